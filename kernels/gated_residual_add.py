"""The fused gated residual add that every rewritten residual branch runs through.

`out = residual + gate * branch`, and when `cache` is given, `branch` is written into `cache` in the
same pass. A reused branch calls the same op with the cache as `branch` and no cache to write.
Registered as `torch.ops.smoothcache_fx.gated_residual_add` with `cache` in `mutates_args`, so
torch.compile and torch.export see one opaque op that writes the cache buffer in place.
"""

from __future__ import annotations

import torch

OP_NAME = "smoothcache_fx::gated_residual_add"


def gated_residual_add_reference(
    residual: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor | None = None,
    cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch oracle: the same two ops, in the same order, as the model's own code.

    `residual + gate * branch` (not addcmul) so the result is bit-identical to the untransformed block.
    """
    if cache is not None:
        cache.copy_(branch)
    update = branch if gate is None else gate * branch
    return residual + update


@torch.library.custom_op(OP_NAME, mutates_args=("cache",))
def gated_residual_add(
    residual: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor | None = None,
    cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """`residual + gate * branch`, writing `branch` into `cache` when one is given."""
    return gated_residual_add_reference(residual, branch, gate, cache)


@gated_residual_add.register_fake
def _gated_residual_add_fake(residual, branch, gate=None, cache=None):
    update = branch if gate is None else gate * branch
    return torch.empty_like(residual + update)
