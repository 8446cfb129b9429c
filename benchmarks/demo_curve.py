"""The demo model's speed/quality curve over alpha: what each SmoothCache threshold buys and costs.

On the shipped digits DiT (`smoothcache_fx.demo`, guidance 1.5, 50 DDIM steps, 4 samples per digit):
calibrate once, then for each alpha build `Schedule.from_errors(errors, alpha)` and measure

- ideal speedup: FLOPs(uncached) / FLOPs(cached), from the calibration's per-branch FLOPs;
- PSNR of the cached samples against the uncached ones from the same noise, and the shipped
  classifier's accuracy on both (the demo's quality bar: PSNR >= 25 dB, accuracy within 2 points);
- achieved speedup, compiled: `transform(..., compile=True)` against `torch.compile(original)`,
  median of `--repeats` generations each, the rows interleaved so that load hits them alike.

    python benchmarks/demo_curve.py [--alphas 0.05,0.1,...] [--repeats 3] [--json curve.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from smoothcache_fx import Schedule, calibrate, transform
from smoothcache_fx.demo.classifier import classify, load_digits_classifier
from smoothcache_fx.demo.job import MAX_ACCURACY_DROP, MIN_PSNR_DB, psnr
from smoothcache_fx.demo.model import NUM_CLASSES, generate, load_demo_model

DEFAULT_ALPHAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.6)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alphas", default=",".join(map(str, DEFAULT_ALPHAS)))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="achieved speedup of eager variants")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    alphas = [float(a) for a in args.alphas.split(",")]
    model = load_demo_model()
    classifier = load_digits_classifier()
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)

    def sample(net):
        return generate(net, labels, args.steps, generator=torch.Generator().manual_seed(0))

    def run_calibration():
        for index in range(2):
            generate(model, labels, args.steps, generator=torch.Generator().manual_seed(1000 + index))

    errors = calibrate(model, run_calibration, lookahead=3, steps=args.steps, progress=False)
    uncached = sample(model)
    accuracy = (classify(uncached, classifier) == labels).float().mean().item()
    baseline = model if args.no_compile else torch.compile(copy.deepcopy(model), fullgraph=True)
    rows = {"uncached": baseline}
    points = []
    for alpha in alphas:
        schedule = Schedule.from_errors(errors, alpha=alpha)
        cached = sample(transform(copy.deepcopy(model), schedule))
        points.append(
            {
                "alpha": alpha,
                "ideal_speedup": errors.ideal_speedup(schedule),
                "psnr_db": psnr(cached, uncached),
                "accuracy": (classify(cached, classifier) == labels).float().mean().item(),
                "computed_steps": {key: sum(mask) for key, mask in schedule.masks.items()},
            }
        )
        rows[alpha] = transform(copy.deepcopy(model), schedule, compile=not args.no_compile)
    for net in rows.values():
        sample(net)  # capture and compile outside the timings
    times = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, net in rows.items():
            start = time.perf_counter()
            sample(net)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["uncached"])
    print(
        f"uncached: {base * 1e3:.0f} ms/generation ({'eager' if args.no_compile else 'compiled'}), "
        f"accuracy {accuracy:.1%}; {len(labels)} samples x {args.steps} steps"
    )
    print(f"{'alpha':>6}{'ideal':>8}{'achieved':>10}{'PSNR dB':>9}{'accuracy':>10}  quality bar")
    for point in points:
        point["achieved_speedup"] = base / statistics.median(times[point["alpha"]])
        point["keeps_quality"] = (
            point["psnr_db"] >= MIN_PSNR_DB and point["accuracy"] >= accuracy - MAX_ACCURACY_DROP
        )
        print(
            f"{point['alpha']:>6.2f}{point['ideal_speedup']:>7.2f}x{point['achieved_speedup']:>9.2f}x"
            f"{point['psnr_db']:>9.1f}{point['accuracy']:>10.1%}  {'kept' if point['keeps_quality'] else 'missed'}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"uncached_accuracy": accuracy, "uncached_s": base, "points": points}, handle, indent=1)
    return points


if __name__ == "__main__":
    main()
