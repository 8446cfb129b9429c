"""passes/conditional.py: each scheduled component's exclusive work in one `torch.cond` on a flag.

The graph form built on it is tested end to end in test_graph_form.py."""

from __future__ import annotations

import models
import torch
from helpers import capture

from smoothcache_fx.passes.branches import find_residual_branches
from smoothcache_fx.passes.conditional import GATED_RESIDUAL_ADD_AND_CACHE, exclusive_nodes, make_conditional

aten = torch.ops.aten


def _captured_dit_block():
    """A facebookresearch-DiT block captured on a real call: graph, its inputs, its branches."""
    torch.manual_seed(0)
    block = models.DiTBlock(models.HIDDEN, models.HEADS).eval()
    captured, inputs = capture(
        block, torch.randn(2, models.TOKENS, models.HIDDEN), torch.randn(2, models.HIDDEN)
    )
    return captured, inputs, find_residual_branches(captured.graph_module.graph)


def test_make_conditional_computes_or_reuses_each_component_by_its_flag():
    """Computing writes every branch into its cache; reusing reads it back, so a second call on the
    same inputs gives the same output; reusing from empty caches does not."""
    captured, inputs, branches = _captured_dit_block()
    conditional = make_conditional(captured.graph_module, branches, ["mlp", "attn"])
    graph = conditional.graph_module.graph
    assert conditional.components == ("attn", "mlp")  # graph order, not the argument's
    assert conditional.rewritten == 2 and conditional.cache_indices == (0, 1)
    assert sum(1 for n in graph.nodes if n.target is torch.ops.higher_order.cond) == 2
    assert sum(1 for n in graph.nodes if n.target is GATED_RESIDUAL_ADD_AND_CACHE) == 2
    with torch.no_grad():
        (want,) = captured.graph_module(*inputs)
        caches = [torch.zeros_like(want) for _ in conditional.cache_sites]
        (computed,) = conditional.graph_module(*inputs, torch.tensor([True, True]), *caches)
        (reused,) = conditional.graph_module(*inputs, torch.tensor([False, False]), *caches)
        empty = [torch.zeros_like(want) for _ in conditional.cache_sites]
        (from_empty,) = conditional.graph_module(*inputs, torch.tensor([False, True]), *empty)
    assert torch.equal(computed, want) and torch.equal(reused, want)
    assert not torch.equal(from_empty, want)


def _branch_with_a_cache_write(x, cache):
    a = aten.relu.default(x)
    b = aten.sin.default(a)
    aten.copy_.default(cache, b)
    c = aten.cos.default(b)
    return aten.add.Tensor(a, c)


def test_exclusive_nodes_keep_shared_work_and_side_effects_outside():
    """Only what `c` alone needs: `a` feeds the output too, and `b` feeds a cache write."""
    graph = torch.fx.symbolic_trace(_branch_with_a_cache_write).graph
    nodes = {n.target: n for n in graph.nodes}
    assert exclusive_nodes(graph, [nodes[aten.cos.default]]) == [nodes[aten.cos.default]]
    graph.erase_node(nodes[aten.copy_.default])
    assert exclusive_nodes(graph, [nodes[aten.cos.default]]) == [
        nodes[aten.sin.default],
        nodes[aten.cos.default],
    ]


def test_each_branch_modulation_chunk_moves_into_its_cond():
    """As the variants narrow the adaLN modulation linear to the chunks a step reads, the single
    graph splits it by chunk, so a branch's shift and scale are computed inside its cond (skipped
    when it is reused) and only the two gates outside (the fused add reads them every step)."""
    captured, inputs, branches = _captured_dit_block()
    conditional = make_conditional(captured.graph_module, branches, ["attn", "mlp"])
    gm = conditional.graph_module

    def modulation_linears(graph):
        return [
            n
            for n in graph.nodes
            if n.target is aten.linear.default
            and n.meta["val"].shape[-1] == models.HIDDEN
            and n.args[0].meta["val"].dim() == 2  # on the conditioning vector, not on tokens
        ]

    assert len(modulation_linears(gm.graph)) == 2  # the gates
    for component in ("attn", "mlp"):
        assert len(modulation_linears(getattr(gm, f"{component}_compute").graph)) == 2  # shift, scale
    with torch.no_grad():
        (want,) = captured.graph_module(*inputs)
        caches = [torch.zeros_like(want) for _ in conditional.cache_sites]
        (computed,) = gm(*inputs, torch.tensor([True, True]), *caches)
    assert torch.equal(computed, want)
