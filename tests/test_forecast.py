"""Forecasting skipped steps end to end: a transformed model with predictor orders against the
forward-patching reference (Newton extrapolation of module outputs, tests/forward_patching_reference.py),
eagerly and compiled (no graph break, no recompile), with the fused op and with plain ops."""

from __future__ import annotations

import copy
import json

import models
import pytest
import torch
from forward_patching_reference import ForwardPatchingReference
from helpers import dit_call, run_steps, tiny_call
from torch._dynamo.utils import counters

import smoothcache_fx
from smoothcache_fx import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10
ATTN = [1, 0, 1, 1, 0, 0, 1, 0, 0, 1]
MLP = [1, 1, 0, 1, 0, 1, 1, 0, 0, 1]
RTOL, ATOL = 1e-5, 1e-5


def _schedule(orders):
    return Schedule(STEPS, {"attn": ATTN, "mlp": MLP}, orders=orders)


def _reference(original, schedule, call=tiny_call):
    model = copy.deepcopy(original)
    masks, orders, strengths = dict(schedule.masks), dict(schedule.orders), dict(schedule.strengths)
    with ForwardPatchingReference(model, masks, orders=orders, strengths=strengths) as ref:
        outputs = run_steps(model, call, STEPS)
    return outputs, ref


@pytest.mark.parametrize("kernel", ["op", "inductor"])
@pytest.mark.parametrize("orders", [{"attn": 1, "mlp": 1}, {"attn": 2, "mlp": 1}, {"attn": 2}])
def test_eager_forecast_equals_forward_patching_reference(orders, kernel):
    torch.manual_seed(0)
    original = models.TinyDiT(depth=2)
    schedule = _schedule(orders)
    expected, ref = _reference(original, schedule)
    model = smoothcache_fx.transform(copy.deepcopy(original), schedule, kernel=kernel)
    got = run_steps(model, tiny_call, STEPS)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=RTOL, atol=ATOL)
    # Forecasting must matter: plain reuse gives other outputs at the skipped steps.
    reuse, _ = _reference(original, schedule.with_orders({}))
    assert max((a - b).abs().max() for a, b in zip(reuse, expected, strict=True)) > 1e-3
    stats = model.smoothcache.stats
    for path, entry in stats.items():
        component = path.rsplit(".", 1)[1]
        assert entry["order"] == orders.get(component, 0)
        skipped = entry["forecast"] + entry["reused"]
        assert (entry["computed"], skipped) == (ref.computed[path], ref.reused[path])
        assert entry["forecast"] == (skipped if entry["order"] else 0)


@pytest.mark.parametrize("kernel", ["op", "inductor"])
def test_damped_forecast_equals_the_reference_and_lies_between_reuse_and_full(kernel):
    """A strength moves the forecast part of the way from the newest output: the transformed model
    agrees with the reference's damped Newton extrapolation, and differs from both ends."""
    torch.manual_seed(0)
    original = models.TinyDiT(depth=2)
    full = _schedule({"attn": 2, "mlp": 1})
    damped = full.with_strengths({"attn": 0.5, "mlp": 0.75})
    expected, _ = _reference(original, damped)
    model = smoothcache_fx.transform(copy.deepcopy(original), damped, kernel=kernel)
    got = run_steps(model, tiny_call, STEPS)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=RTOL, atol=ATOL)
    for other in (full, full.with_orders({})):
        outputs, _ = _reference(original, other)
        assert max((a - b).abs().max() for a, b in zip(outputs, expected, strict=True)) > 1e-3
    stats = model.smoothcache.stats
    assert [stats[f"blocks.0.{c}"]["strength"] for c in ("attn", "mlp")] == [0.5, 0.75]


def test_forecast_history_bytes_in_stats_and_capped_by_max_order():
    original = models.TinyDiT(depth=1)
    schedule = _schedule({"attn": 2, "mlp": 1})
    model = smoothcache_fx.transform(copy.deepcopy(original), schedule)
    run_steps(model, tiny_call, 1)
    capped = smoothcache_fx.transform(copy.deepcopy(original), schedule, max_order=1)
    run_steps(capped, tiny_call, 1)
    reuse = smoothcache_fx.transform(copy.deepcopy(original), schedule, max_order=0)
    run_steps(reuse, tiny_call, 1)
    one = reuse.smoothcache.stats["blocks.0.attn"]["cache_bytes"]
    assert one == 2 * 16 * 32 * 4  # batch 2, 16 tokens, width 32, fp32: one output
    assert model.smoothcache.stats["blocks.0.attn"]["cache_bytes"] == 3 * one
    assert model.smoothcache.stats["blocks.0.mlp"]["cache_bytes"] == 2 * one
    assert capped.smoothcache.stats["blocks.0.attn"]["cache_bytes"] == 2 * one
    assert [reuse.smoothcache.stats[p]["order"] for p in ("blocks.0.attn", "blocks.0.mlp")] == [0, 0]
    with pytest.raises(ValueError, match=r"max_order=\): predictor order must be in \[0, 2\]"):
        smoothcache_fx.transform(copy.deepcopy(original), schedule, max_order=3)


def test_per_block_orders_on_diffusers_dit():
    torch.manual_seed(0)
    original = models.diffusers_dit(num_layers=2)
    masks = {"attn1": ATTN, "ff": MLP, "attn1-1": MLP}
    schedule = Schedule(STEPS, masks, orders={"attn1": 1, "attn1-1": 2, "ff": 1})
    expected, _ = _reference(original, schedule, dit_call)
    model = smoothcache_fx.transform(copy.deepcopy(original), schedule)
    for want, have in zip(expected, run_steps(model, dit_call, STEPS), strict=True):
        torch.testing.assert_close(have, want, rtol=RTOL, atol=ATOL)
    assert model.smoothcache.stats["transformer_blocks.1.attn1"]["order"] == 2


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kernel", ["op", "inductor"])
def test_compiled_forecast_no_graph_breaks_or_recompiles(kernel, fresh_dynamo, forbid_recompiles):
    torch.manual_seed(0)
    original = models.TinyDiT(depth=2)
    schedule = _schedule({"attn": 2, "mlp": 1}).with_strengths({"mlp": 0.75})
    expected, _ = _reference(original, schedule)
    compiled = smoothcache_fx.transform(copy.deepcopy(original), schedule, compile=True, kernel=kernel)
    first = run_steps(compiled, tiny_call, STEPS)
    # One variant per distinct (compute mask, orders): every skipped step of a component shares one
    # variant whatever its lag, since the weights are tensors.
    masks = {(a, m) for a, m in zip(ATTN, MLP, strict=True)}
    assert compiled.smoothcache.distinct_variants() == len(masks)
    assert counters["stats"]["unique_graphs"] == len(masks)
    assert all(v["orders"] == {"attn": 2, "mlp": 1} for v in compiled.smoothcache.variants)
    forbid_recompiles()
    again = run_steps(compiled, tiny_call, STEPS)
    assert not counters["graph_break"] and not counters["recompiles"]
    for want, a, b in zip(expected, first, again, strict=True):
        torch.testing.assert_close(a, want, rtol=RTOL, atol=ATOL)
        assert torch.equal(a, b)


def test_graph_form_forecasts_like_the_variants_eagerly_exported_and_compiled(
    fresh_dynamo, forbid_recompiles
):
    """One graph for every step (a cond per component, forecast weights indexed by the step
    buffer): equal to the variant form eagerly, from torch.export, and under torch.compile."""
    torch.manual_seed(0)
    original = models.TinyDiT(depth=2)
    schedule = _schedule({"attn": 2, "mlp": 1}).with_strengths({"attn": 0.5})
    expected, _ = _reference(original, schedule)
    graph = smoothcache_fx.transform(copy.deepcopy(original), schedule, form="graph")
    for want, have in zip(expected, run_steps(graph, tiny_call, STEPS), strict=True):
        torch.testing.assert_close(have, want, rtol=RTOL, atol=ATOL)
    graph.smoothcache.reset()
    x, y = models.tiny_dit_inputs(2)
    with torch.no_grad():
        program = torch.export.export(graph, (x, torch.full((2,), 1), y), strict=False)
    assert sum(n.target is torch.ops.higher_order.cond for n in program.graph.nodes) == 4
    mutated = {
        s.target
        for s in program.run_decompositions().graph_signature.output_specs
        if s.kind.name == "BUFFER_MUTATION"
    }
    assert "blocks.0.smoothcache_cache_0" in mutated  # the attn history, shifted in the graph
    exported = program.module()
    for want, have in zip(expected, run_steps(exported, tiny_call, STEPS), strict=True):
        torch.testing.assert_close(have, want, rtol=RTOL, atol=ATOL)
    graph.smoothcache.reset()
    compiled = torch.compile(graph, fullgraph=True)
    first = run_steps(compiled, tiny_call, STEPS)
    forbid_recompiles()
    again = run_steps(compiled, tiny_call, STEPS)
    assert not counters["graph_break"]
    for want, a, b in zip(expected, first, again, strict=True):
        torch.testing.assert_close(a, want, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(b, want, rtol=RTOL, atol=ATOL)


def test_profile_names_forecast_steps_and_reports_history_bytes(tmp_path):
    from smoothcache_fx.passes.annotate import branch_range

    model = smoothcache_fx.transform(models.TinyDiT(depth=1), _schedule({"attn": 1}))
    trace = tmp_path / "trace.json"
    report = smoothcache_fx.profile(model, lambda: run_steps(model, tiny_call, STEPS), trace=trace)
    ranges = {e["name"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"}
    assert "smoothcache/blocks.0.attn forecast" in ranges and "smoothcache/blocks.0.mlp reused" in ranges
    assert "smoothcache/blocks.0.attn reused" not in ranges
    names = {name for step in report.steps for name in step.reused}
    assert names == {"blocks.0.attn", "blocks.0.mlp"}
    rows = {b.path: b for b in report.branches}
    assert (rows["blocks.0.attn"].order, rows["blocks.0.mlp"].order) == (1, 0)
    assert rows["blocks.0.attn"].cache_bytes == 2 * rows["blocks.0.mlp"].cache_bytes > 0
    assert rows["blocks.0.attn"].reused == ATTN.count(0) and rows["blocks.0.attn"].reused_s > 0
    assert "order" in str(report) and "cache KiB" in str(report)
    assert branch_range("blocks.0", "attn", False, forecast=True) == "smoothcache/blocks.0.attn forecast"
