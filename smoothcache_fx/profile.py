"""`profile`: what each step computed, what it cost, and where the time went.

One call runs a generation under `torch.profiler` with named ranges: `smoothcache/step N` around
each model call (forward hooks, in Python), `smoothcache/<block path>` around each block and
`smoothcache/<block path>.<component> computed|reused` around each residual branch (graph nodes,
`passes/annotate.py`). The ranges are in the Chrome/Perfetto trace, over the ops and kernels, and
the report sums them per step, per branch and per kernel.

Annotation costs nothing outside `profile`: the runtime runs annotated variants only while
`ToolOptions.annotator` is set, which only `profile` does. Eager variants are annotated inline. Inductor
drops profiler ops from what it compiles, so compiled variants are split at branch boundaries for
profiling, each segment compiled on its own, with the ranges between the compiled calls; the report
says so (the split costs the fusion across a boundary and one compiled-call overhead per segment).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.utils.flop_counter import FlopCounterMode

from smoothcache_fx.block import SCHEDULE_BUFFER
from smoothcache_fx.flops import flop_counter
from smoothcache_fx.kernels.compat import inductor_kernel_profile
from smoothcache_fx.passes.annotate import (
    RANGE_PREFIX,
    add_split_ranges,
    annotate_block,
    branch_range,
    split_block,
    step_range,
)
from smoothcache_fx.runtime import ToolOptions

FORMAT_VERSION = 1
DEFAULT_TOP = 15
GATED_RESIDUAL_ADD_NAMES = ("gated_residual_add",)  # the op (CPU) and `_gated_residual_add_kernel`
# Framework ranges whose names carry a per-graph id; merged into one kernel row each.
_NORMALISE = (
    (re.compile(r"## Call CompiledFxGraph \w+ ##"), "## Call CompiledFxGraph ##"),
    (re.compile(r"Torch-Compiled Region: \d+/\d+"), "Torch-Compiled Region"),
)


# -- report ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepProfile:
    """One model call: its schedule step, wall time and which branches computed or were reused."""

    call: int
    generation: int
    step: int
    wall_s: float
    computed: tuple[str, ...]
    reused: tuple[str, ...]
    branch_s: float
    flops: int | None


@dataclass(frozen=True)
class BranchProfile:
    """One residual branch (`<block path>.<component>`) over the profiled run."""

    path: str
    computed: int
    reused: int
    computed_s: float
    reused_s: float
    share: float  # of the model time (sum of step walls)

    @property
    def total_s(self) -> float:
        return self.computed_s + self.reused_s


@dataclass(frozen=True)
class KernelProfile:
    """One operator / kernel row: calls and self time (device time on CUDA)."""

    name: str
    calls: int
    self_s: float
    share: float  # of the profiled run's wall time


@dataclass(frozen=True)
class ProfileReport:
    """The result of `profile`; `str(report)` is a text table, `to_dict`/`to_json` the same as JSON.

    Times are seconds. `model_s` is the sum of step walls, `outside_s` what `run` spent between and
    around model calls. `kernel_s` sums self time over all operator/kernel rows (device time on
    CUDA), `interpreter_s` the self time of the smoothcache ranges (Python between ops inside steps);
    on CPU the two add up to the profiled time of the run. Speedups are all-compute over cached:
    `ideal_speedup` from FLOPs (`smoothcache_fx.flops`), `achieved_speedup` from model time, with
    `baseline=True`.
    """

    model: str
    device: str
    mode: str
    schedule_steps: int
    wall_s: float
    model_s: float
    outside_s: float
    kernel_s: float
    interpreter_s: float
    steps: tuple[StepProfile, ...]
    branches: tuple[BranchProfile, ...]
    kernels: tuple[KernelProfile, ...]
    cache_bytes: int
    flops: int | None = None
    all_compute_flops: int | None = None
    baseline_wall_s: float | None = None
    baseline_model_s: float | None = None
    trace: str | None = None
    branch_ranges: bool = True
    notes: tuple[str, ...] = ()

    @property
    def ideal_speedup(self) -> float | None:
        if not self.flops or not self.all_compute_flops:
            return None
        return self.all_compute_flops / self.flops

    @property
    def achieved_speedup(self) -> float | None:
        if self.baseline_model_s is None or self.model_s <= 0:
            return None
        return self.baseline_model_s / self.model_s

    @property
    def branch_s(self) -> float:
        return sum(branch.total_s for branch in self.branches)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["format_version"] = FORMAT_VERSION
        data["ideal_speedup"] = self.ideal_speedup
        data["achieved_speedup"] = self.achieved_speedup
        for row, branch in zip(data["branches"], self.branches, strict=True):
            row["total_s"] = branch.total_s
        return data

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def __str__(self) -> str:
        return _format(self)


# -- public ---------------------------------------------------------------------------------------
def profile(
    model,
    run: Callable[[], object],
    *,
    trace: str | os.PathLike | None = None,
    baseline: bool = False,
    branches: bool = True,
    flops: bool = True,
    warmup: int = 1,
    top: int = DEFAULT_TOP,
) -> ProfileReport:
    """Runs `run()` under torch.profiler and reports time per step, branch and kernel; `model` is
    left as it was (same schedule, variants and caches; its counters include the profiled runs).

    `run` is called `warmup` times first (capture, compile), once more under FlopCounterMode with
    eager variants when `flops`, then once profiled, and with `baseline` twice more with every branch
    computing (warm-up, profiled). Each run starts a new generation.

    Args:
        model: a model transformed by `smoothcache_fx.transform` (form="variants", or "graph" with
            branches=False), or a pipeline whose transformer is.
        run: a callable with no arguments that calls the model, e.g. `lambda: pipe(...)`.
        trace: write the profiled run's Chrome/Perfetto trace (JSON) here.
        baseline: also time an all-compute generation for the achieved speedup.
        branches: annotate each block and branch with a range. With compiled variants this splits
            them at branch boundaries for the profiled runs; False profiles the variants as they
            run normally (step ranges and kernels only).
        flops: count FLOPs (one more run, eager) for the FLOP-derived ideal speedup.
        warmup: unprofiled runs first, so capture and compilation stay out of the profile.
        top: how many kernel rows to keep (the gated residual add is always kept).

    Returns:
        A `ProfileReport`.

    Example::

        >>> import torch, smoothcache_fx
        >>> from diffusers import DiTTransformer2DModel
        >>> model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     num_layers=2, sample_size=8, num_embeds_ada_norm=10).eval()
        >>> model = smoothcache_fx.transform(model, smoothcache_fx.Schedule.uniform(4, 2, ["attn1", "ff"]))
        >>> def run():  # one generation; with a pipeline: lambda: pipe(..., num_inference_steps=4)
        ...     with torch.no_grad():
        ...         for t in range(4):
        ...             model(torch.randn(1, 4, 8, 8), timestep=torch.tensor([t]), class_labels=torch.tensor([1]))
        >>> report = smoothcache_fx.profile(model, run, baseline=True)
        >>> [len(step.computed) for step in report.steps]
        [4, 0, 4, 0]
        >>> round(report.ideal_speedup, 2) > 1
        True
        >>> report.to_json(os.devnull); text = str(report)  # or trace="trace.json" for Perfetto
    """
    runtime = _runtime_of(model)
    if not callable(run):
        raise TypeError(
            f"run must be a callable with no arguments that calls the model; got {type(run).__name__}."
        )
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int; got {warmup!r}.")
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive int; got {top!r}.")
    if branches and runtime.form != "variants":
        raise NotImplementedError(
            f"branch ranges need form='variants' (a Python-chosen graph per step); this model has "
            f"form={runtime.form!r}, whose branches are torch.cond bodies. Pass branches=False to "
            "profile steps and kernels only."
        )
    trace_path = _check_trace_path(trace)
    device = _model_device(runtime.model)
    annotator = _BranchAnnotator(runtime) if branches else None
    notes = _notes(runtime, device, branches)
    clock = _StepClock(runtime, device)
    tools = ToolOptions(annotator=annotator)
    try:
        with _kernel_profiling(runtime, device), runtime.using(tools):
            for _ in range(warmup):
                _run_once(run, runtime, clock)
            if baseline:
                with _all_compute(runtime):
                    for _ in range(warmup):
                        _run_once(run, runtime, clock)
            flop_steps = None
            if flops and runtime.form != "variants":
                notes.append("no FLOP count: FlopCounterMode cannot run the graph form's torch.cond.")
            elif flops:
                with runtime.using(ToolOptions(eager=True)):
                    flop_steps = _count_flops(run, runtime, clock)
            profiled = _profiled_run(run, runtime, clock, device, trace_path)
            base = None
            if baseline:
                with _all_compute(runtime):
                    base = _profiled_run(run, runtime, clock, device, None)
    finally:
        clock.remove()
        runtime.reset()
    if annotator is not None and annotator.skipped:
        notes.append(
            f"no range for {sorted(annotator.skipped)}: their work could not be made contiguous; it "
            "counts as block time."
        )
    return _report(runtime, device, profiled, base, flop_steps, trace_path, top, notes, branches)


# -- runs -------------------------------------------------------------------------------------------
@dataclass
class _Call:
    generation: int
    step: int
    start: float
    computed: tuple[str, ...] = ()
    reused: tuple[str, ...] = ()
    wall_s: float = 0.0
    flops: int | None = None


class _StepClock:
    """Forward hooks on the model: a `smoothcache/step N` range, wall time, branches computed and,
    during the FLOP run, FLOPs per model call. Registered after the runtime's hooks, so they see the
    step the runtime is about to run."""

    def __init__(self, runtime, device: torch.device):
        self.runtime = runtime
        self.device = device
        self.calls: list[_Call] = []
        self.flop_counter: FlopCounterMode | None = None
        self._open: tuple[_Call, torch.autograd.profiler.record_function, dict, int] | None = None
        self._hooks = [
            runtime.model.register_forward_pre_hook(self._before),
            runtime.model.register_forward_hook(self._after),
        ]

    def remove(self) -> None:
        self.close()
        for hook in self._hooks:
            hook.remove()

    def close(self) -> None:
        """End a range left open by a model call that raised."""
        if self._open is not None:
            self._open[1].__exit__(None, None, None)
            self._open = None

    def _before(self, module, args) -> None:
        self.close()
        runtime = self.runtime
        before = _counters(runtime)
        flops = self.flop_counter.get_total_flops() if self.flop_counter is not None else 0
        call = _Call(runtime.generations, runtime.step, 0.0)
        _synchronize(self.device)
        ranged = torch.autograd.profiler.record_function(step_range(runtime.step))
        ranged.__enter__()
        call.start = time.perf_counter()  # last, so the wall sits inside the range
        self._open = (call, ranged, before, flops)

    def _after(self, module, args, output) -> None:
        if self._open is None:
            return
        call, ranged, before, flops = self._open
        _synchronize(self.device)
        call.wall_s = time.perf_counter() - call.start
        ranged.__exit__(None, None, None)
        self._open = None
        after = _counters(self.runtime)
        call.computed = tuple(p for p, (c, _) in after.items() if c > before.get(p, (0, 0))[0])
        call.reused = tuple(p for p, (_, r) in after.items() if r > before.get(p, (0, 0))[1])
        if self.flop_counter is not None:
            call.flops = self.flop_counter.get_total_flops() - flops
        self.calls.append(call)


def _counters(runtime) -> dict[str, tuple[int, int]]:
    counts = {}
    for path, block in runtime.blocks.items():
        state = block._smoothcache_state
        for component in state.components:
            counts[f"{path}.{component}"] = (state.computed.get(component, 0), state.reused.get(component, 0))
    return counts


def _run_once(run, runtime, clock: _StepClock) -> tuple[list[_Call], float]:
    runtime.reset()
    clock.calls = []
    start = time.perf_counter()
    try:
        run()
    finally:
        clock.close()
    wall = time.perf_counter() - start
    if not clock.calls:
        raise ValueError(
            f"run must call the model; it returned without calling {runtime.model_class} (0 model "
            "calls). Pass a callable that runs a generation, e.g. lambda: pipe(..., "
            "num_inference_steps=N), not its result."
        )
    return clock.calls, wall


def _count_flops(run, runtime, clock: _StepClock) -> list[_Call]:
    """One run under FlopCounterMode; FLOPs per model call. The caller runs it with
    `ToolOptions(eager=True)`: the counter sees the ops of eager variants, not compiled calls."""
    try:
        with flop_counter() as counter:
            clock.flop_counter = counter
            calls, _ = _run_once(run, runtime, clock)
    finally:
        clock.flop_counter = None
    return calls


@dataclass
class _Profiled:
    calls: list[_Call]
    wall_s: float
    events: list


def _profiled_run(run, runtime, clock, device: torch.device, trace_path: str | None) -> _Profiled:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with _no_gc(), torch.profiler.profile(activities=activities) as prof:
        calls, wall = _run_once(run, runtime, clock)
    if trace_path is not None:
        prof.export_chrome_trace(trace_path)
    return _Profiled(calls, wall, prof.events())


@contextlib.contextmanager
def _no_gc():
    """Like timeit: a collection pause (tens of ms with many live objects) is not the model's time."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _all_compute(runtime):
    """Every scheduled branch computes at every step (the baseline), without touching captures or
    compiled variants: only each block's masks are swapped, and restored after."""
    steps = runtime.schedule.steps
    saved, tables = [], []
    for block in runtime.blocks.values():
        for entry in block._smoothcache_state.captures.values():
            saved.append((entry, entry.masks))
            entry.masks = {name: (True,) * steps for name in entry.masks}
        table = getattr(block, SCHEDULE_BUFFER, None)  # the graph form reads its schedule from here
        if table is not None:
            tables.append((table, table.clone()))
            table.fill_(True)
    try:
        yield
    finally:
        for entry, masks in saved:
            entry.masks = masks
        for table, values in tables:
            table.copy_(values)


@contextlib.contextmanager
def _kernel_profiling(runtime, device: torch.device):
    """Variants compiled during profile() on CPU name their C++ kernels in the profiler (Inductor's
    `cpp.enable_kernel_profile`); the setting is restored afterwards."""
    if runtime.compile_config.enabled and device.type == "cpu":
        with inductor_kernel_profile():
            yield
    else:
        yield


# -- annotated variants --------------------------------------------------------------------------
class _BranchAnnotator:
    """What `BlockState.run` calls while profiling: the variant's annotated graph for one block.

    Eager: a copy of the variant with ranges (per block, since names carry the block path). Compiled:
    the variant split at branch boundaries, each segment compiled once and shared by the blocks of
    that structure, under a per-block top-level graph that holds the ranges.
    """

    def __init__(self, runtime):
        self.runtime = runtime
        self.annotated: dict[tuple[int, str], torch.fx.GraphModule] = {}
        self.splits: dict[int, tuple] = {}
        self.skipped: set[str] = set()

    def __call__(self, path: str, shared, variant, tensors) -> Callable:
        key = (id(variant), path)
        found = self.annotated.get(key)
        if found is None:
            if self.runtime.compile_config.enabled:
                split, segments = self._split(shared, variant, tensors)
                found = add_split_ranges(split, path, segments)
                skipped = split.skipped
            else:
                annotated = annotate_block(variant, shared.branches, path)
                found, skipped = annotated.graph_module, annotated.skipped
            self.skipped.update(f"{path}.{component}" for component in skipped)
            self.annotated[key] = found
        return found

    def _split(self, shared, variant, tensors):
        found = self.splits.get(id(variant))
        if found is None:
            split = split_block(variant, shared.branches)
            device = tensors[0].device if tensors else torch.device("cpu")
            config = self.runtime.compile_config
            if config.uses_cuda_graphs:  # segments of one variant run once per block per step
                config = dataclasses.replace(config, mode=None)
            segments = {
                name: config.compile(split.graph_module.get_submodule(name), device)
                for name, _ in split.segments
            }
            found = (variant, split, segments)  # the variant is held so its id stays unique
            self.splits[id(variant)] = found
        return found[1], found[2]


# -- report assembly -----------------------------------------------------------------------------
def _report(
    runtime, device, profiled: _Profiled, base, flop_steps, trace_path, top, notes, branches: bool
) -> ProfileReport:
    cuda = device.type == "cuda"
    names = _range_names(runtime)
    ranges = [
        e for e in profiled.events if e.device_type == DeviceType.CPU and e.name.startswith(RANGE_PREFIX)
    ]
    step_events = sorted(
        (e for e in ranges if e.name.startswith(f"{RANGE_PREFIX}step ")), key=lambda e: e.time_range.start
    )
    branch_time: dict[str, list[float]] = {}  # path -> [computed_s, reused_s]
    per_step = [0.0] * len(step_events)
    step_index = {id(e): i for i, e in enumerate(step_events)}
    for event in ranges:
        hit = names.get(event.name)
        if hit is None:
            continue
        path, computed = hit
        seconds = (event.device_time_total if cuda else event.cpu_time_total) / 1e6
        branch_time.setdefault(path, [0.0, 0.0])[0 if computed else 1] += seconds
        parent = event.cpu_parent
        while parent is not None and id(parent) not in step_index:
            parent = parent.cpu_parent
        if parent is not None:
            per_step[step_index[id(parent)]] += seconds

    calls = profiled.calls
    flops_by_call = _flops_by_call(flop_steps, calls)
    steps = tuple(
        StepProfile(
            call=i,
            generation=c.generation,
            step=c.step,
            wall_s=c.wall_s,
            computed=c.computed,
            reused=c.reused,
            branch_s=per_step[i] if i < len(per_step) else 0.0,
            flops=flops_by_call[i] if flops_by_call else None,
        )
        for i, c in enumerate(calls)
    )
    model_s = sum(c.wall_s for c in calls)
    branch_rows = []
    for path in _branch_paths(runtime):
        computed_s, reused_s = branch_time.get(path, (0.0, 0.0))
        branch_rows.append(
            BranchProfile(
                path=path,
                computed=sum(path in s.computed for s in steps),
                reused=sum(path in s.reused for s in steps),
                computed_s=computed_s,
                reused_s=reused_s,
                share=(computed_s + reused_s) / model_s if model_s else 0.0,
            )
        )
    kernels, kernel_s, interpreter_s = _kernel_rows(profiled, cuda, top)
    flops = all_flops = None
    if flop_steps:
        flops, all_flops = _flop_totals(flop_steps)
    return ProfileReport(
        model=runtime.model_class,
        device=str(device),
        mode=notes[0],
        schedule_steps=runtime.schedule.steps,
        wall_s=profiled.wall_s,
        model_s=model_s,
        outside_s=profiled.wall_s - model_s,
        kernel_s=kernel_s,
        interpreter_s=interpreter_s,
        steps=steps,
        branches=tuple(branch_rows),
        kernels=tuple(kernels),
        cache_bytes=runtime.cache_bytes,
        flops=flops,
        all_compute_flops=all_flops,
        baseline_wall_s=None if base is None else base.wall_s,
        baseline_model_s=None if base is None else sum(c.wall_s for c in base.calls),
        trace=trace_path,
        branch_ranges=branches,
        notes=tuple(notes[1:]),
    )


def _range_names(runtime) -> dict[str, tuple[str, bool]]:
    """Branch range name -> (branch path, computed)."""
    names = {}
    for path in _branch_paths(runtime):
        block, component = path.rsplit(".", 1)
        for computed in (True, False):
            names[branch_range(block, component, computed)] = (path, computed)
    return names


def _branch_paths(runtime) -> list[str]:
    return [path for block in runtime.blocks for path in _block_branches(runtime, block)]


def _block_branches(runtime, block: str) -> list[str]:
    return [f"{block}.{component}" for component in runtime.branches.get(block, ())]


def _kernel_rows(profiled: _Profiled, cuda: bool, top: int):
    """Operator/kernel rows by self time: CPU ops on CPU, device kernels on CUDA. Device copies of
    user ranges (`gpu_user_annotation`) are not kernels; the ranges' own CPU self time is the
    interpreter's."""
    rows: dict[str, list] = {}
    interpreter_us = 0.0
    for event in profiled.events:
        on_cpu = event.device_type == DeviceType.CPU
        if event.name.startswith(RANGE_PREFIX):
            interpreter_us += event.self_cpu_time_total if on_cpu else 0.0
            continue
        if cuda:
            if on_cpu or event.is_user_annotation:
                continue
            us = event.device_time_total
        elif on_cpu:
            us = event.self_cpu_time_total
        else:
            continue
        name = event.name
        for pattern, replacement in _NORMALISE:
            name = pattern.sub(replacement, name)
        row = rows.setdefault(name, [0, 0.0])
        row[0] += 1
        row[1] += us
    total_us = sum(us for _, us in rows.values())
    wall = profiled.wall_s
    ordered = sorted(rows.items(), key=lambda item: -item[1][1])
    kept = ordered[:top] + [
        item for item in ordered[top:] if any(name in item[0] for name in GATED_RESIDUAL_ADD_NAMES)
    ]
    kernels = [
        KernelProfile(name=name, calls=calls, self_s=us / 1e6, share=us / 1e6 / wall if wall else 0.0)
        for name, (calls, us) in kept
    ]
    return kernels, total_us / 1e6, interpreter_us / 1e6


def _flops_by_call(flop_steps: list[_Call] | None, calls: list[_Call]) -> list[int] | None:
    if not flop_steps or len(flop_steps) != len(calls):
        return None
    if any(
        (a.generation - flop_steps[0].generation, a.step) != (b.generation - calls[0].generation, b.step)
        for a, b in zip(flop_steps, calls, strict=True)
    ):
        return None
    return [c.flops for c in flop_steps]


def _flop_totals(flop_steps: list[_Call]) -> tuple[int, int]:
    """FLOPs of the cached run, and of the same calls with every branch computing: step 0 of a
    generation computes every branch (the runtime refuses a schedule that does not), and shapes are
    fixed within a generation, so each call's all-compute FLOPs are its generation's step-0 FLOPs."""
    first: dict[int, int] = {}
    cached = full = 0
    for call in flop_steps:
        if call.step == 0:
            first[call.generation] = call.flops
        cached += call.flops
        full += first.get(call.generation, call.flops)
    return cached, full


# -- checks and environment ----------------------------------------------------------------------
def _runtime_of(model):
    from smoothcache_fx.transform import _is_pipeline

    target = model.transformer if _is_pipeline(model) else model
    if not isinstance(target, torch.nn.Module):
        raise TypeError(
            "profile expects a model transformed by smoothcache_fx.transform, or a diffusers pipeline "
            f"with a .transformer; got {type(model).__name__}."
        )
    runtime = target.__dict__.get("smoothcache")
    if runtime is None:
        raise ValueError(
            f"profile needs a model transformed by smoothcache_fx; {type(target).__name__} is not. Call "
            "smoothcache_fx.transform(model, schedule) first (Schedule.all_compute(steps, components) "
            "profiles the uncached model)."
        )
    return runtime


def _check_trace_path(trace) -> str | None:
    """Fail before running anything when the trace cannot be written."""
    if trace is None:
        return None
    if not isinstance(trace, (str, os.PathLike)):
        raise TypeError(
            f"trace must be a file path (str or os.PathLike) or None; got {type(trace).__name__}."
        )
    path = os.fspath(trace)
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as error:
        raise ValueError(
            f"trace must be a writable file path; got {path!r} ({error.strerror}). Pass a path in an "
            "existing, writable directory, or trace=None."
        ) from error
    if not existed:
        os.remove(path)
    return path


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _notes(runtime, device: torch.device, branches: bool) -> list[str]:
    """First entry: the mode; then what the numbers mean in that mode."""
    compiled = runtime.compile_config.enabled
    notes = []
    if not compiled:
        notes.append(
            "eager variants, branch ranges inline" if branches else "eager variants, step ranges only"
        )
    elif branches:
        notes.append("compiled variants split at branch boundaries for profiling")
        notes.append(
            "Inductor drops profiler ranges from compiled graphs, so each variant is cut into segments "
            "at branch boundaries, each compiled on its own, with the ranges between the compiled "
            "calls. This costs the fusion across a boundary and one compiled call per segment; "
            "branches=False profiles the variants as they normally run."
        )
        if runtime.compile_config.uses_cuda_graphs:
            notes.append("the segments are compiled without CUDA graphs (mode='reduce-overhead' is dropped).")
    else:
        notes.append("compiled variants as they normally run, step ranges only")
    if compiled and device.type == "cpu" and runtime.kernel == "op":
        notes.append(
            "on CPU Inductor inlines smoothcache_fx::gated_residual_add (its CPU path is the PyTorch "
            "reference), so it shows inside cpp_fused_*add*mul* kernels; on CUDA it is the Triton kernel "
            "_gated_residual_add_kernel."
        )
    if compiled and device.type == "cpu":
        notes.append(
            "CPU kernel rows of variants compiled before profile() show under '## Call CompiledFxGraph ##'; "
            "variants compiled inside it name their C++ kernels (Inductor cpp.enable_kernel_profile)."
        )
    if device.type == "cuda":
        notes.append("CUDA: branch and kernel times are device time; step walls are synchronised.")
    notes.append(
        "FLOPs count matmul-class ops and attention (smoothcache_fx.flops); elementwise work is free there."
    )
    return notes


# -- text -----------------------------------------------------------------------------------------
def _format(report: ProfileReport) -> str:
    ms = 1e3
    lines = [
        f"smoothcache_fx profile: {report.model} on {report.device}, {len(report.steps)} model calls "
        f"(schedule of {report.schedule_steps} steps); {report.mode}",
        f"wall {report.wall_s * ms:.1f} ms = model calls {report.model_s * ms:.1f} ms + outside "
        f"{report.outside_s * ms:.1f} ms; in the profile: ops/kernels {report.kernel_s * ms:.1f} ms + "
        f"interpreter in ranges {report.interpreter_s * ms:.1f} ms; branches {report.branch_s * ms:.1f} ms",
    ]
    if report.ideal_speedup is not None:
        line = (
            f"FLOPs: cached {report.flops / 1e9:.3f} GFLOP vs all-compute {report.all_compute_flops / 1e9:.3f} "
            f"GFLOP: ideal speedup {report.ideal_speedup:.2f}x"
        )
        if report.achieved_speedup is not None:
            line += (
                f"; achieved {report.achieved_speedup:.2f}x ({report.achieved_speedup / report.ideal_speedup:.0%} "
                f"of ideal; all-compute model time {report.baseline_model_s * ms:.1f} ms)"
            )
        lines.append(line)
    elif report.achieved_speedup is not None:
        lines.append(
            f"achieved speedup {report.achieved_speedup:.2f}x (all-compute {report.baseline_model_s * ms:.1f} ms)"
        )
    lines.append(f"cache memory: {report.cache_bytes / 2**20:.2f} MiB")
    lines += ["", f"{'call':>4} {'step':>4} {'wall ms':>9} {'computed':>9} {'reused':>7} {'branches ms':>12}"]
    for s in report.steps:
        lines.append(
            f"{s.call:>4} {s.step:>4} {s.wall_s * ms:>9.2f} {len(s.computed):>9} {len(s.reused):>7} {s.branch_s * ms:>12.2f}"
        )
    width = max([len("branch"), *(len(b.path) for b in report.branches)])
    lines += [
        "",
        f"{'branch':<{width}} {'computed':>8} {'reused':>6} {'computed ms':>11} {'reused ms':>9} {'share':>6}",
    ]
    for b in report.branches:
        times = f"{b.computed_s * ms:>11.2f} {b.reused_s * ms:>9.2f} {b.share:>6.1%}"
        if not report.branch_ranges:
            times = f"{'-':>11} {'-':>9} {'-':>6}"  # profiled with branches=False: no branch ranges
        lines.append(f"{b.path:<{width}} {b.computed:>8} {b.reused:>6} {times}")
    width = min(60, max([len("kernel / op"), *(len(k.name) for k in report.kernels)]))
    lines += ["", f"{'kernel / op':<{width}} {'calls':>6} {'self ms':>9} {'share':>6}"]
    for k in report.kernels:
        lines.append(f"{k.name[:width]:<{width}} {k.calls:>6} {k.self_s * ms:>9.2f} {k.share:>6.1%}")
    if report.trace:
        lines += ["", f"trace: {report.trace}"]
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)
