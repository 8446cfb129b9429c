"""Model coverage: the contract suite of `coverage_checks.py` on a subset of diffusers families, and
the branch pattern's generalisations on hand-written blocks.

The full table (every family, inductor) is `python tests/coverage_report.py`, written to
COVERAGE.md; here DiT, PixArt, SD3 and Flux run eagerly and DiT also compiles (aot_eager: the check
is about graph breaks and recompiles, which do not depend on the backend), in about 50 s on 2 cores.
"""

from __future__ import annotations

import copy

import coverage_checks as checks
import coverage_report
import pytest
import torch
from coverage_families import FAMILIES, Family
from torch import nn
from torch.utils._pytree import tree_leaves

import smoothcache_fx
from smoothcache_fx import Schedule
from smoothcache_fx.passes.branches import find_residual_branches
from smoothcache_fx.passes.capture import capture_block

pytest.importorskip("diffusers")

# The expectation, written out per block path (the module's table states it with globs).
EXPECTED = {
    "dit": {"transformer_blocks.0": ("attn1", "ff"), "transformer_blocks.1": ("attn1", "ff")},
    "pixart": {
        "transformer_blocks.0": ("attn1", "attn2", "ff"),
        "transformer_blocks.1": ("attn1", "attn2", "ff"),
    },
    "sd3": {
        "transformer_blocks.0": ("attn", "ff", "ff_context"),
        "transformer_blocks.1": ("attn", "ff"),  # context_pre_only: no context residuals
    },
    "flux": {
        "transformer_blocks.0": ("attn", "ff", "ff_context"),
        "single_transformer_blocks.0": ("proj_out",),  # attention and MLP inside one residual
    },
}
COMPILED = {"dit": "aot_eager"}


@pytest.fixture(scope="module")
def results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only spin on a shared 2-core machine
    try:
        yield {name: checks.run_family(name, COMPILED.get(name), bf16=False) for name in EXPECTED}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("family", EXPECTED)
def test_family_is_green(results, family):
    result = results[family]
    assert not result.errors
    assert result.branches == EXPECTED[family]
    assert result.expected_ok
    assert result.all_compute_diff <= checks.ALL_COMPUTE_TOL
    assert result.cached_diff <= checks.CACHED_TOL
    assert result.counts_ok
    assert result.cache_effect > checks.MIN_CACHE_EFFECT
    assert result.graph_form_diff <= checks.CACHED_TOL
    assert result.green


def test_compiled_family_has_no_graph_breaks_or_recompiles(results):
    result = results["dit"]
    assert result.compile_backend == "aot_eager"
    assert result.compiled_graphs == 2  # one structure, two masks (compute all / reuse all)
    assert result.graph_breaks == 0
    assert result.recompiles == 0
    assert result.compile_diff <= checks.COMPILED_TOL


def test_table_has_the_command_and_one_row_per_family(results):
    table = coverage_report.render_table(list(results.values()), "python tests/coverage_report.py --out X.md")
    assert "python tests/coverage_report.py --out X.md" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(EXPECTED)
    assert "**4 of 4 families green.**" in table
    assert "`FluxSingleTransformerBlock` ×1 (single_transformer_blocks.0): proj_out" in table


def test_a_wrong_expectation_is_reported_not_raised(monkeypatch):
    family = FAMILIES["dit"]
    wrong = Family(family.model_class, family.config, family.inputs, {"*": ("attn1", "attn2", "ff")})
    monkeypatch.setitem(FAMILIES, "dit", wrong)
    result = checks.run_family("dit", compile_backend=None, bf16=False)
    assert result.expected_ok is False and not result.green
    assert result.branches["transformer_blocks.0"] == ("attn1", "ff")
    assert result.all_compute_diff is not None  # rerun on the branches that were found
    assert "expected {" in coverage_report.render_table([result], "cmd")


def test_cli_rejects_unknown_families():
    with pytest.raises(SystemExit):
        coverage_report.main(["--families", "dit,nope"])


# -- the pattern's generalisations, on blocks the diffusers subset above does not cover ---------------
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
