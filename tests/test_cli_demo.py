"""`smoothcache-fx demo` end to end at reduced size, and its bad inputs."""

from __future__ import annotations

import json
import re

import pytest
from helpers import random_errors

from smoothcache_fx.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--steps",
            "8",
            "--per-class",
            "1",
            "--quality-per-class",
            "2",
            "--no-compile",
            "--repeats",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    for name in (
        "samples.png",
        "schedule.png",
        "errors.png",
        "schedule.json",
        "results.json",
        "calibration_errors.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 8 and results["samples"] == 10 and results["quality_samples"] == 20
    assert results["ideal_speedup"] >= 1.0
    assert results["psnr_db"] > 10
    assert 0 <= results["accuracy_cached"] <= 1 and 0 <= results["accuracy_uncached"] <= 1
    assert set(results["timings_s"]) == {"eager", "eager + SmoothCache"}
    assert all(seconds > 0 for seconds in results["timings_s"].values())
    assert results["speed_quality_curve"], "the default picks a target from a measured curve"
    # Reuse and forecast schedules are both candidates; the result says which kind it chose.
    kinds = {point["kind"] for point in results["speed_quality_curve"]}
    assert kinds == {"reuse", "forecast", "damped"}
    assert {"per comp.", "per block", "uniform"} <= {p["keying"] for p in results["speed_quality_curve"]}
    damped = [p for p in results["speed_quality_curve"] if p["kind"] == "damped"]
    assert all(set(p["strengths"].values()) == {0.75} for p in damped if p["orders"])
    schedule = results["schedule"]
    forecast = "damped forecast" if schedule.get("strengths") else "forecast"
    assert results["schedule_kind"] == (forecast if schedule["orders"] else "reuse")
    table = capsys.readouterr().out
    assert "achieved speedup" in table and "PSNR" in table
    assert f"schedule: {results['schedule_kind']}" in table
    assert "chose the" in table or "no candidate kept the quality bar" in table


def test_unknown_option_is_rejected(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--fastest"])
    assert info.value.code == 2
    assert "unrecognized arguments: --fastest" in capsys.readouterr().err


@pytest.mark.parametrize("strength", ["1.5", "-0.1", "nan"])
def test_strength_out_of_range_is_rejected(capsys, strength):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--strength", strength])
    assert info.value.code == 2
    assert "--strength: must be in [0, 1]" in capsys.readouterr().err


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--steps", "4", "--out", str(blocker / "sub")]) == 2
    assert "--out must be a writable folder" in capsys.readouterr().err


def _demo_with_schedule(tmp_path, masks: dict) -> int:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(masks))
    args = ["demo", "--steps", "4", "--per-class", "1", "--schedule", str(path), "--out", str(tmp_path / "o")]
    return main(args)


def test_schedule_file_for_another_model(tmp_path, capsys):
    assert _demo_with_schedule(tmp_path, {"attn": [1, 0, 1, 1], "mlp": [1, 0, 1, 1]}) == 2
    assert "match no branch of the demo DiT" in capsys.readouterr().err


def test_schedule_file_with_another_step_count(tmp_path, capsys):
    assert _demo_with_schedule(tmp_path, {"attn1": [1, 0, 1], "ff": [1, 1, 1]}) == 2
    assert "Pass --steps 3" in capsys.readouterr().err


@pytest.fixture
def no_model_work(monkeypatch):
    """Makes loading the demo model fail the test: a bad --schedule must be refused before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the demo loaded its model before checking --schedule")

    monkeypatch.setattr("smoothcache_fx.demo.job.load_demo_model", refuse)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"missing\.json', which does not exist\. Check the path"),
        (b"\x89PNG\r\n\x1a\n\xff\xfe", r"missing\.json' must be JSON text in UTF-8.*not a binary file"),
        (b'{"attn1": "1011"}', r"missing\.json: the mask for 'attn1' must be a list of 0/1"),
        (b'{"attn1": [1, 0, 1, 1], "ff": [1, 0, 2, 1]}', r"missing\.json: mask values must be 0 or 1"),
    ],
    ids=["missing", "binary", "mask-type", "mask-value"],
)
def test_bad_schedule_file_fails_before_any_model_work(tmp_path, capsys, no_model_work, content, message):
    path = tmp_path / "missing.json"
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "o"
    assert main(["demo", "--steps", "4", "--schedule", str(path), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert re.search(rf"^smoothcache-fx demo: error: .*{message}", captured.err), captured.err
    assert "calibrating" not in captured.out and not out.exists()


def test_conflicting_schedule_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--alpha", "0.1", "--target", "1.5"])
    assert "at most one of" in capsys.readouterr().err


def test_profile_command_reports_the_schedule(tmp_path, capsys):
    schedule = tmp_path / "s.json"
    schedule.write_text(json.dumps({"attn1": [1, 0, 1, 0, 1, 1], "ff": [1, 1, 1, 0, 1, 1]}))
    trace, report = tmp_path / "trace.json", tmp_path / "report.json"
    code = main(["profile", "--schedule", str(schedule), "--trace", str(trace), "--json", str(report)])
    assert code == 0
    out = capsys.readouterr().out
    assert "ideal speedup" in out and "smoothcache_fx::gated_residual_add" in out
    data = json.loads(report.read_text())
    computed = [len(step["computed"]) for step in data["steps"]]
    blocks = 6  # the demo DiT: attn1 + ff per block
    assert computed == [2 * blocks, blocks, 2 * blocks, 0, 2 * blocks, 2 * blocks]
    assert "smoothcache/step 3" in trace.read_text()


def test_profile_command_rejects_a_schedule_for_another_model(tmp_path, capsys):
    schedule = tmp_path / "s.json"
    schedule.write_text(json.dumps({"attn": [1, 0, 1], "mlp": [1, 0, 1]}))
    assert main(["profile", "--schedule", str(schedule)]) == 2
    assert "match no branch of the demo DiT" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert re.fullmatch(r"smoothcache-fx \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_calibration_progress_only_on_a_terminal(capsys):
    """A redrawn progress bar in a log file is one line per update: none when stderr is not a tty."""
    from smoothcache_fx.calibrate_record import Progress

    progress = Progress(True)
    progress.update(1, 0)
    progress.close()
    assert capsys.readouterr().err == ""


def test_candidate_scan_stops_a_family_at_its_first_failed_setting():
    """A faster setting that passes after a slower one failed is not chosen, and not even tried:
    on the demo's few samples such a pass is a lucky draw (the first demo runs picked one)."""
    from smoothcache_fx.demo.candidates import calibrated_families, scan_candidates

    errors = random_errors()
    verdicts = iter([True, False] + [True, True, False])  # per component, then per block
    evaluated = []

    def evaluate(schedule):
        evaluated.append(schedule)
        return {
            "ideal_speedup": errors.ideal_speedup(schedule),
            "psnr_db": 30.0,
            "accuracy": 1.0,
            "keeps_quality": next(verdicts),
        }

    lines = []
    families = calibrated_families(errors, "reuse", 0, 1.0, (1.1, 1.3, 1.5, 1.7))
    best, curve = scan_candidates(families, evaluate, lines.append)
    # per component: 1.1 passes, 1.3 fails, so 1.5 and 1.7 are not tried; per block: 1.1 and 1.3
    # pass, 1.5 fails, 1.7 not tried
    assert [(p["per_block"], p["target"], p["keeps_quality"]) for p in curve] == [
        (False, 1.1, True),
        (False, 1.3, False),
        (True, 1.1, True),
        (True, 1.3, True),
        (True, 1.5, False),
    ]
    assert len(evaluated) == 5
    assert best[1]["per_block"] and best[1]["target"] == 1.3
    assert best[0] is evaluated[3]
    assert any("not trying target 1.50x, target 1.70x" in line for line in lines)


def test_piecewise_family_computes_the_middle_twice_as_often():
    from smoothcache_fx.demo.candidates import piecewise_family

    family = piecewise_family(20, ("attn1", "ff"), 0.75, (2, 3, 10))
    assert family.kind == "damped" and family.keying == "piecewise"
    assert family.settings == ("every 4/2/4", "every 6/3/6")  # 2 * 10 >= steps
    schedule = family.build(0)
    # every 4th up to step 6, every 2nd from 6 to 14, every 4th from 14; steps 1 and 19
    assert schedule.masks["ff"] == (1, 1, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 1, 1)
    assert schedule.masks["attn1"] == schedule.masks["ff"]
    assert dict(schedule.orders) == {"attn1": 1, "ff": 1}
    assert dict(schedule.strengths) == {"attn1": 0.75, "ff": 0.75}
    assert piecewise_family(20, ("ff",), 1.0, (2,)).kind == "forecast"


def test_uniform_family_forecasts_every_nth_step_damped():
    from smoothcache_fx.demo.candidates import scan_candidates, uniform_family

    family = uniform_family(12, ("attn1", "ff"), 0.75, (2, 3, 4, 20))
    assert family.kind == "damped" and family.settings == ("every 2", "every 3", "every 4")  # 20 >= steps
    schedule = family.build(1)
    assert schedule.masks["attn1"] == (1, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 1)  # every 3rd, step 1 and the last
    assert dict(schedule.orders) == {"attn1": 1, "ff": 1} and dict(schedule.strengths) == {
        "attn1": 0.75,
        "ff": 0.75,
    }
    assert uniform_family(12, ("ff",), 1.0, (2,)).kind == "forecast"
    points = []
    best, curve = scan_candidates(
        [family],
        lambda s: {
            "ideal_speedup": 1.0 / s.compute_fraction["ff"],
            "psnr_db": 30.0,
            "accuracy": 1.0,
            "keeps_quality": True,
        },
        points.append,
    )
    assert [p["setting"] for p in curve] == ["every 2", "every 3", "every 4"]
    assert best[1]["setting"] == "every 4" and best[1]["alpha"] is None and best[1]["target"] is None
    assert "alpha" not in points[0]
