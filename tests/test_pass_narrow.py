"""passes/narrow.py: a linear whose output is split narrowed to the chunks still read."""

from __future__ import annotations

import models
import torch
from helpers import dit_call, run_steps

import smoothcache_fx
from smoothcache_fx import Schedule
from smoothcache_fx.passes.narrow import narrow_partial_linears

aten = torch.ops.aten


def _modulation(x, weight, bias):
    """Six chunks of four, of which chunks 1, 2 and 5 are read."""
    chunks = aten.split.Tensor(aten.linear.default(x, weight, bias), 4, -1)
    return chunks[1], chunks[2], chunks[5]


def _every_chunk(x, weight, bias):
    return aten.split.Tensor(aten.linear.default(x, weight, bias), 4, -1)


def _traced(fn, inputs) -> torch.fx.GraphModule:
    """`fn` as an FX graph whose nodes carry `meta["val"]`, as captured graphs do."""
    graph_module = torch.fx.symbolic_trace(fn)

    class Record(torch.fx.Interpreter):
        def run_node(self, node):
            node.meta["val"] = super().run_node(node)
            return node.meta["val"]

    Record(graph_module).run(*inputs)
    return graph_module


def _inputs():
    # Small integers: every sum is exact, so equality does not depend on the GEMM's summation order.
    g = torch.Generator().manual_seed(0)
    return [torch.randint(-3, 4, shape, generator=g).float() for shape in [(2, 8), (24, 8), (24,)]]


def test_narrow_partial_linears_reads_only_the_rows_of_the_chunks_read():
    inputs = _inputs()
    graph_module = _traced(_modulation, inputs)
    want = graph_module(*inputs)
    assert narrow_partial_linears(graph_module.graph) == 1
    graph_module.graph.eliminate_dead_code()
    graph_module.graph.lint()
    graph_module.recompile()
    linears = [n for n in graph_module.graph.nodes if n.target is aten.linear.default]
    # chunks 1-2 in one linear over rows 4:12, chunk 5 in one over rows 20:24; the full one is gone
    assert [tuple(n.meta["val"].shape) for n in linears] == [(2, 8), (2, 4)]
    assert [n.args[1].args[1:] for n in linears] == [(0, 4, 12), (0, 20, 24)]
    for w, h in zip(want, graph_module(*inputs), strict=True):
        assert torch.equal(w, h)


def test_narrow_partial_linears_leaves_a_linear_whose_chunks_are_all_read():
    inputs = _inputs()
    graph_module = _traced(_every_chunk, inputs)
    before = [(n.target, n.args) for n in graph_module.graph.nodes]
    assert narrow_partial_linears(graph_module.graph) == 0
    assert [(n.target, n.args) for n in graph_module.graph.nodes] == before


def test_reused_step_reads_only_the_gates_of_the_modulation_linear():
    """adaLN-Zero computes six modulations in one linear; a step that reuses both branches reads
    only the two gates (two linears over 1/6 of the rows each), one reusing attn1 only reads
    chunks 2-5 with one linear."""
    schedule = Schedule.from_dict({"attn1": [1, 0, 0], "ff": [1, 0, 1]})
    model = smoothcache_fx.transform(models.diffusers_dit(), schedule)
    expected = run_steps(models.diffusers_dit(), dit_call, 3)
    run_steps(model, dit_call, 3)
    variants = model.transformer_blocks[0]._smoothcache_state.current.variants
    dim = model.transformer_blocks[0].norm1.linear.in_features

    def modulation_rows(compute):
        graph = variants[tuple(compute.items())].graph_module.graph
        rows = []
        for node in graph.nodes:
            if node.target is not torch.ops.aten.linear.default:
                continue
            weight = node.args[1]
            if weight.target is torch.ops.aten.slice.Tensor:  # narrowed: rows of the full weight
                weight = weight.args[0]
            if "norm1_linear_weight" in weight.name:
                rows.append(node.meta["val"].shape[-1])
        return rows

    assert modulation_rows({"attn1": True, "ff": True}) == [6 * dim]
    assert modulation_rows({"attn1": False, "ff": False}) == [dim, dim]
    assert modulation_rows({"attn1": False, "ff": True}) == [4 * dim]
    got = run_steps(model, dit_call, 1)  # step 0 of a new generation computes everything
    assert torch.equal(got[0], expected[0])
