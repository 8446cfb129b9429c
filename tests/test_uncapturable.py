"""Blocks torch.export cannot capture run as the model wrote them, uncached, with one warning
(or an error with `strict=True`); single-child wrapper modules are looked through for blocks."""

from __future__ import annotations

import copy
import warnings

import models
import pytest
import torch
from helpers import run_steps, tiny_call
from torch import nn

import smoothcache_fx
from smoothcache_fx import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4


class RoutingBlock(nn.Module):
    """A mixture-of-experts feed-forward that routes on the host, as HiDream's does
    (`.cpu().numpy()`): data-dependent Python control flow that torch.export cannot trace."""

    def __init__(self, dim: int = models.HIDDEN):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, 2)
        self.experts = nn.ModuleList([models.Mlp(dim), models.Mlp(dim)])

    def forward(self, x, c):
        h = self.norm(x)
        expert = int(self.gate(h).mean(dim=(0, 1)).argmax().cpu().numpy())
        return x + self.experts[expert](h)


class Wrapper(nn.Module):
    """HiDream's shape: each list element wraps the real block and only forwards to it."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x, c):
        return self.block(x, c)


def _mixed(wrapped: bool = False) -> models.TinyDiT:
    torch.manual_seed(0)
    model = models.TinyDiT(depth=3)
    model.blocks[1] = RoutingBlock()
    if wrapped:
        model.blocks = nn.ModuleList([Wrapper(block) for block in model.blocks])
    return model


SCHEDULE = Schedule.from_dict({"attn": [1, 0, 1, 0], "mlp": [1, 1, 0, 0]})


def test_an_uncapturable_block_runs_uncached_with_one_warning():
    original = _mixed()
    model = smoothcache_fx.transform(copy.deepcopy(original), SCHEDULE)
    with pytest.warns(
        UserWarning, match=r"RoutingBlock.*'blocks.1'.*cannot be captured.*numpy.*strict=True"
    ) as record:
        got = run_steps(model, tiny_call, STEPS)
    assert len([w for w in record if "cannot be captured" in str(w.message)]) == 1
    assert set(model.smoothcache.branches) == {"blocks.0", "blocks.2"}
    # The same as transforming only the capturable blocks: blocks.1 is the model's own code.
    reference = smoothcache_fx.transform(copy.deepcopy(original), SCHEDULE, blocks=["blocks.0", "blocks.2"])
    for want, have in zip(run_steps(reference, tiny_call, STEPS), got, strict=True):
        assert torch.equal(want, have)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning in later generations
        run_steps(model, tiny_call, STEPS)


def test_strict_makes_an_uncapturable_block_an_error():
    model = smoothcache_fx.transform(_mixed(), SCHEDULE, strict=True)
    with pytest.raises(
        NotImplementedError, match=r"'blocks.1' \(RoutingBlock\) cannot be captured.*blocks=\["
    ) as info:
        run_steps(model, tiny_call, 1)
    assert info.value.__cause__ is not None  # torch's own error, chained


def test_single_child_wrappers_are_looked_through():
    original = _mixed(wrapped=True)
    model = smoothcache_fx.transform(copy.deepcopy(original), SCHEDULE)
    with pytest.warns(UserWarning, match="RoutingBlock"):
        got = run_steps(model, tiny_call, STEPS)
    assert model.smoothcache.branches == {
        "blocks.0.block": ("attn", "mlp"),
        "blocks.2.block": ("attn", "mlp"),
    }
    reference = smoothcache_fx.transform(_mixed(), SCHEDULE, blocks=["blocks.0", "blocks.2"])
    for want, have in zip(run_steps(reference, tiny_call, STEPS), got, strict=True):
        assert torch.equal(want, have)


def test_full_paths_name_wrapped_blocks():
    """A per-block key (`attn-2`) needs the index right above the component; a wrapped block's
    branches are named by their full path."""
    schedule = Schedule.from_dict({"attn": [1, 0, 1, 0], "blocks.2.block.attn": [1, 1, 1, 1]})
    model = smoothcache_fx.transform(_mixed(wrapped=True), schedule)
    with pytest.warns(UserWarning, match="RoutingBlock"):
        run_steps(model, tiny_call, STEPS)
    stats = model.smoothcache.stats
    assert stats["blocks.0.block.attn"]["reused"] == 2
    assert "blocks.2.block.attn" not in stats or stats["blocks.2.block.attn"]["reused"] == 0


class HostRoutedMlp(nn.Module):
    """A feed-forward that picks one of two MLPs on the host: not capturable."""

    def __init__(self, dim: int = models.HIDDEN):
        super().__init__()
        self.experts = nn.ModuleList([models.Mlp(dim), models.Mlp(dim)])

    def forward(self, x):
        return self.experts[int(x.mean().gt(0).cpu().numpy())](x)


def test_a_change_that_makes_a_block_uncapturable_runs_it_uncached():
    """Captured once, then a submodule swap makes the block untraceable: it runs as written."""
    torch.manual_seed(0)
    original = models.TinyDiT(depth=2)
    model = smoothcache_fx.transform(copy.deepcopy(original), SCHEDULE)
    run_steps(model, tiny_call, STEPS)
    torch.manual_seed(1)
    routed = HostRoutedMlp()
    original.blocks[1].mlp = routed
    model.blocks[1].mlp = copy.deepcopy(routed)
    with pytest.warns(UserWarning, match=r"DiTBlock.*'blocks.1'.*cannot be captured"):
        got = run_steps(model, tiny_call, STEPS)
    reference = smoothcache_fx.transform(copy.deepcopy(original), SCHEDULE, blocks=["blocks.0"])
    for want, have in zip(run_steps(reference, tiny_call, STEPS), got, strict=True):
        assert torch.equal(want, have)


def test_compile_with_an_uncapturable_block_falls_back_to_per_block_variants():
    """Whole-model variants need every block captured: with one that is not, compile=True runs
    per-block variants for the others (the uncapturable block as written, inside no graph)."""
    original = _mixed()
    model = smoothcache_fx.transform(
        copy.deepcopy(original), SCHEDULE, compile=True, granularity="model", backend="aot_eager"
    )
    reference = smoothcache_fx.transform(copy.deepcopy(original), SCHEDULE, blocks=["blocks.0", "blocks.2"])
    with pytest.warns(UserWarning, match="cannot be captured"):
        got = run_steps(model, tiny_call, STEPS)
    assert model.smoothcache.granularity == "block"
    for _ in range(2):
        for want, have in zip(run_steps(reference, tiny_call, STEPS), got, strict=True):
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
        got = run_steps(model, tiny_call, STEPS)
