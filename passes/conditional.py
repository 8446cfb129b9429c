"""The single-graph form: every scheduled component becomes a `torch.cond` on a flag input.

For deployment through torch.export / AOTInductor, where no Python can pick a variant per step,
each scheduled component's exclusive work (what dead-code elimination would remove when it is
reused) moves into the true branch of a `cond`; the false branch returns a copy of the cache.
The fused `gated_residual_add_and_cache` stays outside the `cond` (a mutating op cannot sit inside
one) and
writes the chosen value back into the cache every step, so the cache always holds the branch value
the block used.

The rewritten graph takes the captured graph's inputs, then `flags` (a bool tensor with one entry
per scheduled component, in `ConditionalBlock.components` order), then one cache per site.

A component with a predictor order (`orders`) keeps a history `[k + 1, *shape]` instead of a cache
and takes a `weights` input `[k + 1]` (after `flags`, one per such component in component order):
the false branch of its `cond` returns the forecast `sum_i weights[i] * history[i]`, the residual
update outside the `cond` is the pure `gated_residual_add`, and the history is shifted by plain ops
selected with the flag (`where(flag, shifted, history)`, written back with `copy_`). That reads and
writes the history at every step, skipped or not: a graph cannot mutate only under a `cond`.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

import smoothcache_fx.kernels  # noqa: F401  (registers the torch.ops.smoothcache_fx ops)
from smoothcache_fx.kernels.compat import COND, returns_alias
from smoothcache_fx.passes.branches import BlockBranches, ResidualSite
from smoothcache_fx.passes.narrow import split_linears_by_chunk
from smoothcache_fx.passes.specialise import emit_prediction, replace_residual_add

GATED_RESIDUAL_ADD_AND_CACHE = torch.ops.smoothcache_fx.gated_residual_add_and_cache.default
GATED_RESIDUAL_ADD = torch.ops.smoothcache_fx.gated_residual_add.default


@dataclass(frozen=True)
class ConditionalBlock:
    """A block graph whose scheduled components compute or reuse according to a flags input."""

    graph_module: GraphModule
    components: tuple[str, ...]
    cache_sites: tuple[ResidualSite, ...]
    cache_indices: tuple[int, ...]  # position of each cache site in BlockBranches.sites
    rewritten: int
    orders: tuple[tuple[str, int], ...] = ()  # (component, order) of the forecast components


def make_conditional(
    graph_module: GraphModule, branches: BlockBranches, components, orders=None
) -> ConditionalBlock:
    """Return a new GraphModule with one `cond` per component in `components`; the input is kept.
    `orders`: component -> predictor order of its skipped steps (absent or 0: reuse)."""
    components = tuple(c for c in branches.components if c in set(components))
    orders = {c: o for c, o in (orders or {}).items() if o and c in components}
    graph = Graph()
    graph.output(graph.graph_copy(graph_module.graph, {}))
    root = torch.nn.Module()
    nodes = {node.name: node for node in graph.nodes}
    # One linear per modulation chunk, so each branch's shift/scale moves into its own cond below.
    if split_linears_by_chunk(graph, nodes):
        graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure(impure_random=False))
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    cache_sites = tuple(site for site in branches.sites if site.component in components)

    with graph.inserting_after(placeholders[-1]):
        caches = []
        anchor = graph.placeholder("flags")
        anchor.meta["val"] = torch.empty(len(components), dtype=torch.bool)
        flags = anchor
        weights = {}
        for component in components:
            if component in orders:
                with graph.inserting_after(anchor):
                    weights[component] = anchor = graph.placeholder(f"weights_{component}")
                anchor.meta["val"] = torch.empty(orders[component] + 1, dtype=torch.float32)
        for site in cache_sites:
            with graph.inserting_after(anchor):
                cache = graph.placeholder(f"cache_{site.component}_{len(caches)}")
            value = nodes[site.branch].meta["val"]
            order = orders.get(site.component, 0)
            cache.meta["val"] = value.new_empty((order + 1, *value.shape)) if order else value
            caches.append(cache)
            anchor = cache

    for index, component in enumerate(components):
        sites = [s for s in cache_sites if s.component == component]
        site_caches = [caches[cache_sites.index(s)] for s in sites]
        chosen, pred = _wrap_in_cond(
            graph, root, nodes, flags, index, component, sites, site_caches, weights.get(component)
        )
        for site, cache, value in zip(sites, site_caches, chosen, strict=True):
            if component in orders:
                _fuse_forecast(graph, nodes, site, value, cache, pred)
            else:
                _fuse(graph, nodes, site, value, cache)

    graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure(impure_random=False))
    gm = GraphModule(root, graph, class_name="ConditionalBlock")
    gm.graph.lint()
    gm.recompile()
    indices = tuple(branches.sites.index(site) for site in cache_sites)
    return ConditionalBlock(gm, components, cache_sites, indices, len(cache_sites), tuple(orders.items()))


def exclusive_nodes(graph: Graph, outputs: list[Node]) -> list[Node]:
    """Nodes that only `outputs` need: ancestors of `outputs` not reachable from the graph output
    or from a node with side effects without passing through one of them. This is exactly what a
    reuse variant's DCE removes: a side effect (another branch's fused op writing its cache) stays
    even when its result only fed `outputs` (AuraFlow's attention update feeds only the ff input)."""
    stop = set(outputs)
    live: set[Node] = set()
    stack = [node for node in graph.nodes if node.op == "output" or _has_side_effects(node)]
    while stack:
        node = stack.pop()
        if node in live or node in stop:
            continue
        live.add(node)
        stack.extend(node.all_input_nodes)
    needed: set[Node] = set()
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if node in needed or node in live or node.op == "placeholder":
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    return [node for node in graph.nodes if node in needed]


def _has_side_effects(node: Node) -> bool:
    return node.op == "call_function" and node.is_impure(impure_random=False)


def _wrap_in_cond(graph, root, nodes, flags, index, component, sites, caches, weights=None):
    """Move `component`'s exclusive work into a cond; returns its per-site values and the predicate.
    The false branch copies the caches, or forecasts from the histories when `weights` is given."""
    outputs = [nodes[site.branch] for site in sites]
    # A getitem of a multi-output node outside the body stays outside: cond operands are tensors.
    exclusive = exclusive_nodes(graph, outputs)
    exclusive_set = set(exclusive)
    body = [n for n in exclusive if not (n.target is operator.getitem and n.args[0] not in exclusive_set)]
    body_set = set(body)
    operands = list(dict.fromkeys(n for node in body for n in node.all_input_nodes if n not in body_set))
    extra = [] if weights is None else [weights]
    true_gm = _subgraph(body, operands, outputs, [*caches, *extra])
    false_gm = _cache_copy(operands, caches) if weights is None else _forecast(operands, caches, outputs)
    root.register_module(f"{component}_compute", true_gm)
    root.register_module(f"{component}_reuse", false_gm)

    first_user = min((user for out in outputs for user in out.users), key=_position(graph))
    with graph.inserting_before(first_user):
        operands = [_unaliased(graph, node) for node in operands]
        # `any` over a one-entry slice, not `flags[index]`: AOTInductor (torch 2.13, CPU) reads a
        # cond predicate from its buffer's start, so predicates that are views into one flags tensor
        # all read entry 0 (two conds on flags[0] and flags[1] took flags[0] for both); a reduction
        # gives each predicate a buffer of its own. Same value everywhere else.
        entry = graph.call_function(torch.ops.aten.slice.Tensor, (flags, 0, index, index + 1))
        entry.meta["val"] = torch.empty((1,), dtype=torch.bool)
        pred = graph.call_function(torch.ops.aten.any.default, (entry,))
        pred.meta["val"] = torch.empty((), dtype=torch.bool)
        true_attr = graph.get_attr(f"{component}_compute")
        false_attr = graph.get_attr(f"{component}_reuse")
        result = graph.call_function(COND, (pred, true_attr, false_attr, (*operands, *caches, *extra)))
        result.meta["val"] = tuple(out.meta["val"] for out in outputs)
        chosen = []
        for position, out in enumerate(outputs):
            item = graph.call_function(operator.getitem, (result, position))
            item.meta = copy.copy(out.meta)
            chosen.append(item)
    for out, item in zip(outputs, chosen, strict=True):
        out.replace_all_uses_with(item)
    for node in reversed(body):
        graph.erase_node(node)
    return chosen, pred


def _unaliased(graph: Graph, node: Node) -> Node:
    """Operands of a cond must not alias each other; views (split chunks of one modulation
    vector, unsqueezes) are cloned, which costs a copy of a small tensor."""
    target = node.target
    is_view = target is operator.getitem or returns_alias(target)
    value = node.meta.get("val")
    # Inductor compiles a cond branch for the operand strides seen while tracing but may hand it a
    # relaid-out tensor (seen: a transposed patch embedding arriving contiguous), so operands that
    # are not contiguous get a contiguous copy.
    strided = isinstance(value, torch.Tensor) and not value.is_contiguous()
    if not (is_view or strided):
        return node
    clone = graph.call_function(
        torch.ops.aten.clone.default, (node,), {"memory_format": torch.contiguous_format}
    )
    clone.meta = copy.copy(node.meta)
    return clone


def _position(graph: Graph):
    order = {node: i for i, node in enumerate(graph.nodes)}
    return order.__getitem__


def _subgraph(body: list[Node], operands: list[Node], outputs: list[Node], caches: list[Node]) -> GraphModule:
    """The compute branch: the component's exclusive nodes, fed by the operands (caches unused)."""
    graph = Graph()
    env: dict[Node, Node] = {}
    for node in [*operands, *caches]:
        env[node] = graph.placeholder(node.name)
        env[node].meta = copy.copy(node.meta)
    for node in body:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[out] for out in outputs))
    return GraphModule(torch.nn.Module(), graph)


def _cache_copy(operands: list[Node], caches: list[Node]) -> GraphModule:
    """The reuse branch: copies of the caches (a cond branch must not return its inputs)."""
    graph = Graph()
    for node in operands:
        graph.placeholder(node.name)
    outs = []
    for cache in caches:
        placeholder = graph.placeholder(cache.name)
        outs.append(graph.call_function(torch.ops.aten.clone.default, (placeholder,)))
    graph.output(tuple(outs))
    return GraphModule(torch.nn.Module(), graph)


def _forecast(operands: list[Node], histories: list[Node], outputs: list[Node]) -> GraphModule:
    """The skip branch of a forecast component: `sum_i weights[i] * history[i]` per site, summed in
    fp32 and rounded once to the branch's dtype (`gated_residual_forecast_reference`)."""
    graph = Graph()
    for node in operands:
        graph.placeholder(node.name)
    placeholders = [graph.placeholder(history.name) for history in histories]
    weights = graph.placeholder("weights")
    outs = []
    for history, placeholder, out in zip(histories, placeholders, outputs, strict=True):
        slots = history.meta["val"].shape[0]
        outs.append(emit_prediction(graph, placeholder, weights, out.meta["val"].dtype, slots))
    graph.output(tuple(outs))
    return GraphModule(torch.nn.Module(), graph)


def _fuse_forecast(
    graph: Graph, nodes: dict, site: ResidualSite, value: Node, history: Node, pred: Node
) -> None:
    """The residual update of a forecast site, and the history shifted where the branch computed."""
    add = nodes[site.add]
    gate = None if site.gate is None else nodes[site.gate]
    aten = torch.ops.aten
    slots = history.meta["val"].shape[0]
    with graph.inserting_before(add):
        fused = graph.call_function(GATED_RESIDUAL_ADD, (nodes[site.residual], value, gate))
        newest = graph.call_function(aten.unsqueeze.default, (value, 0))
        older = graph.call_function(aten.slice.Tensor, (history, 0, 1, slots))
        shifted = graph.call_function(aten.cat.default, ([older, newest], 0))
        kept = graph.call_function(aten.where.self, (pred, shifted, history))
        graph.call_function(aten.copy_.default, (history, kept))
    replace_residual_add(graph, nodes, site, fused)


def _fuse(graph: Graph, nodes: dict, site: ResidualSite, value: Node, cache: Node) -> None:
    add = nodes[site.add]
    gate = None if site.gate is None else nodes[site.gate]
    with graph.inserting_before(add):
        fused = graph.call_function(GATED_RESIDUAL_ADD_AND_CACHE, (nodes[site.residual], value, gate, cache))
    replace_residual_add(graph, nodes, site, fused)
