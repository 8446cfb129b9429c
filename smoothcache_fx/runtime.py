"""The one home of a transformed model's state: schedule, step clock, blocks, counters, reset.

Reached as `model.smoothcache`. Each call of the model is one schedule step; where a generation
starts is decided by `smoothcache_fx.generation` (explicit `generation()`, a pipeline call, or the
timesteps the model receives). The clock advances in forward hooks on the model, in Python, so no
step value ever reaches a traced graph.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from smoothcache_fx.block import (
    CACHE_BUFFER_PREFIX,
    ORDERS_KEY,
    SCHEDULE_BUFFER,
    BlockState,
    cache_name,
    variant_key,
)
from smoothcache_fx.compile import CompileConfig
from smoothcache_fx.generation import GenerationClock, timestep_of
from smoothcache_fx.granularity import choose_granularity, estimate_compile_cost
from smoothcache_fx.kernels.compat import CAPTURE_GATE, tree_flatten
from smoothcache_fx.schedules import Schedule, as_schedule
from smoothcache_fx.schedules.aliases import alias_renames
from smoothcache_fx.schedules.forecast import MAX_ORDER, check_order

LOGGER = logging.getLogger("smoothcache_fx")


@dataclass(frozen=True)
class ToolOptions:
    """What a tool asks of the blocks while it runs (`SmoothCacheRuntime.using`); the defaults are
    plain inference.

    Attributes:
        annotator: called per block call with (path, shared capture, variant, tensors); returns the
            callable to run instead of the variant (profile: the variant with profiler ranges).
        record_branches: every scheduled branch writes its cache, even one the schedule never
            reuses, so `branch_outputs()` sees every branch after each step (calibrate). Applies to
            blocks captured while it is set.
        eager: run the specialised graphs eagerly even with compile=True (profile's FLOP count).
    """

    annotator: Callable | None = None
    record_branches: bool = False
    eager: bool = False


_PLAIN = ToolOptions()

_CLOCK_NOT_TRACED = (
    "smoothcache_fx advances its step clock in Python outside traced code (a traced step would "
    "recompile at every step). For compiled, cached blocks use smoothcache_fx.transform(model, "
    "schedule, compile=True), or form='graph' to compile the whole model as one graph."
)


class SmoothCacheRuntime:
    """Step clock and per-block state of one transformed model.

    Attributes:
        schedule: the static schedule in force (the given one, or its resampled copy).
        given_schedule: the schedule given to `transform` or `set_schedule`, aliases applied; the
            one `save_pretrained` writes.
        resample: a pipeline call with another step count runs `given_schedule.resample(steps)`
            instead of being refused (`transform(..., resample=True)`).
        clock: where the generation in progress stands (`step`, `slot`, `generation` read it).
        kernel: "op" (fused custom op) or "inductor" (plain ops) at every rewritten site.
        max_order: the cap on every branch's predictor order (each order adds one buffer of the
            branch output's size per call slot); the schedule's orders above it are lowered to it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        schedule: Schedule,
        blocks: dict,
        kernel: str,
        compile_config: CompileConfig | None = None,
        form: str = "variants",
        calls_per_step: int = 1,
        strict: bool = False,
        resample: bool = False,
        max_order: int = MAX_ORDER,
    ):
        self.model = model
        self.max_order = check_order(max_order, "transform(..., max_order=)")
        # strict: a block that torch.export cannot capture is an error instead of running uncached.
        self.strict = strict
        self._warned_classes: set[str] = set()
        self.form = form
        # Model calls per schedule step (unbatched classifier-free guidance: 2). Call `slot` of a
        # step has caches of its own, so the unconditional call never reads the conditional one's.
        self.calls_per_step = calls_per_step
        self.model_class = type(model).__name__
        self.original_model_class = type(model)
        self.blocks: dict[str, torch.nn.Module] = blocks
        self.schedule = self.given_schedule = self._with_aliases(schedule)
        self.clock = GenerationClock(self.schedule.steps, calls_per_step)
        self.resample = resample
        self.kernel = kernel
        self.compile_config = compile_config or CompileConfig()
        # Blocks of identical structure share one captured graph (parameters are graph inputs).
        self.captured_graphs: dict[tuple, tuple] = {}
        self.in_model_call = False
        # Blocks captured again during the current model call, and why; logged once per call.
        self.recaptured: list[str] = []
        # What a tool (calibrate, profile) asks of the blocks while it runs; see `using`.
        self.tools = ToolOptions()
        self._validated = False
        # Compile granularity in force: "block", "model" or "graph"; "auto" until the first call's
        # end, when the captured blocks give what the choice needs (`smoothcache_fx.granularity`).
        self.granularity = self.compile_config.granularity if self.compile_config.enabled else "block"
        self.granularity_estimate = None
        # Set by transform where whole-model variants can run (compile=True, form="variants").
        self.model_variants = None
        # While a whole-model graph runs: block path -> BlockBinding of that step's mask.
        self.model_graph_bindings = None
        self._hooks = [
            model.register_forward_pre_hook(self._before_model_call, with_kwargs=True),
            model.register_forward_hook(self._after_model_call),
            # Last, and also when the call raised: the call's share of the capture gate.
            model.register_forward_hook(self._release_gate, always_call=True),
        ]

    # -- public -------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """The step the next (or current) model call runs, within its generation."""
        return self.clock.step

    @property
    def slot(self) -> int:
        """Which call of its step the next model call is (0 unless calls_per_step > 1)."""
        return self.clock.slot

    @property
    def generations(self) -> int:
        """How many generations have started since transform."""
        return self.clock.generation

    def reset(self) -> None:
        """End the generation in progress: the next call starts a new one at step 0, and no cache
        written so far may be read again. Caches are overwritten, not freed."""
        self.clock.reset()
        self._forget_generation()

    @contextlib.contextmanager
    def using(self, tools: ToolOptions) -> Iterator[SmoothCacheRuntime]:
        """Run the blocks with `tools` (calibration's recording, profiling's ranges, eager FLOP
        counting) for the duration of the block; plain inference again afterwards."""
        if not isinstance(tools, ToolOptions):
            raise TypeError(f"tools must be a ToolOptions; got {type(tools).__name__}.")
        previous, self.tools = self.tools, tools
        try:
            yield self
        finally:
            self.tools = previous

    @contextlib.contextmanager
    def generation(self) -> Iterator[SmoothCacheRuntime]:
        """Marks one generation: the first model call inside runs step 0; leaving ends it however
        the loop left (finished, interrupted, raised). For custom sampling loops; a transformed
        pipeline's call does this itself.

        Example::

            with model.smoothcache.generation():
                for t in scheduler.timesteps:
                    noise = model(latents, timestep=t, ...).sample
                    latents = scheduler.step(noise, t, latents).prev_sample
        """
        if self.clock.open and self.clock.explicit:
            raise RuntimeError(
                "model.smoothcache.generation() is already open (a pipeline call or an outer "
                "generation() block): generations do not nest. Leave the outer one first."
            )
        self.clock.check_thread()
        self.clock.begin(explicit=True)
        self._forget_generation()
        try:
            yield self
        finally:
            self.reset()

    def set_schedule(self, schedule: Schedule) -> None:
        """Swap the schedule (same model); specialised variants are rebuilt lazily, and an
        automatic granularity is chosen again for the new schedule. Aliases apply as in
        `transform`."""
        self.given_schedule = self._with_aliases(as_schedule(schedule))
        self._use(self.given_schedule)

    def run_resampled(self, steps: int) -> None:
        """Run `steps`-step generations from now on with the given schedule resampled to `steps`
        (`Schedule.resample`); logged when the step count changes. The blocks are specialised
        again (and, with compile=True, their variants compiled again)."""
        if steps == self.schedule.steps:
            return
        schedule = self.given_schedule.resample(steps)
        if schedule is self.given_schedule:
            LOGGER.info(
                "smoothcache_fx: %s back at %d steps, the given schedule's own", self.model_class, steps
            )
            return self._use(schedule)
        LOGGER.info(
            "smoothcache_fx: %s called for %d steps; running the %d-step schedule resampled to %d steps "
            "(compute fraction %s)",
            self.model_class,
            steps,
            self.given_schedule.steps,
            steps,
            {key: round(value, 2) for key, value in schedule.compute_fraction.items()},
        )
        self._use(schedule)

    def _use(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.clock = GenerationClock(self.schedule.steps, self.calls_per_step)
        self.captured_graphs.clear()
        if self.model_variants is not None:
            self.model_variants.clear()
        if self.compile_config.enabled:
            self.granularity = self.compile_config.granularity
        for state in self._states():
            state.captures.clear()
            state.current = None
        self._validated = False
        self.reset()

    def branch_outputs(self) -> dict[str, list[torch.Tensor]]:
        """Branch path -> its cache buffers (one per residual site), for scheduled branches that
        the schedule reuses at some step, or every scheduled branch under
        `using(ToolOptions(record_branches=True))`.

        After a model call these hold the branch outputs of the last step that computed them, so a
        forward hook on the model sees every scheduled branch's output of the step just run
        (calibration reads them this way under an all-compute schedule).
        """
        outputs: dict[str, list[torch.Tensor]] = {}
        for path, block in self.blocks.items():
            entry = block._smoothcache_state.current
            if entry is None:
                continue
            for index, site in enumerate(entry.branches.sites):
                if site.component in entry.masks:
                    tensor = getattr(block, cache_name(index, 0))
                    if site.component in entry.orders:  # a history: its newest slot
                        tensor = tensor[-1]
                    outputs.setdefault(f"{path}.{site.component}", []).append(tensor)
        return outputs

    def step_tensor(self) -> torch.Tensor:
        """The graph form's step: an int64 buffer [1] on the model, advanced inside its forward."""
        return self.model.smoothcache_step

    def remove(self, model: torch.nn.Module) -> None:
        """Undo the transform on `model`: original block classes, no hooks, no cache buffers."""
        for hook in self._hooks:
            hook.remove()
        if self.form == "graph":
            del model._buffers["smoothcache_step"]
        model.__class__ = self.original_model_class
        for block in self.blocks.values():
            state = block._smoothcache_state
            for name in [n for n in block._buffers if n.startswith((CACHE_BUFFER_PREFIX, SCHEDULE_BUFFER))]:
                del block._buffers[name]
            block.__class__ = state.original_class
            del block._smoothcache_state
        del model.smoothcache

    @property
    def branches(self) -> dict[str, tuple[str, ...]]:
        """Block path -> residual branch (component) names found; filled by the first model call."""
        return {path: state.components for path, state in self._items() if state.components}

    @property
    def stats(self) -> dict[str, dict[str, int]]:
        """Per branch path: how often it computed, reused and forecast, its predictor order, and the
        bytes of its cache (a forecast branch of order k keeps k + 1 outputs per call slot)."""
        report = {}
        for path, block in self.blocks.items():
            state = block._smoothcache_state
            if state.current is None:
                continue
            sites = state.current.branches.sites
            for component in state.components:
                nbytes = sum(
                    getattr(block, cache_name(i, slot)).nbytes
                    for i, site in enumerate(sites)
                    if site.component == component and component in state.current.masks
                    for slot in range(self.calls_per_step)
                )
                report[f"{path}.{component}"] = {
                    "computed": state.computed.get(component, 0),
                    "reused": state.reused.get(component, 0),
                    "forecast": state.forecast.get(component, 0),
                    "order": state.current.orders.get(component, 0),
                    "strength": state.current.strengths.get(component, 1.0),
                    "cache_bytes": nbytes,
                }
        return report

    @property
    def variants(self) -> list[dict]:
        """Every specialised variant built so far: which blocks share it, its mask, calls, compiled."""
        report = []
        for shared in self.captured_graphs.values():
            for key, variant in shared.variants.items():
                report.append(
                    {
                        "block_class": shared.blocks and type(self.blocks[shared.blocks[0]]).__name__,
                        "blocks": list(shared.blocks),
                        "compute": {name: on for name, on in key if name != ORDERS_KEY},
                        "orders": dict(variant.orders),
                        "rewritten": variant.rewritten,
                        "nodes_removed": variant.nodes_removed,
                        "calls": shared.calls.get(key, 0),
                        "compiled": key in shared.compiled,
                    }
                )
        return report

    @property
    def model_graphs(self) -> list[dict]:
        """Whole-model variants (granularity "model"): per distinct whole-model mask, the steps
        that use it, its calls and whether it is compiled yet."""
        return [] if self.model_variants is None else self.model_variants.report()

    @property
    def compiles_blocks(self) -> bool:
        """Whether block calls run compiled per-block variants: granularity "block", or profiling
        (whose ranges sit between a block's compiled segments)."""
        config = self.compile_config
        return config.enabled and (self.granularity == "block" or self.tools.annotator is not None)

    def runs_model_graphs(self) -> bool:
        """Whether this model call runs a whole-model compiled graph (granularity "model" or
        "graph"; plain inference only: calibration and profiling need the per-block path, and a
        user's own torch.compile around the model traces the model as written)."""
        return (
            self.granularity in ("auto", "model", "graph")  # "auto": the first call decides there
            and self.in_model_call
            and self.tools == _PLAIN
            and not torch.compiler.is_compiling()
        )

    @property
    def cache_bytes(self) -> int:
        return sum(entry["cache_bytes"] for entry in self.stats.values())

    def __repr__(self) -> str:
        return (
            f"SmoothCacheRuntime({self.model_class}, steps={self.schedule.steps}, step={self.step}, "
            f"blocks={len(self.blocks)}, branches={sum(len(v) for v in self.branches.values())})"
        )

    # -- clock ----------------------------------------------------------------------------------
    def _forget_generation(self) -> None:
        self.in_model_call = False
        if self.form == "graph":
            self.step_tensor().zero_()
        for state in self._states():
            state.reset()

    # The hooks below run eagerly in the common case. Under dynamo (a user's torch.compile of the
    # model) they call `torch.compiler.disable`d twins instead, which break the graph there with a
    # message; `is_dynamo_compiling()` is a constant, unlike `is_compiling()`, a process-wide flag
    # that another thread's torch.export sets (see kernels/compat.py, CaptureGate).
    def _before_model_call(self, module, args, kwargs) -> None:
        if self.form == "graph" and torch.compiler.is_compiling():
            return  # the traced graph keeps its own step; the Python clock is for eager runs
        if torch.compiler.is_dynamo_compiling():
            return self._place_call_untraced(module, args, kwargs)
        return self._place_call(module, args, kwargs)

    def _after_model_call(self, module, args, output) -> None:
        if self.form == "graph" and torch.compiler.is_compiling():
            return
        if torch.compiler.is_dynamo_compiling():
            return self._finish_call_untraced()
        return self._finish_call()

    def _release_gate(self, module, args, output) -> None:
        if self.form == "graph" and torch.compiler.is_compiling():
            return
        if torch.compiler.is_dynamo_compiling():
            return self._release_gate_untraced()
        return CAPTURE_GATE.release_shared()

    def _place_call(self, module, args, kwargs) -> None:
        """Decide which generation and step this call runs (never traced: it reads the timestep's
        value and the thread, and a traced step would recompile every step). First takes the
        call's share of the capture gate: no other thread's capture runs during this call."""
        CAPTURE_GATE.acquire_shared()
        self.clock.check_thread()
        _refuse_gradients(module, args, kwargs)  # before the clock moves
        if self.in_model_call:  # the previous call raised half way: its generation is void
            explicit = self.clock.explicit
            self.clock.reset()
            if explicit:  # inside generation(): it goes on, from step 0
                self.clock.begin(explicit=True)
            self._forget_generation()
        timestep = None if self.clock.explicit else timestep_of(module, args, kwargs)
        if self.clock.before_call(timestep):
            self._forget_generation()
        if self.compile_config.uses_cuda_graphs and torch.cuda.is_available():
            torch.compiler.cudagraph_mark_step_begin()  # outputs of the last step are consumed
        self.in_model_call = True

    def _finish_call(self) -> None:
        self.in_model_call = False
        if self.recaptured:
            LOGGER.info(
                "smoothcache_fx: captured %d block(s) of %s again: %s",
                len(self.recaptured),
                self.model_class,
                "; ".join(self.recaptured),
            )
            self.recaptured = []
        self.validate_branches()
        self.clock.after_call()

    _place_call_untraced = torch.compiler.disable(_place_call, reason=_CLOCK_NOT_TRACED)
    _finish_call_untraced = torch.compiler.disable(_finish_call, reason=_CLOCK_NOT_TRACED)

    @torch.compiler.disable(reason=_CLOCK_NOT_TRACED)
    def _release_gate_untraced(self) -> None:
        CAPTURE_GATE.release_shared()

    def warn_uncapturable(self, name: str, path: str, reason: str, remedy: str) -> None:
        """One warning per block class that torch.export cannot capture."""
        if name in self._warned_classes:
            return
        self._warned_classes.add(name)
        warnings.warn(
            f"smoothcache_fx: blocks of class {name} (first: {path!r}) cannot be captured by "
            f"torch.export ({reason}); they run as the model wrote them, uncached. {remedy} "
            "Pass transform(..., strict=True) to make this an error.",
            stacklevel=2,
        )

    def validate_branches(self) -> None:
        """Once, after the first call has captured the blocks: branches were found, the schedule's
        keys match them, the variant count is within bounds, and "auto" granularity is decided."""
        if self._validated:
            return
        self._validated = True
        paths = [path for _, state in self._items() for path in state.branch_paths()]
        if not paths:
            self.reset()
            classes = sorted({state.original_class.__name__ for _, state in self._items()})
            uncapturable = sorted({s.original_class.__name__ for _, s in self._items() if s.uncapturable})
            why = f" ({', '.join(uncapturable)} could not be captured at all)" if uncapturable else ""
            raise NotImplementedError(
                f"no residual branch found in {self.model_class}: inspected block classes {classes}{why} "
                "for `residual + gate * X` or `residual + X` where X is the output of a direct child "
                "module. Pass the transformer blocks explicitly with transform(..., blocks=[...])."
            )
        self._check_variant_count()
        if self.granularity == "auto":
            self._choose_granularity()
        unmatched = self.schedule.unmatched_keys(paths)
        if unmatched:
            self.reset()
            raise ValueError(
                f"schedule keys {unmatched} match no residual branch of {self.model_class}. Branches "
                f"found: {self.branches}. Use a component name (e.g. {sorted({p.rsplit('.', 1)[1] for p in paths})}), "
                "'component-blockindex', or a full branch path."
            )

    def distinct_variants(self) -> int:
        """How many specialised graphs the schedule needs over a whole generation (all blocks)."""
        needed: dict[int, set] = {}
        for state in self._states():
            entry = state.current
            if entry is None:
                continue
            keys = needed.setdefault(id(entry.shared), set())
            for step in range(self.schedule.steps):
                compute = {name: mask[step] for name, mask in entry.masks.items()}
                keys.add(variant_key(compute, entry.orders))
        return sum(len(keys) for keys in needed.values())

    def _check_variant_count(self) -> None:
        config = self.compile_config
        if not config.enabled or self.granularity == "graph":
            return
        if self.granularity == "model":
            count = estimate_compile_cost(self).model_graphs
        else:
            count = self.distinct_variants()
        if count > config.max_variants:
            self.reset()
            raise ValueError(
                f"this schedule needs {count} compiled variants for {self.model_class}, more than "
                f"max_variants={config.max_variants}. Raise max_variants (each costs one compile), "
                "use a per-component schedule (a few variants per block structure), or transform "
                "with compile=False to run the specialised graphs eagerly."
            )

    def _choose_granularity(self) -> None:
        estimate = estimate_compile_cost(self)
        self.granularity_estimate = estimate
        self.granularity = choose_granularity(
            estimate,
            self.compile_config.compile_budget,
            self.compile_config.max_variants,
            model_graphs_possible=self.model_variants is not None,
        )
        LOGGER.info(
            "smoothcache_fx: %s: compile granularity %r (%s)", self.model_class, self.granularity, estimate
        )

    def block_states(self) -> list[BlockState]:
        """Every transformed block's state, in model order."""
        return self._states()

    def captured_states(self) -> list[BlockState] | None:
        """Every block's state when all of them are captured for the current call, else None (a
        block that cannot be captured keeps the per-block path, which runs it as written)."""
        states = self._states()
        if any(state.current is None or state.uncapturable is not None for state in states):
            return None
        return states

    def _with_aliases(self, schedule: Schedule) -> Schedule:
        """`schedule` with each key component that no block has as a direct child renamed to an
        alias that one has (`smoothcache_fx.schedules.aliases`), logged. Residual branches are
        direct children of their block, so such a key could never match; deciding here, before
        the first call, keeps the blocks' masks fixed from step 0 on."""
        children = {name for block in self.blocks.values() for name, _ in block.named_children()}
        renames = alias_renames(schedule.components, children)
        if not renames:
            return schedule
        LOGGER.info(
            "smoothcache_fx: no block of %s has %s; the schedule's keys are renamed %s "
            "(aliases in smoothcache_fx.schedules.aliases)",
            self.model_class,
            ", ".join(repr(name) for name in renames),
            ", ".join(f"{old} -> {new}" for old, new in renames.items()),
        )
        return schedule.rename(renames)

    def _items(self):
        return [(path, block._smoothcache_state) for path, block in self.blocks.items()]

    def _states(self) -> list[BlockState]:
        return [block._smoothcache_state for block in self.blocks.values()]


def _refuse_gradients(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """SmoothCache is for inference: a reused branch output has no gradient path to the step that
    computed it. Checked only under grad mode (pipelines run under no_grad), before the clock moves."""
    if not torch.is_grad_enabled():
        return
    leaves = tree_flatten((args, kwargs))[0]
    inputs = any(isinstance(leaf, torch.Tensor) and leaf.requires_grad for leaf in leaves)
    if inputs or any(p.requires_grad for p in model.parameters()):
        what = "an input that requires grad" if inputs else "parameters that require grad"
        raise RuntimeError(
            f"smoothcache_fx runs inference only, but {type(model).__name__} was called with "
            f"gradients enabled and {what}: a reused branch output has no gradient path to the "
            "step that computed it. Wrap generation in torch.no_grad() or torch.inference_mode() "
            "(diffusers pipelines already do), or call model.requires_grad_(False) and detach the inputs."
        )
