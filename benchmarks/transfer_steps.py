"""How well a schedule for 20 steps derived from a 50-step calibration matches calibrating at 20.

On the shipped digits DiT (`smoothcache_fx.demo`), guidance 1.5, DDIM: calibrate at 50 steps and at
20 steps (the same labels and seeds), then for a range of alphas compare
`Schedule.from_errors(errors_50, alpha, steps=20)` with `Schedule.from_errors(errors_20, alpha)`:
the share of equal mask entries and the FLOP-derived ideal speed-ups, per component and per block.
The alphas are the 0.1..0.9 quantiles of the 20-step errors, so every alpha changes something.

    python benchmarks/transfer_steps.py [--generations 2] [--per-class 2] [--threads 1]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from smoothcache_fx import Schedule, calibrate
from smoothcache_fx.demo.model import NUM_CLASSES, generate, load_demo_model


def calibrated(model, steps: int, generations: int, per_class: int):
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)

    def run():
        for index in range(generations):
            generate(model, labels, steps, generator=torch.Generator().manual_seed(1000 + index))

    return calibrate(model, run, lookahead=3, steps=steps, progress=False)


def agreement(a: Schedule, b: Schedule, branches) -> float:
    """Share of (branch, step) entries on which the two schedules decide alike."""
    equal = [x == y for path in branches for x, y in zip(a.mask_for(path), b.mask_for(path), strict=True)]
    return float(np.mean(equal))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_demo_model()
    errors_50 = calibrated(model, 50, args.generations, args.per_class)
    errors_20 = calibrated(model, 20, args.generations, args.per_class)
    values = np.concatenate(
        [np.asarray(curve, dtype=float).ravel() for curves in errors_20.errors.values() for curve in curves]
    )
    alphas = np.quantile(values[np.isfinite(values)], np.linspace(0.1, 0.9, 7))
    rows = {}
    for per_block in (False, True):
        agree, resampled, direct = [], [], []
        for alpha in alphas:
            derived = Schedule.from_errors(errors_50, float(alpha), per_block=per_block, steps=20)
            direct_schedule = Schedule.from_errors(errors_20, float(alpha), per_block=per_block)
            agree.append(agreement(derived, direct_schedule, errors_20.errors))
            resampled.append(errors_20.ideal_speedup(derived))
            direct.append(errors_20.ideal_speedup(direct_schedule))
        name = "per block" if per_block else "per component"
        rows[name] = {
            "equal_mask_entries": float(np.mean(agree)),
            "ideal_speedup_resampled": float(np.mean(resampled)),
            "ideal_speedup_direct": float(np.mean(direct)),
            "largest_gap": float(np.max(np.abs(np.subtract(resampled, direct)))),
        }
    print(f"alphas (0.1..0.9 quantiles of the 20-step errors): {np.round(alphas, 3).tolist()}")
    print(f"{'':<14}{'equal entries':>14}{'ideal resampled':>17}{'ideal direct':>14}{'largest gap':>13}")
    for name, row in rows.items():
        print(
            f"{name:<14}{row['equal_mask_entries']:>14.2f}{row['ideal_speedup_resampled']:>16.2f}x"
            f"{row['ideal_speedup_direct']:>13.2f}x{row['largest_gap']:>12.2f}x"
        )
    return rows


if __name__ == "__main__":
    main()
