"""One FLOP count for the whole project: profile's ideal speedup, calibrate's branch costs, benchmarks.

torch's `FlopCounterMode` counts matmul-class ops (linear, bmm, conv, attention kernels) and treats
elementwise work as free. On CPU it has no formula for the attention kernel (see
`kernels/compat.py`), so attention's QK^T and PV matmuls would be left out: a large share of a DiT's
FLOPs at long sequences, and all of what an attention branch saves beyond its projections. Counts
that differ on that point give the same model two ideal speedups (`calibrate`'s schedule target and
`profile`'s report disagreed), so every FLOP count in the project is made by `flop_counter()`.
"""

from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode

from smoothcache_fx.kernels.compat import cpu_sdpa_flop_formulas

__all__ = ["flop_counter"]


def flop_counter() -> FlopCounterMode:
    """A new `FlopCounterMode` that prints nothing and also counts attention on CPU.

    Enter it as a context manager around the calls to count; `get_total_flops()` is the running
    total (also inside the context, which is how per-call and per-module counts are taken as
    differences), `get_flop_counts()` the same per module and op. Each entry starts from zero.

    Returns:
        A `torch.utils.flop_counter.FlopCounterMode` with `display=False`.

    Example::

        >>> import torch
        >>> q = torch.randn(1, 2, 16, 8)  # batch, heads, tokens, head dim
        >>> with flop_counter() as counter:
        ...     _ = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        >>> counter.get_total_flops() == 4 * 1 * 2 * 16 * 16 * 8  # QK^T and PV, 2 FLOPs per MAC
        True
    """
    return FlopCounterMode(display=False, custom_mapping=cpu_sdpa_flop_formulas())
