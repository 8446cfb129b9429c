"""Find residual branches in a captured block graph.

A residual branch is `add(residual, mul(gate, X))` or `add(residual, X)` (either operand order),
where X is produced by one direct child module of the block (attn1, ff, attn, mlp, ...), possibly
through view, slice, permute or cast ops, and the add and mul sit at block level. This is a pattern
confirmed by node metadata (`nn_module_stack` for ownership, `meta["val"]` for shapes), not a table
of models. The gate is whatever multiplies X (`gate`, `gate.unsqueeze(1)`, `gate.tanh()`), as long as
it does not come from X's own module.

The unit a schedule switches is the child module (the "component"): skipping `attn` reuses every
residual update it feeds (SD3's joint attention feeds two streams), since computing any of them
would mean running the module anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from smoothcache_fx.passes.capture import BLOCK_PREFIX

ADD_TARGETS = (torch.ops.aten.add.Tensor,)
MUL_TARGETS = (torch.ops.aten.mul.Tensor,)

# Ops that change a tensor's view, layout or dtype but not its meaning: X may reach the gate through
# them. Slices let one module feed two streams (CogVideoX runs ff on the text and video tokens
# together and slices its output per stream); permutes undo a channels-first layout (Sana's conv
# feed-forward).
PASS_THROUGH_TARGETS = (
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.permute.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.squeeze.dim,
    torch.ops.aten.squeeze.dims,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.clone.default,
    torch.ops.aten.alias.default,
)


@dataclass(frozen=True)
class ResidualSite:
    """One residual update `add = residual + gate * branch`, by node name in the captured graph."""

    component: str
    add: str
    residual: str
    branch: str
    gate: str | None
    mul: str | None


@dataclass(frozen=True)
class BlockBranches:
    """The residual branches of one block, grouped by the child module that produces them."""

    sites: tuple[ResidualSite, ...]

    @property
    def components(self) -> tuple[str, ...]:
        """Components in graph order, each once."""
        return tuple(dict.fromkeys(site.component for site in self.sites))

    def sites_of(self, component: str) -> tuple[ResidualSite, ...]:
        return tuple(site for site in self.sites if site.component == component)


def owner_component(node: Node) -> str | None:
    """The direct child of the block whose forward produced `node`, or None at block level."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for path, _module_type in stack.values():
        if path.startswith(BLOCK_PREFIX):
            return path[len(BLOCK_PREFIX) :].split(".")[0]
    return None


def _value(node: object) -> torch.Tensor | None:
    if not isinstance(node, Node):
        return None
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


def _branch_component(node: Node) -> str | None:
    """Component that produced `node`, following pass-through ops that sit at block level."""
    while True:
        component = owner_component(node)
        if component is not None:
            return component
        if node.op != "call_function" or node.target not in PASS_THROUGH_TARGETS:
            return None
        node = node.args[0]
        if not isinstance(node, Node):
            return None


def _residual_add_pattern(add: Node) -> list[tuple[Node, Node]]:
    """(residual, update) operand pairs of a block-level tensor add, both orders."""
    if add.op != "call_function" or add.target not in ADD_TARGETS or add.kwargs.get("alpha", 1) != 1:
        return []
    if owner_component(add) is not None or len(add.args) != 2:
        return []
    left, right = add.args
    if not (isinstance(left, Node) and isinstance(right, Node)):
        return []
    return [(left, right), (right, left)]


def _residual_add_check(add: Node, residual: Node, branch: Node, component: str) -> bool:
    """The residual carries the stream (same shape as the result, not from the branch's module) and
    the branch is a full-size update."""
    out, res, br = _value(add), _value(residual), _value(branch)
    if out is None or res is None or br is None:
        return False
    return res.shape == out.shape and br.shape == out.shape and _branch_component(residual) != component


def _match_update(update: Node) -> list[tuple[Node, Node | None, Node | None]]:
    """(branch, gate, mul) readings of the update operand: `gate * X`, `X * gate`, or `X`."""
    readings: list[tuple[Node, Node | None, Node | None]] = []
    is_mul = (
        update.op == "call_function"
        and update.target in MUL_TARGETS
        and owner_component(update) is None
        and len(update.users) == 1
        and all(isinstance(arg, Node) for arg in update.args)
    )
    if is_mul:
        first, second = update.args
        readings += [(second, first, update), (first, second, update)]
    readings.append((update, None, None))
    return readings


def find_residual_branches(graph: Graph) -> BlockBranches:
    """Every residual update in a captured block graph, in graph order.

    Returns:
        The sites found; empty when the block has no residual branch (the caller decides
        whether that is an error).
    """
    sites = [site for site in map(_match_site, graph.nodes) if site is not None]
    return BlockBranches(tuple(sites))


def _match_site(add: Node) -> ResidualSite | None:
    for residual, update in _residual_add_pattern(add):
        for branch, gate, mul in _match_update(update):
            component = _branch_component(branch)
            if component is None or not _residual_add_check(add, residual, branch, component):
                continue
            if gate is not None and _branch_component(gate) == component:
                continue  # both factors from one module: a product inside the branch, not a gate
            if _feeds_back(add):
                return None
            return ResidualSite(
                component=component,
                add=add.name,
                residual=residual.name,
                branch=branch.name,
                gate=None if gate is None else gate.name,
                mul=None if mul is None else mul.name,
            )
    return None


def _feeds_back(add: Node) -> bool:
    """Whether the sum flows into a module that produced one of its terms.

    Then the sum is an intermediate of that module, not a residual update of the block: Lumina-Next
    adds attn1's output and the gated attn2 output and projects the sum with `attn2.to_out`. Terms
    are looked at through pass-through ops and one block-level multiplication (a gate).
    """
    producers = {c for term in add.args if isinstance(term, Node) for c in _term_components(term)}
    seen: set[Node] = set()
    stack = list(add.users)
    while stack and producers:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if owner_component(node) in producers:
            return True
        stack.extend(node.users)
    return False


def _term_components(term: Node) -> set[str]:
    component = _branch_component(term)
    if component is not None:
        return {component}
    if term.op == "call_function" and term.target in MUL_TARGETS and owner_component(term) is None:
        return {c for arg in term.args if isinstance(arg, Node) if (c := _branch_component(arg))}
    return set()
