"""passes/specialise.py: one variant per compute mask, its counters and the dead code it removes."""

from __future__ import annotations

import models
import pytest
import torch
from helpers import CASES, capture, run_steps, tiny_call

import smoothcache_fx
from smoothcache_fx import Schedule
from smoothcache_fx.passes.branches import find_residual_branches
from smoothcache_fx.passes.specialise import (
    GATED_RESIDUAL_ADD,
    GATED_RESIDUAL_ADD_AND_CACHE,
    GATED_RESIDUAL_ADD_AND_HISTORY,
    GATED_RESIDUAL_FORECAST,
    specialise_block,
)


def _captured_dit_block():
    torch.manual_seed(0)
    block = models.DiTBlock(models.HIDDEN, models.HEADS).eval()
    captured, inputs = capture(
        block, torch.randn(2, models.TOKENS, models.HIDDEN), torch.randn(2, models.HIDDEN)
    )
    return captured.graph_module, find_residual_branches(captured.graph_module.graph), inputs


def _count(graph_module, target) -> int:
    return sum(1 for node in graph_module.graph.nodes if node.target is target)


def test_specialise_block_rewrites_every_scheduled_site_and_keeps_the_output():
    """The compute variant writes each branch into its cache; a variant reusing attn from that
    cache gives the same output, without attn's work; the captured graph is left as it was."""
    graph_module, branches, inputs = _captured_dit_block()
    nodes = len(graph_module.graph.nodes)
    compute = specialise_block(graph_module, branches, {"attn": True, "mlp": True})
    reuse = specialise_block(graph_module, branches, {"attn": False, "mlp": True})
    with torch.no_grad():
        (want,) = graph_module(*inputs)
        caches = [torch.zeros_like(want) for _ in compute.cache_sites]
        (computed,) = compute.graph_module(*inputs, *caches)
        (reused,) = reuse.graph_module(*inputs, *caches)
    assert torch.equal(computed, want) and torch.equal(reused, want)
    assert compute.rewritten == reuse.rewritten == 2
    assert _count(compute.graph_module, GATED_RESIDUAL_ADD_AND_CACHE) == 2
    assert _count(reuse.graph_module, GATED_RESIDUAL_ADD_AND_CACHE) == 1
    assert _count(reuse.graph_module, GATED_RESIDUAL_ADD) == 1
    assert _count(reuse.graph_module, torch.ops.aten.scaled_dot_product_attention.default) == 0
    assert (compute.computed, compute.reused, reuse.computed, reuse.reused) == (
        ("attn", "mlp"),
        (),
        ("mlp",),
        ("attn",),
    )
    assert reuse.nodes_removed > compute.nodes_removed
    assert len(graph_module.graph.nodes) == nodes


def test_specialise_block_leaves_unscheduled_components_and_refuses_unknown_ones():
    graph_module, branches, _ = _captured_dit_block()
    only_mlp = specialise_block(graph_module, branches, {"mlp": False})
    assert only_mlp.rewritten == 1 and [site.component for site in only_mlp.cache_sites] == ["mlp"]
    assert _count(only_mlp.graph_module, torch.ops.aten.scaled_dot_product_attention.default) == 1
    with pytest.raises(ValueError, match=r"components \['ff'\] that this block does not have"):
        specialise_block(graph_module, branches, {"ff": True})


@pytest.mark.parametrize("case", CASES)
def test_pass_counter_counts_every_scheduled_site(case):
    make, call, components = CASES[case]
    model = smoothcache_fx.transform(make(), Schedule.uniform(2, 2, components))
    run_steps(model, call, 2)
    for block in model.smoothcache.blocks.values():
        variants = block._smoothcache_state.current.variants
        assert len(variants) == 2  # step 0 computes everything, step 1 reuses everything
        for variant in variants.values():
            assert variant.rewritten == len(components)


def test_skipped_branch_drops_its_norm_and_modulate():
    """Dead-code elimination removes the branch's own norm and modulate, keeps shared gate work."""
    model = smoothcache_fx.transform(models.TinyDiT(), Schedule.uniform(2, 2, ["attn"]))
    run_steps(model, tiny_call, 2)
    state = model.blocks[0]._smoothcache_state
    variants = {key[0][1]: v for key, v in state.current.variants.items()}

    def count(variant, op):
        return sum(1 for n in variant.graph_module.graph.nodes if n.target == op)

    aten = torch.ops.aten
    assert count(variants[True], aten.layer_norm.default) == 2
    assert count(variants[False], aten.layer_norm.default) == 1  # norm1 gone, norm2 (mlp) kept
    assert count(variants[False], aten.scaled_dot_product_attention.default) == 0
    assert count(variants[False], aten.linear.default) == count(variants[True], aten.linear.default) - 2
    assert variants[False].nodes_removed > variants[True].nodes_removed


@pytest.mark.parametrize("kernel", ["op", "inductor"])
def test_forecast_sites_shift_history_and_forecast_without_the_branch_work(kernel):
    """attn of order 2: the compute variant shifts attn's output into its history; the skip variant
    adds the weighted history instead (gated like the branch), without attention; mlp reuses."""
    graph_module, branches, inputs = _captured_dit_block()
    orders = {"attn": 2}
    compute = specialise_block(graph_module, branches, {"attn": True, "mlp": True}, kernel, orders)
    skip = specialise_block(graph_module, branches, {"attn": False, "mlp": False}, kernel, orders)
    assert compute.orders == skip.orders == (("attn", 2),)
    assert compute.forecast_sites == () and [s.component for s in skip.forecast_sites] == ["attn"]
    assert skip.rewritten == 2
    if kernel == "op":
        assert _count(compute.graph_module, GATED_RESIDUAL_ADD_AND_HISTORY) == 1
        assert _count(skip.graph_module, GATED_RESIDUAL_FORECAST) == 1
    else:
        assert _count(skip.graph_module, GATED_RESIDUAL_FORECAST) == 0
    assert _count(skip.graph_module, torch.ops.aten.scaled_dot_product_attention.default) == 0
    with torch.no_grad():
        (want,) = graph_module(*inputs)
        history = torch.randn(3, *want.shape)
        start = history.clone()
        cache = torch.zeros_like(want)
        (computed,) = compute.graph_module(*inputs, history, cache)
        # The history moved one slot towards the oldest; the newest is attn's output, which the
        # skip variant with weights (0, 0, 1) reproduces exactly (then mlp from its cache).
        assert torch.equal(history[:2], start[1:])
        torch.testing.assert_close(computed, want, rtol=1e-6, atol=1e-6)
        (reused,) = skip.graph_module(*inputs, torch.tensor([0.0, 0.0, 1.0]), history, cache)
        torch.testing.assert_close(reused, want, rtol=1e-6, atol=1e-6)
        # Other weights give another output (end-to-end numerics: tests/test_forecast.py).
        (forecast,) = skip.graph_module(*inputs, torch.tensor([1.0, -3.0, 3.0]), history, cache)
        assert (forecast - reused).abs().max() > 1e-3


def test_orders_for_unscheduled_components_are_refused():
    graph_module, branches, _ = _captured_dit_block()
    with pytest.raises(ValueError, match=r"orders name components \['attn'\] that the compute mask does not"):
        specialise_block(graph_module, branches, {"mlp": False}, orders={"attn": 1})
