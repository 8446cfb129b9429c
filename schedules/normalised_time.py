"""Normalised time: step i of an N-step generation sits at u = i / (N - 1), from 0 (first step) to
1 (last step), whatever N is. Reading calibration errors or a schedule made for one step count at
another goes through here, so `CalibrationErrors.resampled` and `Schedule.resample` agree on where
each step lies."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def positions(steps: int) -> np.ndarray:
    """Where each of `steps` steps sits in normalised time (one step: at 0)."""
    return np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)


def interpolate(values: Sequence[float], source_steps: int, at: np.ndarray) -> np.ndarray:
    """`values`, given at the first len(values) steps of a `source_steps`-step grid, read at the
    normalised times `at` by linear interpolation (held constant past the last value)."""
    return np.interp(at, positions(source_steps)[: len(values)], values)
