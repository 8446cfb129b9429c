"""The forecast form of the fused gated residual add: history buffers instead of one cache.

A branch of predictor order k keeps a history buffer `[k + 1, *branch.shape]` of its last k+1
computed outputs, oldest first (`smoothcache_fx.schedules.forecast`). Two ops, one per path, so
that no op has a mutated argument that may be None (see `kernels/gated_residual_add.py`):

- `smoothcache_fx::gated_residual_add_and_history(residual, branch, gate, history)`: the compute
  path. Returns `residual + gate * branch` and shifts the history by one in the same pass: slot i
  takes slot i+1, the newest slot takes `branch`. `history` is the only mutated argument.
- `smoothcache_fx::gated_residual_forecast(residual, history, weights, gate=None)`: the skip
  path. Returns `residual + gate * sum_i weights[i] * history[i]`. Pure. `weights` is a small fp32
  tensor `[k + 1]`: the extrapolation weights of this step, a tensor rather than constants baked
  into the graph so that every skipped step of a branch shares one variant (and one compile).

Shifting instead of a ring buffer keeps the graph the same at every compute step (which slot is
newest would otherwise change per step, and with it the variant); it costs k extra reads and writes
of the branch's size on compute steps, which run the whole branch anyway.

By role: `_gated_residual_history_kernel` (Triton; FORECAST selects the path), the ops (launchers:
CPU tensors take the reference, CUDA tensors of a kernel dtype the kernel) and
`gated_residual_forecast_reference` / `gated_residual_add_and_history_reference` (the plain-PyTorch
oracles). Numerics: the prediction is summed in fp32 and rounded to the model's dtype before the
gate, as the reference does; the kernel then adds in fp32 and rounds once (see the sibling module).
"""

from __future__ import annotations

import torch

from smoothcache_fx.kernels.compat import quiet_missing_triton
from smoothcache_fx.kernels.gated_residual_add import (
    HAS_TRITON,
    KERNEL_DTYPES,
    TRITON_INTERPRET,
    _broadcast_strides_3d,
    _check_inputs,
)

FORECAST_OP_NAME = "smoothcache_fx::gated_residual_forecast"
AND_HISTORY_OP_NAME = "smoothcache_fx::gated_residual_add_and_history"


def gated_residual_forecast_reference(
    residual: torch.Tensor, history: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """`residual + gate * prediction`, `prediction = sum_i weights[i] * history[i]` summed in fp32
    and rounded once to the model's dtype (order 0, weights `[1.]`, is exactly the cached output)."""
    prediction = weights[0] * history[0].float()
    for i in range(1, history.shape[0]):
        prediction = prediction + weights[i] * history[i].float()
    prediction = prediction.to(residual.dtype)
    update = prediction if gate is None else gate * prediction
    out = residual + update
    return out if out.is_contiguous() else out.contiguous()


def gated_residual_add_and_history_reference(
    residual: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor | None, history: torch.Tensor
) -> torch.Tensor:
    """`residual + gate * branch`; the history shifted one slot towards the oldest, `branch` newest."""
    with torch.no_grad():  # the history holds values, never autograd history
        for i in range(history.shape[0] - 1):
            history[i].copy_(history[i + 1])
        history[-1].copy_(branch)
    update = branch if gate is None else gate * branch
    out = residual + update
    return out if out.is_contiguous() else out.contiguous()


def _check_history(residual: torch.Tensor, history: torch.Tensor, weights: torch.Tensor | None) -> None:
    """History `[k + 1, *residual.shape]`, contiguous (it is ours: allocated by the runtime), in
    residual's dtype and device; weights fp32 `[k + 1]` on the same device."""
    if history.dim() != residual.dim() + 1 or history.shape[1:] != residual.shape or history.shape[0] < 1:
        raise ValueError(
            f"history must be [k + 1, *residual.shape] = [k + 1, {', '.join(map(str, residual.shape))}]; "
            f"got {tuple(history.shape)}. Allocate one slot per kept output at the branch's shape."
        )
    if history.dtype != residual.dtype or history.device != residual.device:
        raise TypeError(
            f"history must have residual's dtype {residual.dtype} and device {residual.device}; got "
            f"{history.dtype} on {history.device}. Allocate it like the branch output."
        )
    if not history.is_contiguous():
        raise ValueError(
            f"history must be contiguous; got strides {history.stride()}. Allocate it with torch.zeros."
        )
    if weights is not None and (
        weights.shape != history.shape[:1]
        or weights.dtype != torch.float32
        or weights.device != history.device
    ):
        raise ValueError(
            f"weights must be a float32 tensor [{history.shape[0]}] (one per history slot) on "
            f"{history.device}; got {weights.dtype} {tuple(weights.shape)} on {weights.device}. "
            "Build it with torch.tensor(forecast_weights(...), dtype=torch.float32)."
        )


if HAS_TRITON:
    import triton
    import triton.language as tl

    from smoothcache_fx.kernels.gated_residual_add import _CUDA_CONFIGS, _INTERPRET_CONFIGS

    @triton.autotune(
        configs=_INTERPRET_CONFIGS if TRITON_INTERPRET else _CUDA_CONFIGS, key=["n_rows", "n_cols"]
    )
    @triton.jit
    def _gated_residual_history_kernel(
        out_ptr,
        residual_ptr,
        branch_ptr,
        gate_ptr,
        history_ptr,
        weights_ptr,
        n_rows,
        n_cols,
        rows_per_batch,
        stride_rb,
        stride_rn,
        stride_rd,
        stride_bb,
        stride_bn,
        stride_bd,
        stride_gb,
        stride_gn,
        stride_gd,
        SLOTS: tl.constexpr,
        FORECAST: tl.constexpr,
        HAS_GATE: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_COLS: tl.constexpr,
    ):
        """One tile of `out = residual + gate * update` over [B*N, D], where update is the forecast
        from the SLOTS history slots (FORECAST) or the branch, whose history it then shifts in."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        batch = rows // rows_per_batch
        token = rows % rows_per_batch
        dense = rows[:, None] * n_cols + cols[None, :]  # out's and each history slot's offsets
        slot_size = n_rows * n_cols

        residual_offsets = (batch * stride_rb + token * stride_rn)[:, None] + cols[None, :] * stride_rd
        residual = tl.load(residual_ptr + residual_offsets, mask=mask, eviction_policy="evict_first")
        if FORECAST:
            update = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
            for i in tl.static_range(SLOTS):
                weight = tl.load(weights_ptr + i)
                past = tl.load(history_ptr + i * slot_size + dense, mask=mask, eviction_policy="evict_first")
                update += weight * past.to(tl.float32)
            update = update.to(out_ptr.dtype.element_ty).to(tl.float32)  # the reference's rounding
        else:
            branch_offsets = (batch * stride_bb + token * stride_bn)[:, None] + cols[None, :] * stride_bd
            branch = tl.load(branch_ptr + branch_offsets, mask=mask, eviction_policy="evict_first")
            for i in tl.static_range(SLOTS - 1):
                newer = tl.load(history_ptr + (i + 1) * slot_size + dense, mask=mask)
                tl.store(history_ptr + i * slot_size + dense, newer, mask=mask)
            tl.store(history_ptr + (SLOTS - 1) * slot_size + dense, branch, mask=mask)
            update = branch.to(tl.float32)
        if HAS_GATE:
            gate_offsets = (batch * stride_gb + token * stride_gn)[:, None] + cols[None, :] * stride_gd
            gate = tl.load(gate_ptr + gate_offsets, mask=mask, eviction_policy="evict_last")
            update = gate.to(tl.float32) * update
        out = residual.to(tl.float32) + update
        tl.store(out_ptr + dense, out.to(out_ptr.dtype.element_ty), mask=mask)

    def _launch(residual, branch, gate, history, weights) -> torch.Tensor:
        """Allocate `out` and launch; `branch` None is the forecast path, `weights` None the compute
        path. Unused pointers point at `residual`, never written (see the sibling module's launch)."""
        shape = residual.shape
        out = torch.empty(shape, dtype=residual.dtype, device=residual.device)
        if out.numel() == 0:
            return out
        n_cols = shape[-1]
        n_rows = out.numel() // n_cols

        def grid(meta):
            return (triton.cdiv(n_rows, meta["BLOCK_ROWS"]), triton.cdiv(n_cols, meta["BLOCK_COLS"]))

        torch.library.wrap_triton(_gated_residual_history_kernel)[grid](
            out,
            residual,
            residual if branch is None else branch,
            residual if gate is None else gate,
            history,
            residual if weights is None else weights,
            n_rows,
            n_cols,
            shape[1] if len(shape) == 3 else 1,
            *_broadcast_strides_3d(residual, shape),
            *((0, 0, 0) if branch is None else _broadcast_strides_3d(branch, shape)),
            *((0, 0, 0) if gate is None else _broadcast_strides_3d(gate, shape)),
            SLOTS=history.shape[0],
            FORECAST=branch is None,
            HAS_GATE=gate is not None,
        )
        return out


def _uses_kernel(residual: torch.Tensor) -> bool:
    return HAS_TRITON and residual.device.type == "cuda" and residual.dtype in KERNEL_DTYPES


with quiet_missing_triton():

    @torch.library.triton_op(FORECAST_OP_NAME, mutates_args=())
    def gated_residual_forecast(
        residual: torch.Tensor, history: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`residual + gate * sum_i weights[i] * history[i]` in one pass: a forecast skipped step."""
        _check_history(residual, history, weights)
        _check_inputs(residual, history[0], gate, None)
        if _uses_kernel(residual):
            return _launch(residual, None, gate, history, weights)
        return gated_residual_forecast_reference(residual, history, weights, gate)

    @torch.library.triton_op(AND_HISTORY_OP_NAME, mutates_args={"history"})
    def gated_residual_add_and_history(
        residual: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor | None, history: torch.Tensor
    ) -> torch.Tensor:
        """`residual + gate * branch`, shifting `branch` into `history` in the same pass: a compute
        step of a forecast branch."""
        _check_inputs(residual, branch, gate, None)
        _check_history(residual, history, None)
        if _uses_kernel(residual):
            return _launch(residual, branch, gate, history, None)
        return gated_residual_add_and_history_reference(residual, branch, gate, history)


def gated_residual_history_triton(
    residual: torch.Tensor,
    branch: torch.Tensor | None,
    gate: torch.Tensor | None,
    history: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Always launch the Triton kernel (CPU tensors under TRITON_INTERPRET=1): the forecast path
    with `branch=None` and `weights`, the compute path with `branch` and `weights=None`."""
    if not HAS_TRITON:
        raise ModuleNotFoundError(
            "gated_residual_history_triton needs triton; it is not installed. "
            "Install it with `pip install triton==3.7.1` (the version torch 2.13.0 pins)."
        )
    if (branch is None) == (weights is None):
        raise ValueError("pass exactly one of branch (compute path) and weights (forecast path).")
    _check_history(residual, history, weights)
    _check_inputs(residual, history[0] if branch is None else branch, gate, None)
    if residual.device.type == "cpu" and not TRITON_INTERPRET:
        raise RuntimeError(
            "gated_residual_history_triton on CPU tensors needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before importing smoothcache_fx.kernels, or move the tensors to CUDA."
        )
    if residual.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"residual must be one of {KERNEL_DTYPES} for the Triton kernel; got {residual.dtype}."
        )
    return _launch(residual, branch, gate, history, weights)
