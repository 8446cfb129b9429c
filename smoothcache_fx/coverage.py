"""Model coverage: the pass on every diffusers DiT family, from tiny random configs.

Each family is built from a tiny config with random weights (every all-zero parameter, such as an
adaLN-Zero gate or a zero-initialised output projection, gets small noise so every branch matters)
and put through one contract suite:

(a) all-compute: `Schedule.all_compute` over every branch found equals the original model (such a
    schedule leaves never-reused branches as the model wrote them: this checks the capture), and
    so do the steps of (b) that compute every branch through the fused op, in fp32 and (within two
    ulps) in bfloat16, where some blocks add in fp32 around a bf16 branch;
(b) cached: `Schedule.uniform(STEPS, INTERVAL, components)` equals the forward-patching reference
    (`tests/forward_patching_reference.py`, which patches each branch's child module), and changes
    the output (the schedule did something);
(c) compiled: `transform(..., compile=True)` runs with no graph breaks and, after a warm-up
    generation, no recompiles, and equals the eager cached run;
(d) the branches found per block are the expected ones, written per family below;
(e) graph form: `transform(..., form="graph")` (torch.cond per component, the deployment form that
    torch.export takes) equals the cached run of (b).

No adapters: families are reached through the pass's one pattern (`passes/branches.py`). What a
family needs is declared in `FAMILIES`: the diffusers class, a tiny config, an input builder and the
expected branches. diffusers is imported only when a family is built.

    python -m smoothcache_fx.coverage [--families dit,flux] [--out COVERAGE.md]
                                      [--compile-backend inductor|aot_eager|none] [--no-bf16]

The forward-patching reference lives in the test suite, so (b) needs a source checkout.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import importlib.util
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils._pytree import tree_map_only

STEPS = 4
INTERVAL = 2
BATCH = 2
# fp32 throughout: the fused op computes `residual + gate * branch` with the same ops in the same
# order as the blocks, so all-compute and cached runs are expected to match to rounding (measured:
# 0 or a few 1e-7 on these models); 1e-5 leaves room for reassociation, none for a wrong branch.
ALL_COMPUTE_TOL = 1e-5
CACHED_TOL = 1e-5
# bf16 fused-op steps: the op computes eager's own `residual + gate * branch` into a contiguous
# tensor; where the model's own add left another layout (Sana's conv feed-forward, permuted back to
# tokens), a following bf16 linear rounds differently: 1 ulp of the output seen on Sana, exact on
# the rest. Two ulps of the largest output, relative: 2 * 2^-8.
BF16_REL_TOL = 2.0**-7
# Compiled variants may fuse and reorder float ops (inductor's C++ kernels); 1e-4 on outputs of
# magnitude ~1 is still far below the effect of a single reused branch (>1e-2 on every family).
COMPILED_TOL = 1e-4
# A reuse step must move the output by more than this, or the cached run tested nothing.
MIN_CACHE_EFFECT = 1e-3
REFERENCE_PATH = Path(__file__).resolve().parents[1] / "tests" / "forward_patching_reference.py"


# -- input builders: (batch, step) -> forward kwargs; fixed latents, step-dependent timestep ---------
def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def _timestep(batch: int, step: int, scale: float = 1000.0, dtype=torch.float32) -> torch.Tensor:
    """A decreasing timestep, as a sampler would pass: scale * (0.9 - 0.2 * step)."""
    return torch.full((batch,), scale * (0.9 - 0.2 * step), dtype=dtype)


def _dit_inputs(batch: int, step: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "timestep": _timestep(batch, step, dtype=torch.long),
        "class_labels": torch.arange(batch) % 10,
    }


def _pixart_inputs(batch: int, step: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, 5, 24),
        "timestep": _timestep(batch, step, dtype=torch.long),
    }


def _sd3_inputs(batch: int, step: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, 5, 16),
        "pooled_projections": _randn(g, batch, 16),
        "timestep": _timestep(batch, step),
    }


def _flux_inputs(batch: int, step: int) -> dict:
    g = torch.Generator().manual_seed(0)
    height = width = 4
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    return {
        "hidden_states": _randn(g, batch, height * width, 4),
        "encoder_hidden_states": _randn(g, batch, 5, 16),
        "pooled_projections": _randn(g, batch, 16),
        "timestep": _timestep(batch, step, scale=1.0),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(5, 3),
    }


def _stable_audio_inputs(batch: int, step: int) -> dict:
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    g = torch.Generator().manual_seed(0)
    length = 8
    return {
        "hidden_states": _randn(g, batch, 4, length),
        "timestep": _timestep(batch, step, scale=1.0),
        "encoder_hidden_states": _randn(g, batch, 5, 16),
        "global_hidden_states": _randn(g, batch, 1, 16),
        # As StableAudioPipeline builds it: half the head dim, latents plus the global token.
        "rotary_embedding": get_1d_rotary_pos_embed(
            4, length + 1, use_real=True, repeat_interleave_real=False
        ),
    }


def _hunyuan_inputs(batch: int, step: int) -> dict:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    g = torch.Generator().manual_seed(0)
    grid = 8 // 2  # sample 8x8, patch 2
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "timestep": _timestep(batch, step),
        "encoder_hidden_states": _randn(g, batch, 6, 32),
        "text_embedding_mask": torch.ones(batch, 6, dtype=torch.long),
        "encoder_hidden_states_t5": _randn(g, batch, 7, 32),
        "text_embedding_mask_t5": torch.ones(batch, 7, dtype=torch.long),
        "image_meta_size": torch.tensor([[8, 8, 8, 8, 0, 0]] * batch, dtype=torch.float32),
        "style": torch.zeros(batch, dtype=torch.long),
        "image_rotary_emb": get_2d_rotary_pos_embed(
            8, ((0, 0), (grid, grid)), (grid, grid), output_type="pt"
        ),
    }


def _latte_inputs(batch: int, step: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": _randn(g, batch, 4, 2, 8, 8),  # (batch, channels, frames, height, width)
        "encoder_hidden_states": _randn(g, batch, 5, 32),
        "timestep": _timestep(batch, step, dtype=torch.long),
    }


def _cogvideox_inputs(batch: int, step: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": _randn(g, batch, 2, 4, 8, 8),  # (batch, frames, channels, height, width)
        "encoder_hidden_states": _randn(g, batch, 8, 8),
        "timestep": _timestep(batch, step, dtype=torch.long),
    }


def _sana_inputs(batch: int, step: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, 5, 8),
        "timestep": _timestep(batch, step),
    }


def _auraflow_inputs(batch: int, step: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, 5, 16),
        "timestep": _timestep(batch, step, scale=1.0),
    }


def _lumina_next_inputs(batch: int, step: int) -> dict:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "timestep": _timestep(batch, step, scale=1.0),
        "encoder_hidden_states": _randn(g, batch, 5, 32),
        "encoder_mask": torch.ones(batch, 5, dtype=torch.long),
        # As LuminaPipeline builds it: head dim 8, a grid larger than the patched latents.
        "image_rotary_emb": get_2d_rotary_pos_embed_lumina(8, 16, 16),
        "cross_attention_kwargs": {},  # the blocks unpack it with ** (LuminaPipeline passes one)
    }


def _lumina2_inputs(batch: int, step: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "timestep": _timestep(batch, step, scale=1.0),
        "encoder_hidden_states": _randn(g, batch, 5, 16),
        "encoder_attention_mask": torch.ones(batch, 5, dtype=torch.bool),
    }


def _wan_inputs(batch: int, step: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": _randn(g, batch, 4, 2, 8, 8),  # (batch, channels, frames, height, width)
        "timestep": _timestep(batch, step, dtype=torch.long),
        "encoder_hidden_states": _randn(g, batch, 5, 16),
    }


_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
            pos_embed_max_size=16)  # fmt: skip


# -- the families --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One diffusers DiT family: how to build it tiny, call it, and which branches the pass must find.

    Attributes:
        model_class: the diffusers class name.
        config: tiny constructor kwargs (1-4 layers, 2 heads, small samples).
        inputs: (batch, step) -> forward kwargs; everything but the timestep is fixed across steps.
        expected: block path glob -> the components expected there, first match wins.
        notes: what is worth knowing about the family's structure.
    """

    model_class: str
    config: Mapping
    inputs: Callable[[int, int], dict]
    expected: Mapping[str, tuple[str, ...]]
    notes: str = ""

    def build(self, seed: int = 0) -> torch.nn.Module:
        try:
            import diffusers
        except ImportError as error:
            raise ImportError(
                "model coverage builds diffusers models; install them with "
                "`pip install smoothcache-fx[diffusers]` (or `pip install diffusers`)."
            ) from error
        torch.manual_seed(seed)
        model = getattr(diffusers, self.model_class)(**self.config)
        return randomise_zero_init(model).eval()

    @property
    def components(self) -> list[str]:
        """Every expected component, in table order."""
        return list(dict.fromkeys(c for found in self.expected.values() for c in found))

    def expected_for(self, path: str) -> tuple[str, ...] | None:
        for pattern, components in self.expected.items():
            if fnmatch.fnmatchcase(path, pattern):
                return components
        return None


# Tiny configs: 1-4 layers, 2 heads, 8x8 latents; block counts chosen to hit every block kind (SD3's
# context_pre_only last block, Hunyuan's long-skip block, Lumina2's refiners).
# fmt: off
FAMILIES: dict[str, Family] = {
    "dit": Family(
        "DiTTransformer2DModel",
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
             sample_size=8, patch_size=2, num_embeds_ada_norm=1000),
        _dit_inputs,
        {"transformer_blocks.*": ("attn1", "ff")},
    ),
    "pixart": Family(
        "PixArtTransformer2DModel",
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
             cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=24,
             norm_type="ada_norm_single", use_additional_conditions=False),
        _pixart_inputs,
        {"transformer_blocks.*": ("attn1", "attn2", "ff")},
        "PixArt-alpha and -sigma share this class; attn2 (cross-attention) is ungated",
    ),
    "sd3": Family(
        "SD3Transformer2DModel",
        dict(_SD3, num_layers=2),
        _sd3_inputs,
        {"transformer_blocks.1": ("attn", "ff"), "transformer_blocks.*": ("attn", "ff", "ff_context")},
        "joint attention returns both streams (one component, two sites); the last block is "
        "context_pre_only (no context residuals)",
    ),
    "sd35": Family(
        "SD3Transformer2DModel",
        dict(_SD3, num_layers=2, dual_attention_layers=(0,), qk_norm="rms_norm"),
        _sd3_inputs,
        {"transformer_blocks.0": ("attn", "attn2", "ff", "ff_context"), "transformer_blocks.1": ("attn", "ff")},
        "SD3.5 (MMDiT-X): a dual-attention block (attn2 on the image stream), qk rms-norm",
    ),
    "flux": Family(
        "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
             axes_dims_rope=(4, 4, 8)),
        _flux_inputs,
        {"transformer_blocks.*": ("attn", "ff", "ff_context"), "single_transformer_blocks.*": ("proj_out",)},
        "single-stream block: attention and MLP run in parallel inside one residual "
        "(`residual + gate * proj_out(cat(attn, mlp))`), so its one branch is proj_out",
    ),
    "stable-audio": Family(
        "StableAudioDiTModel",
        dict(sample_size=8, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16, time_proj_dim=8,
             global_states_input_dim=16, cross_attention_input_dim=16),
        _stable_audio_inputs,
        {"transformer_blocks.*": ("attn1", "attn2", "ff")},
        "ungated pre-norm residuals; rotary embedding passed as a (cos, sin) tuple",
    ),
    "hunyuan-dit": Family(
        "HunyuanDiT2DModel",
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
             hidden_size=16, num_layers=4, cross_attention_dim=32, cross_attention_dim_t5=32,
             pooled_projection_dim=16, text_len=6, text_len_t5=7),
        _hunyuan_inputs,
        {"blocks.*": ("attn1", "attn2", "ff")},
        "blocks.3 takes the long skip (`skip=`, skip_norm + skip_linear before the residuals)",
    ),
    "latte": Family(
        "LatteTransformer3DModel",
        dict(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
             caption_channels=32, in_channels=4, cross_attention_dim=16, out_channels=8,
             attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
             norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, video_length=2),
        _latte_inputs,
        {"transformer_blocks.*": ("attn1", "attn2", "ff"), "temporal_transformer_blocks.*": ("attn1", "ff")},
        "spatial and temporal BasicTransformerBlocks in two ModuleLists",
    ),
    "cogvideox": Family(
        "CogVideoXTransformer3DModel",
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
             text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=5,
             patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8),
        _cogvideox_inputs,
        {"transformer_blocks.*": ("attn1", "ff")},
        "text and video streams: attn1 returns both; ff runs on their concatenation and its output is "
        "sliced per stream (slices are pass-through)",
    ),
    "sana": Family(
        "SanaTransformer2DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4, num_layers=2,
             num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8,
             caption_channels=8, sample_size=8, patch_size=1),
        _sana_inputs,
        {"transformer_blocks.*": ("attn1", "attn2", "ff")},
        "linear attention; the conv feed-forward's output is flattened and permuted back to tokens "
        "(permutes are pass-through)",
    ),
    "auraflow": Family(
        "AuraFlowTransformer2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
             attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
             joint_attention_dim=16, out_channels=4, pos_embed_max_size=64),
        _auraflow_inputs,
        {"joint_transformer_blocks.*": ("attn", "ff", "ff_context"),
         "single_transformer_blocks.*": ("attn", "ff")},
        "the attention update is normed (norm2) and feeds only the ff input: the ff residual is the "
        "block input",
    ),
    "lumina-next": Family(
        "LuminaNextDiT2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2,
             num_attention_heads=2, num_kv_heads=1, multiple_of=16, norm_eps=1e-5, learn_sigma=True,
             qk_norm=True, cross_attention_dim=32, scaling_factor=1.0),
        _lumina_next_inputs,
        {"layers.*": ("norm2", "ffn_norm2")},
        "sandwich norms: residuals add `tanh(gate) * norm2(attention)` and `ffn_norm2(feed_forward)`, "
        "so the components are the post-norms (skipping norm2 skips attn1, attn2 and the norm); "
        "`attn1 + gate * attn2` feeds attn2.to_out and is not a residual",
    ),
    "lumina2": Family(
        "Lumina2Transformer2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2,
             num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
             axes_dim_rope=(2, 2, 4), axes_lens=(32, 32, 32), cap_feat_dim=16),
        _lumina2_inputs,
        {"*": ("norm2", "ffn_norm2")},
        "sandwich norms as Lumina-Next; the noise and context refiners are blocks too (context_refiner "
        "has no modulation: ungated)",
    ),
    "wan": Family(
        "WanTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
             out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
        _wan_inputs,
        {"blocks.*": ("attn1", "attn2", "ffn")},
        "residual adds in fp32 (`.float()` / `.type_as`, no-ops at fp32); gate from a block-level "
        "scale_shift_table",
    ),
}
# fmt: on


def randomise_zero_init(model: torch.nn.Module) -> torch.nn.Module:
    """diffusers zero-initialises adaLN gates and output projections; with random weights that would
    make branches contribute nothing, so every parameter that is all zeros gets small noise."""
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() and param.abs().max() == 0:
                param.normal_(std=0.2)
    return model


# -- the contract suite -------------------------------------------------------------------------------
@dataclass
class FamilyResult:
    """What the contract suite found for one family; `None` where a check did not run."""

    family: str
    model_class: str = ""
    blocks: dict[str, str] = field(default_factory=dict)  # block path -> class name
    branches: dict[str, tuple[str, ...]] = field(default_factory=dict)  # block path -> components
    expected_ok: bool | None = None
    all_compute_diff: float | None = None
    bf16_diff: float | None = None
    bf16_scale: float | None = None  # max |output| of the bf16 model
    cached_diff: float | None = None
    cache_effect: float | None = None
    counts_ok: bool | None = None
    compile_backend: str | None = None
    compile_diff: float | None = None
    graph_breaks: int | None = None
    recompiles: int | None = None
    compiled_graphs: int | None = None
    graph_form_diff: float | None = None
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def all_compute_ok(self) -> bool:
        return self.all_compute_diff is not None and self.all_compute_diff <= ALL_COMPUTE_TOL

    @property
    def bf16_ok(self) -> bool | None:
        if self.bf16_diff is None:
            return None
        return self.bf16_diff <= BF16_REL_TOL * self.bf16_scale

    @property
    def cached_ok(self) -> bool:
        return (
            self.cached_diff is not None
            and self.cached_diff <= CACHED_TOL
            and bool(self.counts_ok)
            and (self.cache_effect or 0.0) > MIN_CACHE_EFFECT
        )

    @property
    def compile_ok(self) -> bool | None:
        if self.compile_backend is None:
            return None
        return (
            self.compile_diff is not None
            and self.compile_diff <= COMPILED_TOL
            and self.graph_breaks == 0
            and self.recompiles == 0
        )

    @property
    def graph_form_ok(self) -> bool:
        return self.graph_form_diff is not None and self.graph_form_diff <= CACHED_TOL

    @property
    def green(self) -> bool:
        return (
            bool(self.expected_ok)
            and self.all_compute_ok
            and self.bf16_ok is not False
            and self.cached_ok
            and self.compile_ok is not False
            and self.graph_form_ok
            and not self.errors
        )

    @property
    def components(self) -> list[str]:
        return list(dict.fromkeys(c for found in self.branches.values() for c in found))


def _generation(model: torch.nn.Module, family: Family, dtype: torch.dtype = torch.float32) -> list:
    """One generation's outputs, floating inputs cast to `dtype`."""
    outputs = []
    with torch.no_grad():
        for step in range(STEPS):
            inputs = tree_map_only(
                torch.Tensor, partial(_cast_floating, dtype=dtype), family.inputs(BATCH, step)
            )
            outputs.append(model(**inputs, return_dict=False)[0])
    return outputs


def _cast_floating(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _max_diff(expected: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(expected, got, strict=True))


def run_family(name: str, compile_backend: str | None = "inductor", bf16: bool = True) -> FamilyResult:
    """Run the contract suite (a)-(d) on one family; failures are recorded, not raised.

    Args:
        name: a key of `FAMILIES`.
        compile_backend: torch.compile backend for (c); None skips it.
        bf16: also run (a) with the model and inputs in bfloat16.
    """
    from smoothcache_fx import Schedule, transform
    from smoothcache_fx.transform import find_blocks

    family = FAMILIES[name]
    result = FamilyResult(name, family.model_class)
    start = time.perf_counter()
    try:
        original = family.build()
        result.blocks = {path: type(block).__name__ for path, block in find_blocks(original).items()}
        expected = _generation(original, family)

        # (a) all-compute equals the original; (d) the runtime's own branches are the expected ones
        model, outputs = _all_compute(original, family, family.components)
        result.branches = model.smoothcache.branches
        result.expected_ok = all(
            family.expected_for(path) == result.branches.get(path, ()) for path in result.blocks
        )
        components = result.components
        if outputs is None:  # an expected component was not found: rerun on what was
            model, outputs = _all_compute(original, family, components)
        result.all_compute_diff = _max_diff(expected, outputs)
        schedule = Schedule.uniform(STEPS, INTERVAL, components)
        fused_steps = list(range(0, STEPS, INTERVAL))  # every branch computes, through the fused op
        if bf16:  # the same in bfloat16, where residual adds may promote to fp32 around the branch
            low = copy.deepcopy(original).to(torch.bfloat16)
            want = _generation(low, family, torch.bfloat16)
            model = transform(low, schedule)
            got = _generation(model, family, torch.bfloat16)
            result.bf16_diff = _max_diff([want[i] for i in fused_steps], [got[i] for i in fused_steps])
            result.bf16_scale = max(out.float().abs().max().item() for out in want)

        # (b) a caching schedule equals forward patching of the same branches
        model = transform(copy.deepcopy(original), schedule)
        cached = _generation(model, family)
        result.all_compute_diff = max(
            result.all_compute_diff,
            _max_diff([expected[i] for i in fused_steps], [cached[i] for i in fused_steps]),
        )
        result.cache_effect = _max_diff(expected, cached)
        want, reference_counts = _reference_run(original, family, result.branches, schedule)
        result.cached_diff = _max_diff(want, cached)
        stats = model.smoothcache.stats
        result.counts_ok = reference_counts == {p: (s["computed"], s["reused"]) for p, s in stats.items()}

        # (e) the single-graph form gives the same outputs as the variants
        graph_form = transform(copy.deepcopy(original), schedule, form="graph")
        result.graph_form_diff = _max_diff(cached, _generation(graph_form, family))

        # (c) compiled: no graph breaks, no recompiles after a warm-up generation
        if compile_backend is not None:
            result.compile_backend = compile_backend
            _run_compiled(result, original, family, schedule, cached, compile_backend)
    except Exception as error:  # a family's failure is a row of the table, not the end of the run
        result.errors.append(_describe(error))
    result.seconds = time.perf_counter() - start
    return result


def _all_compute(original, family: Family, components: Sequence[str]):
    """A transformed copy under `Schedule.all_compute` and its outputs; outputs are None when a
    schedule key named no branch (the runtime raised after the first call, branches are known)."""
    from smoothcache_fx import Schedule, transform

    model = transform(copy.deepcopy(original), Schedule.all_compute(STEPS, components))
    try:
        return model, _generation(model, family)
    except ValueError as error:
        if "match no residual branch" not in str(error):
            raise
        return model, None


def _reference_run(original, family: Family, branches: Mapping, schedule) -> tuple[list, dict]:
    """Outputs of the forward-patching reference under `schedule`, and its (computed, reused) counts."""
    if not REFERENCE_PATH.exists():
        raise FileNotFoundError(
            f"the forward-patching reference must be at {REFERENCE_PATH}; run coverage from a source "
            "checkout of smoothcache_fx (pip install -e .)."
        )
    spec = importlib.util.spec_from_file_location("forward_patching_reference", REFERENCE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Full branch paths, so the reference patches exactly the modules the pass found.
    masks = {
        f"{path}.{c}": list(schedule.mask_for(f"{path}.{c}"))
        for path, found in branches.items()
        for c in found
    }
    components = sorted({c for found in branches.values() for c in found})
    model = copy.deepcopy(original)
    with module.ForwardPatchingReference(model, masks, components=components) as reference:
        outputs = _generation(model, family)
        counts = {path: (reference.computed[path], reference.reused[path]) for path in reference.patched}
    return outputs, counts


def _run_compiled(result, original, family, schedule, eager, backend) -> None:
    from torch._dynamo.utils import counters

    from smoothcache_fx import transform

    torch._dynamo.reset()
    counters.clear()
    try:
        model = transform(copy.deepcopy(original), schedule, compile=True, backend=backend)
        first = _generation(model, family)
        result.compiled_graphs = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
        counters.clear()
        again = _generation(model, family)
        result.graph_breaks = breaks + sum(counters["graph_break"].values())
        result.recompiles = sum(counters["recompiles"].values()) + counters["stats"]["unique_graphs"]
        result.compile_diff = max(_max_diff(eager, first), _max_diff(eager, again))
    finally:
        torch._dynamo.reset()


def _describe(error: BaseException) -> str:
    frame = traceback.extract_tb(error.__traceback__)[-1]
    message = " ".join(str(error).split())
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{type(error).__name__} at {Path(frame.filename).name}:{frame.lineno}: {message}"


# -- the table --------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "0 (exact)" if value == 0 else f"{value:.1e}"


def _check(ok: bool | None) -> str:
    return {True: "ok", False: "FAIL", None: "not run"}[ok]


def _branches_cell(result: FamilyResult) -> str:
    """Distinct (block class, components) rows with the block paths that have them."""
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for path, cls in result.blocks.items():
        groups.setdefault((cls, result.branches.get(path, ())), []).append(path)
    parts = []
    for (cls, components), paths in groups.items():
        found = ", ".join(components) or "none"
        parts.append(f"`{cls}` ×{len(paths)} ({_paths(paths)}): {found}")
    return "<br>".join(parts)


def _paths(paths: list[str]) -> str:
    if len(paths) <= 2:
        return ", ".join(paths)
    return f"{paths[0]} … {paths[-1]}"


def _compile_cell(result: FamilyResult) -> str:
    if result.compile_backend is None:
        return "not run"
    if result.compile_diff is None:
        return "FAIL"
    return (
        f"{_check(result.compile_ok)}: {result.compiled_graphs} graphs, {result.graph_breaks} breaks, "
        f"{result.recompiles} recompiles; vs eager {_fmt(result.compile_diff)}"
    )


def _notes(result: FamilyResult) -> str:
    notes = [FAMILIES[result.family].notes] if FAMILIES[result.family].notes else []
    if result.expected_ok is False:
        expected = {p: FAMILIES[result.family].expected_for(p) for p in result.blocks}
        notes.append(f"expected {expected}")
    if result.cached_diff is not None and (result.cache_effect or 0.0) <= MIN_CACHE_EFFECT:
        notes.append(f"schedule had no effect ({_fmt(result.cache_effect)})")
    if result.counts_ok is False:
        notes.append("computed/reused counts differ from the reference")
    notes += [f"**{error}**" for error in result.errors]
    return "; ".join(notes).replace("|", "\\|")


def render_table(results: Sequence[FamilyResult], command: str) -> str:
    """COVERAGE.md: the command, the criteria, one row per family."""
    green = sum(r.green for r in results)
    backends = sorted({r.compile_backend for r in results if r.compile_backend})
    lines = [
        "# Model coverage",
        "",
        "Generated by `smoothcache_fx/coverage.py`; do not edit by hand. Regenerate with:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"torch {torch.__version__}, diffusers {_diffusers_version()}, CPU, fp32 except where bf16 is named; compile backend: "
        f"{', '.join(backends) or 'none'}. **{green} of {len(results)} families green.**",
        "",
        f"Each family is built from a tiny config (`FAMILIES` in the module) with random weights, all-zero "
        f"parameters randomised, and called for {STEPS} steps at batch {BATCH} with fixed latents and a "
        "decreasing timestep. Rows call the transformer directly, one call per step; how a pipeline "
        "calls it (guidance, step counts) is not tested here. Columns:",
        "",
        "- **branches**: residual branches the runtime found per block (`model.smoothcache.branches`), "
        "checked against the family's expectation (d).",
        f"- **all-compute**: max |diff| vs the original model of `Schedule.all_compute` over every branch "
        f"and of the steps of the cached run below that compute every branch through the fused op (a; "
        f"pass <= {ALL_COMPUTE_TOL:g}).",
        "- **all-compute bf16**: those fused-op steps with model and inputs in bfloat16, as max |diff| *of* "
        f"the largest |output| (pass <= {BF16_REL_TOL:g} x that, one to two bf16 ulps; see `BF16_REL_TOL`).",
        f"- **cached**: max |diff| of `Schedule.uniform({STEPS}, {INTERVAL}, branches)` vs the "
        "forward-patching reference (`tests/forward_patching_reference.py`) patching the same modules, "
        f"with equal computed/reused counts (b; pass <= {CACHED_TOL:g}); *effect* is the same run's max "
        f"|diff| from the original (must exceed {MIN_CACHE_EFFECT:g}).",
        "- **compiled**: `transform(..., compile=True)`: compiled graphs in the warm-up generation, graph "
        "breaks over two generations, recompiles (and new graphs) in the second, max |diff| vs the eager "
        f"cached run (c; pass: 0 breaks, 0 recompiles, <= {COMPILED_TOL:g}).",
        '- **graph form**: `transform(..., form="graph")` (one graph, `torch.cond` per component), eager, '
        f"max |diff| vs the cached run (e; pass <= {CACHED_TOL:g}).",
        "",
        "| family | model class | branches per block | expected | all-compute | all-compute bf16 "
        "| cached vs reference | compiled | graph form | status | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(result) for result in results]
    return "\n".join(lines) + "\n"


def _row(r: FamilyResult) -> str:
    cached = _diff_cell(r.cached_ok, r.cached_diff)
    if r.cache_effect is not None:
        cached += f" (effect {_fmt(r.cache_effect)})"
    bf16 = _diff_cell(r.bf16_ok, r.bf16_diff)
    if r.bf16_scale is not None:
        bf16 += f" of {r.bf16_scale:.1f}"
    cells = [
        r.family,
        f"`{r.model_class}`",
        _branches_cell(r) or "n/a",
        _check(r.expected_ok),
        _diff_cell(r.all_compute_ok, r.all_compute_diff),
        bf16,
        cached,
        _compile_cell(r),
        _diff_cell(r.graph_form_ok if r.graph_form_diff is not None else None, r.graph_form_diff),
        "green" if r.green else "**red**",
        _notes(r),
    ]
    return "| " + " | ".join(cells) + " |"


def _diff_cell(ok: bool | None, diff: float | None) -> str:
    return "not run" if diff is None else f"{_check(ok)}: {_fmt(diff)}"


def _diffusers_version() -> str:
    try:
        import diffusers
    except ImportError:
        return "not installed"
    return diffusers.__version__


def _quiet_diffusers() -> None:
    """`.to(bfloat16)` logs that some modules (Wan's norms) should stay fp32; coverage casts on purpose."""
    try:
        from diffusers.utils import logging
    except ImportError:
        return
    logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smoothcache_fx.coverage",
        description="Run the coverage contract suite on diffusers DiT families and write COVERAGE.md.",
    )
    parser.add_argument(
        "--families", default=",".join(FAMILIES), help=f"comma-separated subset of {list(FAMILIES)}"
    )
    parser.add_argument("--out", default="COVERAGE.md", help="where to write the table")
    parser.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "none"])
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 all-compute check")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; the models are tiny, so 1 is fastest (default 1)",
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.families.split(",") if name.strip()]
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        parser.error(f"--families must name families from {list(FAMILIES)}; got unknown {unknown}.")
    torch.set_num_threads(args.threads)
    backend = None if args.compile_backend == "none" else args.compile_backend
    results = []
    with warnings.catch_warnings():
        # torch's pytree deprecation notices (raised inside deepcopy) and inductor's note on complex
        # rotary embeddings say nothing about coverage; the table records what failed.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", "Torchinductor does not support code generation for complex")
        _quiet_diffusers()
        for name in names:
            result = run_family(name, backend, bf16=not args.no_bf16)
            status = "green" if result.green else "RED"
            print(f"{name}: {status} ({result.seconds:.0f} s)", *result.errors, flush=True)
            results.append(result)
    parts = ["python -m smoothcache_fx.coverage"]
    if names != list(FAMILIES):
        parts.append(f"--families {','.join(names)}")
    parts += [f"--out {args.out}", f"--compile-backend {args.compile_backend}"]
    if args.no_bf16:
        parts.append("--no-bf16")
    command = " ".join(parts)
    Path(args.out).write_text(render_table(results, command))
    print(f"wrote {args.out}: {sum(r.green for r in results)} of {len(results)} families green")
    return 0 if all(r.green for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
