"""Kernels for smoothcache_fx: each op beside its plain-PyTorch reference and its registration."""

from smoothcache_fx.kernels.gated_residual_add import (
    gated_residual_add,
    gated_residual_add_and_cache,
    gated_residual_add_decomposed,
    gated_residual_add_reference,
    gated_residual_add_triton,
)

__all__ = [
    "gated_residual_add",
    "gated_residual_add_and_cache",
    "gated_residual_add_decomposed",
    "gated_residual_add_reference",
    "gated_residual_add_triton",
]
