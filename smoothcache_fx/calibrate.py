"""`calibrate`: measure how much every residual branch's output changes from step to step.

Three phases, all on the caller's own model object:

1. First call. `run` is started on the untouched model and stopped after its first model call: that
   call records each block's real arguments and, under `FlopCounterMode`, the FLOPs of the whole
   call and of every direct child module of every block (the candidate branch modules).
2. Branches. Each distinct block structure is captured once with the pass's own capture and
   `find_residual_branches`, which names the components (no hand-written module lists).
3. Record. The model is transformed with an all-compute schedule over those components, so after
   each model call `model.smoothcache.branch_outputs()` holds every branch's output of that call;
   a forward hook registered after the transform's hands them to the `Recorder`
   (calibrate_record.py), which compares each call of a step with the same call of earlier steps.
   The model is untransformed at the end, also on error.

Under an initialised `torch.distributed`, each rank records its own generations and the error sums
are combined over the ranks (calibrate_distributed.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from smoothcache_fx.block import capture_shared
from smoothcache_fx.calibrate_distributed import ErrorSums, gather_sums, resolve_group
from smoothcache_fx.calibrate_record import Recorder
from smoothcache_fx.dependencies import CaptureDependencies
from smoothcache_fx.flops import flop_counter
from smoothcache_fx.generation import TIMESTEP_ARGUMENTS, timestep_of
from smoothcache_fx.runtime import ToolOptions
from smoothcache_fx.schedules import Schedule
from smoothcache_fx.schedules.errors import CalibrationErrors
from smoothcache_fx.schedules.forecast import check_order
from smoothcache_fx.transform import _is_pipeline, find_blocks, transform, untransform

__all__ = ["CalibrationErrors", "calibrate"]


def calibrate(
    model,
    run: Callable[[], Any],
    lookahead: int = 3,
    components: Sequence[str] | None = None,
    steps: int | None = None,
    progress: bool = True,
    blocks=None,
    calls_per_step: int = 1,
    max_order: int = 0,
    process_group=None,
) -> CalibrationErrors:
    """Leaves `model` as it was (transformed only while `run` runs): records branch output errors.

    For every residual branch (block path + component) and lag k = 1..lookahead, records at each
    step t the relative L1 error ``|L_t - L_(t-k)|_1 / |L_t|_1`` between the branch's output now
    and k steps earlier, in float32 over the whole tensor (batch included), averaged over the
    generations that `run` performs. Only the last `lookahead` outputs per branch are kept.

    With ``calls_per_step=N`` (a sampler that calls the model N times per step, such as unbatched
    classifier-free guidance: a conditional and an unconditional call), the calls of a step are
    told apart by their order: call c of step t is compared only with call c of earlier steps, as
    its cache would be under ``transform(..., calls_per_step=N)``. The errors of each call are kept
    in ``per_call``; ``errors``, which the schedules read, is their maximum per step, because one
    mask serves every call of a step.

    Where a generation starts:

    * ``steps=S``: every S x calls_per_step consecutive model calls are one generation;
    * else, for a diffusers pipeline: each call of the pipeline is one generation (its step count
      is however many times it called the model, divided by calls_per_step);
    * else by the model's timestep argument (``timestep``, ``timesteps`` or ``t``): the first call
      of a step starts a new generation when its timestep is larger than the previous step's; the
      other calls of a step never start one. Two steps in a row at one timestep are refused (a
      sampler with more calls per step than calls_per_step says, or one that repeats a timestep,
      which needs ``steps=``).

    All generations must have the same number of steps. With calls_per_step > 1 every call of a
    step must have the step's timestep where the model takes one, so a wrong calls_per_step is an
    error rather than errors that mix different calls.

    Across processes (``torchrun``): under an initialised `torch.distributed`, every rank calls
    `calibrate` with the same model and arguments and a `run` of its own generations (its share of
    the labels or prompts, its own seeds); the error sums and generation counts of all ranks are
    added, so every rank returns the same `CalibrationErrors`, equal to one process running every
    rank's generations in rank order, and `Schedule.from_errors` gives every rank the same
    schedule. Ranks that record different branches, steps, lookahead or calls per step, or a rank
    that raises, make every rank raise rather than wait. Only rank 0 shows progress. Every rank of
    the group must call `calibrate`; one that does not leaves the others waiting in the collective.

    Args:
        model: a DiT-style `torch.nn.Module`, or a diffusers pipeline with a `.transformer`. It must
            not be transformed already (calibration installs its own all-compute schedule).
        run: runs one or more whole generations, calling the model (e.g.
            ``lambda: pipe(class_labels=[207, 360], num_inference_steps=50)``). Called twice: once
            stopped after its first model call (branch discovery and FLOPs), once in full.
        lookahead: largest lag k recorded (SmoothCache uses 3 for DiT).
        components: record only these components (e.g. ``["attn1", "ff"]``); default every
            residual branch the pass finds.
        steps: steps per generation (model calls / calls_per_step), when neither a pipeline nor a
            timestep delimits them; the step count of the errors either way.
        progress: show a progress bar (tqdm if installed, else a line on stderr).
        blocks: which modules are transformer blocks, as for `transform`.
        calls_per_step: model calls per step, as for `transform`: 2 for unbatched classifier-free
            guidance (Wan, Lumina2, Flux true CFG), 1 when the guidance is batched into one call.
        max_order: also record, per branch and step, the error of forecasting the output with
            predictor orders 1..max_order from every history of earlier outputs a schedule could
            keep (`CalibrationErrors.forecast`), so that `Schedule.from_errors(...,
            max_order=...)` can choose orders. Keeps `lookahead + max_order * (lookahead + 1)`
            outputs per branch instead of `lookahead`.
        process_group: the `torch.distributed` group whose ranks share the calibration. None (the
            default): the default group when torch.distributed is initialised, else this process
            alone; False: this process alone even then (each rank calibrates for itself).

    Returns:
        `CalibrationErrors`, with the per-branch FLOPs that `Schedule.for_speedup` needs.

    Example::

        errors = smoothcache_fx.calibrate(pipe, lambda: pipe(class_labels=[207], num_inference_steps=50))
        schedule = smoothcache_fx.Schedule.from_errors(errors, alpha=0.18)
    """
    group = resolve_group(process_group)
    show = progress and (group is None or group.rank() == 0)
    record = partial(
        _record, model, run, lookahead, components, steps, show, blocks, calls_per_step, max_order
    )
    return (record() if group is None else gather_sums(group, record)).errors()


def _record(
    model, run, lookahead, components, steps, progress, blocks, calls_per_step, max_order
) -> ErrorSums:
    """`calibrate` in this process: its arguments checked, `run` recorded, the error sums returned."""
    _check_count("lookahead", lookahead, "the largest lag k to record, e.g. lookahead=3")
    _check_count(
        "calls_per_step",
        calls_per_step,
        "the model calls per step, e.g. calls_per_step=2 for unbatched classifier-free guidance",
    )
    if steps is not None:
        _check_count("steps", steps, "the number of steps per generation, e.g. steps=50")
    check_order(max_order, "calibrate(..., max_order=)")
    if not callable(run):
        raise TypeError(
            f"run must be a callable that generates with the model, such as "
            f"lambda: pipe(num_inference_steps=50); got {type(run).__name__}."
        )
    pipe = model if _is_pipeline(model) else None
    net = pipe.transformer if pipe is not None else model
    if not isinstance(net, torch.nn.Module):
        raise TypeError(
            f"calibrate expects a torch.nn.Module or a diffusers pipeline with a .transformer; "
            f"got {type(model).__name__}."
        )
    if "smoothcache" in net.__dict__:
        raise RuntimeError(
            f"{type(net).__name__} is already transformed by smoothcache_fx; calibrate installs its own "
            "all-compute schedule. Call smoothcache_fx.untransform(model) first (or calibrate an "
            "untransformed copy), then transform it again with the schedule derived from the errors."
        )
    found = find_blocks(net, blocks)
    first = _first_call(net, found, run)
    rule = "steps" if steps is not None else "pipeline" if pipe is not None else "timestep"
    if rule == "timestep" and first.timestep is None:
        raise ValueError(
            f"calibrate must know where each generation starts, but {type(net).__name__} was called "
            f"without a timestep argument ({', '.join(TIMESTEP_ARGUMENTS)}) that it could read. Pass "
            "steps=<steps per generation>, or pass the diffusers pipeline instead of its model."
        )
    if components is None:
        components = _find_components(found, first.block_calls)
    schedule = Schedule.all_compute(1, components)  # validates `components`
    recorder = Recorder(lookahead, steps, calls_per_step, progress, max_order)
    boundaries = _Boundaries(rule, steps, calls_per_step)
    hooks = []
    try:
        # One step of one call is enough: under an all-compute schedule every call computes every
        # branch, so the runtime's clock may wrap at every call; generations, steps and the calls of
        # a step are told apart here instead, and the recorder keeps each call's outputs apart.
        transform(net, schedule, blocks=list(found))
        hooks.append(
            net.register_forward_pre_hook(partial(_before_call, boundaries, recorder), with_kwargs=True)
        )
        hooks.append(net.register_forward_hook(partial(_after_call, recorder)))
        marking = _marking_pipeline_calls(pipe, boundaries) if pipe is not None else contextlib.nullcontext()
        # All-compute: caches are written only when asked, and here every branch's is read.
        recording = net.smoothcache.using(ToolOptions(record_branches=True))
        with marking, recording, torch.no_grad():
            run()
        recorder.finish_generation()
    finally:
        for hook in hooks:
            hook.remove()
        recorder.close()
        if "smoothcache" in net.__dict__:
            untransform(net)
    if not recorder.generations:
        raise ValueError(
            "run must call the model during calibration; its second call (the recorded one) made no "
            f"model call to {type(net).__name__}. Make run generate the same way every time it is called."
        )
    metadata = {"generation_rule": rule, "torch": torch.__version__, "dtype": recorder.dtype}
    if pipe is not None and getattr(pipe, "scheduler", None) is not None:
        metadata["solver"] = type(pipe.scheduler).__name__
    return ErrorSums(
        recorder.length,
        lookahead,
        recorder.sums,
        recorder.generations,
        flops={path: first.module_flops.get(path, 0) for path in recorder.branches},
        total_flops=first.total_flops,
        model_class=type(net).__name__,
        metadata=metadata,
        forecast_sums=recorder.forecast_sums,
    )


# -- phase 1: the first model call -----------------------------------------------------------------
class _FirstCallDone(Exception):
    """Raised from a forward hook to stop `run` once the first model call has been observed."""


@dataclass
class _FirstCall:
    block_calls: dict[str, tuple[tuple, dict]] = field(default_factory=dict)
    module_flops: dict[str, int] = field(default_factory=dict)  # "<block>.<child>" -> FLOPs
    total_flops: int = 0
    timestep: float | None = None
    called: bool = False


def _first_call(net: torch.nn.Module, blocks: dict, run: Callable) -> _FirstCall:
    """Run `run` up to the end of its first model call; record block arguments and FLOPs.

    FLOPs per child module are differences of the counter's running total between the child's
    pre- and post-forward hooks, so nothing depends on how FlopCounterMode names modules.
    """
    first = _FirstCall()
    counter = flop_counter()
    counting = []  # non-empty while the counter is entered
    starts: dict[str, list[int]] = {}

    def before_model(module, args, kwargs):
        first.timestep = timestep_of(module, args, kwargs)
        counter.__enter__()
        counting.append(True)

    def after_model(module, args, kwargs, output):
        counter.__exit__(None, None, None)
        counting.clear()
        first.total_flops = counter.get_total_flops()
        first.called = True
        raise _FirstCallDone

    def before_block(path, module, args, kwargs):
        first.block_calls.setdefault(path, (args, kwargs))

    def before_child(path, module, args):
        if counting:
            starts.setdefault(path, []).append(counter.get_total_flops())

    def after_child(path, module, args, output):
        if counting and starts.get(path):
            spent = counter.get_total_flops() - starts[path].pop()
            first.module_flops[path] = first.module_flops.get(path, 0) + spent

    hooks = [
        net.register_forward_pre_hook(before_model, with_kwargs=True),
        net.register_forward_hook(after_model, with_kwargs=True),
    ]
    for path, block in blocks.items():
        hooks.append(block.register_forward_pre_hook(partial(before_block, path), with_kwargs=True))
        for name, child in block.named_children():
            hooks.append(child.register_forward_pre_hook(partial(before_child, f"{path}.{name}")))
            hooks.append(child.register_forward_hook(partial(after_child, f"{path}.{name}")))
    try:
        with torch.no_grad():
            run()
    except _FirstCallDone:
        pass
    finally:
        for hook in hooks:
            hook.remove()
        if counting:  # the model call raised half way
            counter.__exit__(None, None, None)
    if not first.called:
        raise ValueError(
            f"run must call the model; it returned without calling {type(net).__name__}. Pass a "
            "callable that generates with this model, e.g. lambda: pipe(num_inference_steps=50)."
        )
    return first


# -- phase 2: branches ---------------------------------------------------------------------------
def _find_components(blocks: dict, calls: dict) -> list[str]:
    """Component names of every residual branch, found by the runtime's own capture
    (`block.capture_shared`), in graph order."""
    found: dict[str, None] = {}
    graphs: dict = {}
    for path, block in blocks.items():
        if path not in calls:
            continue  # not called in the first step: the runtime would not capture it either
        args, kwargs = calls[path]
        shared = capture_shared(type(block), block, args, kwargs, CaptureDependencies(block), graphs)
        found.update(dict.fromkeys(shared.branches.components))
    if not found:
        classes = sorted({type(block).__name__ for block in blocks.values()})
        raise NotImplementedError(
            f"calibrate found no residual branch: inspected block classes {classes} for "
            "`residual + gate * X` or `residual + X` where X is the output of a direct child module. "
            "Pass the transformer blocks explicitly with blocks=[...]."
        )
    return list(found)


# -- phase 3: recording ----------------------------------------------------------------------------
class _Boundaries:
    """Decides, per model call, whether it starts a new generation (see calibrate's docstring), and
    checks that the calls of one step share its timestep."""

    def __init__(self, rule: str, steps: int | None, calls_per_step: int):
        self.rule = rule
        self.steps = steps
        self.calls_per_step = calls_per_step
        self.calls = 0
        self.step_timestep: float | None = None  # the timestep of the current step's first call
        self.pipeline_depth = 0
        self.pipeline_started = False

    def starts_generation(self, net, args, kwargs, slot: int) -> bool:
        """Whether this call starts a generation; `slot` is the call of its step it would be if it
        continues the current one."""
        self.calls += 1
        read = self.rule == "timestep" or self.calls_per_step > 1
        timestep = timestep_of(net, args, kwargs) if read else None
        if self.rule == "steps":
            starts = (self.calls - 1) % (self.steps * self.calls_per_step) == 0
        elif self.rule == "pipeline":
            if self.pipeline_depth == 0:
                raise ValueError(
                    f"with a pipeline, run must call the model only through the pipeline; "
                    f"{type(net).__name__} was called outside pipe(...). Pass steps=<steps per "
                    "generation>, or calibrate the model instead of the pipeline."
                )
            starts, self.pipeline_started = self.pipeline_started, False
        else:
            if timestep is None:
                raise ValueError(
                    f"{type(net).__name__} was called without a readable timestep argument in the middle "
                    "of calibration; pass steps=<steps per generation>."
                )
            # Only a step's first call may start a generation: the others repeat its timestep.
            previous = self.step_timestep
            if slot == 0 and timestep == previous:
                raise ValueError(
                    f"consecutive steps must have different timesteps for calibrate to tell where a "
                    f"generation starts; two steps in a row had timestep {timestep:g}. If the sampler "
                    "calls the model N times per step (unbatched guidance), pass calls_per_step=N; if "
                    "it evaluates a timestep twice (Heun), pass steps=<steps per generation>."
                )
            starts = slot == 0 and (previous is None or timestep > previous)
        if starts or slot == 0:
            self.step_timestep = timestep
        elif timestep is not None and self.step_timestep is not None and timestep != self.step_timestep:
            raise ValueError(
                f"the {self.calls_per_step} calls of a step must share its timestep "
                f"(calls_per_step={self.calls_per_step}); call {slot + 1} of a step had timestep "
                f"{timestep:g} after the step's first call at {self.step_timestep:g}. Pass "
                "calls_per_step=<model calls per step> (1 when the sampler batches its guidance)."
            )
        return starts


@contextlib.contextmanager
def _marking_pipeline_calls(pipe, boundaries: _Boundaries):
    """Swap in a pipeline subclass whose __call__ tells `boundaries` a generation begins."""
    original = type(pipe)

    def __call__(self, *args, **kwargs):
        boundaries.pipeline_depth += 1
        boundaries.pipeline_started = boundaries.pipeline_depth == 1
        try:
            return original.__call__(self, *args, **kwargs)
        finally:
            boundaries.pipeline_depth -= 1

    pipe.__class__ = type(
        original.__name__, (original,), {"__call__": __call__, "__module__": original.__module__}
    )
    try:
        yield
    finally:
        pipe.__class__ = original


def _before_call(boundaries: _Boundaries, recorder: Recorder, module, args, kwargs) -> None:
    if boundaries.starts_generation(module, args, kwargs, recorder.next_slot):
        recorder.start_generation()


def _after_call(recorder: Recorder, module, args, output) -> None:
    recorder.record(module.smoothcache.branch_outputs())


def _check_count(name: str, value: Any, fix: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= 1; got {type(value).__name__} {value!r}. Pass {fix}.")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value}. Pass {fix}.")
