"""Named profiler ranges around each residual branch of a specialised block graph.

Used only by `smoothcache_fx.profile`: normal runs execute the unannotated variants. For each
residual branch of a variant the pass finds its *region*:

- computed: the branch's exclusive nodes (what dead-code elimination removes when it is reused,
  `passes.conditional.exclusive_nodes`) plus its residual update (the fused `gated_residual_add`, or
  the plain `mul`/`add`/`copy_` of `kernel="inductor"` and of unscheduled branches);
- reused: the residual update alone, which reads the cache.

Export order interleaves a region with unrelated work (the gate's `unsqueeze`, the next branch's
modulation chunks), so the pass first reorders the graph, as a stable topological sort in which each
region is one contiguous run of nodes. Then either

- `annotate_block` puts `torch.ops.profiler._record_function_enter_new` / `_record_function_exit`
  nodes around each region and around the whole block (an eager graph: the ops run op by op, so the
  trace shows each branch's ATen ops inside its range); or
- `split_block` cuts the graph into segments at region boundaries (`torch.fx.passes.split_module`),
  for compiled profiling. The ranges cannot be compiled in place (checked with torch 2.13): dynamo
  refuses the range nodes of an FX graph ("torch.* op returned non-Tensor", their result is a
  ScriptObject); code that uses `with record_function(...)` under
  `torch._dynamo.config.capture_profiler_record_function` keeps them through dynamo and AOTAutograd,
  but Inductor's output code has none, and Inductor fuses across any boundary it does not see. So
  each segment is compiled on its own and the ranges sit in the eager top-level graph, around the
  calls of the compiled segments.

A region that cannot be made contiguous (it would need a node that itself needs the region) is left
unannotated and named in `skipped`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.passes.split_module import split_module

from smoothcache_fx.kernels.compat import RECORD_FUNCTION_ENTER, RECORD_FUNCTION_EXIT
from smoothcache_fx.passes.branches import BlockBranches
from smoothcache_fx.passes.conditional import exclusive_nodes
from smoothcache_fx.passes.specialise import SpecialisedBlock

RECORD_ENTER = RECORD_FUNCTION_ENTER
RECORD_EXIT = RECORD_FUNCTION_EXIT
RANGE_PREFIX = "smoothcache/"
_AFTER_MUL = (torch.ops.aten.mul.Tensor,)
_RESIDUAL_ADD = (torch.ops.aten.add.Tensor,)


def step_range(step: int) -> str:
    return f"{RANGE_PREFIX}step {step}"


def block_range(path: str) -> str:
    return f"{RANGE_PREFIX}{path}"


def branch_range(path: str, component: str, computed: bool, forecast: bool = False) -> str:
    """A branch's range name: `computed`, `reused`, or `forecast` for a skipped branch of a
    component with a predictor order (the trace names what a skipped step ran)."""
    kind = "computed" if computed else "forecast" if forecast else "reused"
    return f"{RANGE_PREFIX}{path}.{component} {kind}"


@dataclass(frozen=True)
class BranchRegion:
    """The nodes (by name, in graph order) that one branch costs in one variant."""

    component: str
    computed: bool
    nodes: tuple[str, ...]
    forecast: bool = False


@dataclass(frozen=True)
class AnnotatedBlock:
    """An annotated (or split) variant and the record of what the pass did.

    Attributes:
        graph_module: same inputs and outputs as the variant's graph module.
        regions: the branches that got a range, in graph order.
        skipped: components whose work could not be made contiguous (no range; their time counts
            as the block's own).
        ranges: profiler ranges inserted (one per region plus one for the block); tests assert it.
        segments: for `split_block`, the submodule names, each with its component or None.
    """

    graph_module: GraphModule
    regions: tuple[BranchRegion, ...]
    skipped: tuple[str, ...]
    ranges: int
    segments: tuple[tuple[str, str | None], ...] = ()


def branch_regions(graph: Graph, variant: SpecialisedBlock, branches: BlockBranches) -> list[BranchRegion]:
    """Each residual branch's region in `graph` (a copy of `variant`'s; see the module docstring)."""
    nodes = {node.name: node for node in graph.nodes}
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    caches = placeholders[len(placeholders) - len(variant.cache_sites) :]
    cache_of = {site: cache for site, cache in zip(variant.cache_sites, caches, strict=True)}
    regions = []
    for component in branches.components:
        computed = component not in variant.reused
        values = []  # what each site's residual update reads as the branch output
        for site in branches.sites_of(component):
            values.append(nodes[site.branch] if computed else cache_of[site])
        region: set[Node] = set(_residual_updates(values))
        if computed:
            region.update(exclusive_nodes(graph, values))
        ordered = tuple(node.name for node in graph.nodes if node in region)
        forecast = not computed and component in dict(variant.orders)
        regions.append(BranchRegion(component, computed, ordered, forecast))
    return regions


def _residual_updates(values: list[Node]) -> list[Node]:
    """The update nodes reading a branch value: the fused op, or `copy_`, `mul` and the `add` after it."""
    found = []
    for value in values:
        for user in value.users:
            found.append(user)
            if user.target in _AFTER_MUL:
                found += [add for add in user.users if add.target in _RESIDUAL_ADD]
    return found


def make_regions_contiguous(graph: Graph, regions: list[BranchRegion]) -> tuple[list, list[str]]:
    """Reorder `graph` (stable topological sort) so every region is one contiguous run of nodes.

    Returns:
        (regions kept, components skipped because their region cannot be contiguous).
    """
    kept = [region for region in regions if region.nodes]
    while True:
        order, blocked = _contiguous_order(graph, kept)
        if blocked is None:
            break
        kept = [region for region in kept if region is not blocked]
    skipped = [region.component for region in regions if region not in kept]
    output = next(node for node in graph.nodes if node.op == "output")
    for node in order:  # every body node moves, in order, to just before the output
        output.prepend(node)
    graph.lint()
    return kept, skipped


def _contiguous_order(graph: Graph, regions: list[BranchRegion]):
    """Kahn's algorithm over the graph with each region contracted to one unit, ready units taken in
    original order. Returns (node order, None) or (partial order, a region on a cycle)."""
    body = [node for node in graph.nodes if node.op not in ("placeholder", "output")]
    position = {node: index for index, node in enumerate(body)}
    unit_of: dict[Node, int] = {}
    units: list[list[Node]] = []
    for region in regions:
        names = set(region.nodes)
        units.append([node for node in body if node.name in names])
        for node in units[-1]:
            unit_of[node] = len(units) - 1
    for node in body:
        if node not in unit_of:
            unit_of[node] = len(units)
            units.append([node])
    needs = [set() for _ in units]
    for index, members in enumerate(units):
        for node in members:
            needs[index].update(unit_of[i] for i in node.all_input_nodes if i in unit_of)
        needs[index].discard(index)
    users = [[] for _ in units]
    for index, inputs in enumerate(needs):
        for other in inputs:
            users[other].append(index)
    waiting = [len(inputs) for inputs in needs]
    ready = [(position[units[i][0]], i) for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order: list[Node] = []
    done = 0
    while ready:
        _, index = heapq.heappop(ready)
        order += units[index]
        done += 1
        for user in users[index]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (position[units[user][0]], user))
    if done == len(units):
        return order, None
    stuck = next(i for i in range(len(regions)) if waiting[i] > 0)
    return order, regions[stuck]


def annotate_block(variant: SpecialisedBlock, branches: BlockBranches, path: str) -> AnnotatedBlock:
    """A copy of `variant`'s graph with a profiler range around the block and around each branch."""
    gm = _copy(variant.graph_module)
    graph = gm.graph
    regions, skipped = make_regions_contiguous(graph, branch_regions(graph, variant, branches))
    nodes = {node.name: node for node in graph.nodes}
    for region in regions:
        first, last = nodes[region.nodes[0]], nodes[region.nodes[-1]]
        _wrap(graph, first, last, branch_range(path, region.component, region.computed, region.forecast))
    body = [node for node in graph.nodes if node.op not in ("placeholder", "output")]
    if body:
        _wrap(graph, body[0], body[-1], block_range(path))
    graph.lint()
    gm.recompile()
    return AnnotatedBlock(gm, tuple(regions), tuple(skipped), ranges=len(regions) + bool(body))


def split_block(variant: SpecialisedBlock, branches: BlockBranches) -> AnnotatedBlock:
    """`variant`'s graph cut into submodules `submod_<i>` at region boundaries, without ranges.

    Each region becomes exactly one segment; the work between regions forms the others. Add the
    ranges per block with `add_split_ranges` (names carry the block path; segments are shared).
    """
    gm = _copy(variant.graph_module)
    graph = gm.graph
    regions, skipped = make_regions_contiguous(graph, branch_regions(graph, variant, branches))
    gm.recompile()
    region_of = {name: region for region in regions for name in region.nodes}
    segment_of: dict[str, int] = {}
    labels: list[BranchRegion | None] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        label = region_of.get(node.name)
        if not labels or label is not labels[-1]:
            labels.append(label)
        segment_of[node.name] = len(labels) - 1
    split = split_module(gm, gm, lambda node: segment_of[node.name], keep_original_order=True)
    segments = []
    for node in split.graph.nodes:
        if node.op == "call_module":
            region = labels[int(node.target.rsplit("_", 1)[1])]
            segments.append((node.target, None if region is None else region.component))
    return AnnotatedBlock(split, tuple(regions), tuple(skipped), ranges=0, segments=tuple(segments))


def add_split_ranges(split: AnnotatedBlock, path: str, submodules: dict[str, torch.nn.Module]) -> GraphModule:
    """A top-level graph for block `path`: `split`'s calls of `submodules` (e.g. compiled segments),
    with a range around the block and around each branch's segment."""
    graph = Graph()
    graph.output(graph.graph_copy(split.graph_module.graph, {}))
    computed = {region.component: region.computed for region in split.regions}
    forecast = {region.component: region.forecast for region in split.regions}
    component_of = dict(split.segments)
    calls = [node for node in graph.nodes if node.op == "call_module"]
    for call in calls:
        component = component_of[call.target]
        if component is not None:
            _wrap(graph, call, call, branch_range(path, component, computed[component], forecast[component]))
    if calls:
        body = [node for node in graph.nodes if node.op not in ("placeholder", "output")]
        _wrap(graph, body[0], body[-1], block_range(path))
    graph.lint()
    return GraphModule(dict(submodules), graph, class_name="ProfiledBlock")


def _wrap(graph: Graph, first: Node, last: Node, name: str) -> None:
    with graph.inserting_before(first):
        enter = graph.call_function(RECORD_ENTER, (name, None))
    with graph.inserting_after(last):
        graph.call_function(RECORD_EXIT, (enter,))
    enter.meta["smoothcache_range"] = name


def _copy(graph_module: GraphModule) -> GraphModule:
    graph = Graph()
    graph.output(graph.graph_copy(graph_module.graph, {}))
    return GraphModule(graph_module, graph, class_name="AnnotatedBlock")
