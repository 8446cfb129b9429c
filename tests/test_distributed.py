"""calibrate and `smoothcache-fx calibrate` across two processes (torchrun, gloo on the CPU), each
checked against one process running every rank's generations in rank order."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import models
import numpy as np
import pytest
import torch

import smoothcache_fx
from smoothcache_fx import CalibrationErrors, Schedule
from smoothcache_fx.calibrate_distributed import resolve_group
from smoothcache_fx.cli_distributed import Launch, share

pytestmark = pytest.mark.usefixtures("one_thread")
WORKER = Path(__file__).with_name("distributed_worker.py")
CLI_STEPS = 4


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)


def _ranks(case: str, tmp_path: Path) -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    done = _torchrun(str(WORKER), case, str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text(encoding="utf-8")) for rank in (0, 1)]


def _assert_same_errors(found: CalibrationErrors, expected: CalibrationErrors) -> None:
    assert (found.steps, found.lookahead, found.generations) == (
        expected.steps,
        expected.lookahead,
        expected.generations,
    )
    assert found.branches == expected.branches and found.model_class == expected.model_class
    assert dict(found.flops) == dict(expected.flops) and found.total_flops == expected.total_flops
    assert dict(found.metadata) == dict(expected.metadata)
    for path, calls in expected.per_call.items():
        for call, found_call in zip(calls, found.per_call[path], strict=True):
            for curve, found_curve in zip(call, found_call, strict=True):
                np.testing.assert_allclose(found_curve, curve, rtol=1e-12, atol=0)
    assert set(found.forecast) == set(expected.forecast)
    for path, predictors in expected.forecast.items():
        assert set(found.forecast[path]) == set(predictors)
        for key, curve in predictors.items():
            np.testing.assert_allclose(found.forecast[path][key], curve, rtol=1e-12, atol=0)


@pytest.mark.timeout(300)
def test_calibrate_over_two_ranks_equals_one_process_over_all_generations(tmp_path):
    ranks = _ranks("calibrate", tmp_path)
    assert ranks[0]["subgroup"] == "generations=2"  # a group of rank 0 alone: its own generations
    assert ranks[1]["subgroup"].startswith("process_group must include this process (rank 1)")
    for result in ranks:
        del result["subgroup"]
    assert ranks[0] == ranks[1]  # every rank returns the same errors and derives the same schedule
    model = worker.tiny_dit()

    def every_generation():  # rank 0's, then rank 1's: 2 + 1, so an unweighted mean of ranks differs
        for rank in (0, 1):
            for seed in worker.GENERATIONS[rank]:
                worker.generate(model, worker.STEPS, seed)

    expected = smoothcache_fx.calibrate(
        model, every_generation, lookahead=worker.LOOKAHEAD, progress=False, max_order=worker.MAX_ORDER
    )
    found = CalibrationErrors.from_dict(ranks[0]["errors"])
    assert found.generations == 3 and expected.forecast  # predictor errors are combined too
    _assert_same_errors(found, expected)
    assert Schedule.from_dict(ranks[0]["schedule"]) == Schedule.from_errors(
        expected, alpha=worker.ALPHA, max_order=worker.MAX_ORDER
    )


@pytest.mark.timeout(300)
def test_ranks_that_disagree_are_refused_on_every_rank(tmp_path):
    ranks = _ranks("steps", tmp_path / "steps")
    for result in ranks:
        assert result["raised"] == "ValueError"
        assert "rank 1 differs from rank 0 in steps: 6 vs 5" in result["message"]
        assert "Give every rank the same model" in result["message"]
    failed = _ranks("failure", tmp_path / "failure")
    assert failed[1] == {"raised": "RuntimeError", "message": "this rank's sampler broke"}
    assert failed[0]["raised"] == "RuntimeError"
    assert failed[0]["message"].startswith("calibrate failed on rank 1 of 2, so no rank can finish it")
    assert "this rank's sampler broke" in failed[0]["message"]


def test_process_group_argument():
    assert resolve_group(None) is None  # not initialised: this process alone
    assert resolve_group(False) is None
    with pytest.raises(ValueError, match="process_group must belong to an initialised torch.distributed"):
        resolve_group(object())
    model = worker.tiny_dit()
    alone = smoothcache_fx.calibrate(
        model, lambda: worker.generate(model, 3, 0), lookahead=1, progress=False, process_group=False
    )
    assert alone.generations == 1 and alone.steps == 3


def test_items_are_shared_in_contiguous_chunks_in_rank_order():
    items = [1, 2, 3, 4, 5]
    chunks = [share(items, Launch(rank, 3, "cpu"), "--class-labels") for rank in range(3)]
    assert chunks == [[1, 2], [3, 4], [5]]
    assert share(items, Launch(0, 1, "cpu"), "--class-labels") == items
    with pytest.raises(ValueError, match=r"--prompt must give at least one item per process; got 1 for 2"):
        share(["a cat"], Launch(1, 2, "cpu"), "--prompt")


@pytest.fixture(scope="module")
def dit_pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit-pipeline")
    models.dit_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.timeout(300)
def test_cli_calibrate_under_torchrun_writes_one_folder_equal_to_one_process(dit_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    done = _torchrun(
        "-m",
        "smoothcache_fx.cli",
        "calibrate",
        str(dit_pipeline_dir),
        "--steps",
        str(CLI_STEPS),
        "--class-labels",
        "1,2,3",
        "--alpha",
        "0.3",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1 and "on 2 processes" in done.stdout  # rank 0 alone reports
    assert sorted(p.name for p in out.iterdir()) == [
        "calibration_errors.json",
        "errors.png",
        "schedule.json",
        "schedule.png",
    ]
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(dit_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = smoothcache_fx.calibrate(pipe, lambda: _every_share(pipe, CLI_STEPS), progress=False)
    _assert_same_errors(CalibrationErrors.load(out / "calibration_errors.json"), expected)
    assert Schedule.load(out / "schedule.json") == Schedule.from_errors(expected, alpha=0.3)


def _every_share(pipe, steps: int) -> np.ndarray:
    """What two ranks generate from labels 1,2,3, in one process: rank 0 labels 1,2 from seed 0,
    then rank 1 label 3 from seed 1 (`cli_distributed.share`, seed + rank)."""
    images = [
        pipe(
            class_labels=labels,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images
        for seed, labels in enumerate(([1, 2], [3]))
    ]
    return np.concatenate(images)


@pytest.mark.timeout(300)
def test_data_parallel_generation_equals_one_process(tmp_path):
    """benchmarks/data_parallel.py: each rank calibrates on its share (one schedule for all), then
    transforms its own pipeline and generates; the images equal one process doing every share."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "data_parallel.py"
    out = tmp_path / "images.npz"
    done = _torchrun(str(script), "--labels", "1,2,3", "--steps", "6", "--alpha", "0.3", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "one schedule on every rank: True" in done.stdout
    found = np.load(out)
    assert found["labels"].tolist() == [1, 2, 3]
    pipe = models.dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    errors = smoothcache_fx.calibrate(pipe, lambda: _every_share(pipe, 6), progress=False)
    schedule = Schedule.from_errors(errors, alpha=0.3)
    assert 0 < sum(schedule.masks["ff"]) < 6  # something is reused, so the caches are exercised
    smoothcache_fx.transform(pipe, schedule)
    np.testing.assert_allclose(found["images"], _every_share(pipe, 6), rtol=0, atol=1e-6)


def test_cli_takes_several_prompts():
    from smoothcache_fx.cli_pipeline import _conditioning

    pipe = models.pixart_text_pipeline()
    args = argparse.Namespace(class_labels=None, prompt=["a cat", "a dog"])
    assert _conditioning(pipe, args) == ("prompt", ["a cat", "a dog"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_context_parallel_transformed_model_equals_one_process(family, tmp_path):
    """diffusers' Ulysses context parallelism over two gloo ranks on a transformed model (transform
    first): every step equals the transformed model in one process, and the reused steps differ
    from the uncached model, so the caches were read. Flux's plan hooks only the model, Wan's also
    `blocks.0`: transforming after enable_parallelism warns that the hooked block runs uncached."""
    for result in _ranks(f"context-parallel-{family}", tmp_path):
        assert max(result["differences"]) <= 1e-6, result["differences"]
        assert min(result["uncached_differences"][1::2]) > 1e-4  # steps 1 and 3 reuse every branch
        assert all(s == {**s, "computed": 2, "reused": 2} for s in result["stats"].values())
        if family == "wan":
            assert any(path.startswith("blocks.0.") for path in result["stats"])
            (warning,) = result["late_warnings"]
            assert "blocks ['blocks.0'] have their forward replaced on the instance" in warning
            assert "Call transform before adding such hooks" in warning
        else:
            assert result["late_warnings"] == []


def test_a_block_with_its_forward_replaced_warns_and_strict_refuses():
    import inspect

    model = worker.tiny_dit()
    hooked = model.blocks[1]
    hooked.forward = hooked.forward  # what a diffusers hook registry does: a bound method on the instance
    with pytest.warns(UserWarning, match=r"blocks \['blocks.1'\] have their forward replaced"):
        smoothcache_fx.transform(model, Schedule.uniform(4, 2, ["attn", "mlp"]))
    # the class's forward keeps the block's parameters, for hooks that bind arguments by name
    assert inspect.signature(type(model.blocks[0]).forward) == inspect.signature(models.DiTBlock.forward)
    smoothcache_fx.untransform(model)
    with pytest.raises(NotImplementedError, match=r"strict=True"):
        smoothcache_fx.transform(model, Schedule.uniform(4, 2, ["attn", "mlp"]), strict=True)
    with pytest.raises(NotImplementedError, match="has its forward replaced on the instance"):
        model.forward = model.forward
        smoothcache_fx.transform(model, Schedule.uniform(4, 2, ["attn", "mlp"]), form="graph")
