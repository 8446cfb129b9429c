"""CalibrationErrors: how much each residual branch's output changes from one step to a later one.

Plain data (floats and ints, no tensors), so schedules can be derived from it without the runtime
and it saves to JSON. `smoothcache_fx.calibrate` measures it; `Schedule.from_errors` and
`Schedule.for_speedup` read it.

Indexing follows the SmoothCache scan: for a branch whose output at step s is L_s and a lag k,

    e_k[i] = |L_i - L_(i+k)|_1 / |L_(i+k)|_1,   i = 0 .. steps-k-1,

so ``errors[path][k - 1]`` holds ``steps - k`` values: the error of reusing step i's output at step
i + k, relative to the output that step would compute.
"""

from __future__ import annotations

import json
import math
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .schedule import Schedule

FORMAT_NAME = "smoothcache_fx.calibration_errors"
FORMAT_VERSION = 1
_FIELDS = ("steps", "lookahead", "errors", "flops", "total_flops", "generations", "model_class", "metadata")


@dataclass(frozen=True, repr=False)
class CalibrationErrors:
    """Per-branch relative L1 errors between step outputs, averaged over calibration generations.

    Args:
        steps: model calls per generation during calibration.
        lookahead: the largest lag k recorded.
        errors: branch path (``"transformer_blocks.3.attn1"``) -> one curve per lag k = 1..lookahead;
            curve k holds e_k[i] for i = 0..steps-k-1 (see the module docstring).
        flops: branch path -> FLOPs of one call of the branch's module (one model call).
        total_flops: FLOPs of one whole model call; what is not in `flops` always runs.
        generations: how many generations the errors are averaged over.
        model_class: class name of the calibrated model.
        metadata: JSON notes (solver, how generations were delimited, dtype, ...).

    Example::

        >>> errors = CalibrationErrors(3, 1, {"blocks.0.attn": [[0.1, 0.2]]})
        >>> errors.curve("attn", 1)
        array([0.1, 0.2])
    """

    steps: int
    lookahead: int
    errors: Mapping[str, tuple[tuple[float, ...], ...]]
    flops: Mapping[str, int] = field(default_factory=dict)
    total_flops: int = 0
    generations: int = 1
    model_class: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("steps", "lookahead", "total_flops", "generations"):
            _check_int(name, getattr(self, name), minimum=0 if name == "total_flops" else 1)
        if not isinstance(self.errors, Mapping) or not self.errors:
            raise ValueError(
                "errors must map at least one branch path to its error curves; got "
                f"{type(self.errors).__name__} {self.errors!r}. Run smoothcache_fx.calibrate(...)."
            )
        curves = {path: self._curves(path, value) for path, value in sorted(self.errors.items())}
        flops = {}
        for path, value in sorted(dict(self.flops).items()):
            if path not in curves:
                raise ValueError(
                    f"flops names {path!r}, which has no error curves; drop it or add its curves."
                )
            _check_int(f"flops[{path!r}]", value, minimum=0)
            flops[path] = value
        if flops and sum(flops.values()) > self.total_flops:
            raise ValueError(
                f"total_flops must be at least the sum of the branch FLOPs ({sum(flops.values())}); got "
                f"{self.total_flops}. Pass the FLOPs of one whole model call."
            )
        if not isinstance(self.model_class, str):
            raise TypeError(f"model_class must be a str; got {type(self.model_class).__name__}.")
        object.__setattr__(self, "errors", types.MappingProxyType(curves))
        object.__setattr__(self, "flops", types.MappingProxyType(flops))
        object.__setattr__(self, "metadata", types.MappingProxyType(_json_copy(self.metadata)))

    def _curves(self, path: Any, value: Any) -> tuple[tuple[float, ...], ...]:
        if not isinstance(path, str) or "." not in path:
            raise ValueError(
                f"error keys must be branch paths '<block path>.<component>' such as "
                f"'transformer_blocks.0.attn1'; got {path!r}."
            )
        curves = tuple(tuple(float(v) for v in curve) for curve in value)
        if len(curves) != self.lookahead:
            raise ValueError(
                f"errors[{path!r}] must hold one curve per lag 1..{self.lookahead}; got {len(curves)}."
            )
        for k, curve in enumerate(curves, start=1):
            if len(curve) != max(self.steps - k, 0):
                raise ValueError(
                    f"errors[{path!r}] lag {k} must have steps - k = {max(self.steps - k, 0)} values "
                    f"(e_k[i] compares step i with step i + k); got {len(curve)}."
                )
            if any(math.isnan(v) or v < 0 for v in curve):
                raise ValueError(f"errors[{path!r}] lag {k} must be non-negative numbers; got {list(curve)}.")
        return curves

    # Frozen dataclass plumbing: MappingProxyType is neither hashable nor picklable.
    def __hash__(self) -> int:
        return hash((self.steps, self.lookahead, tuple(self.errors.items())))

    def __reduce__(self):
        return (type(self), tuple(_plain(getattr(self, name)) for name in _FIELDS))

    def __repr__(self) -> str:
        return (
            f"CalibrationErrors({self.model_class or '?'}, steps={self.steps}, lookahead={self.lookahead}, "
            f"generations={self.generations}, branches={len(self.errors)}, components={list(self.components)})"
        )

    # ------------------------------------------------------------------ views

    @property
    def branches(self) -> tuple[str, ...]:
        """Branch paths, sorted."""
        return tuple(self.errors)

    @property
    def components(self) -> tuple[str, ...]:
        """Component names (last path segment), in first-seen order of the sorted branch paths."""
        return tuple(dict.fromkeys(path.rsplit(".", 1)[1] for path in self.errors))

    @property
    def blocks(self) -> tuple[str, ...]:
        """Block paths, in first-seen order of the sorted branch paths."""
        return tuple(dict.fromkeys(path.rsplit(".", 1)[0] for path in self.errors))

    @property
    def remainder_flops(self) -> int:
        """FLOPs of one model call outside the calibrated branches: always computed."""
        return self.total_flops - sum(self.flops.values())

    def branches_of(self, component: str) -> tuple[str, ...]:
        """Branch paths of one component, e.g. every block's ``attn1``."""
        return tuple(path for path in self.errors if path.rsplit(".", 1)[1] == component)

    def curve(self, key: str, k: int) -> np.ndarray:
        """e_k for a branch path, or for a component averaged over its blocks (the SmoothCache view)."""
        if not isinstance(k, int) or not 1 <= k <= self.lookahead:
            raise ValueError(f"k must be a lag from 1 to lookahead={self.lookahead}; got {k!r}.")
        paths = (key,) if key in self.errors else self.branches_of(key)
        if not paths:
            raise KeyError(
                f"{key!r} is neither a branch path nor a component of these errors; "
                f"components are {list(self.components)}."
            )
        return np.mean([self.errors[path][k - 1] for path in paths], axis=0).reshape(-1)

    def by_component(self) -> dict[str, list[np.ndarray]]:
        """Component -> [e_1, ..., e_lookahead], each averaged over the component's blocks."""
        return {c: [self.curve(c, k) for k in range(1, self.lookahead + 1)] for c in self.components}

    def by_block(self) -> dict[str, dict[str, list[np.ndarray]]]:
        """Block path -> component -> [e_1, ..., e_lookahead] for that one branch."""
        view: dict[str, dict[str, list[np.ndarray]]] = {}
        for path, curves in self.errors.items():
            block, component = path.rsplit(".", 1)
            view.setdefault(block, {})[component] = [np.asarray(c, dtype=float) for c in curves]
        return view

    # ------------------------------------------------------------------ derived

    def resampled(self, steps: int, lags: str = "steps") -> CalibrationErrors:
        """These errors moved onto a grid of `steps` steps over the same (normalised) time.

        Step i of an N-step generation sits at u = i / (N - 1); each e_k curve is linearly
        interpolated in u onto the new grid (held constant past its last point). FLOPs per model
        call do not depend on the step count and are kept.

        Args:
            steps: the new step count.
            lags: "steps" (default): lag k stays k steps, so e_k is reused as is. "time": lag k at
                the new count spans the normalised time of k * (calibrated - 1) / (steps - 1)
                calibrated steps; e is interpolated between calibrated lags (e_0 = 0) and, past
                the lookahead, extrapolated in proportion to the lag.

        How close this comes to calibrating at the new count directly, measured on tests/models.py's
        TinyDiT and diffusers DiT (4 blocks each, random weights, torch.manual_seed(0)) in a diffusers
        DDIM loop, 4 generations, lookahead 3, errors at 50 steps resampled to 20 vs calibrated at
        20, over 7 alphas (the 0.1..0.9 quantiles of the 20-step errors); per component / per block:

        ============  ======  ===========================  ===================================
        model         lags    equal mask entries           ideal speed-up, resampled vs direct
        ============  ======  ===========================  ===================================
        TinyDiT       steps   0.64 / 0.63                  2.25 vs 1.75 / 2.24 vs 1.75
        TinyDiT       time    0.68 / 0.70                  1.84 vs 1.75 / 1.84 vs 1.75
        DiT (diff.)   steps   0.58 / 0.61                  2.11 vs 1.66 / 2.08 vs 1.69
        DiT (diff.)   time    0.63 / 0.62                  1.62 vs 1.66 / 1.63 vs 1.69
        ============  ======  ===========================  ===================================

        With lags="steps" a step at 20 steps is 2.6 calibrated steps apart, so e_k is
        underestimated about two-fold and the schedule reuses more than a direct calibration would;
        lags="time" tracks the direct speed-up to within 0.1. Mask agreement stays near 2/3 either
        way: the scan is greedy, so one changed decision shifts the rest of its mask.
        """
        _check_int("steps", steps, minimum=1)
        if lags not in ("steps", "time"):
            raise ValueError(f'lags must be "steps" or "time"; got {lags!r}.')
        if steps == self.steps:
            return self
        source_positions = _positions(self.steps)
        errors = {}
        for path, curves in self.errors.items():

            def at(lag: int, positions: np.ndarray, curves=curves) -> np.ndarray:
                if lag == 0:
                    return np.zeros(len(positions))
                curve = curves[lag - 1]
                if not curve:  # the lag did not fit in the calibrated generation: nothing measured
                    return np.full(len(positions), math.inf)
                return np.interp(positions, source_positions[: len(curve)], curve)

            resampled = []
            for k in range(1, self.lookahead + 1):
                positions = _positions(steps)[: max(steps - k, 0)]
                if lags == "steps" or not len(positions):
                    resampled.append(at(k, positions).tolist())
                    continue
                span = k * (self.steps - 1) / (steps - 1)  # lag k in calibrated steps
                if span >= self.lookahead:
                    values = at(self.lookahead, positions) * (span / self.lookahead)
                else:
                    low, weight = int(span), span - int(span)
                    values = at(low, positions)
                    if weight:
                        values = (1 - weight) * values + weight * at(low + 1, positions)
                resampled.append(values.tolist())
            errors[path] = resampled
        metadata = {
            **self.metadata,
            "resampled_from_steps": self.metadata.get("resampled_from_steps", self.steps),
            "resampled_lags": lags,
        }
        return CalibrationErrors(
            steps,
            self.lookahead,
            errors,
            dict(self.flops),
            self.total_flops,
            self.generations,
            self.model_class,
            metadata,
        )

    def ideal_speedup(self, schedule: Schedule) -> float:
        """FLOPs of `schedule.steps` uncached model calls over the FLOPs under `schedule`.

        Counts the measured FLOPs of each calibrated branch only at the steps where the schedule
        computes it; everything else (`remainder_flops`) runs every step. An upper bound on the
        wall-clock speed-up: it ignores cache reads and launch overheads.
        """
        if self.total_flops == 0:
            raise ValueError(
                "these errors carry no FLOP counts (total_flops=0); smoothcache_fx.calibrate measures "
                "them. Pass flops= and total_flops= when building CalibrationErrors by hand."
            )
        steps = schedule.steps
        cached = steps * self.remainder_flops
        for path, flops in self.flops.items():
            mask = schedule.mask_for(path)
            cached += flops * (steps if mask is None else sum(mask))
        return steps * self.total_flops / cached

    # ------------------------------------------------------------------ I/O

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data in the versioned ``smoothcache_fx.calibration_errors`` format."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            **{n: _plain(getattr(self, n)) for n in _FIELDS},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationErrors:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT_NAME:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(
                f"calibration errors must be in the {FORMAT_NAME!r} format; got {found!r}. "
                "Pass a file written by CalibrationErrors.save()."
            )
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"calibration errors version must be {FORMAT_VERSION}; got {data.get('version')!r}. "
                "Re-run smoothcache_fx.calibrate with this version."
            )
        missing = sorted({"steps", "lookahead", "errors"} - set(data))
        unknown = sorted(set(data) - set(_FIELDS) - {"format", "version"})
        if missing or unknown:
            raise ValueError(f"calibration errors: missing fields {missing}, unknown fields {unknown}.")
        return cls(**{name: data[name] for name in _FIELDS if name in data})

    @classmethod
    def load(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> CalibrationErrors:
        """Load from a JSON file written by :meth:`save` (or its parsed dict); no tensors involved."""
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        path = Path(source)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as err:
            raise type(err)(f"{path}: {err}") from err

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON (floats round-trip exactly); returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path


def _positions(steps: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}.")


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _json_copy(metadata: Any) -> dict[str, Any]:
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping; got {type(metadata).__name__}.")
    try:
        return json.loads(json.dumps(dict(metadata)))
    except (TypeError, ValueError) as err:
        raise TypeError(f"metadata must be JSON-serialisable; got {err}.") from err
