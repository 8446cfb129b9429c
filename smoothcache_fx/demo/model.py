"""The embedded demo model: a class-conditional diffusers DiT trained on scikit-learn's 8x8 digits.

No weights can be downloaded where this project is tested, so a real trained DiT ships inside the
package (`dit_digits.safetensors`, written by `python -m smoothcache_fx.demo.train`). It is small
enough that 50 guided steps for 10 digits take ~1.2 s on one shared CPU core, yet its blocks behave like a
real DiT's: adjacent-step changes of attn1/ff outputs are what SmoothCache calibrates on, and the
shipped digits classifier (`classifier.py`) scores whether caching kept samples recognisable.
"""

from __future__ import annotations

import json

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

from smoothcache_fx.demo.weights import WEIGHTS_DIR, load_shipped_weights

DIT_WEIGHTS = "dit_digits.safetensors"
DIT_INFO = "dit_digits.json"

NUM_CLASSES = 10
# diffusers' LabelEmbedding adds one extra row when class_dropout_prob > 0 (the default 0.1 of
# AdaLayerNormZero), at index num_classes: the "null" label that classifier-free guidance uses.
NULL_CLASS = NUM_CLASSES

# 6 blocks of 4 heads x 32 (hidden 128), patch 2 on 8x8 pixels = 16 tokens: about 2M parameters,
# the size a teammate measured to reach >90% recognisable samples in ~10 CPU-minutes of training.
DEMO_CONFIG = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,  # eps-prediction only, no learned sigma
    "num_layers": 6,
    "sample_size": 8,
    "patch_size": 2,
    "num_embeds_ada_norm": NUM_CLASSES,
}

# squaredcos_cap_v2 (the improved-DDPM cosine schedule) suits tiny pixel-space images better than
# the linear one; "trailing" spacing makes a short DDIM run start at t=999 (pure noise); samples are
# pixels in [-1, 1], so clipping the predicted x0 to that range is exact, not a hack.
DEMO_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "timestep_spacing": "trailing",
    "set_alpha_to_one": True,
}

# Measured on the shipped weights (dit_digits.json, 200 samples, 50 steps): guidance 1.0 / 1.5 / 2.0 / 3.0
# gives 97% / 98.5% / 62% / 16% classifier accuracy. Above ~1.5 this tiny pixel-space model's
# guided eps amplifies speckle noise on the background, which the classifier reads as an "8".
DEFAULT_GUIDANCE_SCALE = 1.5


def build_demo_model() -> DiTTransformer2DModel:
    """An untrained DiT with `DEMO_CONFIG` (what training starts from and loading fills in)."""
    return DiTTransformer2DModel(**DEMO_CONFIG)


def load_demo_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Returns the shipped digits DiT in eval mode (weights are stored fp16, computed in `dtype`).

    Eval mode matters beyond style: in training mode diffusers' LabelEmbedding randomly replaces
    labels by the null class, so a model left in train mode would ignore its class 10% of the time.
    """
    model = load_shipped_weights(build_demo_model(), DIT_WEIGHTS, "demo")
    model.to(device)
    if dtype != torch.float32:  # diffusers warns on any .to(dtype=...), even a no-op one
        model.to(dtype)
    return model.eval()


def demo_info() -> dict:
    """The training record shipped beside the weights (steps, seed, loss, measured accuracy)."""
    return json.loads((WEIGHTS_DIR / DIT_INFO).read_text())


def make_scheduler(num_steps: int) -> DDIMScheduler:
    """A fresh DDIMScheduler as used in training, with `num_steps` inference timesteps set."""
    scheduler = DDIMScheduler(**DEMO_SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_steps)
    return scheduler


@torch.no_grad()
def generate(
    model,
    class_labels,
    num_steps: int = 50,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    generator: torch.Generator | None = None,
    scheduler: DDIMScheduler | None = None,
) -> torch.Tensor:
    """Samples digits with a plain DDIM loop: exactly one model call per schedule step.

    With guidance_scale > 1 the conditional and null-class halves go through one batched call, as
    diffusers' DiTPipeline does, so a SmoothCache schedule of `num_steps` entries lines up with the
    model calls one to one (a transformed model's step clock advances once per call).

    Args:
        model: the demo DiT (or a transformed copy of it) taking (x, timestep=, class_labels=).
        class_labels: ints in [0, 9], one per sample.
        num_steps: DDIM steps; ignored when `scheduler` is given (its timesteps are used).
        guidance_scale: classifier-free guidance weight; 1.0 disables it (no null-class half).
        generator: seeds the initial noise (DDIM with eta=0 adds no noise after it).
        scheduler: a DDIMScheduler with timesteps already set; `make_scheduler(num_steps)` if None.

    Returns:
        Images [B, 1, 8, 8] in [-1, 1], float32 on the model's device.
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"class_labels must lie in [0, {NUM_CLASSES - 1}]; got {labels.tolist()}.")
    scheduler = scheduler if scheduler is not None else make_scheduler(num_steps)
    size = DEMO_CONFIG["sample_size"]
    x = torch.randn(labels.shape[0], 1, size, size, generator=generator, dtype=torch.float32)
    x = x.to(device)
    use_cfg = guidance_scale > 1.0
    if use_cfg:
        labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    for t in scheduler.timesteps:
        x_in = torch.cat([x, x]) if use_cfg else x
        timestep = torch.full((x_in.shape[0],), int(t), device=device, dtype=torch.long)
        eps = model(x_in.to(dtype), timestep=timestep, class_labels=labels).sample.float()
        if use_cfg:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(eps, t, x).prev_sample
    return x.clamp(-1.0, 1.0)
