"""End-to-end equivalence: a 12-step DDIM loop through a transformed model against independent references.

* attn1 schedules on the diffusers DiT and PixArt models: `SmoothCache.DiffuserCacheHelper` from the
  `dit-smoothcache` package (Roblox's own implementation, which patches `attn1.forward`).
* attn1 + attn2 + ff schedules, and the hand-written TinyDiT / TinyUViT (attn, mlp): the test-local
  forward-patching reference in `forward_patching_reference.py`.

"Equal" means `torch.testing.assert_close(rtol=1e-5, atol=1e-6)` on the final latents (elementwise
|actual - expected| <= 1e-6 + 1e-5 * |expected|). Each test also checks that the cached latents differ
from the all-compute latents by far more than that (relative L1 > `MIN_CACHE_EFFECT`), so a transform
that ignored the schedule would fail; against the forward-patching reference, the per-branch
computed/reused counts in `model.smoothcache.stats` must equal the reference's too.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable
from pathlib import Path

import models
import pytest
import torch
from forward_patching_reference import ForwardPatchingReference

import smoothcache_fx
from smoothcache_fx import Schedule

diffusers = pytest.importorskip("diffusers")
with contextlib.redirect_stdout(io.StringIO()):  # the package prints warnings about optional helpers
    SmoothCache = pytest.importorskip("SmoothCache")

STEPS = 12
RTOL, ATOL = 1e-5, 1e-6
# Every schedule below reuses a branch at a quarter or more of the steps; measured on these models,
# that moves the final latents by 0.24 to 1.2 relative L1 from all-compute (a single flipped mask
# entry still moves them by 1e-2), so 0.05 is far above the tolerance and far below any schedule here.
MIN_CACHE_EFFECT = 0.05
REFERENCE_SCHEDULES = Path(__file__).resolve().parents[1].parent / "shared" / "reference-schedules"

IRREGULAR = [1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1]
EVERY_OTHER = [1, 0] * (STEPS // 2)
LATE_SKIPS = [1, 1, 1, 1, 0, 1, 0, 0, 1, 0, 0, 1]

ATTN1_SCHEDULES = {
    "fora-2": Schedule.uniform(STEPS, 2, ["attn1"]),
    "fora-3": Schedule.uniform(STEPS, 3, ["attn1"]),
    "irregular": Schedule(STEPS, {"attn1": IRREGULAR}),
    "per-block": Schedule(STEPS, {"attn1-0": IRREGULAR, "attn1-1": LATE_SKIPS}),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors are tiny: intra-op threads only add overhead, and on a busy 2-core machine their
    spin-waits tripled this file's run time (62 s vs 26 s measured). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- denoising loops ---------------------------------------------------------------------------------
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_loop(denoise: Denoiser, shape: tuple[int, ...], steps: int = STEPS, seed: int = 0) -> torch.Tensor:
    """Final latents of a DDIM loop; `denoise(latents, timesteps)` returns the noise prediction."""
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in scheduler.timesteps:
            noise = denoise(latents, t.expand(shape[0]))
            latents = scheduler.step(noise, t, latents).prev_sample
    return latents


def dit_loop(model, steps: int = STEPS) -> torch.Tensor:
    """DiTPipeline's loop without guidance: learned-sigma split when out_channels = 2 * in_channels."""
    channels = model.config.in_channels
    labels = torch.tensor([1, 7])

    def denoise(latents, t):
        out = model(latents, timestep=t, class_labels=labels).sample
        return out[:, :channels] if model.config.out_channels // 2 == channels else out

    return ddim_loop(denoise, (2, channels, 8, 8), steps)


def pixart_loop(model, steps: int = STEPS) -> torch.Tensor:
    """PixArtAlphaPipeline's loop without guidance: the first in_channels outputs are the noise."""
    channels = model.config.in_channels
    prompt = models.pixart_inputs(batch=2)["encoder_hidden_states"]

    def denoise(latents, t):
        out = model(latents, encoder_hidden_states=prompt, timestep=t).sample
        return out[:, :channels] if model.config.out_channels // 2 == channels else out

    return ddim_loop(denoise, (2, channels, 8, 8), steps)


def tiny_loop(model, steps: int = STEPS) -> torch.Tensor:
    """TinyDiT / TinyUViT take forward(x, t, y) on token sequences."""
    labels = torch.tensor([1, 7])
    return ddim_loop(lambda x, t: model(x, t, labels), (2, models.TOKENS, models.HIDDEN), steps)


LOOPS = {
    "dit": (models.diffusers_dit, dit_loop),
    "pixart": (models.diffusers_pixart, pixart_loop),
    "tiny_dit": (models.TinyDiT, tiny_loop),
    "tiny_uvit": (models.TinyUViT, tiny_loop),
}


# -- runs ----------------------------------------------------------------------------------------------
def _relative_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().sum() / b.abs().sum()).item()


def _transformed_latents(model, loop, schedule: Schedule):
    """Final latents and {branch path: times reused} of smoothcache_fx on a copy of `model`."""
    model = smoothcache_fx.transform(copy.deepcopy(model), schedule)
    latents = loop(model, schedule.steps)
    assert model.smoothcache.step == 0, "the loop ran exactly one generation"
    return latents, {
        path: entry["reused"] for path, entry in model.smoothcache.stats.items() if entry["reused"]
    }


def _smoothcache_latents(model, loop, schedule: Schedule):
    """Roblox's DiffuserCacheHelper; its per-module step counters never reset: one fresh copy per run."""
    model = copy.deepcopy(model)
    helper = SmoothCache.DiffuserCacheHelper(model, schedule={k: list(v) for k, v in schedule.masks.items()})
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per attn1 call
        helper.enable()
        latents = loop(model, schedule.steps)
        helper.disable()
    return latents, None  # it keeps no counts


def _forward_patching_latents(model, loop, schedule: Schedule):
    model = copy.deepcopy(model)
    reference = ForwardPatchingReference(model, schedule.masks)
    with reference:
        latents = loop(model, schedule.steps)
        assert reference.used_keys == set(schedule.keys), "every key patches some module"
    return latents, {path: count for path, count in reference.reused.items() if count}


def _check(name: str, schedule: Schedule, reference: Callable) -> None:
    factory, loop = LOOPS[name]
    model = factory()
    baseline = loop(model, schedule.steps)
    expected, expected_reused = reference(model, loop, schedule)
    actual, reused = _transformed_latents(model, loop, schedule)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    if expected_reused is not None:
        assert reused == expected_reused
    effect = _relative_l1(expected, baseline)
    assert effect > MIN_CACHE_EFFECT, f"caching moved the latents by only {effect:.2e} relative L1"


# -- tests -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ATTN1_SCHEDULES.values(), ids=ATTN1_SCHEDULES.keys())
@pytest.mark.parametrize("name", ["dit", "pixart"])
def test_attn1_schedule_matches_smoothcache(name, schedule):
    _check(name, schedule, _smoothcache_latents)


MULTI_COMPONENT_SCHEDULES = {
    ("dit", "attn1+ff"): Schedule(STEPS, {"attn1": IRREGULAR, "ff": EVERY_OTHER}),
    ("dit", "full-path"): Schedule(
        STEPS, {"attn1": EVERY_OTHER, "ff": LATE_SKIPS, "transformer_blocks.1.ff": IRREGULAR}
    ),
    ("pixart", "attn1+attn2+ff"): Schedule(
        STEPS, {"attn1": EVERY_OTHER, "attn2": IRREGULAR, "ff": LATE_SKIPS, "attn2-1": EVERY_OTHER}
    ),
    ("pixart", "full-path"): Schedule(
        STEPS, {"attn1-0": IRREGULAR, "ff": EVERY_OTHER, "transformer_blocks.0.attn2": LATE_SKIPS}
    ),
    ("tiny_dit", "attn+mlp"): Schedule(STEPS, {"attn": IRREGULAR, "mlp-1": EVERY_OTHER}),
    ("tiny_dit", "full-path"): Schedule(STEPS, {"attn": EVERY_OTHER, "blocks.0.mlp": LATE_SKIPS}),
    ("tiny_uvit", "attn+mlp"): Schedule(
        STEPS, {"attn": EVERY_OTHER, "mlp": IRREGULAR, "out_blocks.1.attn": LATE_SKIPS}
    ),
}


@pytest.mark.parametrize(
    "name, schedule",
    [(name, schedule) for (name, _), schedule in MULTI_COMPONENT_SCHEDULES.items()],
    ids=[f"{name}-{label}" for name, label in MULTI_COMPONENT_SCHEDULES],
)
def test_schedule_matches_forward_patching(name, schedule):
    _check(name, schedule, _forward_patching_latents)


def test_roblox_threshold_schedule_on_tiny_dit():
    """The published 30-step facebookresearch-DiT schedule (keys attn, mlp), loaded unchanged."""
    path = REFERENCE_SCHEDULES / "30-N-3-threshold-0.35.json"
    if not path.exists():
        pytest.skip(f"{path} is absent (shared reference schedules not checked out)")
    schedule = Schedule.load(path)
    assert schedule.steps == 30 and set(schedule.keys) == {"attn", "mlp"}
    _check("tiny_dit", schedule, _forward_patching_latents)


# -- the oracles agree with each other -------------------------------------------------------------------
def test_forward_patching_reference_matches_smoothcache_on_attn1():
    """The test-local oracle is checked against Roblox's on the schedule they both understand."""
    schedule = ATTN1_SCHEDULES["per-block"]
    model = models.diffusers_dit()
    expected, _ = _smoothcache_latents(model, dit_loop, schedule)
    actual, _ = _forward_patching_latents(model, dit_loop, schedule)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_forward_patching_reference_restores_forwards():
    model = models.diffusers_pixart()
    baseline = pixart_loop(model)
    reference = ForwardPatchingReference(
        model, {"attn1": EVERY_OTHER, "attn2": EVERY_OTHER, "ff": EVERY_OTHER}
    )
    with reference:
        assert len(reference.patched) == 6
        cached = pixart_loop(model)
    assert not any("forward" in vars(module) for _, module in model.named_modules())
    torch.testing.assert_close(pixart_loop(model), baseline, rtol=0, atol=0)
    assert _relative_l1(cached, baseline) > MIN_CACHE_EFFECT
