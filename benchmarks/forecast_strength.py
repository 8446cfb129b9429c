"""How far a forecast should extrapolate: quality against forecast strength on the demo DiT.

Uniform forecast schedules (attn1 and ff computed every n-th step and at steps 1 and the last,
order 1: `frontier.uniform_forecast`) at forecast strengths from 0 (plain reuse) to 1 (the full
line through the last two computed outputs), eagerly: the strength changes only the weights, so
every strength of one interval runs the same graphs at the same speed. Per point: PSNR against the
uncached samples from the same noise, the shipped classifier's accuracy (and its change against
uncached), and how often the cached sample is classified as its uncached twin.

    python benchmarks/forecast_strength.py [--per-class 50] [--intervals 3,4,5]
        [--strengths 0,0.5,0.6,0.75,0.9,1] [--steps 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy

import torch
from frontier import uniform_forecast

from smoothcache_fx import transform
from smoothcache_fx.demo.classifier import classify, load_digits_classifier
from smoothcache_fx.demo.job import psnr
from smoothcache_fx.demo.model import NUM_CLASSES, generate, load_demo_model


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=50, help="samples per digit (50: 500 in all)")
    parser.add_argument("--intervals", type=lambda t: [int(v) for v in t.split(",")], default=[3, 4, 5])
    parser.add_argument("--strengths", type=_floats, default=[0.0, 0.5, 0.6, 0.75, 0.9, 1.0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, classifier = load_demo_model(), load_digits_classifier()
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)

    def sample(model):
        return generate(model, labels, args.steps, generator=torch.Generator().manual_seed(0))

    rows = []
    with torch.no_grad():
        uncached = sample(base)
        uncached_pred = classify(uncached, classifier)
        uncached_accuracy = (uncached_pred == labels).float().mean().item()
        print(f"{len(labels)} samples, {args.steps} steps; uncached accuracy {uncached_accuracy:.1%}")
        print(f"{'interval':>8} {'strength':>8} {'PSNR dB':>8} {'accuracy':>9} {'change':>7} {'agrees':>7}")
        for interval in args.intervals:
            for strength in args.strengths:
                schedule = uniform_forecast(args.steps, interval).with_strengths(strength)
                cached = sample(transform(copy.deepcopy(base), schedule))
                pred = classify(cached, classifier)
                row = {
                    "interval": interval,
                    "strength": strength,
                    "psnr_db": psnr(cached, uncached),
                    "accuracy": (pred == labels).float().mean().item(),
                    "agrees": (pred == uncached_pred).float().mean().item(),
                }
                row["change"] = row["accuracy"] - uncached_accuracy
                rows.append(row)
                print(
                    f"{interval:>8} {strength:>8.2f} {row['psnr_db']:>8.1f} {row['accuracy']:>9.1%} "
                    f"{100 * row['change']:>+6.1f} {row['agrees']:>7.1%}",
                    flush=True,
                )
    return rows


if __name__ == "__main__":
    main()
