"""Specialise a captured block for one compute mask over its components.

For each scheduled residual site:
- computed: `add(residual, mul(gate, X))` becomes `gated_residual_add_and_cache(residual, X, gate,
  cache)`, which also writes X into the site's persistent cache buffer;
- reused: X is replaced by a read of the cache buffer, the add becomes
  `gated_residual_add(residual, cache, gate)`, and dead-code elimination removes everything that
  only X needed (the module itself, its norm and modulate work).
Cache buffers enter the graph as extra placeholders after the call's tensors, one per scheduled site,
in `SpecialisedBlock.cache_sites` order. Components absent from the mask are left untouched.
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
KERNELS = ("op", "inductor")


@dataclass(frozen=True)
class SpecialisedBlock:
    """A specialised graph and the record of what the pass changed.

    Attributes:
        graph_module: takes the captured graph's inputs followed by one cache per `cache_sites`.
        cache_sites: the scheduled sites, in cache-placeholder order.
        computed / reused: scheduled components computed or served from cache in this variant.
        rewritten: residual sites rewritten (the pass's counter; tests assert it).
        nodes_removed: nodes that dead-code elimination removed (the skipped work).
    """

    graph_module: GraphModule
    cache_sites: tuple[ResidualSite, ...]
    computed: tuple[str, ...]
    reused: tuple[str, ...]
    rewritten: int
    nodes_removed: int


def specialise_block(
    graph_module: GraphModule,
    branches: BlockBranches,
    compute: Mapping[str, bool],
    kernel: str = "op",
) -> SpecialisedBlock:
    """Return a new GraphModule for `compute` (component -> computes this step); the input is kept.

    Args:
        graph_module: a captured block graph (see `passes.capture`).
        branches: its residual sites (see `passes.branches`).
        compute: the scheduled components and whether each computes; others are left as they are.
        kernel: "op" emits the fused ops (`smoothcache_fx::gated_residual_add_and_cache` where a
            branch computes, `smoothcache_fx::gated_residual_add` where it is reused); "inductor"
            emits plain torch ops (mul, add, copy_) so inductor generates its own fusion.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}.")
    unknown = sorted(set(compute) - set(branches.components))
    if unknown:
        raise ValueError(
            f"compute mask names components {unknown} that this block does not have; "
            f"its residual branches are {list(branches.components)}."
        )
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(graph_module.graph, {}))
    gm = GraphModule(torch.nn.Module(), graph, class_name="SpecialisedBlock")
    nodes = {node.name: node for node in graph.nodes}
    nodes_before = len(nodes)
    last_placeholder = [node for node in graph.nodes if node.op == "placeholder"][-1]

    cache_sites = tuple(site for site in branches.sites if site.component in compute)
    caches: list[Node] = []
    with graph.inserting_after(last_placeholder):
        for site in reversed(cache_sites):
            caches.insert(0, _cache_placeholder(graph, nodes[site.branch], site))

    for site, cache in zip(cache_sites, caches, strict=True):
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
        nodes_removed=nodes_before + len(caches) - len(graph.nodes),
    )


def _cache_placeholder(graph: torch.fx.Graph, branch: Node, site: ResidualSite) -> Node:
    index = sum(1 for node in graph.nodes if node.op == "placeholder")
    cache = graph.placeholder(f"cache_{site.component}_{index}")
    cache.meta["val"] = branch.meta["val"]
    return cache


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
    fused.meta = copy.copy(add.meta)
    add.replace_all_uses_with(fused)
    graph.erase_node(add)
    nodes[site.add] = fused  # a later site may use this update as its residual
    if site.mul is not None and not nodes[site.mul].users:
        graph.erase_node(nodes[site.mul])


def _emit_decomposed(graph, residual: Node, branch: Node, gate: Node | None, cache: Node | None) -> Node:
    """Plain ATen ops for `kernel="inductor"`: the same expression, the cache written by copy_."""
    aten = torch.ops.aten
    if cache is not None:
        graph.call_function(aten.copy_.default, (cache, branch))
    update = branch if gate is None else graph.call_function(aten.mul.Tensor, (gate, branch))
    return graph.call_function(aten.add.Tensor, (residual, update))
