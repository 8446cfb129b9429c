"""Forecast weights in step index, checked against polynomials they must reproduce exactly."""

from __future__ import annotations

import pytest

from smoothcache_fx.schedules.forecast import forecast_weights, lagrange_weights, weight_table


@pytest.mark.parametrize("order", [0, 1, 2])
def test_weights_extrapolate_polynomials_of_their_order_exactly(order):
    mask = [1, 0, 1, 1, 0, 0, 1, 0, 0, 0]

    def poly(step):  # a polynomial of degree `order` in the step index
        return [3.0, 3.0 - 2 * step, 3.0 - 2 * step + 0.5 * step**2][order]

    for step, computes in enumerate(mask):
        if computes or step == 0:
            continue
        history = [s for s in range(step) if mask[s]][-(order + 1) :]
        weights = forecast_weights(mask, order, step)
        padded = [0.0] * (order + 1 - len(history)) + [poly(s) for s in history]
        if len(history) == order + 1:
            assert sum(w * y for w, y in zip(weights, padded, strict=True)) == pytest.approx(poly(step))
        assert sum(weights) == pytest.approx(1.0)  # a constant is always reproduced


def test_linear_weights_follow_gap_and_lag():
    # computes at 0 and 3 (gap 3); at step 5 the lag is 2: h1 + (h1 - h0) * 2 / 3
    assert forecast_weights([1, 0, 0, 1, 0, 0], 1, 5) == pytest.approx((-2 / 3, 5 / 3))


def test_too_few_computes_fall_back_to_a_lower_order():
    assert forecast_weights([1, 0, 0], 2, 1) == (0.0, 0.0, 1.0)
    assert forecast_weights([1, 1, 0], 2, 2) == pytest.approx((0.0, -1.0, 2.0))
    assert weight_table([1, 0], 1) == [(0.0, 1.0), (0.0, 1.0)]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="skipped step"):
        forecast_weights([1, 1], 1, 1)
    with pytest.raises(ValueError, match="distinct"):
        lagrange_weights([1, 1], 2)
    with pytest.raises(ValueError, match=r"must be in \[0, 2\]"):
        forecast_weights([1, 0], 3, 1)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("strength", [0.0, 0.25, 0.75])
def test_strength_goes_that_far_from_the_newest_output_towards_the_extrapolation(order, strength):
    mask = [1, 0, 1, 1, 0, 0, 1, 0, 0, 0]
    history = [3.0, -1.0, 4.0]  # oldest first; only the last order + 1 are read
    for step in (4, 5, 7, 8, 9):
        full = forecast_weights(mask, order, step)
        damped = forecast_weights(mask, order, step, strength)
        values = history[-(order + 1) :]
        newest = values[-1]
        extrapolated = sum(w * y for w, y in zip(full, values, strict=True))
        got = sum(w * y for w, y in zip(damped, values, strict=True))
        assert got == pytest.approx(newest + strength * (extrapolated - newest))
        assert sum(damped) == pytest.approx(1.0)
    assert weight_table(mask, order, 0.0)[4] == (0.0,) * order + (1.0,)  # strength 0 is reuse


def test_bad_strength_is_refused():
    with pytest.raises(ValueError, match=r"forecast strength must be in \[0, 1\]"):
        forecast_weights([1, 0], 1, 1, 2.0)
    with pytest.raises(TypeError, match="forecast strength must be a number"):
        weight_table([1, 0], 1, None)
