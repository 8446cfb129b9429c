"""`smoothcache-fx calibrate PIPELINE_DIR` and `smoothcache-fx show SCHEDULE`, run as the user runs
them (a subprocess, stderr not a terminal) on a tiny DiT pipeline saved with save_pretrained."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import models
import pytest
import roblox_files

from smoothcache_fx import CalibrationErrors, Schedule

PNG = b"\x89PNG\r\n\x1a\n"
STEPS = 6


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smoothcache_fx.cli", *args], capture_output=True, text=True, timeout=600
    )


def _calibrate_cli(pipeline_dir, out, labels: str, *options: str) -> subprocess.CompletedProcess:
    """`smoothcache-fx calibrate` of the test pipeline over STEPS steps, into `out`."""
    return _cli(
        "calibrate",
        str(pipeline_dir),
        "--steps",
        str(STEPS),
        "--class-labels",
        labels,
        *options,
        "--out",
        str(out),
    )


@pytest.fixture(scope="module")
def dit_pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit-pipeline")
    models.dit_pipeline().save_pretrained(folder)
    return folder


def test_calibrate_writes_errors_schedule_and_plots(dit_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    done = _calibrate_cli(dit_pipeline_dir, out, "1,2", "--alpha", "0.3")
    assert done.returncode == 0, done.stderr
    errors = CalibrationErrors.load(out / "calibration_errors.json")
    schedule = Schedule.load(out / "schedule.json")
    assert errors.steps == STEPS and errors.model_class == "DiTTransformer2DModel"
    assert errors.metadata["solver"] == "DDIMScheduler"
    assert schedule == Schedule.from_errors(errors, alpha=0.3)  # the library's rule, nothing else
    for name in ("errors.png", "schedule.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    assert f"{STEPS} steps, 2 keys" in done.stdout
    computed = sum(schedule.masks["ff"])
    assert f"computed {computed:5d}  reused {STEPS - computed:5d}" in done.stdout
    assert f"ideal speedup {errors.ideal_speedup(schedule):.2f}x" in done.stdout
    # not a terminal: neither calibrate's progress nor diffusers' loading bar
    assert "calibrate:" not in done.stderr and "Loading pipeline components" not in done.stderr


def test_calibrate_with_target_per_block(dit_pipeline_dir, tmp_path):
    done = _calibrate_cli(dit_pipeline_dir, tmp_path, "3", "--target", "1.1", "--per-block")
    assert done.returncode == 0, done.stderr
    schedule = Schedule.load(tmp_path / "schedule.json")
    assert schedule.keys == ("attn1-0", "attn1-1", "ff-0", "ff-1")
    assert schedule.metadata["target"] == 1.1 and schedule.metadata["ideal_speedup"] >= 1.1
    assert schedule.metadata["per_block"] is True


def test_calibrate_with_forecasting_and_a_strength(dit_pipeline_dir, tmp_path):
    done = _calibrate_cli(dit_pipeline_dir, tmp_path, "3", "--max-order", "1", "--strength", "0.75")
    assert done.returncode == 0, done.stderr
    assert CalibrationErrors.load(tmp_path / "calibration_errors.json").max_order == 1
    schedule = Schedule.load(tmp_path / "schedule.json")
    assert schedule.metadata["max_order"] == 1
    # The random test DiT's outputs are not smooth in time: forecasting computes less nowhere, and
    # the schedule keeps reuse (orders {}); the strength applies to forecast keys only.
    assert dict(schedule.strengths) == dict.fromkeys(schedule.orders, 0.75)
    bad = _cli(
        "calibrate",
        str(dit_pipeline_dir),
        "--steps",
        "4",
        "--class-labels",
        "1",
        "--strength",
        "2",
        "--out",
        str(tmp_path),
    )
    assert bad.returncode == 2 and "--strength: must be in [0, 1]" in bad.stderr


def test_summary_names_forecast_orders_and_strengths():
    from smoothcache_fx.cli_pipeline import summary

    schedule = Schedule(4, {"attn1": [1, 0, 1, 0], "ff": [1, 0, 0, 1]}, orders={"attn1": 1, "ff": 2})
    text = summary(schedule.with_strengths({"ff": 0.75}))
    assert "forecast (predictor order) on skipped steps: attn1 1, ff 2" in text
    assert "forecast strength: ff 0.75 (others 1)" in text
    assert "forecast" not in summary(schedule.with_orders({}))


def test_calibrate_refuses_bad_input_with_the_fix(dit_pipeline_dir, tmp_path):
    done = _cli(
        "calibrate", str(dit_pipeline_dir), "--steps", "4", "--prompt", "a cat", "--out", str(tmp_path)
    )
    assert done.returncode == 2 and "DiTPipeline takes no prompt; pass --class-labels" in done.stderr
    done = _cli("calibrate", str(tmp_path), "--steps", "4", "--class-labels", "1", "--out", str(tmp_path))
    assert (
        done.returncode == 2 and "must be a diffusers pipeline folder (with model_index.json" in done.stderr
    )
    done = _cli(
        "calibrate",
        str(dit_pipeline_dir),
        "--steps",
        "4",
        "--alpha",
        "0.1",
        "--target",
        "2",
        "--out",
        str(tmp_path),
    )
    assert done.returncode == 2 and "not allowed with argument" in done.stderr
    assert not (tmp_path / "schedule.json").exists()


def _per_block_file(source: str, tmp_path):
    """A 50-step per-block file for 28 blocks (56 keys, `attn-0` ... `mlp-27`): Roblox's
    `50-N-2-l2c.json` as published (skipped without ../shared/reference-schedules), or one of the
    same format written here."""
    if source == "published":
        path = roblox_files.published("50-N-2-l2c.json")
        if path is None:
            pytest.skip(f"no reference schedules at {roblox_files.REFERENCE_DIR}")
        return path
    return roblox_files.write(tmp_path / "per-block.json", roblox_files.per_block_masks(50, 28))


@pytest.mark.parametrize("source", ["fixture", "published"])
def test_show_summarises_and_writes_the_heatmap(source, tmp_path):
    path = _per_block_file(source, tmp_path)
    done = _cli("show", str(path), "--plot", str(tmp_path / "l2c.png"))
    assert done.returncode == 0, done.stderr
    raw = json.loads(path.read_text(encoding="utf-8"))
    computed = sum(sum(mask) for key, mask in raw.items() if key.startswith("mlp-"))
    assert "50 steps, 56 keys" in done.stdout
    assert re.search(rf"mlp +28 key\(s\) +computed +{computed} +reused +{28 * 50 - computed} ", done.stdout)
    assert "ideal speedup unknown: pass --errors" in done.stdout
    assert (tmp_path / "l2c.png").read_bytes()[:8] == PNG


def test_show_with_errors_gives_the_ideal_speedup(tmp_path):
    errors = CalibrationErrors(
        4,
        1,
        {"blocks.0.attn1": [[0.1, 0.1, 0.1]], "blocks.0.ff": [[0.1, 0.1, 0.1]]},
        flops={"blocks.0.attn1": 30, "blocks.0.ff": 60},
        total_flops=100,
    )
    schedule = Schedule(4, {"attn1": [1, 0, 1, 1], "ff": [1, 0, 0, 1]})
    errors.save(tmp_path / "errors.json")
    schedule.save(tmp_path / "s.json")
    done = _cli(
        "show",
        str(tmp_path / "s.json"),
        "--errors",
        str(tmp_path / "errors.json"),
        "--plot",
        str(tmp_path / "s.png"),
    )
    assert done.returncode == 0, done.stderr
    assert f"ideal speedup {400 / (4 * 10 + 3 * 30 + 2 * 60):.2f}x" in done.stdout
    done = _cli("show", str(tmp_path / "missing.json"))
    assert done.returncode == 2 and f"{str(tmp_path / 'missing.json')!r}, which does not exist" in done.stderr


def test_calibrate_a_text_pipeline_with_a_prompt(tmp_path):
    folder = tmp_path / "pixart"
    models.pixart_text_pipeline().save_pretrained(folder)
    done = _cli(
        "calibrate",
        str(folder),
        "--steps",
        str(STEPS),
        "--prompt",
        "a photo of a red cat",
        "--out",
        str(tmp_path / "out"),
    )
    assert done.returncode == 0, done.stderr
    errors = CalibrationErrors.load(tmp_path / "out" / "calibration_errors.json")
    assert errors.model_class == "PixArtTransformer2DModel" and errors.steps == STEPS
    assert errors.metadata["solver"] == "DPMSolverMultistepScheduler"
    assert Schedule.load(tmp_path / "out" / "schedule.json").keys == ("attn1", "attn2", "ff")
    done = _cli("calibrate", str(folder), "--steps", "2", "--class-labels", "1", "--out", str(tmp_path))
    assert done.returncode == 2 and "PixArtAlphaPipeline takes no class labels; pass --prompt" in done.stderr


def test_heatmap_rows_put_block_numbers_in_numeric_order():
    from smoothcache_fx.plots import schedule_rows

    schedule = Schedule.load(roblox_files.per_block_masks(50, 28))  # as Roblox's 50-N-2-l2c.json
    rows = schedule_rows(schedule)
    assert list(rows)[:3] == ["attn-0", "attn-1", "attn-2"] and list(rows)[27:29] == ["attn-27", "mlp-0"]
    assert rows["mlp-3"] == list(schedule.masks["mlp-3"])
