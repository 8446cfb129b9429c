"""The single-graph form: one exportable graph for every step (step buffer, schedule table, cond)."""

from __future__ import annotations

import copy

import models
import pytest
import torch
from helpers import dit_call, run_steps, tiny_call
from torch._dynamo.utils import counters

import smoothcache_fx
from smoothcache_fx import Schedule

STEPS = 6


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _schedule():
    return Schedule.from_dict({"attn1": [1, 0, 1, 0, 0, 1], "ff": [1, 1, 0, 1, 0, 1]})


def _pair(make=models.diffusers_dit, schedule=None):
    original = make()
    schedule = schedule or _schedule()
    variants = smoothcache_fx.transform(copy.deepcopy(original), schedule)
    graph = smoothcache_fx.transform(copy.deepcopy(original), schedule, form="graph")
    return variants, graph


def test_graph_form_equals_variant_form_over_generations():
    variants, graph = _pair()
    expected = run_steps(variants, dit_call, STEPS)
    first = run_steps(graph, dit_call, STEPS)
    assert graph.smoothcache_step.item() == 0  # wrapped after the generation
    second = run_steps(graph, dit_call, STEPS)
    for want, a, b in zip(expected, first, second, strict=True):
        assert torch.equal(want, a) and torch.equal(want, b)


def test_graph_form_exports_and_runs_a_full_loop_from_the_exported_program():
    variants, graph = _pair()
    expected = run_steps(variants, dit_call, STEPS)
    run_steps(graph, dit_call, 1)  # one eager call captures the blocks
    graph.smoothcache.reset()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 1]), torch.tensor([1, 2])
    with torch.no_grad():
        program = torch.export.export(graph, (x,), {"timestep": t, "class_labels": y}, strict=False)
    conds = [n for n in program.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == 4  # attn1 and ff in each of the 2 blocks
    exported = program.module()
    got = run_steps(exported, dit_call, STEPS)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=0, atol=1e-6)
    mutated = {
        s.target
        for s in program.run_decompositions().graph_signature.output_specs
        if s.kind.name == "BUFFER_MUTATION"
    }
    assert "smoothcache_step" in mutated
    assert "transformer_blocks.1.smoothcache_cache_1" in mutated


def test_graph_form_compiles_to_one_graph_without_recompiles(forbid_recompiles):
    variants, graph = _pair(models.TinyDiT, Schedule.uniform(STEPS, 2, ["attn", "mlp"]))
    expected = run_steps(variants, tiny_call, STEPS)
    run_steps(graph, tiny_call, 1)
    graph.smoothcache.reset()
    compiled = torch.compile(graph, fullgraph=True)
    forbid_recompiles()
    for _ in range(2):
        got = run_steps(compiled, tiny_call, STEPS)
        for want, have in zip(expected, got, strict=True):
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_graph_form_needs_an_eager_call_before_export():
    graph = smoothcache_fx.transform(models.TinyDiT(), Schedule.uniform(4, 2, ["attn"]), form="graph")
    x, y = models.tiny_dit_inputs()
    with pytest.raises(RuntimeError, match="run the transformed model once eagerly"), torch.no_grad():
        torch.export.export(graph, (x, torch.tensor([1, 1]), y), strict=False)


def test_graph_form_argument_errors():
    with pytest.raises(ValueError, match="form must be one of"):
        smoothcache_fx.transform(models.TinyDiT(), Schedule.uniform(4, 2, ["attn"]), form="single")
    with pytest.raises(ValueError, match=r"torch.compile\(model, fullgraph=True\)"):
        smoothcache_fx.transform(
            models.TinyDiT(), Schedule.uniform(4, 2, ["attn"]), form="graph", compile=True
        )


def test_graph_form_untransform():
    original = models.TinyDiT()
    graph = smoothcache_fx.transform(copy.deepcopy(original), Schedule.uniform(4, 2, ["attn"]), form="graph")
    run_steps(graph, tiny_call, 2)
    smoothcache_fx.untransform(graph)
    assert type(graph) is models.TinyDiT and not list(graph.buffers())
    assert torch.equal(run_steps(graph, tiny_call, 1)[0], run_steps(original, tiny_call, 1)[0])


class NormedUpdateBlock(torch.nn.Module):
    """AuraFlow's single-stream block: the attention update is normed and feeds only the ff input;
    the ff residual is the block input. Skipping ff makes attn's fused op (which writes attn's
    cache) feed nothing live, so the graph form must keep it as a side effect."""

    def __init__(self, dim: int = models.HIDDEN):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim)
        self.attn = models.Attention(dim, models.HEADS)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.ff = models.Mlp(dim)
        self.gates = torch.nn.Linear(dim, 2 * dim)

    def forward(self, x, c):
        gate_attn, gate_ff = self.gates(c).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm2(x + gate_attn * self.attn(self.norm1(x)))
        return x + gate_ff * self.ff(h)


def test_graph_form_keeps_a_cache_write_that_only_a_skipped_branch_reads():
    def make():
        torch.manual_seed(0)
        model = models.TinyDiT()
        model.blocks = torch.nn.ModuleList([NormedUpdateBlock() for _ in range(2)])
        return model.eval()

    # step 2: attn computes (its cache must be written) while ff, its only reader, is reused
    schedule = Schedule.from_dict({"attn": [1, 0, 1, 0, 1, 1], "ff": [1, 1, 0, 0, 1, 1]})
    variants, graph = _pair(make, schedule)
    expected = run_steps(variants, tiny_call, STEPS)
    assert variants.smoothcache.branches == {"blocks.0": ("attn", "ff"), "blocks.1": ("attn", "ff")}
    for want, have in zip(expected, run_steps(graph, tiny_call, STEPS), strict=True):
        assert torch.equal(want, have)
