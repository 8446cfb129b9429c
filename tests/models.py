"""Small models for tests: diffusers DiT families from tiny configs and two hand-written block styles.

The hand-written blocks mirror facebookresearch/DiT (`x = x + gate.unsqueeze(1) * attn(modulate(...))`)
and U-ViT (pre-norm residuals with no gate), so the pass is tested on code it has never seen.
"""

from __future__ import annotations

import torch
from torch import nn

HIDDEN = 32
TOKENS = 16
HEADS = 2


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """facebookresearch/DiT's block: adaLN-Zero modulation, gated residuals for attn and mlp."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class UViTBlock(nn.Module):
    """U-ViT's block: pre-norm residuals with no gate (conditioning enters as tokens)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class TinyDiT(nn.Module):
    """A facebookresearch-DiT-style denoiser on token sequences: forward(x, t, y)."""

    def __init__(self, depth: int = 2, dim: int = HIDDEN, heads: int = HEADS, num_classes: int = 10):
        super().__init__()
        self.x_embed = nn.Linear(dim, dim)
        self.t_embed = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(num_classes, dim)
        self.blocks = nn.ModuleList([DiTBlock(dim, heads) for _ in range(depth)])
        self.final = nn.Linear(dim, dim)
        # adaLN-Zero initialises gates to zero; random gates make the residual branches matter.
        for block in self.blocks:
            nn.init.normal_(block.adaLN_modulation[1].weight, std=0.2)

    def forward(self, x, t, y):
        c = self.t_embed(t.float().view(-1, 1) / 1000) + self.y_embed(y)
        h = self.x_embed(x)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h)


class TinyUViT(nn.Module):
    """A U-ViT-style denoiser: conditioning tokens prepended, long skip between halves."""

    def __init__(self, depth: int = 2, dim: int = HIDDEN, heads: int = HEADS, num_classes: int = 10):
        super().__init__()
        self.x_embed = nn.Linear(dim, dim)
        self.t_embed = nn.Linear(1, dim)
        self.y_embed = nn.Embedding(num_classes, dim)
        self.in_blocks = nn.ModuleList([UViTBlock(dim, heads) for _ in range(depth)])
        self.skip = nn.Linear(2 * dim, dim)
        self.out_blocks = nn.ModuleList([UViTBlock(dim, heads) for _ in range(depth)])
        self.final = nn.Linear(dim, dim)

    def forward(self, x, t, y):
        cond = torch.stack([self.t_embed(t.float().view(-1, 1) / 1000), self.y_embed(y)], dim=1)
        h = torch.cat([cond, self.x_embed(x)], dim=1)
        skips = []
        for block in self.in_blocks:
            h = block(h)
            skips.append(h)
        for block in self.out_blocks:
            h = self.skip(torch.cat([h, skips.pop()], dim=-1))
            h = block(h)
        return self.final(h[:, 2:])


def tiny_dit_inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TOKENS, HIDDEN, generator=g), torch.randint(0, 10, (batch,), generator=g)


def diffusers_dit(num_layers: int = 2, seed: int = 0):
    """DiTTransformer2DModel: BasicTransformerBlock with ada_norm_zero (attn1, ff, gated)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    return randomise_zero_init(model).eval()


def diffusers_pixart(num_layers: int = 2, seed: int = 0):
    """PixArtTransformer2DModel: ada_norm_single; attn1 and ff gated, attn2 (cross) ungated."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=24,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    return randomise_zero_init(model).eval()


def pixart_inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 24, generator=g),
    }


def randomise_zero_init(model: nn.Module) -> nn.Module:
    """diffusers zero-initialises adaLN gates and output projections; with random weights that would
    make every branch contribute nothing, so every parameter that is all zeros gets small noise.

    The one definition for the tests, the coverage families and the benchmarks, so a branch that
    matters in one matters in all. std 0.2: large enough that a reused branch moves the outputs of
    the tiny test models well past their tolerances. Empty parameters (zero-size in some diffusers
    configs) are left alone. Modifies `model` in place and returns it.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() and param.abs().max() == 0:
                param.normal_(std=0.2)
    return model


def dit_pipeline(num_layers: int = 2, seed: int = 0):
    """diffusers DiTPipeline around the tiny DiT, a tiny random VAE and DDIM; CFG batches cond+uncond."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
    ).eval()
    pipe = DiTPipeline(transformer=diffusers_dit(num_layers, seed), vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_text_pipeline(seed: int = 0):
    """A text-to-image PixArtAlphaPipeline small enough for the CLI tests: a word-level tokenizer
    built here (no hub files), a one-layer T5 encoder, the tiny PixArt transformer at sample_size
    32 (the smallest that PixArt's resolution binning accepts: 256x256 images) and a 4-level VAE
    (vae_scale_factor 8, so 32x32 latents, 256 tokens)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtTransformer2DModel,
    )
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "red", "blue", "cat", "dog"]
    word_level = Tokenizer(WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(words), d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    text_encoder = T5EncoderModel(config).eval()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        sample_size=32,
        patch_size=2,
        caption_channels=24,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8,) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=randomise_zero_init(transformer).eval(),
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
