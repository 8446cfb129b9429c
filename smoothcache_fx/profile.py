"""`profile`: what each step computed, what it cost, and where the time went.

One call runs a generation under `torch.profiler` with named ranges: `smoothcache/step N` around
each model call (forward hooks, in Python), `smoothcache/<block path>` around each block and
`smoothcache/<block path>.<component> computed|reused|forecast` around each residual branch (graph nodes,
`passes/annotate.py`). The ranges are in the Chrome/Perfetto trace, over the ops and kernels, and
the report (`profile_report.py`) sums them per step, per branch and per kernel.

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
import os
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from smoothcache_fx.block import SCHEDULE_BUFFER
from smoothcache_fx.flops import flop_counter
from smoothcache_fx.kernels.compat import inductor_kernel_profile
from smoothcache_fx.passes.annotate import add_split_ranges, annotate_block, split_block, step_range
from smoothcache_fx.profile_report import (
    FORMAT_VERSION,
    GATED_RESIDUAL_ADD_NAMES,
    BranchProfile,
    CallRecord,
    KernelProfile,
    ProfiledRun,
    ProfileReport,
    StepProfile,
    build_report,
    mode_notes,
)
from smoothcache_fx.runtime import ToolOptions

# The report's classes are re-exported: `from smoothcache_fx.profile import ProfileReport` keeps working.
__all__ = [
    "DEFAULT_TOP",
    "FORMAT_VERSION",
    "GATED_RESIDUAL_ADD_NAMES",
    "BranchProfile",
    "KernelProfile",
    "ProfileReport",
    "StepProfile",
    "profile",
]

DEFAULT_TOP = 15


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
    notes = mode_notes(runtime, device, branches)
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
    return build_report(runtime, device, profiled, base, flop_steps, trace_path, top, notes, branches)


# -- runs -------------------------------------------------------------------------------------------
class _StepClock:
    """Forward hooks on the model: a `smoothcache/step N` range, wall time, branches computed and,
    during the FLOP run, FLOPs per model call. Registered after the runtime's hooks, so they see the
    step the runtime is about to run."""

    def __init__(self, runtime, device: torch.device):
        self.runtime = runtime
        self.device = device
        self.calls: list[CallRecord] = []
        self.flop_counter: FlopCounterMode | None = None
        self._open: tuple[CallRecord, torch.autograd.profiler.record_function, dict, int] | None = None
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
        call = CallRecord(runtime.generations, runtime.step, 0.0)
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
            skipped = state.reused.get(component, 0) + state.forecast.get(component, 0)  # reused or forecast
            counts[f"{path}.{component}"] = (state.computed.get(component, 0), skipped)
    return counts


def _run_once(run, runtime, clock: _StepClock) -> tuple[list[CallRecord], float]:
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


def _count_flops(run, runtime, clock: _StepClock) -> list[CallRecord]:
    """One run under FlopCounterMode; FLOPs per model call. The caller runs it with
    `ToolOptions(eager=True)`: the counter sees the ops of eager variants, not compiled calls."""
    try:
        with flop_counter() as counter:
            clock.flop_counter = counter
            calls, _ = _run_once(run, runtime, clock)
    finally:
        clock.flop_counter = None
    return calls


def _profiled_run(run, runtime, clock, device: torch.device, trace_path: str | None) -> ProfiledRun:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with _no_gc(), torch.profiler.profile(activities=activities) as prof:
        calls, wall = _run_once(run, runtime, clock)
    if trace_path is not None:
        prof.export_chrome_trace(trace_path)
    return ProfiledRun(calls, wall, prof.events())


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
