"""The Schedule: which residual branch computes at which denoising step.

A schedule is data, not code: a frozen, validated mapping from a key to one 0/1 entry per step
(1 = compute the branch, 0 = reuse its cached output from the last step that computed). It is
decided before tracing, so the compiled step never branches on tensors; loading one touches no
device.

Keys come in three forms, from least to most specific:

* a component name, ``"attn1"`` / ``"ff"`` (diffusers) or ``"attn"`` / ``"mlp"`` (facebookresearch
  DiT): every branch whose module is called that;
* a per-block key in the Roblox/SmoothCache style, ``"attn1-3"``: component ``attn1`` of block 3;
* a full module path, ``"transformer_blocks.3.attn1"``: exactly that branch.

A key may also carry a predictor order (``orders``): what a skipped step of its branches uses.
0 (the default) reuses the last computed output; 1 and 2 extrapolate the last two or three computed
outputs in step index (``smoothcache_fx.schedules.forecast``). A forecast key may carry a strength
(``strengths``, default 1): how far along the extrapolation its forecast goes (0 is the last output).

Two file formats load: the bare JSON object published with Roblox/SmoothCache (key -> 0/1 list,
every order 0), and our own versioned envelope written by :meth:`Schedule.save` (version 1 files,
from before orders, load with every order 0; version 2 files, from before strengths, with every
strength 1).
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .forecast import check_order, check_strength
from .from_errors import alpha_for_speedup, errors_at, errors_metadata, masks_and_orders
from .json_file import read_json_object
from .normalised_time import interpolate, positions

FORMAT_NAME = "smoothcache_fx.schedule"
# Version 2 added `orders`, version 3 `strengths`; older files load with every order 0 and every
# strength 1. A schedule is written at the lowest version that holds it (no strengths: version 2),
# so a reader that predates strengths refuses exactly the files it would misread.
FORMAT_VERSION = 3
_ENVELOPE_FIELDS = frozenset({"format", "version", "steps", "masks", "metadata", "orders", "strengths"})
_FIELDS_ADDED = {2: "orders", 3: "strengths"}
_EXAMPLE = "{'attn1': [1, 0, 1, ...], 'ff': [1, 1, 0, ...]}"


@dataclass(frozen=True, repr=False)
class Schedule:
    """Which residual branch computes at which denoising step.

    Construction validates and normalises: masks become tuples of 0/1 ints in a read-only mapping
    with sorted keys, metadata becomes a read-only copy of plain JSON data (so a save/load round
    trip compares equal). Two schedules are equal when steps, masks and metadata are; the hash
    covers steps and masks only, because metadata may hold unhashable lists.

    Args:
        steps: number of denoising steps; every mask has exactly this many entries.
        masks: key -> one 0/1 (or bool) per step. Step 0 must compute: the cache is empty then.
        metadata: free-form JSON-serialisable notes (model, solver, alpha, lookahead, generator...).
        orders: key -> predictor order of a skipped step (0 reuse, 1 linear, 2 quadratic
            extrapolation in step index); every key must be a mask key; keys left out are 0, and
            order-0 entries are dropped so that equal behaviour compares equal.
        strengths: key -> forecast strength in [0, 1] of a key with an order: its forecast is
            `strength * extrapolation + (1 - strength) * last output`; keys left out are 1, and
            strength-1 entries are dropped.

    Example::

        >>> s = Schedule(4, {"attn1": [1, 0, 1, 0], "ff-2": [1, 1, 1, 0]})
        >>> s.mask_for("transformer_blocks.2.ff")
        (True, True, True, False)
        >>> s.computes("transformer_blocks.0.ff", 3)  # no key applies: always computes
        True
    """

    steps: int
    masks: Mapping[str, tuple[int, ...]]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    orders: Mapping[str, int] = field(default_factory=dict)
    strengths: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate_steps(self.steps)
        masks = _validate_masks(self.masks)
        orders = _validate_orders(self.orders, masks)
        strengths = _validate_strengths(self.strengths, orders)
        lengths: dict[int, list[str]] = {}
        for key, mask in masks.items():
            lengths.setdefault(len(mask), []).append(key)
        if len(lengths) > 1:
            found = ", ".join(f"{key}={len(mask)}" for key, mask in masks.items())
            raise ValueError(
                f"masks must all have the same length (one entry per denoising step); got {found}. "
                "Make every mask as long as the number of steps."
            )
        (length,) = lengths
        if length != self.steps:
            raise ValueError(
                f"masks must have steps={self.steps} entries each; got {length} for "
                f"{', '.join(map(repr, masks))}. Pass steps={length} or fix the masks."
            )
        lazy = [key for key, mask in masks.items() if mask[0] != 1]
        if lazy:
            raise ValueError(
                "every mask must compute at step 0, because the cache is empty before the first step "
                f"and there is nothing to reuse; got 0 at step 0 for {', '.join(map(repr, lazy))}. "
                "Set the first entry of these masks to 1."
            )
        object.__setattr__(self, "masks", types.MappingProxyType(masks))
        object.__setattr__(self, "orders", types.MappingProxyType(orders))
        object.__setattr__(self, "strengths", types.MappingProxyType(strengths))
        object.__setattr__(self, "metadata", types.MappingProxyType(_validate_metadata(self.metadata)))

    # Frozen dataclass plumbing: MappingProxyType is neither hashable nor picklable.
    def __hash__(self) -> int:
        return hash(
            (self.steps, tuple(self.masks.items()), tuple(self.orders.items()), tuple(self.strengths.items()))
        )

    def __reduce__(self):
        return (
            type(self),
            (self.steps, dict(self.masks), dict(self.metadata), dict(self.orders), dict(self.strengths)),
        )

    def __repr__(self) -> str:
        fractions = self.compute_fraction
        if len(fractions) <= 4:
            compute = "{" + ", ".join(f"{k!r}: {v:.2f}" for k, v in fractions.items()) + "}"
            keys = repr(list(self.keys))
        else:
            values = list(fractions.values())
            mean = sum(values) / len(values)
            compute = f"{mean:.2f} (min {min(values):.2f}, max {max(values):.2f})"
            keys = f"{len(values)} [{self.keys[0]!r}, {self.keys[1]!r}, ..., {self.keys[-1]!r}]"
        orders = f", orders={dict(self.orders)}" if self.orders else ""
        strengths = f", strengths={dict(self.strengths)}" if self.strengths else ""
        return f"Schedule(steps={self.steps}, keys={keys}, compute_fraction={compute}{orders}{strengths})"

    # ------------------------------------------------------------------ queries

    @property
    def keys(self) -> tuple[str, ...]:
        """The schedule's keys, sorted."""
        return tuple(self.masks)

    @property
    def compute_fraction(self) -> dict[str, float]:
        """Key -> fraction of steps that compute (1.0 = never reuses; the speed-up bound is its inverse)."""
        return {key: sum(mask) / self.steps for key, mask in self.masks.items()}

    def key_for(self, branch_path: str) -> str | None:
        """The key that decides ``branch_path``, most specific first; None when none applies.

        Precedence: the full module path itself, then ``"<component>-<block index>"`` (the last
        dotted segment, and the one before it when that is all digits, as in
        ``transformer_blocks.3.attn1`` -> ``attn1-3``), then the bare component.
        """
        for candidate in _candidates(branch_path):
            if candidate in self.masks:
                return candidate
        return None

    def mask_for(self, branch_path: str) -> tuple[bool, ...] | None:
        """One bool per step for the branch at ``branch_path`` (True = compute), or None.

        None means no key applies, and the branch computes at every step.

        Example::

            >>> s = Schedule(2, {"attn": [1, 0], "attn-3": [1, 1]})
            >>> s.mask_for("blocks.3.attn"), s.mask_for("blocks.4.attn"), s.mask_for("blocks.4.mlp")
            ((True, True), (True, False), None)
        """
        key = self.key_for(branch_path)
        return None if key is None else tuple(bool(v) for v in self.masks[key])

    @property
    def components(self) -> tuple[str, ...]:
        """The components the keys name, sorted: `attn` for `attn`, `attn-3` and `blocks.3.attn`."""
        return tuple(sorted({component_of(key) for key in self.masks}))

    def order_for(self, branch_path: str) -> int:
        """The predictor order of the branch at ``branch_path``'s skipped steps (0: plain reuse).

        Decided by the same key as its mask (see :meth:`key_for`).

        Example::

            >>> Schedule(3, {"attn": [1, 0, 0], "attn-2": [1, 0, 1]}, orders={"attn": 1}).order_for("blocks.1.attn")
            1
        """
        key = self.key_for(branch_path)
        return 0 if key is None else self.orders.get(key, 0)

    def strength_for(self, branch_path: str) -> float:
        """The forecast strength of the branch at ``branch_path`` (1.0: the full extrapolation;
        also for branches that reuse). Decided by the same key as its mask and order."""
        key = self.key_for(branch_path)
        return 1.0 if key is None else self.strengths.get(key, 1.0)

    def with_orders(self, orders: Mapping[str, int]) -> Schedule:
        """A copy with these predictor orders (key -> order) in place of the current ones; the
        strengths of keys that no longer forecast are dropped."""
        if not isinstance(orders, Mapping):
            raise TypeError(
                f"orders must be a mapping of key -> predictor order; got {type(orders).__name__}."
            )
        strengths = {key: value for key, value in self.strengths.items() if orders.get(key)}
        return dataclasses.replace(self, orders=orders, strengths=strengths)

    def with_strengths(self, strengths: Mapping[str, float] | float) -> Schedule:
        """A copy with these forecast strengths in place of the current ones: a mapping (key ->
        strength, keys with an order only) or one number for every key with an order.

        Example::

            >>> s = Schedule(4, {"attn1": [1, 0, 1, 0], "ff": [1, 0, 0, 1]}, orders={"ff": 1})
            >>> dict(s.with_strengths(0.75).strengths)
            {'ff': 0.75}
        """
        if not isinstance(strengths, Mapping):
            strengths = {key: check_strength(strengths, "with_strengths") for key in self.orders}
        return dataclasses.replace(self, strengths=strengths)

    def computes(self, branch_path: str, step: int) -> bool:
        """Whether the branch at ``branch_path`` computes at ``step`` (True when no key applies)."""
        if not 0 <= step < self.steps:
            raise ValueError(
                f"step must be in [0, {self.steps}) for this {self.steps}-step schedule; got {step}. "
                "Run as many steps as the schedule has, or load a schedule made for this step count."
            )
        key = self.key_for(branch_path)
        return key is None or self.masks[key][step] == 1

    def unmatched_keys(self, branch_paths: Iterable[str]) -> list[str]:
        """Keys that name none of ``branch_paths`` (sorted): usually a typo or a different model.

        A key matches a path when it is one of that path's candidates (see :meth:`key_for`), even
        if a more specific key decides the path; a key shadowed that way still names a real branch.
        """
        named = {candidate for path in branch_paths for candidate in _candidates(path)}
        return [key for key in self.masks if key not in named]

    def with_metadata(self, **metadata: Any) -> Schedule:
        """A copy with ``metadata`` merged over the current metadata (this schedule is unchanged)."""
        return dataclasses.replace(self, metadata={**self.metadata, **metadata})

    def rename(self, components: Mapping[str, str]) -> Schedule:
        """A copy whose keys name other components (this schedule is unchanged): Roblox's DiT
        files say `attn` and `mlp` where diffusers' DiT has `attn1` and `ff`.

        The component part of every key is renamed: `attn` -> `attn1`, `attn-3` -> `attn1-3`,
        `blocks.3.attn` -> `blocks.3.attn1`.

        Example::

            >>> sorted(Schedule(2, {"attn": [1, 0], "mlp-1": [1, 1]}).rename({"attn": "attn1", "mlp": "ff"}).keys)
            ['attn1', 'ff-1']
        """
        if not isinstance(components, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in components.items()
        ):
            raise TypeError(
                f"components must map component names to component names, e.g. {{'attn': 'attn1'}}; "
                f"got {components!r}."
            )
        renamed: dict[str, tuple[int, ...]] = {}
        used = set()
        for key, mask in self.masks.items():
            new = _renamed_key(key, components)
            if new != key:
                used.add(component_of(key))
            if new in renamed:
                raise ValueError(
                    f"renaming gives two schedule keys the name {new!r}; got keys {list(self.masks)} and "
                    f"renames {dict(components)}. Rename to distinct components, or drop one key first."
                )
            renamed[new] = mask
        orders = {_renamed_key(key, components): order for key, order in self.orders.items()}
        strengths = {_renamed_key(key, components): value for key, value in self.strengths.items()}
        unused = sorted(set(components) - used)
        if unused:
            raise ValueError(
                f"rename names components {unused} that no schedule key has; the keys are "
                f"{list(self.masks)}. Check the spelling, or leave those out of the mapping."
            )
        return dataclasses.replace(self, masks=renamed, orders=orders, strengths=strengths)

    def resample(self, steps: int) -> Schedule:
        """This schedule for another step count (this one is unchanged), every key kept.

        Step j of the new schedule sits at the same normalised time as in `from_errors(steps=)`
        (``u = j / (steps - 1)``, ``smoothcache_fx.schedules.normalised_time``) and takes the
        entry of the nearest original step there: each mask is linearly interpolated and computes
        where the result is >= 0.5 (a tie computes). Step 0 keeps computing, and so does the last
        step when the original's last step does. Derived from a mask, not from calibration: with
        the errors at hand, `Schedule.from_errors(errors, alpha, steps=...)` decides better.

        Example::

            >>> Schedule(7, {"attn1": [1, 0, 0, 1, 0, 0, 1]}).resample(4).masks["attn1"]
            (1, 0, 0, 1)
            >>> Schedule(5, {"attn1": [1, 0, 1, 0, 1]}).resample(9).masks["attn1"]  # ties compute
            (1, 1, 0, 1, 1, 1, 0, 1, 1)
        """
        _validate_steps(steps)
        if steps == self.steps:
            return self
        at = positions(steps)
        masks = {
            key: tuple(int(value >= 0.5) for value in interpolate(mask, self.steps, at))
            for key, mask in self.masks.items()
        }
        original = self.metadata.get("resampled_from_steps", self.steps)
        # A predictor order and a strength are per key, not per step: they carry over as they are.
        metadata = {**self.metadata, "resampled_from_steps": original}
        return Schedule(steps, masks, metadata, orders=self.orders, strengths=self.strengths)

    # ------------------------------------------------------------------ generators

    @classmethod
    def all_compute(cls, steps: int, components: Sequence[str]) -> Schedule:
        """Every branch computes at every step: the uncached baseline, written as a schedule.

        Example::

            >>> Schedule.all_compute(3, ["attn1"]).masks["attn1"]
            (1, 1, 1)
        """
        _validate_steps(steps)
        keys = _validate_components(components)
        return cls(steps, {key: [1] * steps for key in keys}, {"generator": "all_compute"})

    @classmethod
    def uniform(
        cls, steps: int, interval: int, components: Sequence[str], extra_steps: Iterable[int] = ()
    ) -> Schedule:
        """FORA-style fixed interval: step ``i`` computes iff ``i % interval == 0`` or ``i`` is
        one of ``extra_steps``.

        Plain FORA: the last step is not forced to compute. The Roblox ``*-N-2-fora.json`` files
        differ from ``uniform(steps, 2, ...)`` in that one entry only (their last step computes).
        ``interval=1`` gives the same masks as :meth:`all_compute`. ``extra_steps=(1, steps - 1)``
        is the forecasting recipe (TaylorSeer-style): step 1 gives a line its second point before
        the first skip, and the last step computes.

        Example::

            >>> Schedule.uniform(5, 2, ["attn", "mlp"]).masks["attn"]
            (1, 0, 1, 0, 1)
            >>> Schedule.uniform(7, 3, ["attn"], extra_steps=(1, 6)).masks["attn"]
            (1, 1, 0, 1, 0, 0, 1)
        """
        _check_interval(interval, "interval")
        _validate_steps(steps)
        keys = _validate_components(components)
        extra = _check_extra_steps(extra_steps, steps)
        mask = _interval_mask(steps, [(0, interval)], extra)
        metadata = {"generator": "uniform", "interval": interval, **({"extra_steps": extra} if extra else {})}
        return cls(steps, {key: mask for key in keys}, metadata)

    @classmethod
    def piecewise(
        cls,
        steps: int,
        intervals: Mapping[int, int],
        components: Sequence[str],
        extra_steps: Iterable[int] = (),
    ) -> Schedule:
        """Fixed intervals that change along the generation: ``intervals`` maps the first step of
        each piece to its interval; a piece computes at its first step and every ``interval``-th
        step after it, up to the next piece. ``extra_steps`` compute too, as in :meth:`uniform`.

        Why: the output does not weigh the steps evenly. On the demo DiT (BENCHMARKS.md, "Where
        computes matter") a compute in the middle of the generation buys more quality than one at
        either end: forecasts computed every 4th step up to step 35 and every 8th after it keep
        PSNR >= 30 dB over 500 samples at a 3.38x FLOP ideal, where a uniform interval needs every
        3rd step (2.44x) for the same quality.

        Example::

            >>> Schedule.piecewise(10, {0: 3, 6: 2}, ["ff"], extra_steps=(9,)).masks["ff"]
            (1, 0, 0, 1, 0, 0, 1, 0, 1, 1)
        """
        _validate_steps(steps)
        keys = _validate_components(components)
        pieces = _check_pieces(intervals, steps)
        extra = _check_extra_steps(extra_steps, steps)
        mask = _interval_mask(steps, pieces, extra)
        metadata = {
            "generator": "piecewise",
            "intervals": [list(piece) for piece in pieces],
            **({"extra_steps": extra} if extra else {}),
        }
        return cls(steps, {key: mask for key in keys}, metadata)

    @classmethod
    def from_errors(
        cls, errors, alpha: float, per_block: bool = False, steps: int | None = None, max_order: int = 0
    ) -> Schedule:
        """The SmoothCache schedule: reuse wherever the calibrated error stays within ``alpha``.

        Scans each component's block-averaged e_k curves (or each branch's with
        ``per_block=True``) from step 0, taking the largest lag k <= lookahead with
        e_k[i] <= alpha; the first and last steps always compute. ``steps`` derives a schedule
        for another step count by resampling the errors over normalised time. See
        ``smoothcache_fx.schedules.from_errors`` for the exact rule. Metadata records the
        calibration, ``alpha`` and (when the errors carry FLOPs) the ``ideal_speedup``.

        Args:
            errors: ``CalibrationErrors`` from ``smoothcache_fx.calibrate`` (or a path to its JSON).
            alpha: error budget >= 0; larger reuses more.
            per_block: one mask per block and component instead of one per component.
            steps: schedule length; default the calibrated one.
            max_order: also consider forecasting skipped steps with predictor orders up to this
                (errors from ``calibrate(..., max_order=...)``); each key gets the order whose scan
                computes least, recorded in ``orders``.

        Example::

            errors = smoothcache_fx.calibrate(pipe, lambda: pipe(class_labels=[207], num_inference_steps=50))
            schedule = Schedule.from_errors(errors, alpha=0.18)
        """
        errors = errors_at(errors, steps)
        masks, orders = masks_and_orders(errors, alpha, per_block, max_order)
        metadata = errors_metadata(errors, "from_errors", per_block, alpha=float(alpha))
        if max_order:
            metadata["max_order"] = max_order
        schedule = cls(errors.steps, masks, metadata, orders)
        if errors.total_flops:
            schedule = schedule.with_metadata(ideal_speedup=errors.ideal_speedup(schedule))
        return schedule

    @classmethod
    def for_speedup(
        cls, errors, target: float, per_block: bool = False, steps: int | None = None, max_order: int = 0
    ) -> Schedule:
        """The :meth:`from_errors` schedule with the smallest alpha whose FLOP-derived ideal speed-up
        reaches ``target``; metadata records ``alpha``, ``target`` and the ``ideal_speedup`` reached.

        Raises ValueError, naming the maximum reachable speed-up, when no alpha reaches it.

        Example::

            schedule = Schedule.for_speedup(errors, target=1.8)
        """
        errors = errors_at(errors, steps)
        alpha = alpha_for_speedup(errors, target, per_block, max_order)
        schedule = cls.from_errors(errors, alpha, per_block=per_block, max_order=max_order)
        return schedule.with_metadata(generator="for_speedup", target=target)

    # ------------------------------------------------------------------ I/O

    def to_dict(self) -> dict[str, Any]:
        """This schedule as plain JSON data in the versioned ``smoothcache_fx.schedule`` format."""
        data = {
            "format": FORMAT_NAME,
            "version": self.format_version,
            "steps": self.steps,
            "masks": {key: list(mask) for key, mask in self.masks.items()},
            "orders": dict(self.orders),
            "metadata": json.loads(json.dumps(dict(self.metadata))),
        }
        if self.strengths:
            data["strengths"] = dict(self.strengths)
        return data

    @property
    def format_version(self) -> int:
        """The lowest format version that holds this schedule: 3 with strengths, else 2."""
        return 3 if self.strengths else 2

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        """Build a schedule from either on-disk format, as parsed JSON.

        * Ours (has ``"format"``): ``{"format": "smoothcache_fx.schedule", "version": 3,
          "steps": N, "masks": {...}, "orders": {...}, "strengths": {...}, "metadata": {...}}``;
          version 2 has no ``strengths`` (every strength 1), version 1 neither ``orders`` (every
          order 0).
        * Roblox/SmoothCache: the bare mapping ``{"attn": [1, 0, ...], "mlp": [...]}``; steps is
          the mask length.
        """
        if not isinstance(data, Mapping):
            raise TypeError(
                f"schedule data must be a mapping; got {type(data).__name__}. Pass a dict such as "
                f"{_EXAMPLE} or the output of Schedule.to_dict()."
            )
        if "format" not in data and "version" not in data:
            # Steps come from the validated masks, so arrays and tensors count like lists; when the
            # lengths differ, the constructor names every key with its length.
            masks = _validate_masks(data)
            return cls(max(len(mask) for mask in masks.values()), masks, {})
        if data.get("format") != FORMAT_NAME:
            raise ValueError(
                f"schedule format must be {FORMAT_NAME!r}; got {data.get('format')!r}. Pass a file written "
                "by Schedule.save(), or a bare Roblox-style mapping of keys to 0/1 lists."
            )
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
            raise ValueError(
                f"schedule version must be an int from 1 to {FORMAT_VERSION} (the versions this smoothcache_fx "
                f"reads); got {version!r}. A newer version was written by a newer smoothcache_fx: "
                "upgrade, or re-save the schedule with this one."
            )
        later = {name for added, name in _FIELDS_ADDED.items() if added > version}
        fields = _ENVELOPE_FIELDS - later
        unknown = sorted(set(data) - fields)
        missing = sorted({"steps", "masks"} - set(data))
        if unknown or missing:
            optional = " and ".join(
                ["metadata", *(name for _, name in sorted(_FIELDS_ADDED.items()) if name not in later)]
            )
            newer = [name for name in unknown if name in later]
            hint = (
                f" {newer} came with version {max(v for v, n in _FIELDS_ADDED.items() if n in newer)}: "
                "set that version."
                if newer
                else ""
            )
            raise ValueError(
                f"a version-{version} schedule must have the fields steps, masks and optionally {optional}; "
                f"got unknown {unknown} and missing {missing}. Fix the field names.{hint}"
            )
        return cls(
            data["steps"],
            data["masks"],
            data.get("metadata", {}),
            data.get("orders", {}),
            data.get("strengths", {}),
        )

    @classmethod
    def load(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> Schedule:
        """Load a schedule from a JSON file (either format) or an already parsed dict.

        Reads JSON only; no tensors or device are touched. Every failure names the file and what
        to do: FileNotFoundError (or another OSError) when it cannot be read, ValueError when it is
        not UTF-8 JSON or holds invalid masks, TypeError when a value has the wrong type.

        Example::

            schedule = Schedule.load("smoothcache_schedules/50-N-3-threshold-0.08.json")
        """
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(
                f"source must be a path (str or os.PathLike) or a dict; got {type(source).__name__}."
            )
        path = Path(source)
        expected = f"an object such as {_EXAMPLE}, the output of Schedule.save() or a Roblox-style schedule"
        data = read_json_object(path, "schedule", expected)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
        except TypeError as err:
            raise TypeError(f"{path}: {err}") from err

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON, one mask per line so diffs stay readable; returns the path."""
        data = self.to_dict()
        masks = ",\n".join(
            f"    {json.dumps(key)}: {json.dumps(mask)}" for key, mask in data["masks"].items()
        )
        metadata = json.dumps(data["metadata"], indent=2, sort_keys=True).replace("\n", "\n  ")
        text = (
            "{\n"
            f'  "format": {json.dumps(FORMAT_NAME)},\n'
            f'  "version": {data["version"]},\n'
            f'  "steps": {self.steps},\n'
            f'  "masks": {{\n{masks}\n  }},\n'
            f'  "orders": {json.dumps(data["orders"])},\n'
            + (f'  "strengths": {json.dumps(data["strengths"])},\n' if "strengths" in data else "")
            + f'  "metadata": {metadata}\n'
            "}\n"
        )
        path = Path(path)
        path.write_text(text, encoding="utf-8")
        return path


# ---------------------------------------------------------------------- helpers


def component_of(key: str) -> str:
    """The component a key names: `attn` in `attn`, `attn-3` and `blocks.3.attn`."""
    last = key.rsplit(".", 1)[-1]
    return last if "." in key else key.rsplit("-", 1)[0] if key.rsplit("-", 1)[-1].isdigit() else key


def _renamed_key(key: str, components: Mapping[str, str]) -> str:
    component = component_of(key)
    if component not in components:
        return key
    if "." in key:
        return f"{key.rsplit('.', 1)[0]}.{components[component]}"
    return components[component] + key[len(component) :]


def _candidates(branch_path: str) -> list[str]:
    """Keys that could name ``branch_path``, most specific first (see Schedule.key_for)."""
    segments = branch_path.split(".")
    component = segments[-1]
    candidates = [branch_path]
    if len(segments) >= 2 and segments[-2].isascii() and segments[-2].isdigit():
        candidates.append(f"{component}-{segments[-2]}")
    candidates.append(component)
    return candidates


def _check_interval(interval: Any, where: str) -> int:
    if not isinstance(interval, int) or isinstance(interval, bool):
        raise TypeError(f"{where} must be an int; got {type(interval).__name__} {interval!r}.")
    if interval < 1:
        raise ValueError(
            f"{where} must be >= 1 (compute every `interval` steps); got {interval}. "
            "Use interval=1 for no caching, 2 to compute every other step."
        )
    return interval


def _check_extra_steps(extra_steps: Iterable[int], steps: int) -> list[int]:
    """Sorted distinct step indices, or a ValueError naming the ones out of [0, steps)."""
    extra = list(extra_steps)
    bad = [v for v in extra if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < steps]
    if bad:
        raise ValueError(
            f"extra_steps must be step indices in [0, {steps}); got {bad}. Use steps - 1 for the last step."
        )
    return sorted(set(extra))


def _interval_mask(steps: int, pieces: Sequence[tuple[int, int]], extra: Iterable[int]) -> list[int]:
    """1 at each piece's first step and every `interval`-th step after it up to the next piece
    (pieces sorted, the first at 0), and at the `extra` steps; 0 elsewhere."""
    mask = [0] * steps
    ends = [start for start, _ in pieces[1:]] + [steps]
    for (start, interval), end in zip(pieces, ends, strict=True):
        for i in range(start, end, interval):
            mask[i] = 1
    for i in extra:
        mask[i] = 1
    return mask


def _check_pieces(intervals: Any, steps: int) -> list[tuple[int, int]]:
    """`piecewise`'s mapping as sorted (first step, interval) pairs; the first piece starts at 0."""
    if not isinstance(intervals, Mapping):
        raise TypeError(
            "intervals must be a mapping of first step -> interval, e.g. {0: 5, 15: 4, 35: 5}; "
            f"got {type(intervals).__name__} {intervals!r}."
        )
    starts = list(intervals)
    bad = [v for v in starts if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < steps]
    if bad:
        raise ValueError(f"intervals' keys must be first steps of pieces in [0, {steps}); got {bad}.")
    if 0 not in intervals:
        raise ValueError(
            f"intervals must start a piece at step 0 (step 0 always computes); got first steps {sorted(starts)}. "
            "Add a 0 key."
        )
    return [(start, _check_interval(intervals[start], f"intervals[{start}]")) for start in sorted(starts)]


def _validate_steps(steps: Any) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool):
        raise TypeError(f"steps must be an int; got {type(steps).__name__} {steps!r}.")
    if steps < 1:
        raise ValueError(
            f"steps must be >= 1 (a schedule holds one entry per denoising step); got {steps}. "
            "Pass the sampler's number of inference steps."
        )


def _validate_key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(
            f"schedule keys must be strings; got {type(key).__name__} {key!r}. Use a component name "
            "('attn1'), a per-block key ('attn1-3') or a module path ('transformer_blocks.3.attn1')."
        )
    if not key or any(c.isspace() for c in key) or "" in key.split("."):
        raise ValueError(
            "schedule keys must be non-empty, without whitespace or empty dotted segments; "
            f"got {key!r}. Use a component name ('attn1'), a per-block key ('attn1-3') or a module path "
            "('transformer_blocks.3.attn1')."
        )
    return key


def _validate_mask(key: str, mask: Any) -> tuple[int, ...]:
    """One 0/1 int per step, from a list or tuple of ints or bools, or a 1-D numpy array or tensor.

    Arrays and numpy / torch scalars are recognised by their ``tolist`` (and ``ndim``) rather than
    by type, so that loading a schedule imports neither numpy nor torch; their elements then pass
    the same checks as a list's.
    """
    if hasattr(mask, "ndim") and hasattr(mask, "tolist"):
        mask = _array_values(key, mask)
    if isinstance(mask, (str, bytes, Mapping, set, frozenset)) or not isinstance(mask, Iterable):
        raise TypeError(
            f"the mask for {key!r} must be a list of 0/1, one per step; got {type(mask).__name__} {mask!r}. "
            "Pass a list such as [1, 0, 1, ...] or a 1-D array of ints or bools."
        )
    values = []
    for step, value in enumerate(mask):
        plain = value.tolist() if hasattr(value, "tolist") else value  # numpy scalar, 0-d tensor
        try:
            number = int(plain) if isinstance(plain, bool) else operator.index(plain)
        except TypeError:
            raise TypeError(
                f"mask values must be 0 or 1 (int or bool); got {value!r} ({type(value).__name__}) at step "
                f"{step} of {key!r}. Use 1 to compute and 0 to reuse the cached output."
            ) from None
        if number not in (0, 1):
            raise ValueError(
                f"mask values must be 0 or 1; got {value!r} at step {step} of {key!r}. "
                "Use 1 to compute the branch and 0 to reuse its cached output."
            )
        values.append(number)
    return tuple(values)


def _array_values(key: str, array: Any) -> list[Any]:
    """The entries of a 1-D numpy array or tensor as Python scalars; any other shape is refused."""
    if array.ndim != 1:
        raise ValueError(
            f"the mask for {key!r} must be one-dimensional, one 0/1 per step; got a {array.ndim}-D "
            f"{type(array).__name__} of shape {tuple(array.shape)}. Give each key its own 1-D mask, "
            "e.g. one row of a 2-D array per key."
        )
    values = array.tolist()
    if not all(isinstance(value, int) for value in values):  # bool is an int too
        odd = next(((step, v) for step, v in enumerate(values) if v not in (0, 1)), None)
        where = "" if odd is None else f" with {odd[1]!r} at step {odd[0]}"
        raise TypeError(
            f"the mask for {key!r} must be an array of ints or bools, one 0/1 per step; got a "
            f"{array.dtype} {type(array).__name__}{where}. Turn it into 0/1 first, e.g. (mask > 0.5), "
            "or mask.astype(int) (numpy) / mask.int() (torch) when it holds only 0.0 and 1.0."
        )
    return values


def _validate_masks(masks: Any) -> dict[str, tuple[int, ...]]:
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping of key -> 0/1 list; got {type(masks).__name__}.")
    if not masks:
        raise ValueError(
            f"a schedule must have at least one mask; got no keys. Pass masks such as {_EXAMPLE}, "
            "or use Schedule.all_compute(steps, components)."
        )
    for key in masks:
        _validate_key(key)
    return {key: _validate_mask(key, masks[key]) for key in sorted(masks)}


def _validate_orders(orders: Any, masks: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Key -> order in [0, MAX_ORDER], each key a mask key; order 0 entries dropped (the default)."""
    if not isinstance(orders, Mapping):
        raise TypeError(f"orders must be a mapping of key -> predictor order; got {type(orders).__name__}.")
    unknown = sorted(key for key in orders if key not in masks)
    if unknown:
        raise ValueError(
            f"orders must name keys of the masks; got {unknown}, not among {list(masks)}. A predictor "
            "order applies to the branches its mask key decides: add the mask, or key the order like it."
        )
    checked = {key: check_order(orders[key], f"orders[{key!r}]") for key in sorted(orders)}
    return {key: order for key, order in checked.items() if order}


def _validate_strengths(strengths: Any, orders: Mapping[str, int]) -> dict[str, float]:
    """Key -> strength in [0, 1], each key one with an order; strength-1 entries dropped (the default)."""
    if not isinstance(strengths, Mapping):
        raise TypeError(
            f"strengths must be a mapping of key -> forecast strength; got {type(strengths).__name__}."
        )
    unknown = sorted(key for key in strengths if key not in orders)
    if unknown:
        raise ValueError(
            f"strengths must name keys with a predictor order; got {unknown}, not among "
            f"{sorted(orders)}. A strength scales a forecast: give the key an order >= 1 first, or "
            "drop its strength (a reused output has nothing to scale)."
        )
    checked = {key: check_strength(strengths[key], f"strengths[{key!r}]") for key in sorted(strengths)}
    return {key: value for key, value in checked.items() if value != 1.0}


def _validate_metadata(metadata: Any) -> dict[str, Any]:
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping; got {type(metadata).__name__}.")
    for key in metadata:
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be strings; got {type(key).__name__} {key!r}.")
    try:
        # A JSON round trip checks it can be saved, copies it, and turns tuples into lists so
        # that a loaded schedule compares equal to the one that was saved.
        return json.loads(json.dumps(dict(metadata)))
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"metadata must be JSON-serialisable (it is saved with the schedule); got {err}. "
            "Store numbers, strings, lists and dicts only."
        ) from err


def _validate_components(components: Any) -> list[str]:
    if isinstance(components, str) or not isinstance(components, Iterable):
        raise TypeError(
            "components must be a sequence of keys such as ['attn1', 'ff']; "
            f"got {type(components).__name__} {components!r}."
        )
    keys = [_validate_key(key) for key in components]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"components must be distinct; got {duplicates} more than once. Drop the repeats.")
    return keys


def as_schedule(schedule: Any) -> Schedule:
    """What `transform` and `set_schedule` accept as a schedule, as a `Schedule`: one itself, a
    dict in the SmoothCache JSON format, or a path to such a JSON file."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, (Mapping, str, os.PathLike)):
        return Schedule.load(schedule)
    raise TypeError(
        f"schedule must be a smoothcache_fx.Schedule, a dict in the SmoothCache JSON format, a path "
        f"to a JSON file; got {type(schedule).__name__}."
    )
