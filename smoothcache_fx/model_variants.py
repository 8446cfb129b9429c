"""Whole-model variants: one compiled graph per distinct whole-model step mask.

Per-block variants dispatch from Python at every block call; on an overhead-bound model (a small
DiT on CPU, any DiT on a GPU under CUDA graphs) that dispatch is a visible share of a step. Here the
model's own `forward` is compiled once per distinct whole-model mask (every block's compute mask at
one step), with each block inlined as its specialised graph: one graph per step, no Python between
blocks, and every step with the same mask shares it.

How the step stays out of the graph: each mask gets its own copy of the model's forward code
object, and dynamo keeps a cache per code object, so a compiled mask never sees another mask's
values (no guard failures, no recompiles). While one runs, the runtime exposes that mask's
per-block `BlockBinding`s; a block's forward, traced by dynamo, reads its binding and calls the
variant's graph. Everything that needs Python (checks, counters, which caches are written) runs
eagerly around the compiled call.

The first call for a call signature (and the first after a block is captured again) runs the blocks
eagerly through the per-block path, which captures them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from smoothcache_fx.compile import fresh_code_copy
from smoothcache_fx.passes.capture import CallSignature, call_signature

if TYPE_CHECKING:
    from smoothcache_fx.block import BlockBinding
    from smoothcache_fx.runtime import SmoothCacheRuntime

MaskKey = tuple[tuple[tuple[str, bool], ...], ...]


@dataclass
class _Plan:
    """The compiled masks of one model call signature, valid while every block keeps the captures
    it had when the plan was made (`entries`)."""

    signature: CallSignature
    entries: tuple[Any, ...]
    step_keys: tuple[MaskKey, ...]
    bindings: dict[tuple[MaskKey, int], dict[str, BlockBinding]] = field(default_factory=dict)
    compiled: dict[tuple[MaskKey, int], Any] = field(default_factory=dict)
    calls: dict[MaskKey, int] = field(default_factory=dict)


class ModelVariants:
    """Compiles and runs the model's forward once per distinct whole-model mask."""

    def __init__(self, runtime: SmoothCacheRuntime, forward):
        self.runtime = runtime
        self.forward = forward  # the model class's own forward (unbound function)
        self.plans: dict[CallSignature, _Plan] = {}
        self.compiles = 0

    def clear(self) -> None:
        """Forget every plan (schedule swapped): masks are compiled again when next needed."""
        self.plans.clear()

    def run(self, model: torch.nn.Module, args: tuple, kwargs: dict):
        """One model call: the compiled graph of this step's mask, or the eager per-block path
        when the blocks are not (or no longer) captured for this call."""
        runtime = self.runtime
        signature, tensors = call_signature(args, kwargs)
        plan = self.plans.get(signature)
        if plan is None or not self._still_valid(plan):
            plan = self._capture(model, args, kwargs, signature)
            if plan is None:  # per-block variants: run the call again, compiled
                return self.forward(model, *args, **kwargs)
        step, slot = runtime.step, runtime.slot
        key = plan.step_keys[step]
        # One graph per mask and call slot: each slot's call reads and writes caches of its own.
        compiled = plan.compiled.get((key, slot))
        if compiled is None:
            compiled = self._compile(len(self.plans), len(plan.compiled), tensors)
            plan.compiled[(key, slot)] = compiled
        plan.calls[key] = plan.calls.get(key, 0) + 1
        if runtime.form == "graph":  # one graph for every step: the step is a buffer inside it
            output = compiled(model, *args, **kwargs)
            for state in runtime.block_states():
                state.count_step(step)
            return output
        bindings = plan.bindings.get((key, slot))
        if bindings is None:
            bindings = plan.bindings[(key, slot)] = self._bind(key, slot)
        for binding in bindings.values():
            binding.prepare(step, slot)
        runtime.model_graph_bindings = bindings
        try:
            output = compiled(model, *args, **kwargs)
        finally:
            runtime.model_graph_bindings = None
        for binding in bindings.values():
            binding.record(slot)
        return output

    def report(self) -> list[dict]:
        """Per compiled whole-model mask: the steps that use it, calls so far, compiled or not."""
        rows = []
        for plan in self.plans.values():
            for key in dict.fromkeys(plan.step_keys):
                rows.append(
                    {
                        "steps": [step for step, other in enumerate(plan.step_keys) if other == key],
                        "compute": _describe(key, self.runtime),
                        "calls": plan.calls.get(key, 0),
                        "compiled": (key, 0) in plan.compiled,
                    }
                )
        return rows

    # -- plans ----------------------------------------------------------------------------------
    def _capture(self, model, args: tuple, kwargs: dict, signature: CallSignature) -> _Plan | None:
        """Run the call eagerly through the per-block path, which captures the blocks (and raises
        whatever is wrong with the call), then decide the granularity if it is still "auto".

        The eager run's output is discarded and the call is run again compiled, so that every
        call of every generation runs the same compiled code (an eager step 0 in the first
        generation only would make it differ from later ones in the last bits). Its counters are
        taken back; its cache writes are overwritten by the compiled run (step 0 computes).
        """
        runtime = self.runtime
        counts = [(state, dict(state.computed), dict(state.reused)) for state in runtime.block_states()]
        step = runtime.step_tensor().clone() if runtime.form == "graph" else None
        self.forward(model, *args, **kwargs)
        runtime.validate_branches()
        for state, computed, reused in counts:
            state.computed, state.reused, state.last_call = computed, reused, None
        if step is not None:  # the graph form's forward advanced its step buffer: take it back
            runtime.step_tensor().copy_(step)
        if runtime.granularity == "block":
            return None
        plan = self._make_plan(signature)
        return plan

    def _make_plan(self, signature: CallSignature) -> _Plan | None:
        """The plan for the blocks' current captures: the one made before for them (a call
        signature seen before, back after another: its compiled graphs are kept), or a new one."""
        states = self.runtime.captured_states()
        if states is None:  # a block could not be captured: the per-block path serves every call
            self.runtime.granularity = "block"
            return None
        known = self.plans.get(signature)
        if known is not None and all(s.current is e for s, e in zip(states, known.entries, strict=True)):
            return known
        steps = self.runtime.schedule.steps
        if self.runtime.form == "graph":
            step_keys = ((),) * steps
        else:
            step_keys = tuple(
                tuple(
                    tuple((name, mask[step]) for name, mask in state.current.masks.items())
                    for state in states
                )
                for step in range(steps)
            )
        plan = _Plan(signature, tuple(state.current for state in states), step_keys)
        self.plans[signature] = plan
        return plan

    def _still_valid(self, plan: _Plan) -> bool:
        """Every block runs the capture the plan was made for, and nothing it depends on
        (training flag, submodules, parameters, processors, PEFT) changed. Otherwise the call
        runs eagerly first: it switches the blocks to their captures for this signature (their
        caches re-allocated; refused in the middle of a generation) or captures them again."""
        states = self.runtime.block_states()
        for state, entry in zip(states, plan.entries, strict=True):
            if state.current is not entry or state.uncapturable is not None:
                return False
            if entry.dependencies.changed() is not None:
                return False
        return True

    def _bind(self, key: MaskKey, slot: int) -> dict[str, BlockBinding]:
        bindings = {}
        for state, compute in zip(self.runtime.block_states(), key, strict=True):
            bindings[state.path] = state.binding(self.runtime.blocks[state.path], dict(compute), slot)
        return bindings

    def _compile(self, plan: int, index: int, tensors: list[torch.Tensor]):
        """torch.compile of a fresh copy of the forward's code object: dynamo's cache is per code
        object, so this mask's graph never competes with (or recompiles for) another mask."""
        copy = fresh_code_copy(self.forward, f"smoothcache_{id(self):x}_plan{plan}_mask{index}")
        device = tensors[0].device if tensors else torch.device("cpu")
        self.compiles += 1
        return self.runtime.compile_config.compile(copy, device)


def _describe(key: MaskKey, runtime: SmoothCacheRuntime) -> dict[str, dict[str, bool]]:
    if not key:  # the graph form: one graph whose conds read the step
        return {}
    return {state.path: dict(compute) for state, compute in zip(runtime.block_states(), key, strict=True)}
