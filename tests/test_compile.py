"""Compiled execution: one compile per distinct variant, no graph breaks, no recompiles across steps."""

from __future__ import annotations

import copy

import models
import pytest
import torch
from helpers import dit_call, run_steps, tiny_call
from torch._dynamo.utils import counters

import smoothcache_fx
from smoothcache_fx import Schedule

STEPS = 20


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _schedule():
    # Two components with different periods: 3 distinct masks per block over a generation.
    attn = [1 if step % 2 == 0 else 0 for step in range(STEPS)]
    mlp = [1 if step % 4 == 0 else 0 for step in range(STEPS)]
    return Schedule.from_dict({"attn": attn, "mlp": mlp})


def test_compiled_generations_have_no_graph_breaks_or_recompiles(forbid_recompiles):
    original = models.TinyDiT(depth=3)
    eager = smoothcache_fx.transform(copy.deepcopy(original), _schedule())
    compiled = smoothcache_fx.transform(copy.deepcopy(original), _schedule(), compile=True)

    expected = run_steps(eager, tiny_call, STEPS)
    first = run_steps(compiled, tiny_call, STEPS)  # warm-up: one compile per variant
    variants = compiled.smoothcache.variants
    assert len(variants) == compiled.smoothcache.distinct_variants() == 3
    assert all(v["compiled"] and v["blocks"] == ["blocks.0", "blocks.1", "blocks.2"] for v in variants)
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["graph_break"]

    forbid_recompiles()
    counters.clear()
    for _ in range(2):
        again = run_steps(compiled, tiny_call, STEPS)
        for want, have in zip(first, again, strict=True):
            assert torch.equal(want, have)
    assert counters["stats"]["unique_graphs"] == 0
    assert not counters["recompiles"]
    assert not counters["graph_break"]
    for want, have in zip(expected, first, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("components", [["attn1"], ["attn1", "ff"]])
def test_first_block_layout_does_not_compile_variants_twice(components, forbid_recompiles):
    """diffusers' DiT hands its first block a transposed hidden-state layout (patch embedding), later
    blocks contiguous ones; even the warm-up generation compiles each variant exactly once."""
    original = models.diffusers_dit(num_layers=3)
    schedule = Schedule.uniform(6, 2, components)
    eager = smoothcache_fx.transform(copy.deepcopy(original), schedule)
    compiled = smoothcache_fx.transform(copy.deepcopy(original), schedule, compile=True, backend="aot_eager")
    forbid_recompiles()
    got = run_steps(compiled, dit_call, 6)
    assert counters["stats"]["unique_graphs"] == compiled.smoothcache.distinct_variants() == 2
    for want, have in zip(run_steps(eager, dit_call, 6), got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)


def test_always_computed_branches_keep_no_cache():
    """A branch the schedule never reuses is left as the model wrote it: no cache, no cache write."""
    schedule = Schedule.from_dict({"attn1": [1, 0, 1, 1], "ff": [1, 1, 1, 1]})
    model = smoothcache_fx.transform(models.diffusers_dit(), schedule)
    run_steps(model, dit_call, 4)
    stats = model.smoothcache.stats
    assert stats["transformer_blocks.0.ff"]["computed"] == 4
    assert stats["transformer_blocks.0.ff"]["cache_bytes"] == 0
    assert stats["transformer_blocks.0.attn1"]["cache_bytes"] > 0
    assert set(model.smoothcache.branch_outputs()) == {
        "transformer_blocks.0.attn1",
        "transformer_blocks.1.attn1",
    }


def test_batch_size_change_compiles_each_variant_once_more():
    model = smoothcache_fx.transform(models.TinyDiT(), Schedule.uniform(4, 2, ["attn", "mlp"]), compile=True)
    run_steps(model, tiny_call, 4, batch=2)
    assert counters["stats"]["unique_graphs"] == 2
    run_steps(model, tiny_call, 4, batch=3)
    assert counters["stats"]["unique_graphs"] == 4
    run_steps(model, tiny_call, 4, batch=2)  # both signatures stay compiled
    run_steps(model, tiny_call, 4, batch=3)
    assert counters["stats"]["unique_graphs"] == 4


def test_reduce_overhead_on_cpu_warns_and_works():
    original = models.TinyDiT()
    model = smoothcache_fx.transform(
        copy.deepcopy(original), Schedule.all_compute(2, ["attn"]), compile=True, mode="reduce-overhead"
    )
    with pytest.warns(UserWarning, match="reduce-overhead.*default mode"):
        out = run_steps(model, tiny_call, 2)
    torch.testing.assert_close(out[-1], run_steps(original, tiny_call, 2)[-1], rtol=1e-5, atol=1e-5)


def test_user_compile_of_the_transformed_model_breaks_at_blocks_without_recompiling():
    """Wrapping the transformed model in torch.compile works: blocks stay out of the trace (a graph
    break each), so dynamo never guards on the step and nothing recompiles per step."""
    original = models.TinyDiT()
    model = smoothcache_fx.transform(copy.deepcopy(original), Schedule.uniform(4, 2, ["attn"]))
    expected = run_steps(
        smoothcache_fx.transform(copy.deepcopy(original), Schedule.uniform(4, 2, ["attn"])), tiny_call, 8
    )
    wrapped = torch.compile(model, backend="aot_eager")
    got = run_steps(wrapped, tiny_call, 8)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    assert sum(counters["recompiles"].values()) <= 1
    assert counters["graph_break"]


def test_fullgraph_user_compile_points_to_compile_true():
    model = smoothcache_fx.transform(models.TinyDiT(), Schedule.uniform(4, 2, ["attn"]))
    wrapped = torch.compile(model, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="compile=True"):
        run_steps(wrapped, tiny_call, 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"mode": "fastest"}, ValueError, "compile mode must be one of"),
        ({"options": {"no_such_option": True}}, ValueError, "not inductor options"),
        ({"mode": "max-autotune", "options": {"max_autotune": True}}, ValueError, "either mode or options"),
        ({"max_variants": 0}, ValueError, "max_variants must be"),
    ],
)
def test_bad_compile_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        smoothcache_fx.transform(models.TinyDiT(), Schedule.uniform(2, 2, ["attn"]), compile=True, **kwargs)


def test_too_many_variants_names_the_count_and_the_fallback():
    # attn1 every 2nd step, ff every 3rd: all four compute/reuse combinations occur.
    per_block = {
        "attn1": [int(step % 2 == 0) for step in range(12)],
        "ff": [int(step % 3 == 0) for step in range(12)],
    }
    model = smoothcache_fx.transform(models.diffusers_dit(), per_block, compile=True, max_variants=3)
    with pytest.raises(ValueError, match=r"needs 4 compiled variants.*max_variants=3.*compile=False"):
        run_steps(model, dit_call, 1)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@requires_cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_cuda_compiled_variants_match_eager(mode, forbid_recompiles):
    """On CUDA the fused op is the Triton kernel; with CUDA graphs the static cache buffers are
    written in place by the replayed graphs, generation after generation."""
    original = models.TinyDiT(depth=3).cuda()
    eager = smoothcache_fx.transform(copy.deepcopy(original), _schedule())
    compiled = smoothcache_fx.transform(copy.deepcopy(original), _schedule(), compile=True, mode=mode)

    def call(model, step, batch=2):
        x, y = models.tiny_dit_inputs(batch)
        return model(x.cuda(), torch.full((batch,), 50 * step + 1, device="cuda"), y.cuda()).clone()

    expected = run_steps(eager, call, STEPS)
    run_steps(compiled, call, STEPS)
    forbid_recompiles()
    for _ in range(2):
        got = run_steps(compiled, call, STEPS)
        for want, have in zip(expected, got, strict=True):
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)
    pointers = [b.data_ptr() for n, b in compiled.named_buffers() if "smoothcache_cache_" in n]
    run_steps(compiled, call, STEPS)
    assert pointers == [b.data_ptr() for n, b in compiled.named_buffers() if "smoothcache_cache_" in n]
