"""Where generations start and end, in every form: a transformed pipeline, the transformer alone
(from its timesteps), and `model.smoothcache.generation()` for custom loops.

The reference for every output is a fresh transform of the same model on the same inputs: what a
generation computes must not depend on what ran before it.
"""

from __future__ import annotations

import contextlib
import copy
import threading

import models
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, HeunDiscreteScheduler
from helpers import pipeline_images

import smoothcache_fx
from smoothcache_fx import Schedule
from smoothcache_fx.generation import AmbiguousGenerationError

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6
SCHEDULE = Schedule.from_dict({"attn1": [1, 0, 1, 0, 1, 1], "ff": [1, 1, 0, 1, 0, 1]})


def _images(pipe, steps=STEPS):
    return pipeline_images(pipe, steps)


def _fresh_pipeline_images(original, steps):
    pipe = copy.deepcopy(original)
    pipe.transformer = smoothcache_fx.transform(pipe.transformer, SCHEDULE)
    return _images(pipe, steps)


def test_transformer_only_form_over_three_generations_of_different_lengths():
    """The README's `pipe.transformer = transform(pipe.transformer, schedule)`: each pipeline call
    starts at step 0, whatever length the one before it had."""
    original = models.dit_pipeline()
    pipe = copy.deepcopy(original)
    pipe.transformer = smoothcache_fx.transform(pipe.transformer, SCHEDULE)
    for steps in (4, 6, 3):
        np.testing.assert_array_equal(_images(pipe, steps), _fresh_pipeline_images(original, steps))


class _Stop(Exception):
    pass


def _loop(model, steps, stop_at=None, scheduler=None, generation=None):
    """A user's own sampling loop (DDIM by default) over the diffusers DiT, optionally raising at
    `stop_at` (the loop dies there) and optionally inside `model.smoothcache.generation()`."""
    scheduler = scheduler or DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    scheduler.set_timesteps(steps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 7])
    outputs = []
    with torch.no_grad(), generation or contextlib.nullcontext():
        for index, t in enumerate(scheduler.timesteps):
            if index == stop_at:
                raise _Stop
            x_in = scheduler.scale_model_input(x, t)
            eps = model(x_in, timestep=t.expand(2), class_labels=y).sample[:, :4]
            outputs.append(eps)
            x = scheduler.step(eps, t, x).prev_sample
    return outputs


def _fresh(original, schedule=SCHEDULE):
    return smoothcache_fx.transform(copy.deepcopy(original), schedule)


def _assert_equal_runs(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stop_at", [2, 3, 5])
def test_a_generation_that_dies_early_does_not_leak_into_the_next(stop_at):
    original = models.diffusers_dit()
    model = _fresh(original)
    with pytest.raises(_Stop):
        _loop(model, STEPS, stop_at=stop_at)
    _assert_equal_runs(_loop(model, STEPS), _loop(_fresh(original), STEPS))


def test_a_generation_that_dies_after_one_step_is_refused_not_guessed():
    """One call, then the loop starts over at the same timestep: from the timesteps alone that is a
    warm-up, a restart or a sampler calling twice per step. Refused with the fix; marked, it runs."""
    original = models.diffusers_dit()
    model = _fresh(original)
    with pytest.raises(_Stop):
        _loop(model, STEPS, stop_at=1)
    with pytest.raises(AmbiguousGenerationError, match=r"calls_per_step"):
        _loop(model, STEPS)
    model.smoothcache.reset()
    _assert_equal_runs(_loop(model, STEPS), _loop(_fresh(original), STEPS))


class _LoopPipeline:
    """The shape of a diffusers pipeline's denoising loop (`transformer`, `scheduler`, the
    `interrupt` check at the top of each step, `callback_on_step_end` after it), around the DiT."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
        self._interrupt = False

    @property
    def interrupt(self):
        return self._interrupt

    def __call__(self, num_inference_steps=STEPS, callback_on_step_end=None):
        self._interrupt = False
        self.scheduler.set_timesteps(num_inference_steps)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for index, t in enumerate(self.scheduler.timesteps):
                if self.interrupt:
                    continue
                eps = self.transformer(x, timestep=t.expand(2), class_labels=torch.tensor([1, 7])).sample
                x = self.scheduler.step(eps[:, :4], t, x).prev_sample
                if callback_on_step_end is not None:
                    callback_on_step_end(self, index, t, {})
        return x


def test_interrupted_pipeline_returns_and_the_next_call_starts_over():
    """diffusers' convention: a step callback sets `pipe._interrupt` and the loop skips the rest;
    the call returns what it has, and the next call is a whole generation from step 0."""
    original = models.diffusers_dit()
    pipe = smoothcache_fx.transform(_LoopPipeline(copy.deepcopy(original)), SCHEDULE)

    def stop_after_three(pipe, index, t, state):
        pipe._interrupt = index == 2
        return state

    pipe(callback_on_step_end=stop_after_three)
    assert pipe.transformer.smoothcache.step == 0 and not pipe.transformer.smoothcache.clock.open
    fresh = smoothcache_fx.transform(_LoopPipeline(copy.deepcopy(original)), SCHEDULE)
    assert torch.equal(pipe(), fresh())


def test_warm_up_with_the_first_timestep_is_refused_and_reset_fixes_it():
    original = models.diffusers_dit()
    model = _fresh(original)
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8), timestep=torch.tensor([999, 999]), class_labels=torch.tensor([1, 7]))
    with pytest.raises(AmbiguousGenerationError, match=r"warm-up call.*generation\(\)"):
        _loop(model, STEPS, scheduler=_trailing())
    model.smoothcache.reset()
    want = _loop(_fresh(original), STEPS, scheduler=_trailing())
    _assert_equal_runs(_loop(model, STEPS, scheduler=_trailing()), want)


def _trailing():
    """DDIM whose first timestep is 999, the timestep a warm-up call is most often made at."""
    return DDIMScheduler(num_train_timesteps=1000, clip_sample=False, timestep_spacing="trailing")


def test_warm_up_at_a_later_timestep_is_refused_at_the_third_call():
    original = models.diffusers_dit()
    model = _fresh(original)
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8), timestep=torch.tensor([0, 0]), class_labels=torch.tensor([1, 7]))
    with pytest.raises(AmbiguousGenerationError, match=r"warm-up call"):
        _loop(model, STEPS)
    # Later generations start cleanly again: the refused one ended where it was refused.
    model.smoothcache.reset()
    _assert_equal_runs(_loop(model, STEPS), _loop(_fresh(original), STEPS))


def test_explicit_generation_for_custom_loops():
    """`generation()` marks step 0 at entry and ends the generation at exit; a warm-up call before
    it is harmless, shorter loops are fine, a loop past the schedule is refused before it runs."""
    original = models.diffusers_dit()
    model = _fresh(original)
    want = _loop(_fresh(original), STEPS)
    with torch.no_grad():  # a warm-up with the generation's own first timestep
        model(torch.randn(2, 4, 8, 8), timestep=torch.tensor([999, 999]), class_labels=torch.tensor([1, 7]))
    _assert_equal_runs(_loop(model, STEPS, generation=model.smoothcache.generation()), want)
    short = _loop(model, 3, generation=model.smoothcache.generation())
    _assert_equal_runs(short, _loop(_fresh(original), 3, generation=None))
    with pytest.raises(ValueError, match=r"already ran the schedule's 6 steps"):
        _loop(model, STEPS + 1, generation=model.smoothcache.generation())
    _assert_equal_runs(_loop(model, STEPS, generation=model.smoothcache.generation()), want)


def test_generations_do_not_nest():
    model = _fresh(models.diffusers_dit())
    outer = model.smoothcache.generation()
    outer.__enter__()
    with pytest.raises(RuntimeError, match="do not nest"), model.smoothcache.generation():
        pass
    outer.__exit__(None, None, None)
    assert not model.smoothcache.clock.open


def test_heun_sampler_with_the_transformer_alone():
    """A second-order sampler repeats each timestep after the first (t0, t1, t1, t2, t2, ...):
    repeats do not start generations; two generations in a row equal two marked ones."""
    original = models.diffusers_dit()
    heun = HeunDiscreteScheduler(num_train_timesteps=1000)
    heun.set_timesteps(4)
    calls = len(heun.timesteps)  # 2 * 4 - 1 model calls per generation
    schedule = Schedule.from_dict({"attn1": [1, 0, 1, 0, 1, 0, 1], "ff": [1, 1, 0, 1, 1, 0, 1]})
    assert schedule.steps == calls
    model = _fresh(original, schedule)
    reference = _fresh(original, schedule)

    def run(m, marked):
        return _loop(
            m,
            4,
            scheduler=HeunDiscreteScheduler(num_train_timesteps=1000),
            generation=m.smoothcache.generation() if marked else None,
        )

    first, second = run(model, False), run(model, False)
    _assert_equal_runs(first, run(reference, True))
    _assert_equal_runs(second, first)
    assert model.smoothcache.generations == 2


def test_pipeline_with_another_step_count_is_refused_before_the_model_runs():
    pipe = smoothcache_fx.transform(models.dit_pipeline(), SCHEDULE)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match=r"num_inference_steps=4, but the schedule has 6 steps.*steps=4"):
        _images(pipe, 4)
    assert not calls


def test_gradients_are_refused_before_the_clock_moves():
    """An input that requires grad with frozen weights: refused, and the clock has not moved, so the
    next generation is right."""
    original = models.diffusers_dit()
    model = _fresh(original)
    model.requires_grad_(False)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="input that requires grad"):
        model(x, timestep=torch.tensor([999, 999]), class_labels=torch.tensor([1, 7]))
    assert model.smoothcache.step == 0 and model.smoothcache.generations == 0
    _assert_equal_runs(_loop(model, STEPS), _loop(_fresh(original), STEPS))


def test_the_reference_cache_write_records_no_autograd_history():
    """The reference path (the CPU op and kernel='inductor' eagerly) writes a value, not history: a
    cache with a grad_fn made every later per-step backward fail ("backward through the graph a
    second time")."""
    from smoothcache_fx.kernels import gated_residual_add_reference

    branch = torch.randn(2, 3, 4, requires_grad=True)
    cache = torch.zeros(2, 3, 4)
    out = gated_residual_add_reference(torch.randn(2, 3, 4), branch, torch.randn(4), cache)
    assert out.requires_grad and not cache.requires_grad and cache.grad_fn is None
    assert torch.equal(cache, branch.detach())


def test_one_model_shared_by_two_threads_is_refused():
    model = _fresh(models.diffusers_dit())
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 7])
    with torch.no_grad():
        model(x, timestep=torch.tensor([999, 999]), class_labels=y)  # this thread's generation
    errors = []

    def other():
        try:
            with torch.no_grad():
                model(x, timestep=torch.tensor([979, 979]), class_labels=y)
        except RuntimeError as error:
            errors.append(str(error))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert errors and "another thread" in errors[0] and "copy.deepcopy" in errors[0]


def test_two_threads_with_their_own_models_capture_at_the_same_time():
    """Captures run torch.export, whose state is process-wide: they are serialised, and both
    models come out right."""
    originals = [models.diffusers_dit(seed=seed) for seed in (0, 1)]
    wants = [_loop(_fresh(original), STEPS) for original in originals]
    results: dict[int, list] = {}
    barrier = threading.Barrier(2)

    def run(index):
        model = _fresh(originals[index])
        barrier.wait()
        results[index] = _loop(model, STEPS)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, want in enumerate(wants):
        _assert_equal_runs(results[index], want)
