"""PNG plots of calibration errors and schedules (optional extra: ``pip install smoothcache-fx[plot]``).

Plotting lives here, not on `Schedule` or `CalibrationErrors`, because `schedules/` is pure data
and maths: this module imports schedules, never the reverse. matplotlib is imported lazily, on the
first plot. Figures are drawn on matplotlib's Agg canvas directly (`matplotlib.figure.Figure`, not
pyplot), so plotting neither needs a display nor changes the process-wide backend.

Example::

    from smoothcache_fx.plots import plot_errors, plot_schedule

    plot_errors(errors, "errors.png", alpha=0.18)
    plot_schedule(schedule, "schedule.png")
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smoothcache_fx.schedules import Schedule
from smoothcache_fx.schedules.errors import CalibrationErrors
from smoothcache_fx.schedules.forecast import predictor_key

_COMPUTE_COLOUR = "#1f4e79"
_REUSE_COLOUR = "#e8eef5"
_FORECAST_COLOUR = "#f2b134"
_ORDER_STYLES = {1: "--", 2: ":"}


def plot_errors(
    errors: CalibrationErrors,
    path: str | os.PathLike[str],
    alpha: float | None = None,
    per_block: bool = False,
) -> Path:
    """One panel per component: its block-averaged e_k over the step index i, one line per lag k;
    with predictor errors (`calibrate(..., max_order=...)`), also each order's error forecasting
    step i + k from computes k + 1 steps apart (the history of a scan that keeps skipping k steps),
    dashed for order 1 and dotted for order 2, in the colour of its lag.

    Args:
        errors: from `smoothcache_fx.calibrate`.
        path: PNG file to write.
        alpha: draw this threshold as a horizontal line.
        per_block: also draw each block's curve, thin and faint, behind the average.

    Returns:
        The path written.
    """
    figure_class, _ = _matplotlib()
    components = errors.components
    figure = figure_class(figsize=(6.4, 2.6 * len(components)), layout="constrained")
    axes = figure.subplots(len(components), 1, squeeze=False)[:, 0]
    for axis, component in zip(axes, components, strict=True):
        for k in range(1, errors.lookahead + 1):
            curve = errors.curve(component, k)
            (line,) = axis.plot(np.arange(len(curve)), curve, marker=".", label=f"k={k}")
            if per_block:
                for branch in errors.branches_of(component):
                    values = errors.errors[branch][k - 1]
                    axis.plot(np.arange(len(values)), values, color=line.get_color(), alpha=0.25, lw=0.7)
            predictors = errors.predictor_errors(component)
            for order, style in _ORDER_STYLES.items():
                values = predictors.get(predictor_key(order, k, (k + 1,) * order))
                if values is not None:  # indexed by the forecast step: shift to the compute step i
                    shown = np.where(np.isfinite(values[k:]), values[k:], np.nan)
                    axis.plot(
                        np.arange(len(shown)),
                        shown,
                        color=line.get_color(),
                        ls=style,
                        lw=1,
                        label=f"order {order}, k={k}",
                    )
        if alpha is not None:
            axis.axhline(alpha, color="black", ls="--", lw=1, label=f"alpha={alpha:g}")
        if _all_positive(errors, component):
            axis.set_yscale("log")
        axis.set_title(f"{component} (mean of {len(errors.branches_of(component))} blocks)", fontsize=10)
        axis.set_ylabel("rel. L1 e_k[i]")
        axis.legend(fontsize=8)
    axes[-1].set_xlabel("step i (e_k[i] compares step i with step i+k)")
    figure.suptitle(
        f"{errors.model_class or 'model'}: {errors.steps} steps, {errors.generations} generation(s)",
        fontsize=11,
    )
    return _save(figure, path)


def plot_schedule(
    schedule: Schedule, path: str | os.PathLike[str], branches: Mapping[str, Sequence[str]] | None = None
) -> Path:
    """Heatmap, rows x steps: dark = compute, light = reuse the cached output, amber = forecast
    (a row whose key has a predictor order; the row's label names the order).

    Args:
        schedule: any `Schedule`.
        path: PNG file to write.
        branches: block path -> component names (``model.smoothcache.branches``); gives one row per
            branch resolved through the schedule's keys (a branch no key covers always computes).
            Without it, one row per schedule key.

    Returns:
        The path written.
    """
    figure_class, colors = _matplotlib()
    rows = schedule_rows(schedule, branches)
    matrix = np.array(list(rows.values()), dtype=float).reshape(len(rows), schedule.steps)
    height = 1.2 + 0.22 * len(rows)
    width = min(max(4.0, 2.5 + 0.16 * schedule.steps), 16.0)
    figure = figure_class(figsize=(width, height), layout="constrained")
    axis = figure.subplots()
    cmap = colors.ListedColormap([_REUSE_COLOUR, _FORECAST_COLOUR, _COMPUTE_COLOUR])
    axis.imshow(matrix, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    axis.set_yticks(range(len(rows)), list(rows), fontsize=7)
    axis.set_xlabel("step")
    computed = int((matrix == 1).sum())
    title = f"{schedule.steps} steps, computed {computed}/{matrix.size}"
    for name in ("alpha", "ideal_speedup"):
        if name in schedule.metadata:
            title += f", {name}={schedule.metadata[name]:.3g}"
    axis.set_title(title, fontsize=9)
    return _save(figure, path)


def schedule_rows(
    schedule: Schedule, branches: Mapping[str, Sequence[str]] | None = None
) -> dict[str, list[float]]:
    """The heatmap's rows, top to bottom: one per key (block numbers in numeric order: `attn1-2`
    before `attn1-10`), or with `branches` one per branch, resolved through the keys. A step is
    1 (computed), 0.5 (forecast: skipped with a predictor order > 0) or 0 (reused); a row with an
    order says so in its label."""

    def row(mask, order):
        return [1.0 if v else 0.5 if order else 0.0 for v in mask]

    rows = {}
    if branches is None:
        for key in sorted(schedule.masks, key=_numeric_order):
            order = schedule.orders.get(key, 0)
            rows[f"{key} (order {order})" if order else key] = row(schedule.masks[key], order)
        return rows
    for block, components in branches.items():
        for component in components:
            path = f"{block}.{component}"
            mask, order = schedule.mask_for(path), schedule.order_for(path)
            label = f"{path} (order {order})" if order else path
            rows[label] = [1.0] * schedule.steps if mask is None else row(mask, order)
    return rows


def _numeric_order(key: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)]


def _all_positive(errors: CalibrationErrors, component: str) -> bool:
    values = [v for b in errors.branches_of(component) for curve in errors.errors[b] for v in curve]
    return bool(values) and min(values) > 0 and np.isfinite(values).all()


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib import colors
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plotting needs matplotlib, which is not installed. Install the optional extra with "
            "`pip install smoothcache-fx[plot]` (or `pip install matplotlib`)."
        ) from err
    return Figure, colors


def _save(figure, path: str | os.PathLike[str]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # draw on Agg regardless of the process-wide backend
    path = Path(path)
    figure.savefig(path, format="png", dpi=110)
    return path
