"""Shared test helpers: step-by-step model calls on the test models, the block styles the pass is
checked on end to end, a block captured the way the runtime captures it (for direct pass tests),
and random calibration errors for schedule generators."""

from __future__ import annotations

import models
import numpy as np
import torch

from smoothcache_fx import CalibrationErrors
from smoothcache_fx.passes.capture import CapturedBlock, capture_block


def random_errors(seed: int = 0, steps: int = 12, lookahead: int = 3) -> CalibrationErrors:
    """Reuse errors of 3 blocks x (attn, mlp), uniform in [0, 0.5 * lag], FLOPs 40 and 70 of 400."""
    rng = np.random.default_rng(seed)
    curves, flops = {}, {}
    for block in range(3):
        for component, cost in (("attn", 40), ("mlp", 70)):
            path = f"blocks.{block}.{component}"
            curves[path] = [
                np.round(rng.uniform(0, 0.5, steps - k) * k, 3).tolist() for k in range(1, lookahead + 1)
            ]
            flops[path] = cost
    return CalibrationErrors(steps, lookahead, curves, flops, 400, model_class="Random")


def dit_call(model, step: int, batch: int = 2, dtype=torch.float32):
    """One denoising-step call of the diffusers DiT with fixed latents and a step-dependent timestep."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=g).to(dtype)
    t = torch.full((batch,), 50 * step + 1)
    y = torch.arange(batch) % 10
    return model(x, timestep=t, class_labels=y).sample


def pixart_call(model, step: int, batch: int = 2):
    return model(**models.pixart_inputs(batch), timestep=torch.full((batch,), 50 * step + 1)).sample


def tiny_call(model, step: int, batch: int = 2):
    x, y = models.tiny_dit_inputs(batch)
    return model(x, torch.full((batch,), 50 * step + 1), y)


def run_steps(model, call, steps: int, **kwargs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [call(model, step, **kwargs) for step in range(steps)]


# Block style -> (model factory, step call, the components its blocks have).
CASES = {
    "diffusers-dit": (models.diffusers_dit, dit_call, ("attn1", "ff")),
    "diffusers-pixart": (models.diffusers_pixart, pixart_call, ("attn1", "attn2", "ff")),
    "facebook-dit-block": (models.TinyDiT, tiny_call, ("attn", "mlp")),
    "uvit-block": (models.TinyUViT, tiny_call, ("attn", "mlp")),
}


def capture(block: torch.nn.Module, *args: torch.Tensor) -> tuple[CapturedBlock, list[torch.Tensor]]:
    """`block(*args)` captured as the runtime captures it, and the inputs its graph takes for that
    call (the block's parameters and buffers, lifted constants, then `args`)."""
    captured = capture_block(block, type(block).forward, args, {})
    state = {**dict(block.named_parameters()), **dict(block.named_buffers())}
    inputs = [*(state[name] for name in captured.state_names), *captured.constants, *args]
    return captured, inputs


def pipeline_images(pipe, steps: int):
    """One DiT pipeline generation of two fixed classes from a fixed seed, as numpy images."""
    return pipe(
        class_labels=[1, 7],
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
