"""`transform(pipe, schedule)`: one pipeline call is one generation of the schedule."""

from __future__ import annotations

import copy

import models
import numpy as np
import pytest
import torch
from helpers import pipeline_images

import smoothcache_fx
from smoothcache_fx import Schedule

STEPS = 6


def _generate(pipe, steps=STEPS):
    return pipeline_images(pipe, steps)


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


def _unbatched_guidance_loop(cond_model, uncond_model, steps: int, scale: float = 3.0):
    """DDIM with classifier-free guidance as two model calls per step (as Wan and Lumina2 do)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    scheduler.set_timesteps(steps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, null = torch.tensor([1, 7]), torch.tensor([0, 0])
    with torch.no_grad():
        for t in scheduler.timesteps:
            timestep = t.expand(2)
            eps_cond = cond_model(x, timestep=timestep, class_labels=cond).sample[:, :4]
            eps_null = uncond_model(x, timestep=timestep, class_labels=null).sample[:, :4]
            x = scheduler.step(eps_null + scale * (eps_cond - eps_null), t, x).prev_sample
    return x


def test_two_calls_per_step_keep_a_cache_per_call():
    """calls_per_step=2 equals two independently transformed models, one per call of the step: the
    unconditional call never reads the conditional call's cache."""
    steps = 6
    schedule = Schedule.from_dict({"attn1": [1, 0, 1, 0, 0, 1], "ff": [1, 1, 0, 1, 0, 1]})
    original = models.diffusers_dit()
    model = smoothcache_fx.transform(copy.deepcopy(original), schedule, calls_per_step=2)
    cond_model = smoothcache_fx.transform(copy.deepcopy(original), schedule)
    uncond_model = smoothcache_fx.transform(copy.deepcopy(original), schedule)

    got = _unbatched_guidance_loop(model, model, steps)
    want = _unbatched_guidance_loop(cond_model, uncond_model, steps)
    assert torch.equal(got, want)
    assert model.smoothcache.step == 0 and model.smoothcache.slot == 0  # a whole generation ran
    assert model.smoothcache.stats["transformer_blocks.0.attn1"] == {
        "computed": 6,  # 3 steps x 2 calls
        "reused": 6,
        "forecast": 0,
        "order": 0,
        "strength": 1.0,
        "cache_bytes": 2 * cond_model.smoothcache.stats["transformer_blocks.0.attn1"]["cache_bytes"],
    }
    assert not torch.equal(_unbatched_guidance_loop(original, original, steps), want)  # it reused


def test_calls_per_step_arguments_and_pipeline_count():
    with pytest.raises(ValueError, match="calls_per_step must be a positive int"):
        smoothcache_fx.transform(models.diffusers_dit(), Schedule.uniform(4, 2, ["attn1"]), calls_per_step=0)
    with pytest.raises(ValueError, match="calls_per_step > 1 needs form='variants'"):
        smoothcache_fx.transform(
            models.diffusers_dit(), Schedule.uniform(4, 2, ["attn1"]), form="graph", calls_per_step=2
        )
    pipe = smoothcache_fx.transform(
        models.dit_pipeline(), Schedule.uniform(STEPS, 2, ["attn1"]), calls_per_step=2
    )
    with pytest.raises(ValueError, match=rf"{STEPS} steps x 2 calls per step"):
        _generate(pipe)  # DiTPipeline batches its guidance: one call per step


def test_two_calls_per_step_keep_a_history_per_call():
    """The same with forecasting: each call of a step forecasts from its own history."""
    steps = 6
    schedule = Schedule(
        6, {"attn1": [1, 0, 1, 0, 0, 1], "ff": [1, 1, 0, 1, 0, 1]}, orders={"attn1": 1, "ff": 2}
    )
    original = models.diffusers_dit()
    model = smoothcache_fx.transform(copy.deepcopy(original), schedule, calls_per_step=2)
    cond_model = smoothcache_fx.transform(copy.deepcopy(original), schedule)
    uncond_model = smoothcache_fx.transform(copy.deepcopy(original), schedule)
    got = _unbatched_guidance_loop(model, model, steps)
    assert torch.equal(got, _unbatched_guidance_loop(cond_model, uncond_model, steps))
    reuse = smoothcache_fx.transform(copy.deepcopy(original), schedule.with_orders({}), calls_per_step=2)
    assert not torch.equal(got, _unbatched_guidance_loop(reuse, reuse, steps))  # it forecast
    stats = model.smoothcache.stats["transformer_blocks.0.attn1"]
    assert (stats["order"], stats["forecast"], stats["reused"]) == (1, 6, 0)  # 3 skipped steps x 2 calls
    assert (
        stats["cache_bytes"]
        == 2 * 2 * cond_model.smoothcache.stats["transformer_blocks.0.attn1"]["cache_bytes"] // 2
    )
