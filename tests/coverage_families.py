"""Model coverage, the families: every diffusers DiT family the pass is checked on, built tiny.

What a family needs is declared in `FAMILIES`: the diffusers class, a tiny config, an input builder
and the branches the pass must find per block. No adapters: every family is reached through the
pass's one pattern (`passes/branches.py`), so a family is data, not code. diffusers is imported only
when a family is built. The checks that run on each family are in `coverage_checks.py`, the table
and its command in `coverage_report.py`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from models import randomise_zero_init


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
                "model coverage builds diffusers models, so diffusers must be installed; install it "
                'with `pip install -e ".[test]"` in the checkout (or `pip install diffusers`).'
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
