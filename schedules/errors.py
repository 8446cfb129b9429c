"""CalibrationErrors: how much each residual branch's output changes from one step to a later one.

Plain data (floats and ints, no tensors), so schedules can be derived from it without the runtime
and it saves to JSON. `smoothcache_fx.calibrate` measures it; `Schedule.from_errors` and
`Schedule.for_speedup` read it.

Indexing follows the SmoothCache scan: for a branch whose output at step s is L_s and a lag k,

    e_k[i] = |L_i - L_(i+k)|_1 / |L_(i+k)|_1,   i = 0 .. steps-k-1,

so ``errors[path][k - 1]`` holds ``steps - k`` values: the error of reusing step i's output at step
i + k, relative to the output that step would compute.

A sampler may call the model more than once per step (unbatched classifier-free guidance: a
conditional and an unconditional call). Call c of a step is only ever compared with call c of
earlier steps (each call has caches of its own, `transform(..., calls_per_step=N)`), so the errors
are kept per call in `per_call`; `errors` holds their per-step maximum, because one mask serves
every call of a step.

With `calibrate(..., max_order=k)` the errors also hold, in `forecast`, the relative L1 error of
forecasting each step from earlier outputs with predictor orders 1..k, for every history a schedule
can give the forecast (see `smoothcache_fx.schedules.forecast`): what `from_errors` needs to choose
an order per branch.
"""

from __future__ import annotations

import json
import math
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .forecast import parse_predictor_key
from .json_file import read_json_object
from .normalised_time import interpolate
from .normalised_time import positions as normalised_positions

if TYPE_CHECKING:
    from .schedule import Schedule

FORMAT_NAME = "smoothcache_fx.calibration_errors"
# Version 2 added `per_call` (written only when there is more than one call per step); version-1
# files are single-call errors and still load. Version 3 added `forecast` (written only when
# calibrated with max_order > 0).
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
_FIELDS = (
    "steps",
    "lookahead",
    "errors",
    "flops",
    "total_flops",
    "generations",
    "model_class",
    "metadata",
    "per_call",
    "forecast",
)


@dataclass(frozen=True, repr=False)
class CalibrationErrors:
    """Per-branch relative L1 errors between step outputs, averaged over calibration generations.

    Args:
        steps: steps per generation during calibration (model calls / `calls_per_step`).
        lookahead: the largest lag k recorded.
        errors: branch path (``"transformer_blocks.3.attn1"``) -> one curve per lag k = 1..lookahead;
            curve k holds e_k[i] for i = 0..steps-k-1 (see the module docstring). With several
            calls per step, the maximum over the calls of `per_call` at every (lag, step): a
            step's mask applies to every call of the step, so the schedule that `from_errors` and
            `for_speedup` derive from these must be safe for the worst call. `from_calls` builds
            it.
        flops: branch path -> FLOPs of one call of the branch's module (one model call).
        total_flops: FLOPs of one whole model call; what is not in `flops` always runs.
        generations: how many generations the errors are averaged over.
        model_class: class name of the calibrated model.
        metadata: JSON notes (solver, how generations were delimited, dtype, ...).
        per_call: branch path -> call of the step (0..calls_per_step-1) -> lag -> step values,
            each call compared only with the same call of earlier steps. None (the default): one
            call per step, whose errors are `errors`.
        forecast: branch path -> predictor key ("order/lag/gap[/gap]", `forecast.predictor_key`)
            -> one error per step t: forecasting L_t with that order from the outputs of the
            history the key names, |prediction - L_t|_1 / |L_t|_1 (inf where the history would
            start before step 0); the maximum over the calls of a step. Empty: reuse only.

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
    per_call: Mapping[str, tuple[tuple[tuple[float, ...], ...], ...]] | None = None
    forecast: Mapping[str, Mapping[str, tuple[float, ...]]] | None = None

    @classmethod
    def from_calls(
        cls,
        steps: int,
        lookahead: int,
        per_call: Mapping[str, Sequence[Sequence[Sequence[float]]]],
        **fields: Any,
    ) -> CalibrationErrors:
        """Errors from per-call curves (path -> call -> lag -> step); `errors` is their per-step
        maximum over the calls. `fields` are the other fields (flops, total_flops, ...)."""
        if not isinstance(per_call, Mapping):
            raise TypeError(
                f"per_call must map branch paths to per-call error curves; got {type(per_call).__name__}."
            )
        errors = {path: _max_over_calls(path, calls) for path, calls in per_call.items()}
        return cls(steps, lookahead, errors, per_call=per_call, **fields)

    def __post_init__(self) -> None:
        for name in ("steps", "lookahead", "total_flops", "generations"):
            _check_int(name, getattr(self, name), minimum=0 if name == "total_flops" else 1)
        if not isinstance(self.errors, Mapping) or not self.errors:
            raise ValueError(
                "errors must map at least one branch path to its error curves; got "
                f"{type(self.errors).__name__} {self.errors!r}. Run smoothcache_fx.calibrate(...)."
            )
        curves = {path: self._curves(path, value) for path, value in sorted(self.errors.items())}
        per_call = self._per_call(curves)
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
        object.__setattr__(self, "per_call", types.MappingProxyType(per_call))
        object.__setattr__(self, "flops", types.MappingProxyType(flops))
        object.__setattr__(self, "metadata", types.MappingProxyType(_json_copy(self.metadata)))
        object.__setattr__(self, "forecast", types.MappingProxyType(self._forecast(curves)))

    def _forecast(self, curves: dict[str, tuple]) -> dict[str, dict[str, tuple[float, ...]]]:
        """Validated `forecast`: known branch paths, predictor keys, one non-negative value per step."""
        if self.forecast is None:
            return {}
        if not isinstance(self.forecast, Mapping):
            raise TypeError(
                f"forecast must be a mapping of branch paths; got {type(self.forecast).__name__}."
            )
        checked = {}
        for path in sorted(self.forecast):
            if path not in curves:
                raise ValueError(
                    f"forecast names {path!r}, which has no error curves; drop it or add its curves."
                )
            table = {}
            for key, values in sorted(dict(self.forecast[path]).items()):
                parse_predictor_key(key)
                values = tuple(float(v) for v in values)
                if len(values) != self.steps or any(math.isnan(v) or v < 0 for v in values):
                    raise ValueError(
                        f"forecast[{path!r}][{key!r}] must hold one non-negative error per step "
                        f"({self.steps}); got {len(values)} values {list(values)[:4]}..."
                    )
                table[key] = values
            checked[path] = table
        return checked

    @property
    def max_order(self) -> int:
        """The highest predictor order with recorded errors (0: reuse only)."""
        return max((parse_predictor_key(k)[0] for table in self.forecast.values() for k in table), default=0)

    def predictor_errors(self, key: str) -> dict[str, np.ndarray]:
        """Predictor key -> errors per step for a branch path, or a component averaged over its
        blocks (as `curve`)."""
        paths = (key,) if key in self.errors else self.branches_of(key)
        if not paths or any(path not in self.forecast for path in paths):
            return {}
        keys = self.forecast[paths[0]]
        return {k: np.mean([self.forecast[path][k] for path in paths], axis=0) for k in keys}

    def _curves(self, path: Any, value: Any, label: str = "") -> tuple[tuple[float, ...], ...]:
        if not isinstance(path, str) or "." not in path:
            raise ValueError(
                f"error keys must be branch paths '<block path>.<component>' such as "
                f"'transformer_blocks.0.attn1'; got {path!r}."
            )
        label = label or f"errors[{path!r}]"
        curves = tuple(tuple(float(v) for v in curve) for curve in value)
        if len(curves) != self.lookahead:
            raise ValueError(f"{label} must hold one curve per lag 1..{self.lookahead}; got {len(curves)}.")
        for k, curve in enumerate(curves, start=1):
            if len(curve) != max(self.steps - k, 0):
                raise ValueError(
                    f"{label} lag {k} must have steps - k = {max(self.steps - k, 0)} values "
                    f"(e_k[i] compares step i with step i + k); got {len(curve)}."
                )
            if any(math.isnan(v) or v < 0 for v in curve):
                raise ValueError(f"{label} lag {k} must be non-negative numbers; got {list(curve)}.")
        return curves

    def _per_call(self, curves: dict[str, tuple]) -> dict[str, tuple]:
        """Validated `per_call` (one call: `errors` itself); `errors` must be its per-step maximum."""
        if self.per_call is None:
            return {path: (value,) for path, value in curves.items()}
        if not isinstance(self.per_call, Mapping) or set(self.per_call) != set(curves):
            found = (
                sorted(self.per_call) if isinstance(self.per_call, Mapping) else type(self.per_call).__name__
            )
            raise ValueError(
                f"per_call must name the same branch paths as errors ({sorted(curves)}); got {found}. "
                "Build both with CalibrationErrors.from_calls(steps, lookahead, per_call, ...)."
            )
        per_call, counts = {}, set()
        for path in curves:
            calls = self.per_call[path]
            per_call[path] = tuple(
                self._curves(path, call, f"per_call[{path!r}][{index}]") for index, call in enumerate(calls)
            )
            counts.add(len(per_call[path]))
            if per_call[path] and _max_over_calls(path, per_call[path]) != curves[path]:
                raise ValueError(
                    f"errors[{path!r}] must be the per-step maximum over the calls of per_call[{path!r}] "
                    "(one mask serves every call of a step); it is not. Build both with "
                    "CalibrationErrors.from_calls(steps, lookahead, per_call, ...)."
                )
        if len(counts) != 1 or 0 in counts:
            raise ValueError(
                f"per_call must give every branch the same number (>= 1) of calls per step; got "
                f"{sorted(counts)}. Record every call of every step."
            )
        return per_call

    # Frozen dataclass plumbing: MappingProxyType is neither hashable nor picklable.
    def __hash__(self) -> int:
        return hash((self.steps, self.lookahead, tuple(self.errors.items())))

    def __reduce__(self):
        return (type(self), tuple(_plain(getattr(self, name)) for name in _FIELDS))

    def __repr__(self) -> str:
        calls = f", calls_per_step={self.calls_per_step}" if self.calls_per_step > 1 else ""
        return (
            f"CalibrationErrors({self.model_class or '?'}, steps={self.steps}, lookahead={self.lookahead}"
            f"{calls}, generations={self.generations}, branches={len(self.errors)}, "
            f"components={list(self.components)})"
        )

    # ------------------------------------------------------------------ views

    @property
    def calls_per_step(self) -> int:
        """Model calls per step during calibration (2 for unbatched classifier-free guidance)."""
        return len(next(iter(self.per_call.values())))

    def for_call(self, call: int) -> CalibrationErrors:
        """The errors of call `call` of each step alone, as single-call errors (e.g. to plot the
        conditional and the unconditional call apart)."""
        if isinstance(call, bool) or not isinstance(call, int) or not 0 <= call < self.calls_per_step:
            raise ValueError(
                f"call must be an index 0..{self.calls_per_step - 1} of a call of the step; got {call!r}."
            )
        if self.calls_per_step == 1:
            return self
        errors = {path: calls[call] for path, calls in self.per_call.items()}
        metadata = {**self.metadata, "call": call}
        return CalibrationErrors(
            self.steps,
            self.lookahead,
            errors,
            dict(self.flops),
            self.total_flops,
            self.generations,
            self.model_class,
            metadata,
        )

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

        With several calls per step, each call's curves are resampled and `errors` is their
        maximum again, so the resampled schedule stays safe for the worst call.
        """
        _check_int("steps", steps, minimum=1)
        if lags not in ("steps", "time"):
            raise ValueError(f'lags must be "steps" or "time"; got {lags!r}.')
        if steps == self.steps:
            return self
        per_call = {
            path: [_resampled_curves(curves, self.steps, steps, lags) for curves in calls]
            for path, calls in self.per_call.items()
        }
        metadata = {
            **self.metadata,
            "resampled_from_steps": self.metadata.get("resampled_from_steps", self.steps),
            "resampled_lags": lags,
        }
        # Predictor errors depend on the exact step spacing of each history: not resampled, so
        # schedules from resampled errors reuse (calibrate at the step count to forecast).
        if self.forecast:
            metadata["forecast_dropped"] = "predictor errors are not resampled"
        fields = {
            "flops": dict(self.flops),
            "total_flops": self.total_flops,
            "generations": self.generations,
            "model_class": self.model_class,
            "metadata": metadata,
        }
        if self.calls_per_step == 1:
            errors = {path: calls[0] for path, calls in per_call.items()}
            return CalibrationErrors(steps, self.lookahead, errors, **fields)
        return CalibrationErrors.from_calls(steps, self.lookahead, per_call, **fields)

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
        """Plain JSON data in the versioned ``smoothcache_fx.calibration_errors`` format;
        ``per_call`` only with several calls per step (with one it would repeat ``errors``)."""
        names = tuple(
            n
            for n in _FIELDS
            if (n != "per_call" or self.calls_per_step > 1) and (n != "forecast" or self.forecast)
        )
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            **{n: _plain(getattr(self, n)) for n in names},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationErrors:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT_NAME:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(
                f"calibration errors must be in the {FORMAT_NAME!r} format; got {found!r}. "
                "Pass a file written by CalibrationErrors.save()."
            )
        version = data.get("version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise ValueError(
                f"calibration errors version must be one of {list(READABLE_VERSIONS)}; got {version!r}. "
                "Re-run smoothcache_fx.calibrate with this version."
            )
        fields = (
            set(_FIELDS)
            - ({"per_call"} if version == 1 else set())
            - ({"forecast"} if version < 3 else set())
        )
        missing = sorted({"steps", "lookahead", "errors"} - set(data))
        unknown = sorted(set(data) - fields - {"format", "version"})
        if missing or unknown:
            raise ValueError(f"calibration errors: missing fields {missing}, unknown fields {unknown}.")
        return cls(**{name: data[name] for name in _FIELDS if name in data})

    @classmethod
    def load(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> CalibrationErrors:
        """Load from a JSON file written by :meth:`save` (or its parsed dict); no tensors involved."""
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        path = Path(source)
        data = read_json_object(path, "calibration errors", "the output of CalibrationErrors.save()")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{path}: {err}") from err

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON (floats round-trip exactly); returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path


def _resampled_curves(
    curves: tuple[tuple[float, ...], ...], source_steps: int, steps: int, lags: str
) -> list[list[float]]:
    """One branch's e_1..e_lookahead moved from `source_steps` to `steps` (see `resampled`)."""
    lookahead = len(curves)

    def at(lag: int, positions: np.ndarray) -> np.ndarray:
        if lag == 0:
            return np.zeros(len(positions))
        curve = curves[lag - 1]
        if not curve:  # the lag did not fit in the calibrated generation: nothing measured
            return np.full(len(positions), math.inf)
        return interpolate(curve, source_steps, positions)

    resampled = []
    for k in range(1, lookahead + 1):
        positions = normalised_positions(steps)[: max(steps - k, 0)]
        if lags == "steps" or not len(positions):
            resampled.append(at(k, positions).tolist())
            continue
        span = k * (source_steps - 1) / (steps - 1)  # lag k in calibrated steps
        if span >= lookahead:
            values = at(lookahead, positions) * (span / lookahead)
        else:
            low, weight = int(span), span - int(span)
            values = at(low, positions)
            if weight:
                values = (1 - weight) * values + weight * at(low + 1, positions)
        resampled.append(values.tolist())
    return resampled


def _max_over_calls(path: str, calls: Sequence[Sequence[Sequence[float]]]) -> tuple[tuple[float, ...], ...]:
    """Per (lag, step), the largest error over the calls of a step: the error `errors` holds."""
    calls = [tuple(tuple(float(v) for v in curve) for curve in call) for call in calls]
    if not calls:
        raise ValueError(f"per_call[{path!r}] must hold the curves of at least one call; got none.")
    shapes = {tuple(len(curve) for curve in call) for call in calls}
    if len(shapes) != 1:
        raise ValueError(
            f"per_call[{path!r}] must give every call of the step the same curve lengths (one per lag, "
            f"steps - k values each); got {sorted(shapes)}."
        )
    return tuple(
        tuple(max(values) for values in zip(*curves, strict=True)) for curves in zip(*calls, strict=True)
    )


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
