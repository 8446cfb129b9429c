"""`transform(pipe, schedule)`: one pipeline call is one generation of the schedule."""

from __future__ import annotations

import copy

import models
import numpy as np
import pytest
import torch

import smoothcache_fx
from smoothcache_fx import Schedule

STEPS = 6


def _generate(pipe, steps=STEPS):
    return pipe(
        class_labels=[1, 7],
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


@pytest.fixture(scope="module")
def pipelines():
    original = models.dit_pipeline()
    transformed = smoothcache_fx.transform(
        copy.deepcopy(original), Schedule.uniform(STEPS, 2, ["attn1", "ff"])
    )
    return original, transformed


def test_pipeline_transform_swaps_in_the_transformed_model(pipelines):
    original, pipe = pipelines
    assert isinstance(pipe, type(original))
    assert hasattr(pipe.transformer, "smoothcache")
    assert not hasattr(original.transformer, "smoothcache")


def test_three_pipeline_calls_give_the_same_images(pipelines):
    original, pipe = pipelines
    first = _generate(pipe)
    for _ in range(2):
        np.testing.assert_array_equal(_generate(pipe), first)
    assert np.abs(first - _generate(original)).max() > 1e-4  # caching changed something


def test_pipeline_call_resets_a_half_finished_generation(pipelines):
    _, pipe = pipelines
    first = _generate(pipe)
    with torch.no_grad():  # leave the clock in the middle of a generation
        pipe.transformer(
            torch.randn(2, 4, 8, 8), timestep=torch.tensor([5, 5]), class_labels=torch.tensor([1, 2])
        )
    assert pipe.transformer.smoothcache.step == 1
    np.testing.assert_array_equal(_generate(pipe), first)


def test_all_compute_pipeline_equals_original():
    original = models.dit_pipeline()
    pipe = smoothcache_fx.transform(copy.deepcopy(original), Schedule.all_compute(STEPS, ["attn1", "ff"]))
    np.testing.assert_allclose(_generate(pipe), _generate(original), rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [STEPS - 2, STEPS + 2])
def test_pipeline_step_count_must_match_the_schedule(pipelines, steps):
    _, pipe = pipelines
    with pytest.raises(
        ValueError, match=rf"schedule has {STEPS} steps|more than the schedule's {STEPS} steps"
    ):
        _generate(pipe, steps)
    _generate(pipe)  # the runtime is usable again afterwards
