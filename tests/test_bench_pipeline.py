"""Smoke test of benchmarks/bench_pipeline.py at a tiny size: it runs, checks its rows, writes JSON.

The benchmark's figures are not asserted (timings on a shared CPU mean nothing at this size); what is
asserted is that the rows it reports are correct: all-compute equals the original, smoothcache_fx
equals dit-smoothcache on an attn1-only schedule, and FLOP-based ideal speedups follow the schedule.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "bench_pipeline.py"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_pipeline

        yield bench_pipeline
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_tiny_run_reports_correct_rows(tmp_path):
    out = tmp_path / "tiny.json"
    result = _run(
        "--config", "tiny", "--steps", "4", "--repeats", "1", "--threads", "1",
        "--rows", "eager,helper,sc-eager", "--schedules", "all-compute,fora2,fora2-attn1",
        "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ach/ideal" in result.stdout and "MISMATCH" not in result.stdout
    rows = {row["row"]: row for row in json.loads(out.read_text())["rows"]}
    # the helper runs attn1 only, so its fora2-attn1 row would repeat its fora2 row and is skipped
    assert set(rows) == {
        "eager", "helper all-compute", "helper fora2",
        "sc-eager all-compute", "sc-eager fora2", "sc-eager fora2-attn1",
    }  # fmt: skip
    assert rows["sc-eager all-compute"]["reference"] == "eager"
    assert rows["sc-eager all-compute"]["ref_max_abs_diff"] == 0.0
    assert rows["sc-eager fora2-attn1"]["reference"] == "helper fora2"
    assert rows["sc-eager fora2-attn1"]["ref_max_abs_diff"] == 0.0
    assert rows["sc-eager fora2"]["rel_err_vs_eager"] > 0  # caching changes the output
    assert rows["eager"]["ideal_speedup"] == 1.0
    assert 1 < rows["sc-eager fora2-attn1"]["ideal_speedup"] < rows["sc-eager fora2"]["ideal_speedup"]
    assert all(row["repeatable"] and row["median_s"] > 0 for row in rows.values())
    assert rows["sc-eager fora2"]["cache_bytes"] > 0 and rows["eager"]["cache_bytes"] == 0


def test_help_and_cpu_skip_of_xl(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--help"])
    assert exit_info.value.code == 0 and "--schedules" in capsys.readouterr().out
    assert bench.main(["--config", "XL", "--device", "cpu"]) == 0
    assert "GPU only" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--rows must be"):
        bench.parse_args(["--rows", "eager,nope"])


def test_alpha_schedule_keys_and_resampling(bench):
    schedule = bench.alpha_schedule(50)
    assert set(schedule.masks) == {"attn1", "ff"}
    reference = bench.reference_schedule_dir() / bench.REFERENCE_SCHEDULE
    if reference.is_file():
        raw = json.loads(reference.read_text())
        assert list(schedule.masks["attn1"]) == raw["attn"] and list(schedule.masks["ff"]) == raw["mlp"]
    for steps in (1, 4, 20, 70):
        mask = bench.alpha_schedule(steps).masks["attn1"]
        assert len(mask) == steps and mask[0] == 1 and mask[-1] == 1
    assert bench.resample_mask([1, 0, 1, 0, 1], 3) == [1, 1, 1]
    assert bench.alpha_like_mask(10)[0] == 1 and bench.alpha_like_mask(10)[-1] == 1


def test_every_schedule_builds_with_the_expected_variant_count(bench):
    variants = {"all-compute": 1, "fora2": 2, "fora3": 2, "fora2-4": 3, "fora2-attn1": 2}
    for name, count in variants.items():
        masks = bench.make_schedule(name, 8).masks
        assert len({tuple(m[i] for m in masks.values()) for i in range(8)}) == count, name
