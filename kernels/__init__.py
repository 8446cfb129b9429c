"""Kernels for smoothcache_fx: each op beside its plain-PyTorch reference and its registration."""

from smoothcache_fx.kernels.gated_residual_add import (
    gated_residual_add,
    gated_residual_add_and_cache,
    gated_residual_add_decomposed,
    gated_residual_add_reference,
    gated_residual_add_triton,
)
from smoothcache_fx.kernels.gated_residual_forecast import (
    gated_residual_add_and_history,
    gated_residual_add_and_history_reference,
    gated_residual_forecast,
    gated_residual_forecast_reference,
    gated_residual_history_triton,
)

__all__ = [
    "gated_residual_add",
    "gated_residual_add_and_cache",
    "gated_residual_add_decomposed",
    "gated_residual_add_reference",
    "gated_residual_add_triton",
    "gated_residual_add_and_history",
    "gated_residual_add_and_history_reference",
    "gated_residual_forecast",
    "gated_residual_forecast_reference",
    "gated_residual_history_triton",
]
