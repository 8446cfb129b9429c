"""The fused gated residual add that every rewritten residual branch runs through.

Two ops, one per path of a rewritten branch, so that no op has a mutated argument that may be None:

- `smoothcache_fx::gated_residual_add(residual, branch, gate=None)`: `residual + gate * branch`.
  The reuse path, where `branch` is the cache buffer. Pure.
- `smoothcache_fx::gated_residual_add_and_cache(residual, branch, gate, cache)`: the same, and
  `branch` written into `cache` in the same pass. The compute path; `cache` is required and is the
  op's only mutated argument.

A mutated argument that may be None breaks Inductor: functionalization turns a call with
`cache=None` into `auto_functionalized_v2` with no bases, whose decomposition leaves a
`getitem` that lowering rejects ("<built-in function getitem> is not an OpOverload"). With two ops
both paths compile with Inductor, with and without triton installed.

Both are registered once, with `torch.library.triton_op`, whether or not triton can be imported:
torch.compile traces a triton_op's body instead of treating it as opaque, so on CPU Inductor fuses
the reference's plain ops into its own C++ loop and on CUDA it sees (and can CUDA-graph) the kernel
launch; torch.export keeps the ops as they are. Without triton the body takes the reference on
every device.

By role, side by side:

- `_gated_residual_add_kernel`: the Triton kernel. One read of `residual`, `branch` and the (small)
  `gate`, one write of `out` and, when caching, one write of `cache`: 3 reads + 2 writes instead of
  the 4 reads + 3 writes of eager's mul, add and copy_.
- `gated_residual_add`, `gated_residual_add_and_cache`: the ops (launchers). CPU tensors take the
  reference path; CUDA tensors launch the kernel.
- `gated_residual_add_reference`: the plain-PyTorch oracle the tests and benchmarks compare against.

Numerics: the kernel computes in fp32 and rounds once to the output dtype. Eager rounds twice
(`gate * branch` to the dtype, then the add), so the two differ by at most about 1 ulp of the output
plus half an ulp of `gate * branch` (which only shows where the add cancels); the kernel's single
rounding is the more accurate of the two. For fp32 the only difference is FMA contraction on the
GPU; under the interpreter fp32 matches eager exactly. The tests give each dtype its own tolerance.
The CPU path is the reference itself, so it is bit-identical to the model's own eager code.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from smoothcache_fx.kernels.compat import quiet_missing_triton

OP_NAME = "smoothcache_fx::gated_residual_add"
AND_CACHE_OP_NAME = "smoothcache_fx::gated_residual_add_and_cache"

# torch 2.13.0's CUDA wheel pins triton==3.7.1 (its Requires-Dist); torch's CPU wheel has no triton.
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Read once, at import, because that is when `triton.jit` decides whether the kernel below is an
# interpreted (numpy, CPU tensors) or a compiled (CUDA) function; setting it later has no effect.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Dtypes the kernel loads and stores; each is upcast to fp32 for the arithmetic. fp64 would lose
# precision in fp32, so CUDA fp64 tensors take the reference path instead.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The dimensions the op understands: [B, D] (pooled / adaLN-on-class-token blocks) and [B, N, D].
SUPPORTED_RANKS = (2, 3)


def gated_residual_add_reference(
    residual: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor | None = None,
    cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch oracle: the same two ops, in the same order, as the model's own code.

    `residual + gate * branch` (not addcmul) so the result is bit-identical to the untransformed block.
    The result is contiguous, as the Triton kernel's: `residual + update` would take the residual's
    layout, and DiTs whose first block gets a transposed residual from the patch embedding
    (`flatten(2).transpose(1, 2)`) would then carry that layout through every later block, where the
    model's own `update + residual` makes it contiguous again. A transposed layout slows every linear
    after it and, with compiled variants, gives the first block's inputs other strides than the rest
    (a second compile of each variant).
    """
    if cache is not None:
        with torch.no_grad():  # a cache holds a value, never autograd history
            cache.copy_(branch)
    update = branch if gate is None else gate * branch
    out = residual + update
    return out if out.is_contiguous() else out.contiguous()


def gated_residual_add_decomposed(
    residual: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor | None = None,
    cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """What the pass emits for `kernel="inductor"`: the op as plain torch ops, `cache.copy_` included.

    Dynamo traces through it, so Inductor fuses the mul, the add and the cache write into a kernel of
    its own. It is the reference's expression on purpose: one definition of the math, so the
    decomposed, the reference and the CPU op path cannot drift apart.
    """
    return gated_residual_add_reference(residual, branch, gate, cache)


def _check_inputs(
    residual: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor | None,
    cache: torch.Tensor | None,
) -> None:
    """Raise a clear error for inputs the op does not accept, on every path (CPU, CUDA, fake).

    Checked here rather than left to torch's own broadcasting errors because the kernel reads raw
    pointers: a shape or dtype that eager would silently promote or broadcast would be read wrongly.
    """
    if residual.dim() not in SUPPORTED_RANKS:
        raise NotImplementedError(
            f"residual must be 2-D [B, D] or 3-D [B, N, D]; got shape {tuple(residual.shape)}. "
            "Reshape it to [B, N, D] before the op, or call gated_residual_add_reference."
        )
    if not residual.dtype.is_floating_point:
        raise TypeError(f"residual must be a floating point tensor; got dtype {residual.dtype}.")
    if branch.shape != residual.shape:
        raise ValueError(
            f"branch must have residual's shape {tuple(residual.shape)}; got {tuple(branch.shape)}. "
            "The op adds the branch output to the residual stream element by element: check which "
            "tensors the pass matched."
        )
    if branch.dtype != residual.dtype:
        raise TypeError(
            f"branch must have residual's dtype {residual.dtype}; got {branch.dtype}. "
            "Cast one of them so both share a dtype."
        )
    for name, tensor in (("branch", branch), ("gate", gate), ("cache", cache)):
        if tensor is not None and tensor.device != residual.device:
            raise ValueError(
                f"{name} must be on residual's device {residual.device}; got {tensor.device}. "
                f"Move it with {name}.to(residual.device)."
            )
    if gate is not None:
        _check_gate(residual, gate)
    if cache is not None:
        if cache.shape != branch.shape:
            raise ValueError(
                f"cache must have branch's shape {tuple(branch.shape)}; got {tuple(cache.shape)}. "
                "Allocate the cache buffer with torch.empty_like(branch) at the shape the model runs at."
            )
        if cache.dtype != branch.dtype:
            raise TypeError(
                f"cache must have branch's dtype {branch.dtype}; got {cache.dtype}. "
                "Allocate the cache buffer in the model's dtype."
            )


def _check_gate(residual: torch.Tensor, gate: torch.Tensor) -> None:
    """A gate must broadcast to residual's shape without changing it, and keep residual's dtype."""
    broadcasts = gate.dim() <= residual.dim() and all(
        g == 1 or g == r for g, r in zip(reversed(gate.shape), reversed(residual.shape), strict=False)
    )
    if not broadcasts:
        raise ValueError(
            f"gate must broadcast to residual's shape {tuple(residual.shape)}; got {tuple(gate.shape)}. "
            "DiT gates are [B, D], [B, 1, D], [1, 1, D] or [D]: unsqueeze a [B, D] gate to [B, 1, D] "
            "for a [B, N, D] residual."
        )
    promoted = torch.promote_types(gate.dtype, residual.dtype)
    if promoted != residual.dtype:
        raise TypeError(
            f"gate must not promote the output past residual's dtype {residual.dtype}; got gate dtype "
            f"{gate.dtype} (result would be {promoted}). Cast the gate to {residual.dtype}."
        )


def _broadcast_strides_3d(tensor: torch.Tensor, shape: torch.Size) -> tuple[int, int, int]:
    """Strides of `tensor` broadcast to `shape`, as [B, N, D]; broadcast dimensions get stride 0.

    Computed from the tensor's own strides instead of through `expand`/`unsqueeze` views so the kernel
    is handed the original tensors: no view ops for functionalization to track around the launch.
    """
    offset = len(shape) - tensor.dim()
    strides = []
    for i in range(len(shape)):
        j = i - offset
        strides.append(0 if j < 0 or tensor.shape[j] == 1 else tensor.stride(j))
    if len(shape) == 2:
        return strides[0], 0, strides[1]
    return strides[0], strides[1], strides[2]


if HAS_TRITON:
    import triton
    import triton.language as tl

    # Memory-bound elementwise kernel: tiles of 4K-8K elements, wide along D so contiguous rows give
    # 16-byte vector loads. Small BLOCK_COLS with many rows serve D not a multiple of 1024 (DiT-XL's
    # 1152 = 9 * 128); autotuning picks per (n_rows, n_cols). Rewriting `out` and `cache` with the
    # same values on every benchmark run is idempotent, so no restore_value is needed.
    _CUDA_CONFIGS = [
        triton.Config({"BLOCK_ROWS": rows, "BLOCK_COLS": cols}, num_warps=warps)
        for rows, cols, warps in [
            (32, 128, 4),
            (64, 128, 8),
            (16, 256, 4),
            (32, 256, 8),
            (8, 512, 4),
            (16, 512, 8),
            (4, 1024, 4),
            (8, 1024, 8),
        ]
    ]
    # The interpreter runs programs one after another in numpy: benchmarking configs there measures
    # nothing and multiplies test time, and big tiles mean fewer (slow) program launches.
    _INTERPRET_CONFIGS = [triton.Config({"BLOCK_ROWS": 64, "BLOCK_COLS": 256}, num_warps=4)]

    @triton.autotune(
        configs=_INTERPRET_CONFIGS if TRITON_INTERPRET else _CUDA_CONFIGS,
        key=["n_rows", "n_cols"],
    )
    @triton.jit
    def _gated_residual_add_kernel(
        out_ptr,
        residual_ptr,
        branch_ptr,
        gate_ptr,
        cache_ptr,
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
        stride_cb,
        stride_cn,
        stride_cd,
        HAS_GATE: tl.constexpr,
        WRITE_CACHE: tl.constexpr,
        CONTIGUOUS: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_COLS: tl.constexpr,
    ):
        """out = residual + gate * branch over a [B*N, D] grid of tiles; cache = branch if asked.

        Rows are (batch, token) pairs, so a broadcast gate is indexed with stride 0 in the dimensions
        it lacks. `out` is always a fresh contiguous tensor; with CONTIGUOUS the big inputs share its
        `row * n_cols + col` offsets, otherwise each is read and written through its own strides.
        """
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        batch = rows // rows_per_batch
        token = rows % rows_per_batch

        out_offsets = rows[:, None] * n_cols + cols[None, :]
        if CONTIGUOUS:
            residual_offsets = out_offsets
            branch_offsets = out_offsets
            cache_offsets = out_offsets
        else:
            residual_offsets = (batch * stride_rb + token * stride_rn)[:, None] + cols[None, :] * stride_rd
            branch_offsets = (batch * stride_bb + token * stride_bn)[:, None] + cols[None, :] * stride_bd
            cache_offsets = (batch * stride_cb + token * stride_cn)[:, None] + cols[None, :] * stride_cd

        branch = tl.load(branch_ptr + branch_offsets, mask=mask, eviction_policy="evict_first")
        residual = tl.load(residual_ptr + residual_offsets, mask=mask, eviction_policy="evict_first")
        update = branch.to(tl.float32)
        if HAS_GATE:
            gate_offsets = (batch * stride_gb + token * stride_gn)[:, None] + cols[None, :] * stride_gd
            # The gate is re-read by every token of its batch row: keep it in cache.
            gate = tl.load(gate_ptr + gate_offsets, mask=mask, eviction_policy="evict_last")
            update = gate.to(tl.float32) * update
        out = residual.to(tl.float32) + update
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_CACHE:
            tl.store(cache_ptr + cache_offsets, branch, mask=mask)

    def _launch(
        residual: torch.Tensor,
        branch: torch.Tensor,
        gate: torch.Tensor | None,
        cache: torch.Tensor | None,
    ) -> torch.Tensor:
        """Allocate `out` and launch the kernel; inputs are already checked."""
        shape = residual.shape
        out = torch.empty(shape, dtype=residual.dtype, device=residual.device)
        if out.numel() == 0:
            return out
        n_cols = shape[-1]
        rows_per_batch = shape[1] if len(shape) == 3 else 1
        n_rows = out.numel() // n_cols
        contiguous = (
            residual.is_contiguous() and branch.is_contiguous() and (cache is None or cache.is_contiguous())
        )

        def grid(meta):
            return (triton.cdiv(n_rows, meta["BLOCK_ROWS"]), triton.cdiv(n_cols, meta["BLOCK_COLS"]))

        # Unused pointers point at `residual`, which the kernel never writes. Not at `out`: were
        # Inductor's mutation analysis to fall back to "every pointer is written", functionalization
        # would clone `out` once per argument it appears in and keep the last, unwritten, clone.
        torch.library.wrap_triton(_gated_residual_add_kernel)[grid](
            out,
            residual,
            branch,
            residual if gate is None else gate,
            residual if cache is None else cache,
            n_rows,
            n_cols,
            rows_per_batch,
            *_broadcast_strides_3d(residual, shape),
            *_broadcast_strides_3d(branch, shape),
            *((0, 0, 0) if gate is None else _broadcast_strides_3d(gate, shape)),
            *((0, 0, 0) if cache is None else _broadcast_strides_3d(cache, shape)),
            HAS_GATE=gate is not None,
            WRITE_CACHE=cache is not None,
            CONTIGUOUS=contiguous,
        )
        return out


def _gated_residual_add_body(
    residual: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor | None,
    cache: torch.Tensor | None,
) -> torch.Tensor:
    """Both ops' body: the kernel for CUDA tensors of a kernel dtype when triton is there, else the
    reference. The device check lives here, not in `register_kernel("cpu")`: torch.compile traces a
    triton_op's body for every device, so a CPU-only machine would otherwise trace the kernel launch
    and fail for want of a GPU driver. The body doubles as the fake (meta) kernel."""
    _check_inputs(residual, branch, gate, cache)
    if HAS_TRITON and residual.device.type == "cuda" and residual.dtype in KERNEL_DTYPES:
        return _launch(residual, branch, gate, cache)
    return gated_residual_add_reference(residual, branch, gate, cache)


with quiet_missing_triton():

    @torch.library.triton_op(OP_NAME, mutates_args=())
    def gated_residual_add(
        residual: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`residual + gate * branch` in one pass: the reuse path, where `branch` is a cache."""
        return _gated_residual_add_body(residual, branch, gate, None)

    @torch.library.triton_op(AND_CACHE_OP_NAME, mutates_args={"cache"})
    def gated_residual_add_and_cache(
        residual: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor | None, cache: torch.Tensor
    ) -> torch.Tensor:
        """`residual + gate * branch`, writing `branch` into `cache` in the same pass: the compute
        path. `cache` is required: the op's only mutated argument is never None."""
        return _gated_residual_add_body(residual, branch, gate, cache)


def gated_residual_add_triton(
    residual: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor | None = None,
    cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """Always launch the Triton kernel, whatever the device: the op's CUDA path, callable directly.

    On CPU tensors this runs under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
    imported), which is how the tests check the kernel itself on a machine without a GPU.

    Args:
        residual: [B, N, D] or [B, D].
        branch: residual's shape and dtype.
        gate: broadcastable to residual's shape ([B, D], [B, 1, D], [1, 1, D], [D]) or None.
        cache: branch's shape and dtype, written in place (any strides), or None.

    Returns:
        A new contiguous tensor `residual + gate * branch`, computed in fp32, rounded once.
    """
    if not HAS_TRITON:
        raise ModuleNotFoundError(
            "gated_residual_add_triton needs triton; it is not installed. "
            "Install it with `pip install triton==3.7.1` (the version torch 2.13.0 pins)."
        )
    _check_inputs(residual, branch, gate, cache)
    if residual.device.type == "cpu" and not TRITON_INTERPRET:
        raise RuntimeError(
            "gated_residual_add_triton on CPU tensors needs the Triton interpreter; TRITON_INTERPRET "
            "was not 1 when smoothcache_fx.kernels was imported. Set TRITON_INTERPRET=1 before "
            "importing it, move the tensors to CUDA, or call gated_residual_add for the CPU path."
        )
    if residual.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"residual must be one of {KERNEL_DTYPES} for the Triton kernel; got {residual.dtype}. "
            "Call gated_residual_add, which takes the reference path for other dtypes."
        )
    return _launch(residual, branch, gate, cache)
