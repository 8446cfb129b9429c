"""Masks from calibration errors: the SmoothCache scan, and a search for a target speed-up.

Pure maths on `CalibrationErrors`; `Schedule.from_errors` and `Schedule.for_speedup` wrap the
results into schedules, so imports point one way: schedule -> from_errors -> errors.

The scan (arXiv 2411.10510; the published `dit-smoothcache` package does not ship its calibration
module, so this description is the reference). With e_k[i] = |L_i - L_(i+k)|_1 / |L_(i+k)|_1:

    i = 0
    while i < steps:
        for k = lookahead .. 1 (largest first):
            if i + k < steps and e_k[i] <= alpha: compute at i, reuse at i+1..i+k, i = i+k+1; next i
        otherwise: compute at i, i = i+1
    the first and the last step always compute.

Per component, e_k is averaged over the blocks first (one mask per component, as in the paper);
`per_block=True` scans every branch on its own curves.

Forecasting (`max_order` > 0, errors calibrated with predictor errors): each key may also skip
steps by forecasting with order m (`smoothcache_fx.schedules.forecast`). The scan is the same, with
one change of test: from a compute at i it jumps k steps when every forecast step i+1..i+k has a
calibrated error <= alpha for the history the scan's own computes give it (the last m+1 computes;
fewer at the start, a lower order then). Every forecast step is tested, not only the last, because
an extrapolation's error need not grow with the lag as reuse's does. Each key runs the scan for
every order 0..max_order and keeps the mask that computes least (the lowest order on ties), so at
max_order=0, or where forecasting does not help, the schedule is exactly the reuse schedule.

Speed-up search: the scan's compute count is piecewise constant in alpha, changing only at the
error values, but it is not monotone (a larger alpha can take a long jump that lands where nothing
fits). So instead of bisection every distinct error value is evaluated, per key on its own values,
which is exact and cheap (keys x values x steps); the smallest alpha reaching the target is kept,
which makes the chosen alpha and the reached speed-up non-decreasing in the target.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import CalibrationErrors
from .forecast import MAX_ORDER, check_order, predictor_key

# Alphas tried per search when forecasting: every distinct error value would be keys x histories x
# steps scans each; evenly spaced quantiles of them, then every value in the bracket found.
_FORECAST_SEARCH_POINTS = 128


def smoothcache_mask(curves: Sequence[Sequence[float]], alpha: float, steps: int) -> tuple[int, ...]:
    """The SmoothCache scan for one key: 1 = compute, 0 = reuse.

    Args:
        curves: e_1 .. e_lookahead; curve k has (at least) steps - k values, e_k[i] comparing
            step i with step i + k.
        alpha: the error budget; e_k[i] <= alpha allows reusing step i's output through step i+k.
        steps: schedule length.

    Example::

        >>> smoothcache_mask([[0.1, 0.1, 0.1], [0.2, 0.3]], alpha=0.2, steps=4)
        (1, 0, 0, 1)
    """
    mask = [0] * steps
    i = 0
    while i < steps:
        mask[i] = 1
        for k in range(len(curves), 0, -1):
            if i + k < steps and curves[k - 1][i] <= alpha:
                i += k + 1
                break
        else:
            i += 1
    mask[0] = mask[-1] = 1
    return tuple(mask)


def forecast_mask(
    curves: Sequence[Sequence[float]],
    predictors: Mapping[str, Sequence[float]],
    alpha: float,
    steps: int,
    order: int,
) -> tuple[int, ...]:
    """The scan for one key forecasting its skipped steps with predictor order `order`.

    Args:
        curves: the key's reuse curves e_1 .. e_lookahead (used while fewer than two computes).
        predictors: the key's predictor errors (`CalibrationErrors.predictor_errors`).
        alpha, steps: as for `smoothcache_mask`.
        order: 1 or 2.
    """
    if order == 0:
        return smoothcache_mask(curves, alpha, steps)
    mask = [0] * steps
    computes: list[int] = []
    i = 0
    while i < steps:
        mask[i] = 1
        computes.append(i)
        history = computes[-(order + 1) :]
        gaps = [history[j] - history[j - 1] for j in range(len(history) - 1, 0, -1)]
        for k in range(len(curves), 0, -1):
            if i + k < steps and all(
                _forecast_error(curves, predictors, history, gaps, i, j) <= alpha for j in range(1, k + 1)
            ):
                i += k + 1
                break
        else:
            i += 1
    mask[0] = mask[-1] = 1
    return tuple(mask)


def _forecast_error(curves, predictors, history: list[int], gaps: list[int], i: int, lag: int) -> float:
    """The calibrated error of step i + lag forecast from `history` (computes, the newest i)."""
    if len(history) == 1:  # one compute so far: the forecast is that output
        return curves[lag - 1][i]
    values = predictors.get(predictor_key(len(history) - 1, lag, gaps))
    return math.inf if values is None else values[i + lag]


def masks_and_orders(
    errors: CalibrationErrors, alpha: float, per_block: bool = False, max_order: int = 0
) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Key -> mask, and key -> predictor order where forecasting computes less than reuse (see the
    module docstring). `max_order` above what the errors recorded is refused."""
    alpha = _check_alpha(alpha)
    max_order = _check_max_order(errors, max_order)
    masks, orders = {}, {}
    for key, (curves, _, predictors) in _keyed(errors, per_block, max_order).items():
        masks[key], orders[key] = _best_mask(curves, predictors, alpha, errors.steps, max_order)
    return masks, {key: order for key, order in orders.items() if order}


def _best_mask(curves, predictors, alpha: float, steps: int, max_order: int) -> tuple[tuple[int, ...], int]:
    best, best_order = smoothcache_mask(curves, alpha, steps), 0
    for order in range(1, max_order + 1):
        mask = forecast_mask(curves, predictors, alpha, steps, order)
        if sum(mask) < sum(best):
            best, best_order = mask, order
    return best, best_order


def masks_from_errors(
    errors: CalibrationErrors, alpha: float, per_block: bool = False
) -> dict[str, tuple[int, ...]]:
    """Key -> the SmoothCache mask at threshold `alpha` (see the module docstring).

    Args:
        errors: the calibrated errors, at the step count the masks are for.
        alpha: error budget, >= 0; larger reuses more.
        per_block: one mask per branch (keys ``component-blockindex``, or full paths when block
            indices are ambiguous) instead of one per component averaged over blocks.
    """
    return masks_and_orders(errors, alpha, per_block)[0]


def alpha_for_speedup(
    errors: CalibrationErrors, target: float, per_block: bool = False, max_order: int = 0
) -> float:
    """The smallest alpha whose masks reach the FLOP-derived ideal speed-up `target`.

    The ideal speed-up is `CalibrationErrors.ideal_speedup`: total FLOPs of a generation uncached
    over cached, from the per-branch FLOPs measured by calibrate.

    Raises:
        ValueError: when no alpha reaches `target`; the message gives the maximum reachable.
    """
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not target >= 1:
        raise ValueError(
            f"target must be a speed-up >= 1 (uncached FLOPs / cached FLOPs); got {target!r}. "
            "Pass e.g. target=1.8."
        )
    if errors.total_flops == 0:
        raise ValueError(
            "for_speedup needs FLOP counts, and these errors have none (total_flops=0); "
            "smoothcache_fx.calibrate measures them."
        )
    max_order = _check_max_order(errors, max_order)
    keyed = _keyed(errors, per_block, max_order)
    uncached = errors.steps * errors.total_flops
    if max_order:
        candidates, speedups = _forecast_speedups(errors, keyed, max_order, target)
    else:
        candidates = np.unique(np.concatenate([[0.0], *(np.concatenate(c) for c, _, _ in keyed.values())]))
        candidates = candidates[np.isfinite(candidates)]
        cached = np.full(len(candidates), errors.steps * errors.remainder_flops, dtype=object)
        for curves, flops, _ in keyed.values():
            cached += flops * _compute_counts(curves, errors.steps, candidates)
        speedups = [uncached / int(c) for c in cached]  # int / int: the same float ideal_speedup gives
    reached = [index for index, speedup in enumerate(speedups) if speedup >= target]
    if not reached:
        best = int(np.argmax(speedups))
        raise ValueError(
            f"target speed-up must be reachable by some alpha; got target={target}, but the maximum "
            f"ideal speed-up for these errors is {speedups[best]:.4f} (at alpha={candidates[best]:.6g}, "
            f"{errors.steps} steps, per_block={per_block}). Lower the target, use per_block=True, or "
            "calibrate with a larger lookahead."
        )
    return float(candidates[reached[0]])


def errors_at(
    errors: CalibrationErrors | str | os.PathLike[str] | Mapping[str, Any], steps: int | None
) -> CalibrationErrors:
    """`errors` loaded if given as a path or dict, and resampled to `steps` (None: as calibrated)."""
    errors = _as_errors(errors)
    if steps is None:
        return errors
    return errors.resampled(steps, lags="time")  # measured closer to direct calibration (errors.py)


def errors_metadata(
    errors: CalibrationErrors, generator: str, per_block: bool, **extra: Any
) -> dict[str, Any]:
    """What a schedule derived from `errors` records about them (model, steps, calibration)."""
    metadata = {
        "generator": generator,
        "model_class": errors.model_class,
        "steps": errors.steps,
        "calibrated_steps": errors.metadata.get("resampled_from_steps", errors.steps),
        "lookahead": errors.lookahead,
        "per_block": per_block,
        "generations": errors.generations,
        **extra,
    }
    if errors.metadata.get("solver"):
        metadata["solver"] = errors.metadata["solver"]
    if errors.calls_per_step > 1:  # the schedule is for transform(..., calls_per_step=N)
        metadata["calls_per_step"] = errors.calls_per_step
    return metadata


def _forecast_speedups(errors: CalibrationErrors, keyed: dict, max_order: int, target: float):
    """(alphas, ideal speed-ups) for a forecasting search: evenly spaced quantiles of every error
    value, then every value between the last quantile short of `target` and the first reaching it."""
    values = [np.concatenate(c) for c, _, _ in keyed.values()]
    values += [np.asarray(v) for _, _, p in keyed.values() for v in p.values()]
    every = np.unique(np.concatenate([[0.0], *values]))
    every = every[np.isfinite(every)]

    def speedup(alpha: float) -> float:
        cached = errors.steps * errors.remainder_flops
        for curves, flops, predictors in keyed.values():
            cached += flops * sum(_best_mask(curves, predictors, alpha, errors.steps, max_order)[0])
        return errors.steps * errors.total_flops / cached

    picks = np.unique(np.linspace(0, len(every) - 1, min(len(every), _FORECAST_SEARCH_POINTS)).astype(int))
    coarse = [speedup(float(every[p])) for p in picks]
    first = next((n for n, s in enumerate(coarse) if s >= target), None)
    if first is None or first == 0:
        return every[picks], coarse
    bracket = every[picks[first - 1] + 1 : picks[first] + 1]
    return bracket, [speedup(float(a)) for a in bracket]


def _compute_counts(curves, steps: int, alphas: np.ndarray) -> np.ndarray:
    """Computed steps of one key's mask at each alpha: the scan only changes at the key's own values."""
    own = np.unique(np.concatenate([np.asarray(c, dtype=float) for c in curves] or [np.zeros(0)]))
    counts = np.array([sum(smoothcache_mask(curves, float(a), steps)) for a in own], dtype=object)
    below = sum(smoothcache_mask(curves, -1.0, steps))
    index = np.searchsorted(own, alphas, side="right") - 1
    return np.array([below if i < 0 else counts[i] for i in index], dtype=object)


def _keyed(
    errors: CalibrationErrors, per_block: bool, max_order: int = 0
) -> dict[str, tuple[list, int, dict]]:
    """Schedule key -> (its e_k curves, FLOPs of one computation of everything the key covers, its
    predictor errors up to `max_order`: key -> list per step, empty at order 0)."""

    def predictors(key: str) -> dict[str, list[float]]:
        if not max_order:
            return {}
        table = errors.predictor_errors(key)
        return {k: v.tolist() for k, v in table.items() if int(k.split("/", 1)[0]) <= max_order}

    if not per_block:
        return {
            component: (
                [errors.curve(component, k).tolist() for k in range(1, errors.lookahead + 1)],
                sum(errors.flops.get(path, 0) for path in errors.branches_of(component)),
                predictors(component),
            )
            for component in errors.components
        }
    return {
        key: ([list(c) for c in errors.errors[path]], errors.flops.get(path, 0), predictors(path))
        for key, path in _block_keys(errors.branches).items()
    }


def _check_max_order(errors: CalibrationErrors, max_order: Any) -> int:
    check_order(max_order, "max_order")
    if max_order > errors.max_order:
        raise ValueError(
            f"max_order must be at most the predictor order these errors were calibrated with "
            f"({errors.max_order}); got {max_order}. Calibrate with smoothcache_fx.calibrate(..., "
            f"max_order={max_order}) (up to {MAX_ORDER}), or pass max_order={errors.max_order}."
        )
    return max_order


def _block_keys(paths: Sequence[str]) -> dict[str, str]:
    """Per-branch keys: ``component-blockindex`` (the SmoothCache style) when that names every
    branch uniquely (blocks in one list), else the full branch paths."""
    short = {}
    for path in paths:
        block, component = path.rsplit(".", 1)
        index = block.rsplit(".", 1)[-1]
        short[f"{component}-{index}" if index.isascii() and index.isdigit() else path] = path
    return short if len(short) == len(paths) else {path: path for path in paths}


def _as_errors(errors: Any) -> CalibrationErrors:
    if isinstance(errors, CalibrationErrors):
        return errors
    if isinstance(errors, (str, os.PathLike, Mapping)):
        return CalibrationErrors.load(errors)
    raise TypeError(
        f"errors must be CalibrationErrors (from smoothcache_fx.calibrate), or a path to its JSON; "
        f"got {type(errors).__name__}."
    )


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a number; got {type(alpha).__name__} {alpha!r}.")
    if math.isnan(alpha) or alpha < 0:
        raise ValueError(
            f"alpha must be >= 0 (the largest relative L1 error allowed for a reuse); got {alpha}. "
            "The paper uses values such as 0.08 to 0.35."
        )
    return float(alpha)
