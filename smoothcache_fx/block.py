"""Per-block dispatch: capture on first call, pick the specialised variant for the current step.

A transformed block keeps its identity (same object, same parameters, same state_dict keys); only
its class is swapped for a subclass whose `forward` dispatches here. The step never enters a traced
graph: the variant is chosen in Python from the static schedule, so each variant is a plain graph.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from smoothcache_fx.dependencies import CaptureDependencies
from smoothcache_fx.kernels.compat import mark_static_address, tree_flatten, tree_map_only, tree_unflatten
from smoothcache_fx.passes.branches import BlockBranches, find_residual_branches
from smoothcache_fx.passes.capture import (
    CallSignature,
    CapturedBlock,
    call_signature,
    capture_block,
    structure_key,
)
from smoothcache_fx.passes.conditional import ConditionalBlock, make_conditional
from smoothcache_fx.passes.specialise import SpecialisedBlock, specialise_block
from smoothcache_fx.schedules.forecast import weight_table

if TYPE_CHECKING:
    from smoothcache_fx.runtime import SmoothCacheRuntime

CACHE_BUFFER_PREFIX = "smoothcache_cache_"
SCHEDULE_BUFFER = "smoothcache_schedule"
_DISPATCH_NOT_TRACED = (
    "smoothcache_fx chooses each block's variant in Python from the step clock; tracing it would "
    "recompile at every step. Blocks run outside your torch.compile graph (a graph break each). For "
    "compiled, cached blocks use smoothcache_fx.transform(model, schedule, compile=True)."
)


@dataclass
class SharedCapture:
    """A captured graph and its specialised variants, shared by every block of the same structure
    and call signature (parameters are graph inputs, so one graph serves them all)."""

    captured: CapturedBlock
    branches: BlockBranches
    variants: dict[tuple[tuple[str, bool], ...], SpecialisedBlock] = field(default_factory=dict)
    compiled: dict[tuple[tuple[str, bool], ...], Callable] = field(default_factory=dict)
    calls: dict[tuple[tuple[str, bool], ...], int] = field(default_factory=dict)
    blocks: list[str] = field(default_factory=list)
    conditionals: dict[tuple, ConditionalBlock] = field(default_factory=dict)

    def conditional(self, components: tuple[str, ...], orders: dict[str, int]) -> ConditionalBlock:
        """The single-graph (`torch.cond`) form for a set of scheduled components and their
        predictor orders, built once."""
        key = (components, tuple(sorted(orders.items())))
        found = self.conditionals.get(key)
        if found is None:
            found = make_conditional(self.captured.graph_module, self.branches, components, orders)
            self.conditionals[key] = found
        return found


@dataclass
class _Capture:
    """One call signature of one block: the shared graph plus this block's schedule masks, the
    predictor orders and strengths of its forecast components and their per-step weights ([order +
    1] fp32 tensors on the block's device, one per step, built once per capture)."""

    shared: SharedCapture
    masks: dict[str, tuple[bool, ...]]
    dependencies: CaptureDependencies
    state_owners: tuple[tuple[dict, str], ...] = ()
    orders: dict[str, int] = field(default_factory=dict)
    strengths: dict[str, float] = field(default_factory=dict)
    weights: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def captured(self) -> CapturedBlock:
        return self.shared.captured

    @property
    def branches(self) -> BlockBranches:
        return self.shared.branches

    @property
    def variants(self) -> dict:
        return self.shared.variants


class BlockState:
    """What one transformed block knows: its path, captures, caches' validity and counters."""

    def __init__(self, path: str, original_class: type, runtime: SmoothCacheRuntime):
        self.path = path
        self.original_class = original_class
        self.runtime = runtime
        self.captures: dict[CallSignature, _Capture] = {}
        self.current: _Capture | None = None
        self.written: set[tuple[int, int]] = set()  # (slot, site index) written this generation
        self.last_call: tuple[int, int, int] | None = None
        self.computed: dict[str, int] = {}
        self.reused: dict[str, int] = {}
        self.forecast: dict[str, int] = {}
        # Why this block cannot be captured (it then runs as the model wrote it), or None.
        self.uncapturable: str | None = None

    # -- what the runtime reads ---------------------------------------------------------------
    @property
    def components(self) -> tuple[str, ...]:
        return () if self.current is None else self.current.branches.components

    def branch_paths(self) -> list[str]:
        return [f"{self.path}.{component}" for component in self.components]

    def reset(self) -> None:
        """Forget which caches hold this generation's values (buffers stay allocated)."""
        self.written.clear()
        self.last_call = None

    # -- dispatch -------------------------------------------------------------------------------
    def run(self, block: torch.nn.Module, args: tuple, kwargs: dict):
        """Run one step of the block, eagerly (see `run_untraced` for the traced case)."""
        runtime = self.runtime
        if not runtime.in_model_call or self.uncapturable is not None:
            return self.original_class.forward(block, *args, **kwargs)
        _check_grad_mode(block, self.path)
        signature, tensors = call_signature(args, kwargs)
        entry = self._entry_for(block, signature, args, kwargs)
        if entry is None:  # just found uncapturable: this call and every later one run uncached
            return self.original_class.forward(block, *args, **kwargs)
        call_id = (runtime.generations, runtime.step, runtime.slot)
        if self.last_call == call_id:
            raise NotImplementedError(
                f"block {self.path!r} ({self.original_class.__name__}) was called twice in one model "
                "call; smoothcache_fx keeps one cache per block and step. Exclude blocks that are "
                "reused within a step with transform(..., blocks=[...])."
            )
        self.last_call = call_id
        compute = {name: mask[runtime.step] for name, mask in entry.masks.items()}
        variant, run_graph = self._variant(entry, compute, tensors)
        if runtime.compile_config.enabled:
            tensors = _contiguous(tensors)
        if runtime.tools.annotator is not None:  # only inside smoothcache_fx.profile()
            run_graph = runtime.tools.annotator(self.path, entry.shared, variant, tensors)
        caches = self._caches(block, variant)
        weights = [entry.weights[site.component][runtime.step] for site in variant.forecast_sites]
        state = [table[name] for table, name in entry.state_owners]
        flat = run_graph(*state, *entry.captured.constants, *tensors, *weights, *caches)
        self.count(compute)
        return tree_unflatten(list(flat), entry.captured.out_spec)

    def count(self, compute: dict[str, bool]) -> None:
        """Count one call's computed, forecast and reused branches (unscheduled branches always
        compute)."""
        entry = self.current
        for name in entry.branches.components:
            on = compute.get(name, True)
            counter = self.computed if on else self.forecast if name in entry.orders else self.reused
            counter[name] = counter.get(name, 0) + 1

    def count_step(self, step: int) -> None:
        """`count` for the graph form, whose conds choose inside the graph: from the schedule."""
        self.count({name: mask[step] for name, mask in self.current.masks.items()})

    # What a block's forward calls under dynamo (a user's torch.compile around the model): a graph
    # break with the reason, instead of guarding on the step (which would recompile every step).
    run_untraced = torch.compiler.disable(run, reason=_DISPATCH_NOT_TRACED)

    def run_graph_form(self, block: torch.nn.Module, args: tuple, kwargs: dict):
        """One step in the single-graph form: the step is a tensor, each component a `torch.cond`.

        Traceable by dynamo and torch.export: nothing here reads the Python step clock. The first
        call must be eager (it captures the block).
        """
        runtime = self.runtime
        # Contiguous activations: inductor may re-lay-out a buffer feeding a cond branch, which was
        # compiled for the strides seen while tracing (a transposed patch embedding, say).
        args, kwargs = tree_map_only(torch.Tensor, torch.Tensor.contiguous, (args, kwargs))
        leaves = tree_flatten((args, kwargs))[0]
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if torch.compiler.is_compiling():
            entry = self.current
            if entry is None:
                raise RuntimeError(
                    f"block {self.path!r} has not been captured yet: run the transformed model once "
                    "eagerly (one step) before torch.export or torch.compile of the whole model."
                )
        else:
            if not runtime.in_model_call:
                return self.original_class.forward(block, *args, **kwargs)
            _check_grad_mode(block, self.path)
            signature, tensors = call_signature(args, kwargs)
            entry = self._entry_for(block, signature, args, kwargs)
        conditional = entry.shared.conditional(tuple(entry.masks), entry.orders)
        step = runtime.step_tensor()
        flags = getattr(block, SCHEDULE_BUFFER).index_select(0, step).squeeze(0)
        weights = [
            getattr(block, weights_table_name(name)).index_select(0, step).squeeze(0)
            for name, _ in conditional.orders
        ]
        caches = [getattr(block, cache_name(index, 0)) for index in conditional.cache_indices]
        state = [table[name] for table, name in entry.state_owners]
        flat = conditional.graph_module(*state, *entry.captured.constants, *tensors, flags, *weights, *caches)
        if not torch.compiler.is_compiling():
            self.count_step(runtime.step)
        return tree_unflatten(list(flat), entry.captured.out_spec)

    def _entry_for(self, block, signature: CallSignature, args, kwargs) -> _Capture:
        current = self.current
        if current is not None and current.captured.signature == signature:
            change = current.dependencies.changed()
            if change is None:
                return current
            return self._capture_again(block, signature, args, kwargs, change)
        if current is not None and (self.runtime.step != 0 or self.runtime.slot != 0):
            change = current.captured.signature.describe_change(signature)
            raise RuntimeError(
                f"block {self.path!r} changed its input in the middle of a generation (step "
                f"{self.runtime.step} of {self.runtime.schedule.steps}): {change}. Cached branch "
                "outputs from earlier steps no longer fit. Keep batch size, resolution, dtype and "
                "device fixed within a generation, or call model.smoothcache.reset() to start a new one."
            )
        entry = self.captures.get(signature)
        if entry is None:
            entry = self._capture(block, args, kwargs)
            if entry is None:
                return None
            self.captures[signature] = entry
        self.current = entry
        self.written.clear()
        self._prepare_buffers(block, entry)
        return entry

    def _prepare_buffers(self, block, entry: _Capture) -> None:
        """The entry's cache buffers (kept where shape, dtype and device still fit) and, in the
        graph form, its schedule table."""
        runtime = self.runtime
        _allocate_caches(
            block, entry, static=runtime.compile_config.uses_cuda_graphs, slots=runtime.calls_per_step
        )
        device = entry.captured.signature.tensors[0][2] if entry.captured.signature.tensors else None
        entry.weights = {
            name: [
                torch.tensor(row, dtype=torch.float32, device=device)
                for row in weight_table(entry.masks[name], order, entry.strengths.get(name, 1.0))
            ]
            for name, order in entry.orders.items()
        }
        if runtime.form == "graph":
            _register_schedule_table(block, entry, runtime.schedule.steps)
            for name, rows in entry.weights.items():  # the graph form indexes them with the step
                block.register_buffer(weights_table_name(name), torch.stack(rows), persistent=False)

    def _capture_shared(self, block, args, kwargs, dependencies) -> SharedCapture | None:
        """`capture_shared`, or None (with one warning per block class) when torch.export cannot
        capture the block: it then runs as the model wrote it, uncached; `strict=True` raises.

        Export fails in many ways (data-dependent control flow, `.numpy()`, untraceable calls),
        each with its own exception type, so every exception counts as "cannot be captured"; the
        original is chained to the error in strict mode and named in the warning otherwise.
        """
        try:
            return capture_shared(
                self.original_class, block, args, kwargs, dependencies, self.runtime.captured_graphs
            )
        except Exception as error:
            reason = (
                f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            )
            name = self.original_class.__name__
            remedy = (
                "Make the block's forward traceable by torch.export (no data-dependent Python "
                "control flow, no .item()/.numpy()), or leave it out with transform(..., blocks=[...])."
            )
            if self.runtime.strict:
                raise NotImplementedError(
                    f"block {self.path!r} ({name}) cannot be captured by torch.export: {reason}. {remedy}"
                ) from error
            self.uncapturable = reason
            self.runtime.warn_uncapturable(name, self.path, reason, remedy)
            return None

    def _capture_again(self, block, signature: CallSignature, args, kwargs, change: str) -> _Capture | None:
        """The block changed what its capture depends on: capture it again (its variants are
        specialised and compiled again). Caches written this generation stay valid: same call,
        same branch outputs' shapes."""
        self.runtime.recaptured.append(f"{self.path}: {change}")
        components = self.current.branches.components
        self.captures.clear()
        entry = self._capture(block, args, kwargs)
        self.current = entry
        if entry is None:  # the change made it uncapturable: it runs uncached from now on
            return None
        self.captures[signature] = entry
        if entry.branches.components != components:
            self.written.clear()
        self._prepare_buffers(block, entry)
        return entry

    def _capture(self, block, args, kwargs) -> _Capture:
        dependencies = CaptureDependencies(block)
        shared = self._capture_shared(block, args, kwargs, dependencies)
        if shared is None:
            return None
        shared.blocks.append(self.path)
        branches = shared.branches
        schedule = self.runtime.schedule
        masks = {}
        for component in branches.components:
            mask = schedule.mask_for(f"{self.path}.{component}")
            # A branch that computes at every step is never read from a cache: left as the model
            # wrote it, it costs nothing (no cache buffer, no cache write, the model's own add).
            if mask is not None and (not all(mask) or self.runtime.tools.record_branches):
                masks[component] = tuple(bool(v) for v in mask)
        orders, strengths = {}, {}
        for component, mask in masks.items():
            path = f"{self.path}.{component}"
            order = min(schedule.order_for(path), self.runtime.max_order)
            if order and not all(mask):
                orders[component] = order
                # The strength only changes the weights, which are graph inputs: no variant depends
                # on it, so it is not part of any variant key.
                strengths[component] = schedule.strength_for(path)
        owners = _state_owners(block, shared.captured.state_names)
        return _Capture(shared, masks, dependencies, owners, orders, strengths)

    def specialised(self, entry: _Capture, compute: dict[str, bool]) -> SpecialisedBlock:
        """The specialised graph for `compute` (component -> computes), built once per shared capture."""
        shared = entry.shared
        key = variant_key(compute, entry.orders)
        variant = shared.variants.get(key)
        if variant is None:
            variant = specialise_block(
                shared.captured.graph_module,
                shared.branches,
                compute,
                kernel=self.runtime.kernel,
                orders=entry.orders,
            )
            shared.variants[key] = variant
        return variant

    def binding(self, block: torch.nn.Module, compute: dict[str, bool], slot: int) -> BlockBinding:
        """What a whole-model graph needs to inline this block's variant for `compute` at call
        `slot` (see `smoothcache_fx.model_variants`). A forecast site's weights change with the
        step, not with the mask: the graph reads them from a buffer per component that `prepare`
        fills before each call, so every step with this mask shares the graph."""
        entry = self.current
        variant = self.specialised(entry, compute)
        sites = entry.branches.sites
        indices = [sites.index(site) for site in variant.cache_sites]
        forecast = tuple(site.component for site in variant.forecast_sites)
        for component in dict.fromkeys(forecast):
            name = weights_now_name(component)
            rows = entry.weights[component]
            if getattr(block, name, None) is None or getattr(block, name).shape != rows[0].shape:
                with torch.inference_mode(False), torch.no_grad():
                    buffer = torch.zeros_like(rows[0])
                if self.runtime.compile_config.uses_cuda_graphs:
                    mark_static_address(buffer)
                block.register_buffer(name, buffer, persistent=False)
        return BlockBinding(
            state=self,
            block=block,
            weights=forecast,
            history=tuple(
                i
                for i, s in zip(indices, variant.cache_sites, strict=True)
                if s.component in variant.computed and s.component in entry.orders
            ),
            graph_module=variant.graph_module,
            state_owners=entry.state_owners,
            constants=tuple(entry.captured.constants),
            out_spec=entry.captured.out_spec,
            cache_names=tuple(cache_name(index, slot) for index in indices),
            reads=tuple(
                i for i, s in zip(indices, variant.cache_sites, strict=True) if s.component in variant.reused
            ),
            writes=tuple(
                i
                for i, s in zip(indices, variant.cache_sites, strict=True)
                if s.component in variant.computed
            ),
            computed=tuple(n for n in entry.branches.components if compute.get(n, True)),
            reused=tuple(n for n in entry.branches.components if not compute.get(n, True)),
        )

    def _variant(
        self, entry: _Capture, compute: dict[str, bool], tensors
    ) -> tuple[SpecialisedBlock, Callable]:
        """The specialised graph for `compute` and the callable that runs it (compiled or not)."""
        shared = entry.shared
        key = variant_key(compute, entry.orders)
        variant = self.specialised(entry, compute)
        shared.calls[key] = shared.calls.get(key, 0) + 1
        config = self.runtime.compile_config
        if not self.runtime.compiles_blocks or self.runtime.tools.eager:
            return variant, variant.graph_module
        run_graph = shared.compiled.get(key)
        if run_graph is None:
            device = tensors[0].device if tensors else torch.device("cpu")
            run_graph = config.compile(variant.graph_module, device)
            shared.compiled[key] = run_graph
        return variant, run_graph

    def _caches(self, block, variant: SpecialisedBlock) -> list[torch.Tensor]:
        sites = self.current.branches.sites
        slot = self.runtime.slot
        caches = []
        for site in variant.cache_sites:
            index = sites.index(site)
            if site.component in variant.reused and (slot, index) not in self.written:
                raise _reuse_before_compute(self.path, site.component, self.runtime.step)
            buffer = getattr(block, cache_name(index, slot))
            if site.component in variant.computed:
                if site.component in dict(variant.orders) and (slot, index) not in self.written:
                    buffer.zero_()  # empty history slots get weight 0: keep them finite
                self.written.add((slot, index))
            caches.append(buffer)
        return caches


@dataclass(frozen=True)
class BlockBinding:
    """One block's specialised variant as a whole-model graph inlines it, with the bookkeeping the
    runtime does eagerly around that graph (which caches it reads and writes, the counters)."""

    state: BlockState
    block: torch.nn.Module
    weights: tuple[str, ...]  # per forecast site, in placeholder order: its component
    history: tuple[int, ...]  # site indices whose history buffer a compute step shifts
    graph_module: torch.fx.GraphModule
    state_owners: tuple[tuple[dict, str], ...]
    constants: tuple[torch.Tensor, ...]
    out_spec: Any
    cache_names: tuple[str, ...]
    reads: tuple[int, ...]  # site indices served from cache
    writes: tuple[int, ...]  # site indices computed (their cache written)
    computed: tuple[str, ...]
    reused: tuple[str, ...]

    def run(self, block: torch.nn.Module, args: tuple, kwargs: dict):
        """The block's call inside the whole-model graph (traced by dynamo, never run eagerly)."""
        leaves = tree_flatten((args, kwargs))[0]
        tensors = [leaf.contiguous() for leaf in leaves if isinstance(leaf, torch.Tensor)]
        state = [table[name] for table, name in self.state_owners]
        weights = [getattr(block, weights_now_name(component)) for component in self.weights]
        caches = [getattr(block, name) for name in self.cache_names]
        flat = self.graph_module(*state, *self.constants, *tensors, *weights, *caches)
        return tree_unflatten(list(flat), self.out_spec)

    def prepare(self, step: int, slot: int) -> None:
        """Eagerly, before the whole-model graph runs: refuse a reuse of a cache not written in
        this generation, zero a history buffer about to get its first output (its empty slots
        get weight 0 and must stay finite), and put this step's forecast weights in place."""
        state, block = self.state, self.block
        written = state.written
        for index in self.reads:
            if (slot, index) not in written:
                site = state.current.branches.sites[index]
                raise _reuse_before_compute(state.path, site.component, step)
        for index in self.history:
            if (slot, index) not in written:
                getattr(block, cache_name(index, slot)).zero_()
        weights = state.current.weights
        for component in dict.fromkeys(self.weights):
            getattr(block, weights_now_name(component)).copy_(weights[component][step])

    def record(self, slot: int) -> None:
        state = self.state
        state.written.update((slot, index) for index in self.writes)
        orders = state.current.orders
        for name in self.computed:
            state.computed[name] = state.computed.get(name, 0) + 1
        for name in self.reused:
            counter = state.forecast if name in orders else state.reused
            counter[name] = counter.get(name, 0) + 1


def _reuse_before_compute(path: str, component: str, step: int) -> RuntimeError:
    return RuntimeError(
        f"block {path!r}: the schedule reuses {component!r} at step {step} before it was computed "
        "in this generation. Every scheduled branch must compute at the first step of a generation."
    )


# The variant key's entry for predictor orders (absent when every scheduled component reuses, so
# reuse-only keys stay `tuple(compute.items())`).
ORDERS_KEY = "__orders__"


def variant_key(compute: dict[str, bool], orders: dict[str, int]) -> tuple:
    """The key of a specialised variant: its compute mask and, if any, its predictor orders."""
    key = tuple(compute.items())
    return key + ((ORDERS_KEY, tuple(sorted(orders.items()))),) if orders else key


def capture_shared(
    original_class: type,
    block: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    dependencies: CaptureDependencies,
    graphs: dict,
) -> SharedCapture:
    """The one place a block is captured and its residual branches found (the runtime and
    `calibrate` both come here): a `SharedCapture` from `graphs`, or a new one put there.

    Blocks share a capture when their class, structure (`structure_key`), call signature and the
    Python values their capture bakes in (`CaptureDependencies.key`) are equal: parameters are
    graph inputs, so one graph serves them all.
    """
    signature, _ = call_signature(args, kwargs)
    key = (original_class, structure_key(block), signature, dependencies.key())
    shared = graphs.get(key)
    if shared is None:
        with torch.inference_mode(False):
            captured = capture_block(block, original_class.forward, args, kwargs)
        shared = SharedCapture(captured, find_residual_branches(captured.graph_module.graph))
        graphs[key] = shared
    return shared


def _contiguous(tensors):
    """Compiled variants guard on input strides. A DiT's first block gets its hidden states from the
    patch embedding in a transposed layout, every later block contiguous ones (the fused op returns
    contiguous tensors, as the model's own `update + residual` does): one copy for the first block
    keeps every block of a structure on one compiled graph per variant instead of two."""
    if all(t.is_contiguous() for t in tensors):
        return tensors
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def _state_owners(block: torch.nn.Module, names: tuple[str, ...]) -> tuple[tuple[dict, str], ...]:
    """(owning module's _parameters or _buffers dict, key) per lifted state path: resolved once,
    read with a dict lookup per call (get_submodule per parameter per call cost ~40 us each, and
    nn.Module.__getattr__ ~10 us). Reassigning a parameter updates the same dict, so it is seen."""
    owners = []
    for path in names:
        owner, _, name = path.rpartition(".")
        module = block.get_submodule(owner) if owner else block
        owners.append((module._parameters if name in module._parameters else module._buffers, name))
    return tuple(owners)


def weights_now_name(component: str) -> str:
    """Whole-model variants: the current step's forecast weights of a component ([order + 1]),
    filled before each call (removed with the caches: same prefix)."""
    return f"{CACHE_BUFFER_PREFIX}weights_{component}"


def weights_table_name(component: str) -> str:
    """The graph form's [steps, order + 1] forecast weights of a component (removed with the
    schedule table: same prefix)."""
    return f"{SCHEDULE_BUFFER}_weights_{component}"


def cache_name(index: int, slot: int) -> str:
    """The buffer of site `index` for call `slot` of a step (slot 0 keeps the plain name)."""
    return f"{CACHE_BUFFER_PREFIX}{index}" if slot == 0 else f"{CACHE_BUFFER_PREFIX}{index}_call{slot}"


def _allocate_caches(block: torch.nn.Module, entry: _Capture, static: bool = False, slots: int = 1) -> None:
    """(Re)allocate one non-persistent buffer per site and call slot with the branch output's shape
    and dtype.

    Allocated outside inference mode so a cache created under `torch.inference_mode()` can still
    be written later under `torch.no_grad()`; written in place afterwards (static addresses).
    """
    nodes = {node.name: node for node in entry.captured.graph_module.graph.nodes}
    with torch.inference_mode(False), torch.no_grad():
        for index, slot in itertools.product(range(len(entry.branches.sites)), range(slots)):
            value = nodes[entry.branches.sites[index].branch].meta["val"]
            order = entry.orders.get(entry.branches.sites[index].component, 0)
            name = cache_name(index, slot)
            # A forecast component keeps its last order + 1 outputs (see passes/specialise.py).
            shape = (order + 1, *value.shape) if order else value.shape
            existing = getattr(block, name, None)
            if (
                existing is not None
                and existing.shape == shape
                and existing.dtype == value.dtype
                and existing.device == value.device
            ):
                continue
            buffer = torch.zeros(
                shape, dtype=value.dtype, device=value.device
            )  # finite: an empty history slot is read with weight 0
            if static:  # CUDA graphs read and write the buffer in place instead of copying it
                mark_static_address(buffer)
            block.register_buffer(name, buffer, persistent=False)


def _register_schedule_table(block: torch.nn.Module, entry: _Capture, steps: int) -> None:
    """Bool buffer [steps, scheduled components] that the graph form indexes with the step tensor."""
    columns = [entry.masks[name] for name in entry.masks] or [(True,) * steps]
    device = entry.captured.signature.tensors[0][2] if entry.captured.signature.tensors else None
    table = torch.tensor(columns, dtype=torch.bool, device=device).T.contiguous()
    block.register_buffer(SCHEDULE_BUFFER, table, persistent=False)


def _check_grad_mode(block: torch.nn.Module, path: str) -> None:
    if torch.is_grad_enabled() and any(p.requires_grad for p in block.parameters()):
        raise RuntimeError(
            f"smoothcache_fx runs inference only, but block {path!r} was called with gradients "
            "enabled: a reused branch output has no gradient path to the steps that computed it. "
            "Wrap generation in torch.no_grad() or torch.inference_mode() (diffusers pipelines "
            "already do), or call model.requires_grad_(False)."
        )
