"""Calibrated predictor errors and the schedules that choose predictor orders from them."""

from __future__ import annotations

import copy

import models
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from forward_patching_reference import ForwardPatchingReference
from helpers import run_steps, tiny_call

import smoothcache_fx
from smoothcache_fx import CalibrationErrors, Schedule
from smoothcache_fx.schedules.from_errors import forecast_mask, smoothcache_mask

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 12


def _ddim_tiny(model, steps: int = STEPS, seed: int = 0):
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    x, labels = models.tiny_dit_inputs(seed=seed)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(2), labels), t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def calibration():
    torch.manual_seed(0)
    model = models.TinyDiT(depth=2)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        errors = smoothcache_fx.calibrate(model, lambda: _ddim_tiny(model), max_order=2, progress=False)
    return reference, errors


def _outputs(model) -> dict[str, list[torch.Tensor]]:
    """Every step's attn / mlp output of the untransformed model, by forward hooks."""
    outputs: dict[str, list[torch.Tensor]] = {}
    hooks = [
        getattr(block, name).register_forward_hook(
            lambda m, a, out, key=f"blocks.{i}.{name}": outputs.setdefault(key, []).append(out.double())
        )
        for i, block in enumerate(model.blocks)
        for name in ("attn", "mlp")
    ]
    with torch.no_grad():
        _ddim_tiny(model)
    for hook in hooks:
        hook.remove()
    return outputs


@pytest.mark.parametrize("key", ["1/1/1", "1/2/3", "1/3/4", "2/1/1/1", "2/2/3/1", "2/3/2/4"])
def test_predictor_errors_equal_a_polynomial_fit_by_hand(calibration, key):
    """The error of forecasting step t from the history a key names, against numpy's polyfit
    through those outputs (exact fit: as many points as coefficients), in float64."""
    reference, errors = calibration
    order, lag, *gaps = (int(v) for v in key.split("/"))
    for path, series in _outputs(reference).items():
        recorded = errors.forecast[path][key]
        for t in range(STEPS):
            nodes = [t - lag]
            for gap in gaps:
                nodes.append(nodes[-1] - gap)
            if nodes[-1] < 0:
                assert recorded[t] == float("inf")
                continue
            stacked = torch.stack([series[n] for n in nodes]).reshape(len(nodes), -1).numpy()
            fit = np.polyfit(np.array(nodes, dtype=float), stacked, order)
            prediction = sum(c * float(t) ** p for p, c in enumerate(fit[::-1]))
            actual = series[t].reshape(-1).numpy()
            want = np.abs(prediction - actual).sum() / np.abs(actual).sum()
            assert recorded[t] == pytest.approx(want, rel=1e-4, abs=1e-6), (path, t)


def test_errors_with_predictors_round_trip_and_older_files_load(calibration, tmp_path):
    _, errors = calibration
    loaded = CalibrationErrors.load(errors.save(tmp_path / "errors.json"))
    assert loaded.forecast == errors.forecast and loaded.max_order == 2
    data = errors.to_dict()
    del data["forecast"]
    assert CalibrationErrors.from_dict(data | {"version": 2}).max_order == 0
    with pytest.raises(ValueError, match=r"unknown fields \['forecast'\]"):
        CalibrationErrors.from_dict(errors.to_dict() | {"version": 2})
    assert errors.resampled(6).forecast == {}  # not resampled: schedules at 6 steps reuse


def test_from_errors_at_max_order_0_is_the_reuse_schedule(calibration):
    _, errors = calibration
    for alpha in (0.05, 0.2, 0.5):
        plain = Schedule.from_errors(errors, alpha)
        assert Schedule.from_errors(errors, alpha, max_order=0) == plain
        forecast = Schedule.from_errors(errors, alpha, max_order=2)
        for key in plain.masks:  # the chosen order never computes more than reuse
            assert sum(forecast.masks[key]) <= sum(plain.masks[key])


def test_forecast_scan_on_hand_made_errors():
    """Reuse errors too large to skip anything, a linear forecast good everywhere: order 1 skips."""
    steps, lookahead = 8, 2
    curves = [[0.5] * (steps - 1), [0.9] * (steps - 2)]
    predictors = {
        f"1/{lag}/{gap}": [float("inf")] * gap + [0.01] * (steps - gap) for lag in (1, 2) for gap in (1, 2, 3)
    }
    assert smoothcache_mask(curves, 0.1, steps) == (1,) * steps
    # Steps 0 and 1 compute (one compute: reuse error 0.5); from then every two-step jump forecasts.
    assert forecast_mask(curves, predictors, 0.1, steps, 1) == (1, 1, 0, 0, 1, 0, 0, 1)
    errors = CalibrationErrors(
        steps,
        lookahead,
        {"blocks.0.attn": curves},
        forecast={"blocks.0.attn": predictors},
    )
    schedule = Schedule.from_errors(errors, 0.1, max_order=1)
    assert schedule.masks["attn"] == (1, 1, 0, 0, 1, 0, 0, 1) and schedule.orders == {"attn": 1}
    with pytest.raises(ValueError, match=r"max_order must be at most .* \(1\); got 2.*calibrate"):
        Schedule.from_errors(errors, 0.1, max_order=2)


def test_for_speedup_with_forecasting_reaches_the_target_and_runs(calibration):
    reference, errors = calibration
    schedule = Schedule.for_speedup(errors, 1.5, max_order=2, per_block=True)
    assert schedule.metadata["ideal_speedup"] >= 1.5
    assert errors.ideal_speedup(schedule) == schedule.metadata["ideal_speedup"]
    # Whatever orders it chose, the transformed model runs them like the forward-patching reference.
    steps = schedule.steps
    want_model = copy.deepcopy(reference)
    with ForwardPatchingReference(want_model, dict(schedule.masks), orders=dict(schedule.orders)):
        want = run_steps(want_model, tiny_call, steps)
    got = run_steps(smoothcache_fx.transform(copy.deepcopy(reference), schedule), tiny_call, steps)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_plots_show_orders(calibration, tmp_path):
    pytest.importorskip("matplotlib")
    from smoothcache_fx.plots import plot_errors, plot_schedule

    _, errors = calibration
    schedule = Schedule.from_errors(errors, 0.05, max_order=2)
    assert schedule.orders, "this alpha must pick an order for the plot to show it"
    for path in (
        plot_errors(errors, tmp_path / "e.png", alpha=0.05),
        plot_schedule(schedule, tmp_path / "s.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predictor_errors_of_large_outputs_come_from_a_sample(calibration, monkeypatch):
    """Outputs larger than FORECAST_SAMPLE elements are measured on a fixed random subset: close
    to the exact errors (here 512 of 1024 elements), not equal to them."""
    import smoothcache_fx.calibrate_record as record

    reference, exact = calibration
    monkeypatch.setattr(record, "FORECAST_SAMPLE", 512)
    model = copy.deepcopy(reference)
    with torch.no_grad():
        sampled = smoothcache_fx.calibrate(model, lambda: _ddim_tiny(model), max_order=1, progress=False)
    assert sampled.errors == exact.errors  # reuse errors stay exact
    for path, table in sampled.forecast.items():
        for key, values in table.items():
            want = np.array(exact.forecast[path][key])
            finite = np.isfinite(want)
            np.testing.assert_allclose(np.array(values)[finite], want[finite], rtol=0.25)
            assert not np.allclose(np.array(values)[finite], want[finite], rtol=1e-6)
