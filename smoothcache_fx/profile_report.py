"""The report of `smoothcache_fx.profile`: per step, branch and kernel, built from a profiled run.

`profile.py` runs the model and records each call (`CallRecord`) and the profiler's events
(`ProfiledRun`); `build_report` sums the `smoothcache/` ranges (`passes/annotate.py` names them) per
step and per branch, and the other events per kernel, into a `ProfileReport`, which prints as a
text table and saves as JSON. `mode_notes` says what the numbers mean in each profiling mode.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType

from smoothcache_fx.passes.annotate import RANGE_PREFIX, branch_range

FORMAT_VERSION = 1
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
    """One residual branch (`<block path>.<component>`) over the profiled run. `reused` counts
    every skipped step (reused or, for a branch of predictor `order` > 0, forecast);
    `cache_bytes` is what the branch keeps (order + 1 outputs per call slot)."""

    path: str
    computed: int
    reused: int
    computed_s: float
    reused_s: float
    share: float  # of the model time (sum of step walls)
    order: int = 0
    cache_bytes: int = 0

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


# -- what a run records ----------------------------------------------------------------------------
@dataclass
class CallRecord:
    """One model call as the step clock saw it (`profile.py`); a `StepProfile` once reported."""

    generation: int
    step: int
    start: float
    computed: tuple[str, ...] = ()
    reused: tuple[str, ...] = ()
    wall_s: float = 0.0
    flops: int | None = None


@dataclass
class ProfiledRun:
    """A run under torch.profiler: its model calls, wall time and the profiler's events."""

    calls: list[CallRecord]
    wall_s: float
    events: list


# -- report assembly -----------------------------------------------------------------------------
def build_report(
    runtime, device, profiled: ProfiledRun, base, flop_steps, trace_path, top, notes, branches: bool
) -> ProfileReport:
    """The report of the `profiled` run; `base` is the all-compute run (or None), `flop_steps` the
    FLOP run's calls (or None), `notes` starts with the mode (see `mode_notes`)."""
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
    stats = runtime.stats
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
                order=stats.get(path, {}).get("order", 0),
                cache_bytes=stats.get(path, {}).get("cache_bytes", 0),
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
        names[branch_range(block, component, False, forecast=True)] = (path, False)  # a skipped step
    return names


def _branch_paths(runtime) -> list[str]:
    return [path for block in runtime.blocks for path in _block_branches(runtime, block)]


def _block_branches(runtime, block: str) -> list[str]:
    return [f"{block}.{component}" for component in runtime.branches.get(block, ())]


def _kernel_rows(profiled: ProfiledRun, cuda: bool, top: int):
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


def _flops_by_call(flop_steps: list[CallRecord] | None, calls: list[CallRecord]) -> list[int] | None:
    if not flop_steps or len(flop_steps) != len(calls):
        return None
    if any(
        (a.generation - flop_steps[0].generation, a.step) != (b.generation - calls[0].generation, b.step)
        for a, b in zip(flop_steps, calls, strict=True)
    ):
        return None
    return [c.flops for c in flop_steps]


def _flop_totals(flop_steps: list[CallRecord]) -> tuple[int, int]:
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


# -- what the numbers mean ------------------------------------------------------------------------
def mode_notes(runtime, device: torch.device, branches: bool) -> list[str]:
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
        f"{'branch':<{width}} {'computed':>8} {'skipped':>7} {'order':>5} {'cache KiB':>9} "
        f"{'computed ms':>11} {'skipped ms':>10} {'share':>6}",
    ]
    for b in report.branches:
        times = f"{b.computed_s * ms:>11.2f} {b.reused_s * ms:>10.2f} {b.share:>6.1%}"
        if not report.branch_ranges:
            times = f"{'-':>11} {'-':>10} {'-':>6}"  # profiled with branches=False: no branch ranges
        memory = f"{b.order:>5} {b.cache_bytes / 1024:>9.1f}"
        lines.append(f"{b.path:<{width}} {b.computed:>8} {b.reused:>7} {memory} {times}")
    width = min(60, max([len("kernel / op"), *(len(k.name) for k in report.kernels)]))
    lines += ["", f"{'kernel / op':<{width}} {'calls':>6} {'self ms':>9} {'share':>6}"]
    for k in report.kernels:
        lines.append(f"{k.name[:width]:<{width}} {k.calls:>6} {k.self_s * ms:>9.2f} {k.share:>6.1%}")
    if report.trace:
        lines += ["", f"trace: {report.trace}"]
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)
