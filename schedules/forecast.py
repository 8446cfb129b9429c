"""Forecasting a skipped branch from its last computed outputs: the coefficients, in step index.

A branch of predictor order k keeps its last k+1 computed outputs (its history, oldest first). At a
step that skips it, its output is extrapolated with the Lagrange polynomial through those outputs
placed at the steps that computed them: order 0 repeats the last output (plain reuse), order 1 is
the line through the last two (`h1 + (h1 - h0) * lag / gap`), order 2 the parabola through the last
three. The polynomial is in step index, which makes every weight a constant of (schedule, step),
decided before the first model call, whatever the scheduler. Measured against the timestep, sigma
and log sigma on the demo DiT (`benchmarks/forecast_nodes.py`, BENCHMARKS.md): the same as the
timestep under evenly spaced DDIM steps, and the best for order 1 wherever skip runs are longer than
one step; sigma helps only order 2, which stays worse than order 1 there.

The weights are what the fused forecast op reads: `prediction = sum_i weights[i] * history[i]`.
Before a branch has computed k+1 times the forecast uses the computes it has (a lower order); the
missing oldest slots get weight 0.

Pure maths on Python numbers: the runtime turns the weights into small tensors, calibration uses
the same weights to measure each order's error.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

# Orders the fused op and calibration support. Order 2 already needs three full-size history buffers
# per branch; higher orders extrapolate a noisier polynomial (calibration can show it, but no model
# measured here gained from order 3).
MAX_ORDER = 2


def lagrange_weights(nodes: Sequence[int], at: int) -> tuple[float, ...]:
    """Weights w with p(at) = sum w[i] * y[i] for the polynomial p through (nodes[i], y[i]).

    Example::

        >>> lagrange_weights([0, 2], 3)  # the line through steps 0 and 2, read at step 3
        (-0.5, 1.5)
    """
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"nodes must be distinct steps; got {list(nodes)}.")
    weights = []
    for i, node in enumerate(nodes):
        weight = 1.0
        for j, other in enumerate(nodes):
            if j != i:
                weight *= (at - other) / (node - other)
        weights.append(weight)
    return tuple(weights)


def check_order(order: object, where: str) -> int:
    """`order` as an int in [0, MAX_ORDER], or a clear error naming `where` it came from."""
    if not isinstance(order, int) or isinstance(order, bool):
        raise TypeError(f"{where}: predictor order must be an int; got {type(order).__name__} {order!r}.")
    if not 0 <= order <= MAX_ORDER:
        raise ValueError(
            f"{where}: predictor order must be in [0, {MAX_ORDER}] (0 reuses the last output, 1 "
            f"extrapolates a line, 2 a parabola); got {order}."
        )
    return order


def computed_steps(mask: Sequence[int | bool], step: int) -> list[int]:
    """The steps before `step` at which `mask` computes, oldest first."""
    return [s for s in range(step) if mask[s]]


def check_strength(strength: object, where: str) -> float:
    """`strength` as a float in [0, 1], or a clear error naming `where` it came from."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise TypeError(
            f"{where}: forecast strength must be a number in [0, 1]; got {type(strength).__name__} {strength!r}."
        )
    if not 0.0 <= strength <= 1.0:
        raise ValueError(
            f"{where}: forecast strength must be in [0, 1] (1 the full extrapolation, 0 the last "
            f"output, as reuse; 0.75 measured best on the demo DiT); got {strength}."
        )
    return float(strength)


def forecast_weights(
    mask: Sequence[int | bool], order: int, step: int, strength: float = 1.0
) -> tuple[float, ...]:
    """Weights over a history of `order + 1` slots (oldest first) for skipped `step` of `mask`.

    The newest slot holds the output of the last step before `step` that computed; slot i from the
    end holds the i-th before it. Fewer computes than `order + 1` so far: the weights of the computes
    there are (a lower order), 0 for the empty slots.

    `strength` blends the extrapolation with reuse: `strength * polynomial + (1 - strength) *
    newest`, a forecast that goes only part of the way the polynomial points. Full extrapolation
    overshoots: on the demo DiT over 500 samples (BENCHMARKS.md, "Damped forecasting"), order 1 at
    strength 1 lost up to 4 points of classifier accuracy where 0.75 lost none, for up to 1 dB of
    PSNR (0.9 had more PSNR than 1 at every interval measured).

    Example::

        >>> forecast_weights([1, 0, 1, 0, 0], 1, 4)  # line through steps 0 and 2, read at step 4
        (-1.0, 2.0)
        >>> forecast_weights([1, 0, 1, 0, 0], 1, 4, strength=0.5)  # half-way from the newest output
        (-0.5, 1.5)
        >>> forecast_weights([1, 0, 1, 0, 0], 1, 1)  # one compute so far: reuse it
        (0.0, 1.0)
    """
    check_order(order, "forecast_weights")
    check_strength(strength, "forecast_weights")
    if not 0 < step < len(mask) or mask[step]:
        raise ValueError(f"step must be a skipped step of the mask (0 < step < {len(mask)}); got {step}.")
    nodes = computed_steps(mask, step)[-(order + 1) :]
    if not nodes:
        raise ValueError(f"the mask skips step {step} before any step computed; step 0 must compute.")
    weights = (0.0,) * (order + 1 - len(nodes)) + lagrange_weights(nodes, step)
    if strength == 1.0:
        return weights
    return tuple(strength * w + (1.0 - strength) * (i == order) for i, w in enumerate(weights))


def weight_table(mask: Sequence[int | bool], order: int, strength: float = 1.0) -> list[tuple[float, ...]]:
    """`forecast_weights` for every step of `mask` (compute steps get the newest slot alone, unused)."""
    unit = (0.0,) * order + (1.0,)
    return [unit if mask[s] else forecast_weights(mask, order, s, strength) for s in range(len(mask))]


# ------------------------------------------------------------------ calibrated predictor errors
#
# Calibration measures, per branch, the error of forecasting step t from the outputs of earlier
# steps placed as a schedule could place its computes: the newest `lag` steps back, each older one
# `gap` steps before the next. A key "order/lag/gap[/gap]" names one such history; its errors are
# indexed by the forecast step t (inf where the history would start before step 0). The scan in
# `from_errors` reads the key of the history its own computes make, so every gap it can produce is
# recorded: consecutive computes are at most lookahead + 1 steps apart.


def predictor_key(order: int, lag: int, gaps: Sequence[int]) -> str:
    """The calibration key of an order-`order` forecast `lag` steps after the newest compute, with
    `gaps` between consecutive computes going back (newest gap first)."""
    return "/".join(str(v) for v in (order, lag, *gaps))


def parse_predictor_key(key: str) -> tuple[int, int, tuple[int, ...]]:
    """(order, lag, gaps) of a `predictor_key`; ValueError naming the key when it is not one."""
    try:
        order, lag, *gaps = (int(v) for v in key.split("/"))
    except ValueError:
        order, lag, gaps = -1, 0, []
    if not 1 <= order <= MAX_ORDER or len(gaps) != order or lag < 1 or min(gaps) < 1:
        raise ValueError(
            f"predictor error keys must be 'order/lag/gap' (order 1) or 'order/lag/gap/gap' (order 2) "
            f"with positive lag and gaps; got {key!r}."
        )
    return order, lag, tuple(gaps)


def predictor_histories(max_order: int, lookahead: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """Every (order, lag, gaps) a scan with this lookahead can need, orders 1..max_order."""
    histories = []
    for order in range(1, max_order + 1):
        for lag in range(1, lookahead + 1):
            for gaps in itertools.product(range(1, lookahead + 2), repeat=order):
                histories.append((order, lag, gaps))
    return histories


def history_steps(step: int, lag: int, gaps: Sequence[int]) -> list[int]:
    """The compute steps of a history, oldest first: `step - lag`, then each gap further back."""
    nodes = [step - lag]
    for gap in gaps:
        nodes.append(nodes[-1] - gap)
    return nodes[::-1]
