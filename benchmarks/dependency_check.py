"""Per-call cost of checking what each block's capture depends on, against a compiled step.

Every model call checks, per transformed block, the training flags, submodule and parameter
identities, attention processors and PEFT state that its capture depends on
(`smoothcache_fx.dependencies`), and reads the timestep to place the call in its generation. This
script times both on the shipped demo model (6 blocks, 40 samples with guidance = batch 80, FORA-2
on attn1 and ff, `compile=True`) and reports them as a share of a compiled step's wall time.

    python benchmarks/dependency_check.py [--steps 50] [--per-class 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import smoothcache_fx
from smoothcache_fx.demo.model import generate, load_demo_model
from smoothcache_fx.generation import timestep_of


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    schedule = smoothcache_fx.Schedule.uniform(args.steps, 2, ["attn1", "ff"])
    model = smoothcache_fx.transform(load_demo_model(), schedule, compile=True)
    labels = [digit for digit in range(10) for _ in range(args.per_class)]
    generate(model, labels, num_steps=args.steps)  # capture and compile
    walls = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        generate(model, labels, num_steps=args.steps, generator=torch.Generator().manual_seed(0))
        walls.append(time.perf_counter() - start)
    step_s = statistics.median(walls) / args.steps

    states = [block._smoothcache_state for block in model.smoothcache.blocks.values()]
    timestep = torch.full((20 * args.per_class,), 999, dtype=torch.long)
    calls = 2000
    start = time.perf_counter()
    for _ in range(calls):
        for state in states:
            assert state.current.dependencies.changed() is None
    check_s = (time.perf_counter() - start) / calls
    start = time.perf_counter()
    for _ in range(calls):
        timestep_of(model, (), {"timestep": timestep})
    timestep_s = (time.perf_counter() - start) / calls

    print(f"demo model: {len(states)} blocks, batch {20 * args.per_class}, {args.steps} steps, compiled")
    print(f"compiled step (median of {args.repeats} generations): {step_s * 1e3:.2f} ms")
    print(
        f"dependency check, all blocks, per call: {check_s * 1e6:.1f} us = {100 * check_s / step_s:.2f}% of a step"
    )
    print(f"timestep read per call: {timestep_s * 1e6:.1f} us = {100 * timestep_s / step_s:.2f}% of a step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
