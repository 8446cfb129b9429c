"""What a forecast step costs against a reuse step, compiled, on the demo DiT.

One schedule, FORA-2 on attn1 and ff (every other step skips both), run with predictor orders 0
(reuse), 1 and 2. Each model call of a generation is timed on its own (median over `--repeats`
generations); the report gives the median skipped-step and computed-step times per order and the
ratios to order 0. A skipped step of order k reads k+1 history buffers per branch instead of one
cache; a computed step shifts the history (k more reads and writes of the branch's size).

    python benchmarks/forecast_cost.py [--steps 50] [--per-class 4] [--repeats 5] [--no-compile]
        [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from smoothcache_fx import Schedule, transform
from smoothcache_fx.demo.model import NUM_CLASSES, generate, load_demo_model


class _CallTimer:
    """Times every model call (forward pre/post hooks), in call order."""

    def __init__(self, model):
        self.times: list[float] = []
        self._start = 0.0
        model.register_forward_pre_hook(lambda *_: self._begin())
        model.register_forward_hook(lambda *_: self.times.append(time.perf_counter() - self._start))

    def _begin(self):
        self._start = time.perf_counter()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_demo_model()
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    schedule = Schedule.uniform(args.steps, 2, ["attn1", "ff"])
    mask = schedule.masks["attn1"]
    models, timers = {}, {}
    for order in (0, 1, 2):
        orders = {"attn1": order, "ff": order} if order else {}
        models[order] = transform(
            copy.deepcopy(base), schedule.with_orders(orders), compile=not args.no_compile
        )
        timers[order] = _CallTimer(models[order])
    with torch.no_grad():
        for order, model in models.items():  # capture and compile outside the timings
            generate(model, labels, args.steps, generator=torch.Generator().manual_seed(0))
            timers[order].times.clear()
        for _ in range(args.repeats):  # interleaved, so load on the machine hits every order alike
            for model in models.values():
                generate(model, labels, args.steps, generator=torch.Generator().manual_seed(0))
    rows = {}
    for order, timer in timers.items():
        calls = [timer.times[i :: args.steps] for i in range(args.steps)]
        per_step = [statistics.median(values) for values in calls]
        rows[order] = {
            "skipped_ms": 1e3 * statistics.median(t for t, on in zip(per_step, mask, strict=True) if not on),
            "computed_ms": 1e3 * statistics.median(t for t, on in zip(per_step, mask, strict=True) if on),
            "cache_bytes": models[order].smoothcache.cache_bytes,
        }
    print(
        f"demo DiT, {len(labels)} samples (x2 guidance batch), {args.steps} steps, FORA-2 on attn1+ff, "
        f"{'eager' if args.no_compile else 'compiled'}, {torch.get_num_threads()} threads; median per model "
        f"call over {args.repeats} generations"
    )
    print(
        f"{'order':>5}{'skipped ms':>12}{'vs reuse':>10}{'computed ms':>13}{'vs reuse':>10}{'cache KiB':>11}"
    )
    for order, row in rows.items():
        print(
            f"{order:>5}{row['skipped_ms']:>12.3f}{row['skipped_ms'] / rows[0]['skipped_ms']:>9.2f}x"
            f"{row['computed_ms']:>13.3f}{row['computed_ms'] / rows[0]['computed_ms']:>9.2f}x"
            f"{row['cache_bytes'] / 1024:>11.0f}"
        )
    return rows


if __name__ == "__main__":
    main()
