"""`Schedule.resample(steps)` and `transform(pipe, schedule, resample=True)`."""

from __future__ import annotations

import copy
import logging

import models
import numpy as np
import pytest
import roblox_files
from helpers import pipeline_images

import smoothcache_fx
from smoothcache_fx import Schedule


def _nearest_reference(mask: tuple[int, ...], steps: int) -> tuple[int, ...]:
    """Step j takes the entry of the original step nearest in normalised time; on an exact tie
    between two steps it computes when either does."""
    source = len(mask) - 1
    out = []
    for j in range(steps):
        where = j * source / (steps - 1)
        low = int(where)
        if where - low < 0.5 or low == source:
            out.append(mask[low])
        elif where - low > 0.5:
            out.append(mask[low + 1])
        else:
            out.append(max(mask[low], mask[low + 1]))
    return tuple(out)


def _per_block_schedule(source: str) -> Schedule:
    """50 steps, per-block keys for 28 blocks (56 masks): Roblox's `50-N-2-l2c.json` as published
    (skipped without ../shared/reference-schedules), or a file of the same format written here."""
    if source == "published":
        path = roblox_files.published("50-N-2-l2c.json")
        if path is None:
            pytest.skip(f"no reference schedules at {roblox_files.REFERENCE_DIR}")
        masks = Schedule.load(path).masks
    else:
        masks = roblox_files.per_block_masks(50, 28)
    return Schedule(50, masks, {"source": source})


@pytest.mark.parametrize("source", ["fixture", "published"])
@pytest.mark.parametrize("steps", [2, 7, 20, 37, 50, 100])
def test_resample_takes_the_nearest_step_in_normalised_time(steps, source):
    schedule = _per_block_schedule(source)
    assert len(schedule.keys) == 56
    resampled = schedule.resample(steps)
    assert resampled.steps == steps and resampled.keys == schedule.keys
    for key, mask in schedule.masks.items():
        assert resampled.masks[key] == _nearest_reference(mask, steps), key
    assert resampled.metadata.get("resampled_from_steps") == (None if steps == 50 else 50)
    assert resampled.metadata["source"] == schedule.metadata["source"]


def test_resample_keeps_the_reuse_share_and_the_origin():
    schedule = Schedule.load(roblox_files.fora_masks(50))  # as Roblox's 50-N-2-fora.json
    assert schedule.resample(50) is schedule
    double = schedule.resample(100)  # no exact ties: each step twice, so 1 1 0 0 1 1 ...
    assert double.masks["attn"][:8] == (1, 1, 0, 0, 1, 1, 0, 0)
    assert abs(double.compute_fraction["attn"] - schedule.compute_fraction["attn"]) < 0.01
    assert double.resample(30).metadata["resampled_from_steps"] == 50  # the first origin is kept


def test_resample_refuses_bad_step_counts():
    schedule = Schedule.uniform(4, 2, ["attn1"])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        schedule.resample(0)
    with pytest.raises(TypeError, match="steps must be an int"):
        schedule.resample("20")


STEPS = 6


def test_pipeline_without_resample_refuses_another_step_count_and_names_the_option():
    pipe = smoothcache_fx.transform(models.dit_pipeline(), Schedule.uniform(STEPS, 2, ["attn1", "ff"]))
    with pytest.raises(ValueError, match=r"num_inference_steps=4.*resample=True"):
        pipeline_images(pipe, 4)


def test_pipeline_with_resample_runs_the_resampled_schedule(caplog):
    original = models.dit_pipeline()
    schedule = Schedule(STEPS, {"attn1": [1, 0, 0, 1, 0, 1], "ff": [1, 1, 0, 1, 0, 1]})
    pipe = smoothcache_fx.transform(copy.deepcopy(original), schedule, resample=True)
    for steps in (4, 9):
        direct = smoothcache_fx.transform(copy.deepcopy(original), schedule.resample(steps))
        with caplog.at_level(logging.INFO, logger="smoothcache_fx"):
            caplog.clear()
            first = pipeline_images(pipe, steps)
            again = pipeline_images(pipe, steps)
        lines = [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()]
        assert len(lines) == 1 and f"resampled to {steps} steps" in lines[0]  # logged once
        np.testing.assert_array_equal(first, pipeline_images(direct, steps))
        np.testing.assert_array_equal(again, first)
        assert pipe.transformer.smoothcache.schedule == schedule.resample(steps)
    fixed = smoothcache_fx.transform(copy.deepcopy(original), schedule)
    np.testing.assert_array_equal(pipeline_images(pipe, STEPS), pipeline_images(fixed, STEPS))
    assert pipe.transformer.smoothcache.schedule == schedule


def test_resample_needs_a_pipeline():
    with pytest.raises(ValueError, match="resample=True needs a diffusers pipeline"):
        smoothcache_fx.transform(models.diffusers_dit(), Schedule.uniform(4, 2, ["attn1"]), resample=True)
