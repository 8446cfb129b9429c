"""Shared test helpers: step-by-step model calls on the test models."""

from __future__ import annotations

import models
import torch


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
