"""Bandwidth of the fused gated residual add against eager and against Inductor's own fusion.

The op is memory bound, so the figure of merit is achieved bandwidth over the bytes the op must move:
`residual`, `branch` and the small `gate` read once, `out` and (when caching) `cache` written once.
All three implementations are charged the same byte count, so GB/s is effective bandwidth: eager's
extra round trip through the `gate * branch` temporary shows up as lower GB/s, not as more bytes.

- triton:   the ops the pass emits (autotuned kernel): `gated_residual_add_and_cache` for a computed
            branch, `gated_residual_add` for a reused one
- eager:    `gated_residual_add_reference` (copy_, mul, add: three kernels)
- inductor: `torch.compile(gated_residual_add_decomposed)`, Inductor's own fused kernel

Timings are medians of `triton.testing.do_bench` (which flushes L2 between runs), or of
`do_bench_cudagraph` with `--cuda-graph` to take launch overhead out of the small shapes.

Usage::

    python benchmarks/bench_kernel.py                     # full grid, table to stdout
    python benchmarks/bench_kernel.py --quick --json results.json
    python benchmarks/bench_kernel.py --peak-gbs 3350     # a device missing from PEAK_GBS

Without a CUDA device it prints the grid it would measure, with byte counts, says so and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from smoothcache_fx.kernels import (
    gated_residual_add,
    gated_residual_add_and_cache,
    gated_residual_add_decomposed,
    gated_residual_add_reference,
)

# Peak DRAM bandwidth in GB/s by a substring of torch.cuda.get_device_name(), most specific first.
# Source: NVIDIA's product datasheets (H100: "NVIDIA H100 Tensor Core GPU" datasheet; H200: "NVIDIA
# H200 Tensor Core GPU" datasheet; A100: "NVIDIA A100 Tensor Core GPU" datasheet; L40S, L4: their
# product pages). These are marketing peaks; a good streaming kernel reaches roughly 85-90% of them.
PEAK_GBS = [
    ("H100 80GB HBM3", 3350.0, "H100 SXM5 80GB: 3.35 TB/s (H100 datasheet)"),
    ("H100 NVL", 3900.0, "H100 NVL 94GB: 3.9 TB/s (H100 datasheet)"),
    ("H100 PCIe", 2000.0, "H100 PCIe 80GB: 2.0 TB/s (H100 datasheet)"),
    ("H200", 4800.0, "H200 141GB: 4.8 TB/s (H200 datasheet)"),
    ("A100-SXM4-80GB", 2039.0, "A100 SXM 80GB: 2,039 GB/s (A100 datasheet)"),
    ("A100 80GB PCIe", 1935.0, "A100 PCIe 80GB: 1,935 GB/s (A100 datasheet)"),
    ("A100", 1555.0, "A100 40GB: 1,555 GB/s (A100 datasheet)"),
    ("L40S", 864.0, "L40S: 864 GB/s (L40S product page)"),
    ("L4", 300.0, "L4: 300 GB/s (L4 product page)"),
]

# DiT-XL/2 runs D=1152 at N=256 (256 px) and N=1024 (512 px); D=3072 with N=4096 is the width and
# token count of MMDiT-class models (SD3 / Flux) at 1024 px.
BATCHES = (2, 8, 16)
TOKENS = (256, 1024, 4096)
DIMS = (1152, 3072)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# "compute": a step that runs the branch and writes its cache; "reuse": a cached step, no cache write.
MODES = ("compute", "reuse")


def bytes_moved(batch: int, tokens: int, dim: int, dtype: torch.dtype, mode: str) -> int:
    """Bytes the op must move: 3 reads (residual, branch, a [B, 1, D] gate) + out, + cache if computing."""
    full = batch * tokens * dim * dtype.itemsize
    gate = batch * dim * dtype.itemsize
    writes = 2 if mode == "compute" else 1
    return 2 * full + gate + writes * full


def peak_gbs(device_name: str, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override, "--peak-gbs"
    for key, gbs, source in PEAK_GBS:
        if key in device_name:
            return gbs, source
    return None, f"unknown device {device_name!r}: pass --peak-gbs"


def grid(quick: bool):
    if quick:
        return [(2, 256, 1152, "bfloat16", mode) for mode in MODES] + [
            (8, 4096, 3072, "bfloat16", mode) for mode in MODES
        ]
    return list(itertools.product(BATCHES, TOKENS, DIMS, DTYPES, MODES))


def measure(batch, tokens, dim, dtype_name, mode, bench) -> dict[str, float]:
    """Median milliseconds of each implementation on one shape, after checking they agree."""
    dtype = DTYPES[dtype_name]
    residual = torch.randn(batch, tokens, dim, device="cuda", dtype=dtype)
    branch = torch.randn_like(residual)
    gate = torch.randn(batch, 1, dim, device="cuda", dtype=dtype)
    cache = torch.empty_like(branch) if mode == "compute" else None
    # One fresh compile per shape: without the reset, dynamo's per-function recompile limit would
    # quietly hand later shapes back to eager and "inductor" would time eager.
    torch._dynamo.reset()
    compiled = torch.compile(gated_residual_add_decomposed, fullgraph=True, dynamic=False)
    impls = {
        "triton": (
            (lambda: gated_residual_add_and_cache(residual, branch, gate, cache))
            if mode == "compute"
            else (lambda: gated_residual_add(residual, branch, gate))
        ),
        "eager": lambda: gated_residual_add_reference(residual, branch, gate, cache),
        "inductor": lambda: compiled(residual, branch, gate, cache),
    }
    expected = gated_residual_add_reference(residual, branch, gate)
    for name, fn in impls.items():  # also the warm-up: autotuning and compilation happen here
        torch.testing.assert_close(fn(), expected, atol=6e-2, rtol=1.6e-2, msg=f"{name} disagrees")
    return {name: bench(fn) for name, fn in impls.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 shapes instead of the full grid")
    parser.add_argument("--cuda-graph", action="store_true", help="time with do_bench_cudagraph")
    parser.add_argument("--peak-gbs", type=float, default=None, help="peak DRAM bandwidth, GB/s")
    parser.add_argument("--json", metavar="PATH", help="write the results (or the plan) as JSON")
    args = parser.parse_args(argv)

    rows = grid(args.quick)
    on_gpu = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if on_gpu else "none"
    peak, peak_source = peak_gbs(device_name, args.peak_gbs)
    if not on_gpu:
        print("No CUDA device: nothing is timed. This is the grid a GPU run measures:\n")
    else:
        print(f"device: {device_name}; peak {peak} GB/s ({peak_source})\n")

    results = []
    header = f"{'B':>3} {'N':>5} {'D':>5} {'dtype':>8} {'mode':>7} {'MB':>8}"
    if on_gpu:
        header += "".join(f" {name + ' GB/s':>14} {'%peak':>6}" for name in ("triton", "eager", "inductor"))
    print(header)
    for batch, tokens, dim, dtype_name, mode in rows:
        moved = bytes_moved(batch, tokens, dim, DTYPES[dtype_name], mode)
        row = {
            "batch": batch,
            "tokens": tokens,
            "dim": dim,
            "dtype": dtype_name,
            "mode": mode,
            "bytes": moved,
        }
        line = f"{batch:>3} {tokens:>5} {dim:>5} {dtype_name:>8} {mode:>7} {moved / 1e6:>8.1f}"
        if on_gpu:
            bench = _bench_fn(args.cuda_graph)
            for name, ms in measure(batch, tokens, dim, dtype_name, mode, bench).items():
                gbs = moved / (ms * 1e-3) / 1e9
                pct = None if peak is None else 100.0 * gbs / peak
                row[name] = {"ms": ms, "gbs": gbs, "pct_peak": pct}
                line += f" {gbs:>14.0f} {'-' if pct is None else f'{pct:.0f}':>6}"
        results.append(row)
        print(line, flush=True)

    if args.json:
        report = {
            "device": device_name,
            "measured": on_gpu,
            "peak_gbs": peak,
            "peak_source": peak_source,
            "timer": "do_bench_cudagraph" if args.cuda_graph else "do_bench",
            "torch": torch.__version__,
            "rows": results,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


def _bench_fn(cuda_graph: bool):
    import triton.testing

    if cuda_graph:
        return lambda fn: triton.testing.do_bench_cudagraph(fn, return_mode="median")
    return lambda fn: triton.testing.do_bench(fn, return_mode="median")


if __name__ == "__main__":
    sys.exit(main())
