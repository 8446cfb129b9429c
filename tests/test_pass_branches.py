"""passes/branches.py: residual branches found by one pattern, on the block styles the diffusers
families do not cover (the coverage suite checks those) and on the hand-written test blocks."""

from __future__ import annotations

import copy

import models
import pytest
import torch
from helpers import capture
from torch import nn
from torch.utils._pytree import tree_leaves

import smoothcache_fx
from smoothcache_fx import Schedule
from smoothcache_fx.passes.branches import find_residual_branches, owner_component
from smoothcache_fx.passes.capture import capture_block


def test_find_residual_branches_reads_components_gates_and_the_residual_chain():
    """facebookresearch/DiT's block: two gated sites, the second's residual the first's sum."""
    torch.manual_seed(0)
    block = models.DiTBlock(models.HIDDEN, models.HEADS).eval()
    captured, _ = capture(block, torch.randn(2, models.TOKENS, models.HIDDEN), torch.randn(2, models.HIDDEN))
    graph = captured.graph_module.graph
    branches = find_residual_branches(graph)
    assert branches.components == ("attn", "mlp")
    attn, mlp = branches.sites
    nodes = {node.name: node for node in graph.nodes}
    assert nodes[attn.residual].op == "placeholder"  # the block's input x
    assert mlp.residual == attn.add  # the stream after attn's update
    assert nodes[mlp.add] in next(n for n in graph.nodes if n.op == "output").args[0]
    for site in branches.sites:
        assert owner_component(nodes[site.branch]) == site.component
        assert site.gate is not None and nodes[site.mul].args[0] is nodes[site.gate]
        assert owner_component(nodes[site.gate]) is None  # the gate comes from the block's own linear
    assert branches.sites_of("mlp") == (mlp,)


def test_find_residual_branches_without_gates_and_without_residuals():
    """U-ViT's pre-norm residuals have no gate; a block with no residual add has no site."""
    x = torch.randn(2, models.TOKENS, models.HIDDEN)
    captured, _ = capture(models.UViTBlock(models.HIDDEN, models.HEADS).eval(), x)
    branches = find_residual_branches(captured.graph_module.graph)
    assert branches.components == ("attn", "mlp")
    assert all(site.gate is None and site.mul is None for site in branches.sites)
    captured, _ = capture(models.Mlp(models.HIDDEN).eval(), x)
    assert find_residual_branches(captured.graph_module.graph).sites == ()


class _Linear(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(x)


class SlicedTwoStreamBlock(nn.Module):
    """CogVideoX-style: one ff over both streams, its output sliced per stream."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.ff = _Linear()

    def forward(self, text, video, gate):
        out = self.ff(self.norm(torch.cat([text, video], dim=1)))
        text = text + gate * out[:, : text.shape[1]]
        video = video + gate * out[:, text.shape[1] :]
        return text, video


class ChannelsFirstBlock(nn.Module):
    """Sana-style: the branch runs channels-first and is permuted back to tokens."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3, padding=1)

    def forward(self, x, gate):
        return x + gate * self.conv(x.transpose(1, 2)).permute(0, 2, 1)


class SandwichNormBlock(nn.Module):
    """Lumina-Next-style: `attn1 + gate * attn2` is projected by attn2 and post-normed; only the
    post-norm's output is a residual update."""

    def __init__(self):
        super().__init__()
        self.attn1 = _Linear()
        self.attn2 = _Linear()
        self.norm2 = nn.LayerNorm(8)
        self.gate = nn.Parameter(torch.randn(8))

    def forward(self, x, gate):
        mixed = self.attn1(x) + self.attn2(x) * self.gate.tanh()
        return x + gate.unsqueeze(1).tanh() * self.norm2(self.attn2.proj(mixed))


class Fp32ResidualBlock(nn.Module):
    """Wan-style: a low-precision branch added in fp32 (`h.float() + X * gate_fp32`, implicit
    promotion) and cast back; the capture makes the upcast explicit so the pattern sees X through it."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn = _Linear()

    def forward(self, x, gate):
        return (x.float() + self.attn(self.norm(x)) * gate.float()).type_as(x)


class ClippedResidualBlock(nn.Module):
    """Flux-style fp16 guard: the residual sum is clipped after the add."""

    def __init__(self):
        super().__init__()
        self.ff = _Linear()

    def forward(self, x, gate):
        return (x + gate * self.ff(x)).clip(-65504, 65504)


class _Stack(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList([block])

    def forward(self, *args):
        return self.blocks[0](*args)


GENERALISATIONS = {
    "sliced-two-stream": (SlicedTwoStreamBlock, [(2, 3, 8), (2, 5, 8), (2, 1, 8)], torch.float32, ("ff",), 2),
    "channels-first": (ChannelsFirstBlock, [(2, 5, 8), (2, 1, 8)], torch.float32, ("conv",), 1),
    "sandwich-norm": (SandwichNormBlock, [(2, 5, 8), (2, 8)], torch.float32, ("norm2",), 1),
    "fp32-residual-bf16": (Fp32ResidualBlock, [(2, 5, 8), (2, 1, 8)], torch.bfloat16, ("attn",), 1),
    "clipped-fp16": (ClippedResidualBlock, [(2, 5, 8), (2, 1, 8)], torch.float16, ("ff",), 1),
}


@pytest.mark.parametrize("case", GENERALISATIONS)
def test_pattern_generalisations(case):
    """Each block's branches are found, and an all-compute transform reproduces it exactly."""
    block, shapes, dtype, components, sites = GENERALISATIONS[case]
    torch.manual_seed(0)
    original = _Stack(block()).to(dtype).eval()
    args = tuple(
        torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(dtype)
        for i, shape in enumerate(shapes)
    )
    captured = capture_block(original.blocks[0], type(original.blocks[0]).forward, args, {})
    assert len(find_residual_branches(captured.graph_module.graph).sites) == sites
    model = smoothcache_fx.transform(copy.deepcopy(original), Schedule.all_compute(2, components))
    with torch.no_grad():
        for _ in range(2):
            for want, have in zip(tree_leaves(original(*args)), tree_leaves(model(*args)), strict=True):
                assert torch.equal(want, have)
    assert model.smoothcache.branches == {"blocks.0": components}
