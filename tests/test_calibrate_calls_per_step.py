"""calibrate(..., calls_per_step=N): samplers that call the model N times per step (unbatched
classifier-free guidance) get errors per call, each call compared only with the same call of
earlier steps, and per-step errors that are the maximum over the calls."""

from __future__ import annotations

import copy
import json
import pickle

import models
import numpy as np
import pytest
import torch
from test_pipeline import _unbatched_guidance_loop

import smoothcache_fx
from smoothcache_fx import CalibrationErrors, Schedule

STEPS = 6
LOOKAHEAD = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def _two_generations(cond_model, uncond_model):
    """Two generations of the guidance loop (one seed: the second exercises the boundary)."""
    _unbatched_guidance_loop(cond_model, uncond_model, STEPS)
    _unbatched_guidance_loop(cond_model, uncond_model, STEPS)


def _calibrate_guided(**kwargs) -> CalibrationErrors:
    model = models.diffusers_dit()
    return smoothcache_fx.calibrate(
        model, lambda: _two_generations(model, model), lookahead=LOOKAHEAD, progress=False, **kwargs
    )


@pytest.fixture(scope="module")
def guided():
    """Errors of the 2-calls-per-step loop, generations delimited by the timestep rule."""
    return _calibrate_guided(calls_per_step=2)


@pytest.fixture(scope="module")
def separate():
    """One calibration per call, each of a model that only receives that call's inputs: the other
    call of every step goes to an uncalibrated twin, so latents and timesteps are the same."""
    cond, uncond, twin = models.diffusers_dit(), models.diffusers_dit(), models.diffusers_dit()
    return (
        smoothcache_fx.calibrate(
            cond, lambda: _two_generations(cond, twin), lookahead=LOOKAHEAD, progress=False
        ),
        smoothcache_fx.calibrate(
            uncond, lambda: _two_generations(twin, uncond), lookahead=LOOKAHEAD, progress=False
        ),
    )


# ---------------------------------------------------------------------- the errors


@pytest.mark.parametrize("rule", ["timestep", "steps"])
def test_per_call_errors_equal_a_calibration_of_each_call_alone(guided, separate, rule):
    errors = guided if rule == "timestep" else _calibrate_guided(calls_per_step=2, steps=STEPS)
    assert (errors.steps, errors.calls_per_step, errors.generations) == (STEPS, 2, 2)
    assert errors.metadata["generation_rule"] == rule
    for call, alone in enumerate(separate):
        assert (alone.steps, alone.calls_per_step) == (STEPS, 1)
        assert errors.branches == alone.branches and errors.flops == alone.flops
        for path in alone.branches:
            for k in range(LOOKAHEAD):
                np.testing.assert_allclose(
                    errors.per_call[path][call][k],
                    alone.errors[path][k],
                    rtol=1e-6,
                    atol=1e-9,
                    err_msg=f"call {call} {path} k={k + 1}",
                )
        assert errors.for_call(call).errors.keys() == alone.errors.keys()


def test_step_errors_are_the_max_over_the_calls(guided):
    differ = False
    for path in guided.branches:
        for k in range(LOOKAHEAD):
            cond, uncond = (np.asarray(calls[k]) for calls in guided.per_call[path])
            np.testing.assert_array_equal(guided.errors[path][k], np.maximum(cond, uncond))
            differ |= not np.array_equal(cond, uncond)
    assert differ  # different class labels: the calls' errors are not the same


def test_one_call_per_step_mixes_the_calls(guided):
    """What calibrate reported for this loop before calls_per_step (steps counted per call): each
    call's 'previous output' is the other call's, so lag 1 compares conditional with
    unconditional outputs. The true per-call lag-1 errors hide at lag 2."""
    model = models.diffusers_dit()
    mixed = smoothcache_fx.calibrate(
        model,
        lambda: _unbatched_guidance_loop(model, model, STEPS),
        lookahead=LOOKAHEAD,
        steps=2 * STEPS,
        progress=False,
    )
    assert (mixed.steps, mixed.calls_per_step) == (2 * STEPS, 1)
    for path in guided.branches:
        cond, uncond = (np.asarray(calls[0]) for calls in guided.per_call[path])
        mixed_lag1, mixed_lag2 = (np.asarray(curve) for curve in mixed.errors[path][:2])
        np.testing.assert_allclose(mixed_lag2[0::2], cond, rtol=1e-6)  # c_i against c_(i+1)
        np.testing.assert_allclose(mixed_lag2[1::2], uncond, rtol=1e-6)  # u_i against u_(i+1)
        # The conditional call of step i+1 measured against the unconditional call of step i.
        previous_call = mixed_lag1[1::2]
        assert np.all(previous_call[1:] > cond[1:]), path
        assert not np.allclose(previous_call, guided.errors[path][0], rtol=0.1)


def test_the_timestep_rule_refuses_two_steps_at_one_timestep():
    """Without calls_per_step the second call of each step looks like a step at the same timestep:
    refused with the fix, rather than cut into one-step generations."""
    model = models.diffusers_dit()
    with pytest.raises(ValueError, match=r"two steps in a row had timestep .*pass calls_per_step=N"):
        smoothcache_fx.calibrate(model, lambda: _unbatched_guidance_loop(model, model, STEPS), progress=False)


# ---------------------------------------------------------------------- files


def test_errors_round_trip_and_old_files_still_load(guided, tmp_path):
    data = guided.to_dict()
    assert data["version"] == 3 and len(data["per_call"]["transformer_blocks.0.ff"]) == 2
    loaded = CalibrationErrors.load(guided.save(tmp_path / "errors.json"))
    assert loaded == guided and loaded.calls_per_step == 2 and loaded.per_call == guided.per_call
    assert pickle.loads(pickle.dumps(guided)) == guided
    assert copy.deepcopy(guided) == guided

    single = guided.for_call(0)
    assert "per_call" not in single.to_dict()  # one call: per_call would repeat errors
    old = {key: value for key, value in single.to_dict().items() if key != "per_call"}
    old["version"] = 1  # the shape written before per_call existed
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old), encoding="utf-8")
    loaded = CalibrationErrors.load(path)
    assert loaded == single and loaded.calls_per_step == 1
    assert loaded.per_call == {p: (curves,) for p, curves in single.errors.items()}

    with pytest.raises(ValueError, match=r"unknown fields \['per_call'\]"):
        CalibrationErrors.from_dict({**data, "version": 1})
    with pytest.raises(ValueError, match=r"version must be one of \[1, 2, 3\]; got 4"):
        CalibrationErrors.from_dict({**data, "version": 4})


def test_resampling_keeps_the_max_over_calls(guided):
    moved = guided.resampled(9, lags="time")
    assert (moved.steps, moved.calls_per_step) == (9, 2)
    for call in range(2):
        assert moved.for_call(call).errors == guided.for_call(call).resampled(9, lags="time").errors
    # from_calls checked it when it built `moved`; here once more by hand.
    for path, calls in moved.per_call.items():
        for k in range(LOOKAHEAD):
            np.testing.assert_array_equal(moved.errors[path][k], np.maximum(calls[0][k], calls[1][k]))


def test_hand_built_per_call_errors_are_validated():
    per_call = {"blocks.0.attn": [[[0.1, 0.4]], [[0.3, 0.2]]]}
    errors = CalibrationErrors.from_calls(3, 1, per_call)
    assert errors.errors == {"blocks.0.attn": ((0.3, 0.4),)} and errors.calls_per_step == 2
    assert "calls_per_step=2" in repr(errors)
    with pytest.raises(ValueError, match="per-step maximum over the calls"):
        CalibrationErrors(3, 1, {"blocks.0.attn": [[0.1, 0.4]]}, per_call=per_call)
    with pytest.raises(ValueError, match="same number"):
        CalibrationErrors.from_calls(3, 1, {**per_call, "blocks.1.attn": [[[0.1, 0.4]]]})
    with pytest.raises(ValueError, match=r"per_call\['blocks.0.attn'\] must give every call"):
        CalibrationErrors.from_calls(3, 1, {"blocks.0.attn": [[[0.1, 0.4]], [[0.3]]]})
    with pytest.raises(ValueError, match="at least one call"):
        CalibrationErrors.from_calls(3, 1, {"blocks.0.attn": []})
    with pytest.raises(ValueError, match="call must be an index 0..1"):
        errors.for_call(2)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("calls_per_step", "error"), [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_bad_calls_per_step(calls_per_step, error):
    model = models.diffusers_dit()
    with pytest.raises(error, match=r"calls_per_step must be an int >= 1; got .*\. Pass the model calls"):
        smoothcache_fx.calibrate(
            model, lambda: _unbatched_guidance_loop(model, model, STEPS), calls_per_step=calls_per_step
        )
    assert "smoothcache" not in model.__dict__ and not model._forward_hooks


def test_a_wrong_call_count_is_refused_not_mixed():
    model = models.diffusers_dit()
    # Three calls per step on a two-call loop: the third call is the next step's, at its timestep.
    with pytest.raises(ValueError, match=r"3 calls of a step must share its timestep.*calls_per_step="):
        smoothcache_fx.calibrate(
            model, lambda: _unbatched_guidance_loop(model, model, STEPS), calls_per_step=3, progress=False
        )
    # Two calls per step on a pipeline whose guidance is batched (one call per step).
    pipe = models.dit_pipeline()
    with pytest.raises(ValueError, match="2 calls of a step must share its timestep"):
        smoothcache_fx.calibrate(
            pipe, lambda: pipe(class_labels=[1, 7], num_inference_steps=4), calls_per_step=2, progress=False
        )

    # Whole steps only: a generation that ends after the first call of a step.
    def run():
        _unbatched_guidance_loop(model, model, STEPS)
        with torch.no_grad():
            model(
                torch.randn(2, 4, 8, 8), timestep=torch.tensor([999, 999]), class_labels=torch.tensor([1, 7])
            )

    with pytest.raises(ValueError, match="generation 2 has 1. Pass calls_per_step="):
        smoothcache_fx.calibrate(model, run, steps=STEPS, calls_per_step=2, progress=False)
    assert "smoothcache" not in model.__dict__ and "smoothcache" not in pipe.transformer.__dict__


# ---------------------------------------------------------------------- schedules from them


def test_schedule_from_per_call_errors_drives_a_two_call_loop(guided):
    alpha = float(np.median([v for curves in guided.errors.values() for v in curves[0]]))
    schedule = Schedule.from_errors(guided, alpha)
    assert schedule.steps == STEPS and schedule.metadata["calls_per_step"] == 2
    assert any(0 in mask for mask in schedule.masks.values())  # something is reused
    original = models.diffusers_dit()
    model = smoothcache_fx.transform(copy.deepcopy(original), schedule, calls_per_step=2)
    cached = _unbatched_guidance_loop(model, model, STEPS)
    assert torch.isfinite(cached).all()
    assert model.smoothcache.step == 0 and model.smoothcache.slot == 0  # a whole generation ran
    for path, stats in model.smoothcache.stats.items():
        assert stats["reused"] == 2 * schedule.mask_for(path).count(False), path
    assert not torch.equal(cached, _unbatched_guidance_loop(original, original, STEPS))
