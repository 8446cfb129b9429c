"""Overhead-bound compiled generation: the shipped demo DiT, a row per compile granularity and peers.

The demo model (6 blocks, 16 tokens, 2.1M parameters) takes a few milliseconds a step on a CPU: per
call overhead (Python between blocks, guard checks, kernel launches) is a large share of a step, as
it is for a large DiT on a GPU. Every row generates `--per-class` x 10 digits with classifier-free
guidance (one batched model call per step) over `--steps` DDIM steps, from the same noise:

- compile        `torch.compile(original, fullgraph=True)`: the baseline of every ratio
- sc-block       `transform(..., compile=True, granularity="block")`: per-block variants
- sc-model       `granularity="model"`: one compiled graph per distinct whole-model mask
- sc-graph       `granularity="graph"`: the single `torch.cond` graph, compiled once
- sc-auto        `compile=True` as it is by default (the automatic choice; its pick is printed)
- helper         Roblox's `SmoothCacheHelper` (dit-smoothcache) on attn1 and ff, then
                 `torch.compile(model)` (it runs Python counters per branch call: graph breaks)
- fbc            diffusers' FirstBlockCache (`--fbc-threshold`), then `torch.compile(model)`

Timing: one warm-up generation per row, with a fresh inductor cache (its time minus the row's steady
time is the compile and capture time; dynamo's own compile seconds are printed beside it), then `--repeats` rounds with the
rows interleaved, medians reported; graph breaks and recompiles are counted over the warm-up and the
timed rounds. Ideal speedup is FLOPs(original)/FLOPs(row) over one generation (`flop_counter`).
Cached rows are compared with the uncached samples (PSNR).

Usage::

    python benchmarks/bench_overhead.py --threads 1 --repeats 5
    python benchmarks/bench_overhead.py --schedule roblox-0.18 --rows compile,sc-block,sc-model,sc-auto
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import (
    dynamo_compile_seconds,
    dynamo_counts,
    dynamo_delta,
    environment,
    fresh_inductor_cache,
    own_forward,
    prime_compiler,
)

import smoothcache_fx
from smoothcache_fx import Schedule
from smoothcache_fx.demo.job import psnr
from smoothcache_fx.demo.model import generate, load_demo_model
from smoothcache_fx.flops import flop_counter

ROWS = ("compile", "sc-block", "sc-model", "sc-graph", "sc-auto", "helper", "fbc")
REFERENCE_SCHEDULES = Path(__file__).resolve().parents[2] / "shared" / "reference-schedules"


@dataclass
class Row:
    name: str
    model: torch.nn.Module
    reset: Callable[[], None] = lambda: None
    quiet: bool = False  # the Roblox helper prints a line per branch call
    note: Callable[[], str] = lambda: ""
    result: dict = field(default_factory=dict)


class _InContext(torch.nn.Module):
    """Calls `model` inside `context()` (diffusers' cache hooks need a named cache context)."""

    def __init__(self, model: torch.nn.Module, context: Callable):
        super().__init__()
        self.model, self.context = model, context

    def forward(self, *args, **kwargs):
        with self.context():
            return self.model(*args, **kwargs)


def make_schedule(name: str, steps: int) -> Schedule:
    """fora2: attn1 and ff computed every 2nd step; roblox-0.18: Roblox's DiT-XL/2 alpha=0.18
    schedule (keys renamed to diffusers' names); anything else: a schedule JSON file."""
    if name == "fora2":
        return Schedule.uniform(steps, 2, ["attn1", "ff"])
    if name == "roblox-0.18":
        path = REFERENCE_SCHEDULES / f"{steps}-N-3-threshold-0.18.json"
        if not path.exists():
            raise SystemExit(f"{path} not found: Roblox ships it for 50 steps only (--steps 50).")
        return Schedule.load(path).rename({"attn": "attn1", "mlp": "ff"})
    return Schedule.load(name)


def build_rows(names: list[str], base: torch.nn.Module, schedule: Schedule, args) -> list[Row]:
    rows = []
    for name in names:
        model = copy.deepcopy(base)
        if name in ("compile", "helper", "fbc"):
            own_forward(model, name)
        if name == "compile":
            rows.append(Row(name, torch.compile(model, fullgraph=True)))
        elif name.startswith("sc-"):
            granularity = name.removeprefix("sc-")
            kwargs = {} if granularity == "auto" else {"granularity": granularity}
            model = smoothcache_fx.transform(model, schedule, compile=True, **kwargs)
            rows.append(Row(name, model, note=lambda m=model: f"granularity {m.smoothcache.granularity}"))
        elif name == "helper":
            rows.append(_helper_row(model, schedule))
        elif name == "fbc":
            rows.append(_fbc_row(model, args.fbc_threshold))
    return rows


def _helper_row(model: torch.nn.Module, schedule: Schedule) -> Row:
    with contextlib.redirect_stdout(io.StringIO()):  # SmoothCache prints warnings on import
        from diffusers.models.attention import BasicTransformerBlock
        from SmoothCache import SmoothCacheHelper
    masks = {name: list(mask) for name, mask in schedule.masks.items()}
    helper = SmoothCacheHelper(model, BasicTransformerBlock, list(masks), masks)
    helper.enable()
    return Row(
        "helper", torch.compile(model), reset=helper.reset_state, quiet=True, note=lambda: f"{sorted(masks)}"
    )


def _fbc_row(model: torch.nn.Module, threshold: float) -> Row:
    from diffusers.hooks import FirstBlockCacheConfig
    from diffusers.models.cache_utils import CacheMixin

    # diffusers' DiT has no enable_cache, but its blocks are in the TransformerBlockRegistry.
    model.__class__ = type(type(model).__name__, (type(model), CacheMixin), {})
    model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    compiled = torch.compile(model)
    return Row(
        "fbc",
        _InContext(compiled, lambda: model.cache_context("cond")),
        reset=model._reset_stateful_cache,
        note=lambda: f"threshold {threshold}",
    )


def sample(row: Row, labels: list[int], steps: int) -> torch.Tensor:
    row.reset()
    with contextlib.redirect_stdout(io.StringIO()) if row.quiet else contextlib.nullcontext():
        return generate(row.model, labels, num_steps=steps, generator=torch.Generator().manual_seed(0))


def ideal_speedups(base, schedule: Schedule, labels, steps: int, rows: list[Row], fbc_threshold: float):
    """FLOPs(original) / FLOPs(row) over one generation, counted eagerly (after one uncounted
    generation, so capture work stays out)."""

    def flops(model, reset=lambda: None):
        sample(Row("count", model, reset=reset), labels, steps)
        with flop_counter() as counter:
            sample(Row("count", model, reset=reset), labels, steps)
        return counter.get_total_flops()

    plain = flops(copy.deepcopy(base))
    cached = flops(smoothcache_fx.transform(copy.deepcopy(base), schedule))
    ideal = {row.name: plain / cached for row in rows if row.name.startswith("sc-") or row.name == "helper"}
    ideal["compile"] = 1.0
    if any(row.name == "fbc" for row in rows):
        fbc = _fbc_row(copy.deepcopy(base), fbc_threshold)
        fbc.model.model = fbc.model.model._orig_mod  # count the eager model
        ideal["fbc"] = plain / flops(fbc.model, fbc.reset)
    return ideal


def run(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_demo_model()
    schedule = make_schedule(args.schedule, args.steps)
    labels = [digit for digit in range(10) for _ in range(args.per_class)]
    rows = build_rows(args.rows.split(","), base, schedule, args)
    prime_compiler(torch.device("cpu"))
    reference = generate(base, labels, num_steps=args.steps, generator=torch.Generator().manual_seed(0))
    for row in rows:
        before, compiling = dynamo_counts(), dynamo_compile_seconds()
        start = time.perf_counter()
        with fresh_inductor_cache():  # no row compiles faster for graphs an earlier row or run cached
            row.result["output"] = sample(row, labels, args.steps)
        row.result["first_s"] = time.perf_counter() - start
        row.result["dynamo_compile_s"] = dynamo_compile_seconds() - compiling
        row.result["warmup"] = dynamo_delta(before, dynamo_counts())
        print(f"[warm-up] {row.name}: {row.result['first_s']:.1f} s ({row.note()})", flush=True)
    times = {row.name: [] for row in rows}
    cpu_times = {row.name: [] for row in rows}
    timed_counts = {row.name: {"breaks": 0, "recompiles": 0, "graphs": 0} for row in rows}
    for round_index in range(args.repeats):
        order = rows[round_index % len(rows) :] + rows[: round_index % len(rows)]
        for row in order:
            before = dynamo_counts()
            start, start_cpu = time.perf_counter(), time.process_time()
            sample(row, labels, args.steps)
            times[row.name].append(time.perf_counter() - start)
            cpu_times[row.name].append(time.process_time() - start_cpu)
            delta = dynamo_delta(before, dynamo_counts())
            timed_counts[row.name] = {k: timed_counts[row.name][k] + delta[k] for k in delta}
    ideal = ideal_speedups(base, schedule, labels, args.steps, rows, args.fbc_threshold)
    # With one thread, process CPU time is the steadier clock on a shared machine (time slices lost
    # to other processes do not count); with more, spinning OpenMP workers inflate it: wall time.
    clock = cpu_times if args.threads == 1 else times
    baseline = statistics.median(clock["compile"]) if "compile" in clock else None
    table = []
    for row in rows:
        median = statistics.median(clock[row.name])
        speedup = baseline / median if baseline else None
        table.append(
            {
                "row": row.name,
                "note": row.note(),
                "ms_per_generation": 1000 * median,
                "clock": "process CPU" if args.threads == 1 else "wall",
                "wall_ms_per_generation": 1000 * statistics.median(times[row.name]),
                "x_compile": speedup,
                "ideal": ideal.get(row.name),
                "achieved_over_ideal": speedup / ideal[row.name] if speedup and ideal.get(row.name) else None,
                "first_generation_s": row.result["first_s"],
                "compile_s": row.result["first_s"] - statistics.median(times[row.name]),
                "dynamo_compile_s": row.result["dynamo_compile_s"],
                "psnr_db": psnr(row.result["output"], reference),
                "warmup": row.result["warmup"],
                "timed": timed_counts[row.name],
            }
        )
    return {"environment": environment(torch.device("cpu")), "args": vars(args), "rows": table}


def print_table(result: dict) -> None:
    rows = result["rows"]
    base = next((r for r in rows if r["row"] == "compile"), None)
    print(
        f"time/gen: median {rows[0]['clock']} time; compile s: first generation's wall time minus the median"
    )
    print(
        f"{'row':10} {'time/gen':>9} {'x compile':>9} {'ideal':>6} {'ach/ideal':>9} {'compile s':>9} "
        f"{'x plain':>7} {'dynamo s':>8} {'first s':>8} {'PSNR':>6} {'breaks':>6} {'recomp':>6}  note"
    )
    for r in rows:
        fmt = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
        plain = r["compile_s"] / base["compile_s"] if base and base["compile_s"] > 0 else None
        breaks = r["warmup"]["breaks"] + r["timed"]["breaks"]
        recompiles = r["warmup"]["recompiles"] + r["timed"]["recompiles"]
        print(
            f"{r['row']:10} {r['ms_per_generation']:7.0f}ms {fmt(r['x_compile'], '8.2f')}x "
            f"{fmt(r['ideal'], '5.2f')}x {fmt(r['achieved_over_ideal'], '9.3f')} {r['compile_s']:9.1f} "
            f"{fmt(plain, '6.2f')}x {r['dynamo_compile_s']:8.1f} {r['first_generation_s']:8.1f} {r['psnr_db']:6.1f} {breaks:6d} "
            f"{recompiles:6d}  {r['note']}"
        )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--per-class", type=int, default=4, help="digits per class (batch = 20 x this with CFG)"
    )
    parser.add_argument("--schedule", default="fora2", help="fora2, roblox-0.18, or a schedule JSON file")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up")
    parser.add_argument("--fbc-threshold", type=float, default=0.05)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.rows.split(",")) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {ROWS}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
