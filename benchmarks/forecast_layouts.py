"""Would another history layout make a forecast step as cheap as a reuse step? The skipped step's
residual kernel, alone, with the history stored four ways.

A fully skipped step of the demo DiT is, compiled, one inductor kernel that adds every block's gated
branch output to the residual: 12 branches (6 blocks x attn1, ff) of [80, 16, 128] fp32 with gates
[80, 1, 128]. Reuse reads one cache per branch; an order-1 forecast reads two history slots and
weighs them. This times that kernel (torch.compile, the model's shapes) for:

- `reuse`: `h + g * cache` per branch (the baseline);
- `slot-major`: the history as today, `[2, *shape]`, `h + g * (w0 * old + w1 * new)`;
- `interleaved`: the two slots side by side per row (`[80, 16, 2, 128]` viewed as `[2, *shape]`),
  so each branch is one memory stream instead of two;
- `difference-bf16`: the newest output in fp32 and the difference to the one before in bfloat16,
  `h + g * (new + a * diff)`: a quarter fewer bytes than slot-major.

Each is timed after a 64 MiB write evicts the caches (as a skipped step finds them after a computed
step) and warm, median over `--repeats`, as a ratio to `reuse` in the same run.

    python benchmarks/forecast_layouts.py [--repeats 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPE = (80, 16, 128)  # the demo's batch of 40 samples x2 (guidance), 16 tokens, width 128
BRANCHES = 12


def reuse(h, gates, caches):
    for gate, cache in zip(gates, caches, strict=True):
        h = h + gate * cache
    return h


def slots(h, gates, histories, weights):
    for gate, history in zip(gates, histories, strict=True):
        h = h + gate * (weights[0] * history[0] + weights[1] * history[1])
    return h


def differences(h, gates, newest, diffs, weights):
    for gate, new, diff in zip(gates, newest, diffs, strict=True):
        h = h + gate * (new + weights[0] * diff.float())
    return h


def main(argv=None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h = torch.randn(SHAPE)
    gates = [torch.randn(SHAPE[0], 1, SHAPE[2]) for _ in range(BRANCHES)]
    caches = [torch.randn(SHAPE) for _ in range(BRANCHES)]
    slot_major = [torch.randn(2, *SHAPE) for _ in range(BRANCHES)]
    interleaved = [torch.randn(*SHAPE[:-1], 2, SHAPE[-1]).movedim(-2, 0) for _ in range(BRANCHES)]
    diffs = [torch.randn(SHAPE).to(torch.bfloat16) for _ in range(BRANCHES)]
    weights = torch.tensor([-0.5, 1.5])
    cases = {
        "reuse": (torch.compile(reuse), (h, gates, caches)),
        "slot-major": (torch.compile(slots), (h, gates, slot_major, weights)),
        "interleaved": (torch.compile(slots), (h, gates, interleaved, weights)),
        "difference-bf16": (torch.compile(differences), (h, gates, caches, diffs, weights)),
    }
    for function, inputs in cases.values():  # compile outside the timings
        function(*inputs)
    evictor = torch.empty(64 * 2**20 // 4)
    results: dict[str, dict[str, float]] = {}
    print(
        f"{BRANCHES} branches of {list(SHAPE)} fp32, {torch.get_num_threads()} threads; median of {args.repeats}"
    )
    print(f"{'layout':<16} {'evicted us':>10} {'vs reuse':>8} {'warm us':>8} {'vs reuse':>8}")
    times: dict[tuple[str, bool], list[float]] = {
        (name, evict): [] for name in cases for evict in (True, False)
    }
    for _ in range(args.repeats):
        for evict in (True, False):
            for name, (function, inputs) in cases.items():  # interleaved: drift hits every layout alike
                if evict:
                    evictor.add_(1.0)
                start = time.perf_counter()
                function(*inputs)
                times[name, evict].append(time.perf_counter() - start)
    for name in cases:
        evicted, warm = (statistics.median(times[name, evict]) for evict in (True, False))
        results[name] = {"evicted_us": evicted * 1e6, "warm_us": warm * 1e6}
    for name, row in results.items():
        print(
            f"{name:<16} {row['evicted_us']:>10.0f} {row['evicted_us'] / results['reuse']['evicted_us']:>7.2f}x "
            f"{row['warm_us']:>8.0f} {row['warm_us'] / results['reuse']['warm_us']:>7.2f}x"
        )
    return results


if __name__ == "__main__":
    main()
