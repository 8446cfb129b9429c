"""passes/annotate.py: profiler ranges around each branch of a variant, and variants split at
branch boundaries (how `smoothcache_fx.profile` sees branches; the profile itself is tested in
test_profile.py)."""

from __future__ import annotations

import models
import pytest
import torch
from helpers import dit_call, run_steps, tiny_call

import smoothcache_fx
from smoothcache_fx import Schedule
from smoothcache_fx.passes.annotate import (
    RECORD_ENTER,
    RECORD_EXIT,
    annotate_block,
    branch_range,
    split_block,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _variants(make, call, schedule):
    model = smoothcache_fx.transform(make(), schedule)
    run_steps(model, call, schedule.steps)
    path, block = next(iter(model.smoothcache.blocks.items()))
    entry = block._smoothcache_state.current
    return path, entry.branches, list(entry.variants.values())


@pytest.mark.parametrize(
    ("make", "call", "components"),
    [(models.diffusers_dit, dit_call, ("attn1", "ff")), (models.TinyDiT, tiny_call, ("attn",))],
)
def test_annotate_wraps_each_branch_in_one_contiguous_range(make, call, components):
    path, branches, variants = _variants(make, call, Schedule.uniform(2, 2, list(components)))
    for variant in variants:
        annotated = annotate_block(variant, branches, path)
        assert annotated.ranges == len(branches.components) + 1 and not annotated.skipped
        nodes = list(annotated.graph_module.graph.nodes)
        for region in annotated.regions:
            enter = next(
                n
                for n in nodes
                if n.target is RECORD_ENTER
                and n.args[0].startswith(f"smoothcache/{path}.{region.component} ")
            )
            exit_ = next(iter(enter.users))
            assert exit_.target is RECORD_EXIT
            inside = nodes[nodes.index(enter) + 1 : nodes.index(exit_)]
            assert [n.name for n in inside] == list(region.nodes)
            assert enter.args[0] == branch_range(path, region.component, region.computed)
        values = [n.meta["val"] for n in nodes if n.op == "placeholder"]
        inputs = [
            torch.randn(v.shape).to(v.dtype)
            if v.dtype.is_floating_point
            else torch.zeros(v.shape, dtype=v.dtype)
            for v in values
        ]
        with torch.no_grad():
            want = variant.graph_module(*[t.clone() for t in inputs])
            have = annotated.graph_module(*[t.clone() for t in inputs])
        for w, h in zip(want, have, strict=True):
            assert torch.equal(w, h)


def test_annotated_graphs_do_not_compile_as_they_are():
    """Why compiled variants are split for profiling: dynamo cannot trace an FX graph's range nodes."""
    path, branches, variants = _variants(models.TinyDiT, tiny_call, Schedule.uniform(2, 2, ["attn"]))
    annotated = annotate_block(variants[0], branches, path).graph_module
    values = [n.meta["val"] for n in annotated.graph.nodes if n.op == "placeholder"]
    inputs = [torch.randn(v.shape).to(v.dtype) for v in values]
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="non-Tensor"):
        torch.compile(annotated, fullgraph=True, backend="eager")(*inputs)
    torch._dynamo.reset()


def test_split_cuts_one_segment_per_branch():
    path, branches, variants = _variants(models.diffusers_dit, dit_call, Schedule.uniform(2, 2, ["attn1"]))
    for variant in variants:
        split = split_block(variant, branches)
        assert [c for _, c in split.segments if c is not None] == ["attn1", "ff"]
