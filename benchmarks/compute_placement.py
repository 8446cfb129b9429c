"""Where in a generation computes matter: forecast quality against the placement of computed steps.

On the demo DiT (50 DDIM steps, guidance 1.5), attn1 and ff forecast with order 1 at strength 0.9,
always computed at steps 0, 1 and the last. Two sweeps, quality only (eager: the placement changes
which steps compute, not what a step costs), PSNR against the uncached samples from the same noise:

- `stretches`: every 5th step, plus every 2nd step inside one stretch of 10 steps, for each of the
  five stretches: the same compute count, so the PSNR says which stretch a compute helps most;
- `grid`: three intervals, for steps [0, 15), [15, 35) and [35, 50)
  (`frontier.piecewise_forecast`), over a grid; prints the PSNR / ideal speed-up Pareto front;
- `boundaries` (not in `both`): the middle stretch's first and last step moved (10-18, 30-40) for
  interval triples around the grid's front, schedules of >= 3.3x ideal only; its Pareto front.

Run it on noise other than the frontier's (`--seed 7`, the default) to choose a piecewise
schedule, and judge the choice on the frontier's samples (`frontier.py --families`).

    python benchmarks/compute_placement.py [--sweep stretches|grid|both|boundaries] [--per-class 30]
        [--seed 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import itertools

import torch
from frontier import PIECEWISE_STRENGTH, piecewise_forecast

from smoothcache_fx import Schedule, calibrate, transform
from smoothcache_fx.demo.job import psnr
from smoothcache_fx.demo.model import NUM_CLASSES, generate, load_demo_model

STEPS = 50
GRID_OUTER = (4, 5, 6, 8)  # intervals of the first and last stretches
GRID_MIDDLE = (2, 3, 4)
BOUNDARY_FIRSTS = (10, 12, 15, 18)
BOUNDARY_LASTS = (30, 33, 35, 38, 40)
BOUNDARY_INTERVALS = ((4, 4, 8), (5, 4, 8), (6, 4, 8), (5, 4, 10), (6, 5, 10), (8, 4, 8), (5, 5, 8))


def stretch_schedule(start: int, length: int = 10, base: int = 5, dense: int = 2) -> Schedule:
    """Every `base`-th step, every `dense`-th inside [start, start + length), steps 1 and last."""
    mask = [
        int(
            i % base == 0 or i in (1, STEPS - 1) or (start <= i < start + length and (i - start) % dense == 0)
        )
        for i in range(STEPS)
    ]
    schedule = Schedule(
        STEPS, {"attn1": mask, "ff": mask}, {"generator": "stretch", "dense": [start, start + length]}
    )
    return schedule.with_orders({"attn1": 1, "ff": 1})


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", choices=("stretches", "grid", "both", "boundaries"), default="both")
    parser.add_argument("--per-class", type=int, default=30, help="samples per digit (30: 300 in all)")
    parser.add_argument("--seed", type=int, default=7, help="noise seed (the frontier's is 0)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_demo_model()
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)

    def sample(model, labels=labels, seed=args.seed):
        with torch.no_grad():
            return generate(model, labels, STEPS, generator=torch.Generator().manual_seed(seed))

    calibration_labels = torch.arange(NUM_CLASSES).repeat_interleave(2)
    errors = calibrate(
        base, lambda: sample(base, calibration_labels, 1000), lookahead=1, steps=STEPS, progress=False
    )
    uncached = sample(base)
    rows = []

    def measure(sweep: str, setting: str, schedule: Schedule) -> None:
        cached = sample(transform(copy.deepcopy(base), schedule.with_strengths(PIECEWISE_STRENGTH)))
        row = {
            "sweep": sweep,
            "setting": setting,
            "computes": sum(schedule.masks["ff"]),
            "ideal_speedup": errors.ideal_speedup(schedule),
            "psnr_db": psnr(cached, uncached),
        }
        rows.append(row)
        print(
            f"{sweep:>9}  {setting:<22} {row['computes']:>3} computes  ideal {row['ideal_speedup']:.2f}x  "
            f"PSNR {row['psnr_db']:5.1f} dB",
            flush=True,
        )

    print(f"{len(labels)} samples (seed {args.seed}), {STEPS} steps, order 1, strength {PIECEWISE_STRENGTH}")
    if args.sweep in ("stretches", "both"):
        measure("stretches", "every 5th, none dense", piecewise_forecast(STEPS, (5, 5, 5)))
        for start in range(0, STEPS, 10):
            measure("stretches", f"every 2nd in [{start}, {start + 10})", stretch_schedule(start))
    if args.sweep in ("grid", "both"):
        for first, middle, last in itertools.product(GRID_OUTER, GRID_MIDDLE, GRID_OUTER):
            measure(
                "grid", f"every {first} / {middle} / {last}", piecewise_forecast(STEPS, (first, middle, last))
            )
        _print_front([r for r in rows if r["sweep"] == "grid"])
    if args.sweep == "boundaries":
        for starts in itertools.product(BOUNDARY_FIRSTS, BOUNDARY_LASTS):
            for intervals in BOUNDARY_INTERVALS:
                schedule = piecewise_forecast(STEPS, intervals, starts)
                if errors.ideal_speedup(schedule) >= 3.3:
                    measure("boundary", "{} / {} / {} from {} / {}".format(*intervals, *starts), schedule)
        _print_front(rows)
    return rows


def _print_front(rows: list[dict]) -> None:
    front, best = [], float("-inf")
    for row in sorted(rows, key=lambda r: -r["ideal_speedup"]):
        if row["psnr_db"] > best:
            best = row["psnr_db"]
            front.append(row)
    print("Pareto front (fastest first):")
    for row in front:
        print(f"  {row['setting']:<22} ideal {row['ideal_speedup']:.2f}x  PSNR {row['psnr_db']:5.1f} dB")


if __name__ == "__main__":
    main()
