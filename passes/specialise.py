"""Specialise a captured block for one compute mask over its components.

For each scheduled residual site:
- computed: `add(residual, mul(gate, X))` becomes `gated_residual_add_and_cache(residual, X, gate,
  cache)`, which also writes X into the site's persistent cache buffer;
- reused: X is replaced by a read of the cache buffer, the add becomes
  `gated_residual_add(residual, cache, gate)`, and dead-code elimination removes everything that
  only X needed (the module itself, its norm and modulate work).
Cache buffers enter the graph as extra placeholders after the call's tensors, one per scheduled site,
in `SpecialisedBlock.cache_sites` order. Components absent from the mask are left untouched.

A component with a predictor order k > 0 (`orders`) keeps a history buffer `[k + 1, *shape]` in
place of its cache (see `kernels/gated_residual_forecast.py`):
- computed: `gated_residual_add_and_history(residual, X, gate, history)` shifts X into the history;
- skipped: `gated_residual_forecast(residual, history, weights, gate)`, the extrapolation from the
  history with this step's weights, and X's work is dead code as for reuse. The weights `[k + 1]`
  are graph inputs, not constants, so that every skipped step of a component runs one variant
  whatever its lag; they enter after the call's tensors and before the caches, one per
  `SpecialisedBlock.forecast_sites`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

import smoothcache_fx.kernels  # noqa: F401  (registers the torch.ops.smoothcache_fx ops)
from smoothcache_fx.passes.branches import BlockBranches, ResidualSite
from smoothcache_fx.passes.narrow import narrow_partial_linears

GATED_RESIDUAL_ADD = torch.ops.smoothcache_fx.gated_residual_add.default
GATED_RESIDUAL_ADD_AND_CACHE = torch.ops.smoothcache_fx.gated_residual_add_and_cache.default
GATED_RESIDUAL_FORECAST = torch.ops.smoothcache_fx.gated_residual_forecast.default
GATED_RESIDUAL_ADD_AND_HISTORY = torch.ops.smoothcache_fx.gated_residual_add_and_history.default
KERNELS = ("op", "inductor")


@dataclass(frozen=True)
class SpecialisedBlock:
    """A specialised graph and the record of what the pass changed.

    Attributes:
        graph_module: takes the captured graph's inputs, one weights tensor per `forecast_sites`,
            then one cache (or history, for a component with an order) per `cache_sites`.
        cache_sites: the scheduled sites, in cache-placeholder order.
        computed / reused: scheduled components computed or served from cache (reused or
            forecast) in this variant.
        orders: (component, predictor order) for the scheduled components of order > 0.
        forecast_sites: the skipped sites of those components, in weights-placeholder order.
        rewritten: residual sites rewritten (the pass's counter; tests assert it).
        nodes_removed: nodes that dead-code elimination removed (the skipped work).
    """

    graph_module: GraphModule
    cache_sites: tuple[ResidualSite, ...]
    computed: tuple[str, ...]
    reused: tuple[str, ...]
    rewritten: int
    nodes_removed: int
    orders: tuple[tuple[str, int], ...] = ()
    forecast_sites: tuple[ResidualSite, ...] = ()


def specialise_block(
    graph_module: GraphModule,
    branches: BlockBranches,
    compute: Mapping[str, bool],
    kernel: str = "op",
    orders: Mapping[str, int] | None = None,
) -> SpecialisedBlock:
    """Return a new GraphModule for `compute` (component -> computes this step); the input is kept.

    Args:
        graph_module: a captured block graph (see `passes.capture`).
        branches: its residual sites (see `passes.branches`).
        compute: the scheduled components and whether each computes; others are left as they are.
        kernel: "op" emits the fused ops (`smoothcache_fx::gated_residual_add_and_cache` where a
            branch computes, `smoothcache_fx::gated_residual_add` where it is reused); "inductor"
            emits plain torch ops (mul, add, copy_) so inductor generates its own fusion.
        orders: scheduled component -> predictor order of its skipped steps (absent or 0: reuse).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}.")
    unknown = sorted(set(compute) - set(branches.components))
    if unknown:
        raise ValueError(
            f"compute mask names components {unknown} that this block does not have; "
            f"its residual branches are {list(branches.components)}."
        )
    orders = {name: order for name, order in (orders or {}).items() if order}
    unscheduled = sorted(set(orders) - set(compute))
    if unscheduled:
        raise ValueError(
            f"orders name components {unscheduled} that the compute mask does not schedule; a "
            f"predictor order applies to scheduled components only, here {list(compute)}."
        )
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(graph_module.graph, {}))
    gm = GraphModule(torch.nn.Module(), graph, class_name="SpecialisedBlock")
    nodes = {node.name: node for node in graph.nodes}
    nodes_before = len(nodes)
    last_placeholder = [node for node in graph.nodes if node.op == "placeholder"][-1]

    cache_sites = tuple(site for site in branches.sites if site.component in compute)
    forecast_sites = tuple(s for s in cache_sites if s.component in orders and not compute[s.component])
    caches: list[Node] = []
    weights: dict[ResidualSite, Node] = {}
    with graph.inserting_after(last_placeholder):
        for site in reversed(cache_sites):
            caches.insert(
                0, _cache_placeholder(graph, nodes[site.branch], site, orders.get(site.component, 0))
            )
        for site in reversed(forecast_sites):
            weights[site] = _weights_placeholder(graph, nodes[site.branch], site, orders[site.component])

    for site, cache in zip(cache_sites, caches, strict=True):
        order = orders.get(site.component, 0)
        if order:
            _rewrite_forecast_site(graph, nodes, site, cache, weights.get(site), kernel)
        else:
            _rewrite_site(graph, nodes, site, cache, compute[site.component], kernel)

    # Seeded-random ops (sdpa carries that tag for its dropout) count as pure here: the graphs are
    # inference graphs, and keeping them would keep every skipped attention alive.
    graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure(impure_random=False))
    # What stays of an adaLN modulation linear whose shift/scale chunks died with their branches.
    if narrow_partial_linears(graph):
        graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure(impure_random=False))
    graph.lint()
    gm.recompile()
    return SpecialisedBlock(
        graph_module=gm,
        cache_sites=cache_sites,
        computed=tuple(name for name, on in compute.items() if on),
        reused=tuple(name for name, on in compute.items() if not on),
        rewritten=len(cache_sites),
        nodes_removed=nodes_before + len(caches) + len(weights) - len(graph.nodes),
        orders=tuple(orders.items()),
        forecast_sites=forecast_sites,
    )


def _cache_placeholder(graph: torch.fx.Graph, branch: Node, site: ResidualSite, order: int) -> Node:
    index = sum(1 for node in graph.nodes if node.op == "placeholder")
    value = branch.meta["val"]
    if order:  # the history of the last order + 1 computed outputs, oldest first
        cache = graph.placeholder(f"history_{site.component}_{index}")
        cache.meta["val"] = value.new_empty((order + 1, *value.shape))
    else:
        cache = graph.placeholder(f"cache_{site.component}_{index}")
        cache.meta["val"] = value
    return cache


def _weights_placeholder(graph: torch.fx.Graph, branch: Node, site: ResidualSite, order: int) -> Node:
    index = sum(1 for node in graph.nodes if node.op == "placeholder")
    weights = graph.placeholder(f"weights_{site.component}_{index}")
    weights.meta["val"] = branch.meta["val"].new_empty((order + 1,), dtype=torch.float32)
    return weights


def _rewrite_forecast_site(
    graph, nodes: dict, site: ResidualSite, history: Node, weights, kernel: str
) -> None:
    """A site of a component with a predictor order: shift into the history where it computes,
    forecast from it where it is skipped (`weights` given)."""
    add = nodes[site.add]
    residual = nodes[site.residual]
    gate = None if site.gate is None else nodes[site.gate]
    branch = nodes[site.branch]
    own_users = {add} | ({nodes[site.mul]} if site.mul is not None else set())
    with graph.inserting_before(add):
        if weights is None and kernel == "op":
            fused = graph.call_function(GATED_RESIDUAL_ADD_AND_HISTORY, (residual, branch, gate, history))
        elif weights is None:
            _emit_history_shift(graph, branch, history)
            fused = _emit_decomposed(graph, residual, branch, gate, None)
        elif kernel == "op" and set(branch.users) <= own_users:
            fused = graph.call_function(GATED_RESIDUAL_FORECAST, (residual, history, weights, gate))
        else:  # plain ops, or X also feeds other nodes: each of them reads the prediction
            prediction = emit_prediction(
                graph, history, weights, branch.meta["val"].dtype, history.meta["val"].shape[0]
            )
            prediction.meta["val"] = branch.meta["val"]
            branch.replace_all_uses_with(prediction)
            fused = (
                _emit_decomposed(graph, residual, prediction, gate, None)
                if kernel == "inductor"
                else graph.call_function(GATED_RESIDUAL_ADD, (residual, prediction, gate))
            )
    replace_residual_add(graph, nodes, site, fused)


def _emit_history_shift(graph, branch: Node, history: Node) -> None:
    """Plain ATen ops for the compute path's history update: slot i takes slot i+1, the newest X."""
    aten = torch.ops.aten
    slots = history.meta["val"].shape[0]
    for i in range(slots - 1):
        older = graph.call_function(aten.select.int, (history, 0, i))
        newer = graph.call_function(aten.select.int, (history, 0, i + 1))
        graph.call_function(aten.copy_.default, (older, newer))
    newest = graph.call_function(aten.select.int, (history, 0, slots - 1))
    graph.call_function(aten.copy_.default, (newest, branch))


def replace_residual_add(graph, nodes: dict, site: ResidualSite, fused: Node) -> None:
    """Put `fused` in place of the site's residual add (its meta kept), and drop the gate multiply
    if nothing else reads it. `nodes` maps the site's node names to this graph's nodes; a later
    site may use this update as its residual, so the entry is updated too. Both passes use it."""
    add = nodes[site.add]
    fused.meta = copy.copy(add.meta)
    add.replace_all_uses_with(fused)
    graph.erase_node(add)
    nodes[site.add] = fused
    if site.mul is not None and not nodes[site.mul].users:
        graph.erase_node(nodes[site.mul])


def emit_prediction(graph, history: Node, weights: Node, dtype: torch.dtype, slots: int) -> Node:
    """Plain ATen ops for `sum_i weights[i] * history[i]` over the history's `slots` entries, in
    fp32, rounded once to `dtype` (the reference's expression: `gated_residual_forecast_reference`).
    Both passes use it: the variants inline, the graph form in a cond's skip branch."""
    aten = torch.ops.aten
    prediction = None
    for i in range(slots):
        weight = graph.call_function(aten.select.int, (weights, 0, i))
        past = graph.call_function(aten.select.int, (history, 0, i))
        past = graph.call_function(aten._to_copy.default, (past,), {"dtype": torch.float32})
        term = graph.call_function(aten.mul.Tensor, (weight, past))
        prediction = term if prediction is None else graph.call_function(aten.add.Tensor, (prediction, term))
    return graph.call_function(aten._to_copy.default, (prediction,), {"dtype": dtype})


def _rewrite_site(graph, nodes: dict, site: ResidualSite, cache: Node, computes: bool, kernel: str) -> None:
    add = nodes[site.add]
    residual = nodes[site.residual]
    gate = None if site.gate is None else nodes[site.gate]
    branch = nodes[site.branch]
    if not computes:
        branch.replace_all_uses_with(cache)
        branch = cache
    with graph.inserting_before(add):
        written = cache if computes else None
        if kernel == "inductor":
            fused = _emit_decomposed(graph, residual, branch, gate, written)
        elif computes:
            fused = graph.call_function(GATED_RESIDUAL_ADD_AND_CACHE, (residual, branch, gate, cache))
        else:
            fused = graph.call_function(GATED_RESIDUAL_ADD, (residual, branch, gate))
    replace_residual_add(graph, nodes, site, fused)


def _emit_decomposed(graph, residual: Node, branch: Node, gate: Node | None, cache: Node | None) -> Node:
    """Plain ATen ops for `kernel="inductor"`: the same expression, the cache written by copy_."""
    aten = torch.ops.aten
    if cache is not None:
        graph.call_function(aten.copy_.default, (cache, branch))
    update = branch if gate is None else graph.call_function(aten.mul.Tensor, (gate, branch))
    return graph.call_function(aten.add.Tensor, (residual, update))
