"""Speed/quality frontier on the demo DiT: ours (reuse, forecast) against diffusers' caching hooks
and Roblox's SmoothCache helper.

For every method and setting, on the shipped digits DiT (50 DDIM steps, guidance 1.5):

- quality over `--samples` samples (evenly over the 10 digits, one batch, fixed noise): PSNR of the
  samples against the uncached ones from the same noise, the shipped classifier's accuracy, and the
  Fréchet distance in the classifier's 64-d feature space (its penultimate layer; the FID recipe
  with this classifier in place of Inception) to the uncached samples and to the held-out real
  digits (the fifth of scikit-learn's digits the classifier never saw; needs scikit-learn);
- speed on the demo's batch (`--time-per-class` per digit): median time per generation over
  `--repeats`, compiled where the method compiles (ours: `transform(..., compile=True)`; the
  uncached baseline: `torch.compile(model, fullgraph=True)`; hooks and the helper:
  `torch.compile(model)`, graph breaks allowed, or eager when that fails), against the compiled
  uncached model timed beside it. Each row starts from `torch._dynamo.reset()` with the baseline
  compiled again, and the two alternate: rows share code objects (the DiT's forward, each hook's
  `new_forward`), whose entries and recompiles would otherwise slow each other (an interleaved
  baseline ran 1.7x slower at the end of a quick run), and the pairing cancels the machine's drift
  (22% over a run that timed rows apart). Graph breaks and recompiles are counted per row;
- ideal speed-up where a FLOP model exists (ours: calibrated per-branch FLOPs).

Methods: ours with reuse (alpha sweep), ours with forecasting (alpha sweep, predictor orders <= 2;
at full strength and damped to 0.75), ours with uniform forecasting (every n-th step, order 1, full
and damped), ours with piecewise forecasting (three intervals along the generation, strength 0.9),
diffusers 0.42 hooks that apply to `DiTTransformer2DModel` (FirstBlockCache thresholds,
TaylorSeerCache intervals, MagCache thresholds with ratios from its own calibration run,
PyramidAttentionBroadcast ranges, FasterCache with the guidance halves in its order), and
`SmoothCache.DiffuserCacheHelper` (pip dit-smoothcache, attn1 only) with our reuse schedules' attn1
masks. A method that cannot run on this model is reported as skipped with the reason.

    python benchmarks/frontier.py                     # the full run (quiet CPU: about an hour)
    python benchmarks/frontier.py --quick             # 100 samples, 1 repeat, fewer settings
    python benchmarks/frontier.py --json frontier.json --plot docs/frontier.png
    python benchmarks/frontier.py --quality-from frontier.json --json timed.json   # timing again
    python benchmarks/frontier.py --plot-from frontier.json damped.json --plot docs/frontier.png
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import gc
import io
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from common import dynamo_counts, dynamo_delta, own_forward

from smoothcache_fx import Schedule, calibrate, transform
from smoothcache_fx.demo.classifier import load_digits_classifier
from smoothcache_fx.demo.job import MAX_ACCURACY_DROP, MIN_PSNR_DB, psnr
from smoothcache_fx.demo.model import NUM_CLASSES, generate, load_demo_model
from smoothcache_fx.demo.train import load_digits_tensors, test_mask

ALPHAS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8)
QUICK_ALPHAS = (0.1, 0.2, 0.4, 0.8)
# Forecast strength of the damped families (the demo's default, `DemoOptions.strength`).
DAMPED = 0.75
# The piecewise family: intervals for steps [0, 15), [15, 35) and [35, 50) of 50; the settings are
# the Pareto front between 2.99x and 3.61x ideal found on other noise than the frontier's
# (`benchmarks/compute_placement.py`, seed 7): computes in the middle stretch buy the most PSNR.
# Strength 0.9 had the best PSNR at every interval measured (`forecast_strength.py`).
PIECE_STARTS = (15, 35)
PIECEWISE = ((5, 3, 5), (4, 4, 5), (5, 4, 5), (4, 4, 8), (5, 4, 8))
PIECEWISE_STRENGTH = 0.9


@dataclass
class Method:
    """One point to measure: `make()` returns (model to sample with, reset before a generation)."""

    family: str
    setting: str
    make: Callable[[], tuple[torch.nn.Module, Callable[[], None]]]
    ideal_speedup: float | None = None
    # Ours: the compiled model for timing, built apart so that the quality batch (another batch
    # size) runs the eager variants instead of compiling every variant twice.
    make_compiled: Callable[[], torch.nn.Module] | None = None
    result: dict = field(default_factory=dict)
    # The eager model and its reset from the quality pass, kept for the timing pass.
    net: torch.nn.Module | None = None
    reset: Callable[[], None] | None = None


class _InCacheContext(torch.nn.Module):
    """A diffusers-hooked DiT called inside `cache_context("cond")` (the hooks keep their state per
    context), with the current timestep published for PAB's and FasterCache's callbacks.

    `unconditional_first`: the demo batches guidance as [conditional, null class]; FasterCache
    splits a batch as [unconditional, conditional] (diffusers' pipelines' order), so for it the
    halves are swapped on the way in and back on the way out."""

    def __init__(self, model, clock: dict, unconditional_first: bool = False):
        super().__init__()
        self.model = model
        self.clock = clock
        self.unconditional_first = unconditional_first

    def forward(self, x, timestep, class_labels):
        self.clock["t"] = int(timestep.reshape(-1)[0])
        if self.unconditional_first:
            x, timestep, class_labels = (_swap_halves(t) for t in (x, timestep, class_labels))
        with self.model.cache_context("cond"):
            out = self.model(hidden_states=x, timestep=timestep, class_labels=class_labels)
        if self.unconditional_first:
            out.sample = _swap_halves(out.sample)
        return out


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2)
    return torch.cat([second, first])


def _hooked(base, config_factory, unconditional_first: bool = False):
    """A copy of `base` with a diffusers cache enabled (DiTTransformer2DModel gets CacheMixin: its
    BasicTransformerBlocks are in diffusers' block registry, its attention layers diffusers'
    Attention), wrapped to run in a cache context."""
    from diffusers.models.cache_utils import CacheMixin

    model = copy.deepcopy(base)
    model.__class__ = type(type(model).__name__, (type(model), CacheMixin), {})
    clock = {"t": 999}
    model.enable_cache(config_factory(clock))
    return _InCacheContext(model, clock, unconditional_first), model._reset_stateful_cache


def mag_cache_ratios(base, labels, steps: int) -> list[float]:
    """MagCache's own calibration (`MagCacheConfig(calibrate=True)`): one uncached generation with
    the hooks measuring each step's residual magnitude ratio, which diffusers prints at the end."""
    from diffusers.hooks import MagCacheConfig

    net, reset = _hooked(base, lambda clock: MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    reset()
    with torch.no_grad(), contextlib.redirect_stdout(printed):
        generate(net, labels, steps, generator=torch.Generator().manual_seed(1000))
    lists = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
    if not lists:
        raise RuntimeError(f"MagCache calibration printed no ratios: {printed.getvalue()[:300]!r}")
    return [float(value) for value in ast.literal_eval(lists[-1])]


def _helper(base, mask):
    with contextlib.redirect_stdout(io.StringIO()):  # it prints warnings on import
        from SmoothCache import DiffuserCacheHelper
    model = copy.deepcopy(base)
    helper = DiffuserCacheHelper(model, schedule={"attn1": list(mask)})
    helper.enable()
    return model, helper.reset_state


def uniform_forecast(steps: int, interval: int) -> Schedule:
    """attn1 and ff computed every `interval`-th step and at steps 1 and the last (the issue's
    forward-patching recipe), order 1 on both: the uncalibrated counterpart of TaylorSeer's
    `cache_interval`."""
    schedule = Schedule.uniform(steps, interval, ["attn1", "ff"], extra_steps=(1, steps - 1))
    return schedule.with_orders({"attn1": 1, "ff": 1})


def piecewise_forecast(
    steps: int, intervals: tuple[int, int, int], starts: tuple[int, int] = PIECE_STARTS
) -> Schedule:
    """attn1 and ff computed at three intervals, for the first, middle and last stretch of the
    generation (`starts` of 50 steps, scaled to `steps`), and at steps 1 and the last; order 1."""
    starts = [round(start * steps / 50) for start in starts]
    pieces = dict(zip([0, *starts], intervals, strict=True))
    schedule = Schedule.piecewise(steps, pieces, ["attn1", "ff"], extra_steps=(1, steps - 1))
    return schedule.with_orders({"attn1": 1, "ff": 1})


def methods(base, errors, steps: int, quick: bool, mag_ratios: list[float]) -> list[Method]:
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    found = []
    for alpha in QUICK_ALPHAS if quick else ALPHAS:
        for family, max_order, strength in (
            ("ours reuse", 0, 1.0),
            ("ours forecast", 2, 1.0),
            ("ours forecast damped", 2, DAMPED),
        ):
            schedule = Schedule.from_errors(errors, alpha, max_order=max_order).with_strengths(strength)
            found.append(
                Method(
                    family,
                    f"alpha={alpha}" + (f" orders={dict(schedule.orders)}" if schedule.orders else ""),
                    lambda s=schedule: (transform(copy.deepcopy(base), s), lambda: None),
                    errors.ideal_speedup(schedule),
                    lambda s=schedule: transform(copy.deepcopy(base), s, compile=True),
                )
            )
            if max_order == 0:
                found.append(
                    Method(
                        "SmoothCache helper",
                        f"alpha={alpha} (attn1 mask)",
                        lambda m=schedule.masks["attn1"]: _helper(base, m),
                    )
                )
    for interval, strength in itertools.product((3, 4) if quick else (2, 3, 4, 5), (1.0, DAMPED)):
        schedule = uniform_forecast(steps, interval).with_strengths(strength)
        found.append(
            Method(
                "ours forecast uniform" + (" damped" if strength < 1 else ""),
                f"every {interval} (+1, last), order 1" + (f", strength {strength}" if strength < 1 else ""),
                lambda s=schedule: (transform(copy.deepcopy(base), s), lambda: None),
                errors.ideal_speedup(schedule),
                lambda s=schedule: transform(copy.deepcopy(base), s, compile=True),
            )
        )

    for pieces in ((5, 4, 5), (4, 4, 5)) if quick else PIECEWISE:
        schedule = piecewise_forecast(steps, pieces).with_strengths(PIECEWISE_STRENGTH)
        found.append(
            Method(
                "ours forecast piecewise",
                "every {} / {} / {} from steps 0 / {} / {} (+1, last), order 1, strength {}".format(
                    *pieces, *PIECE_STARTS, PIECEWISE_STRENGTH
                ),
                lambda s=schedule: (transform(copy.deepcopy(base), s), lambda: None),
                errors.ideal_speedup(schedule),
                lambda s=schedule: transform(copy.deepcopy(base), s, compile=True),
            )
        )

    def hook(family: str, setting: str, config, unconditional_first: bool = False) -> Method:
        """A diffusers cache hook: `config(clock)` builds its config (`clock["t"]` is the timestep)."""
        return Method(family, setting, lambda: _hooked(base, config, unconditional_first))

    for threshold in (0.05, 0.1, 0.2) if quick else (0.02, 0.05, 0.1, 0.2, 0.4):
        found.append(
            hook(
                "diffusers FirstBlockCache",
                f"threshold={threshold}",
                lambda clock, th=threshold: FirstBlockCacheConfig(threshold=th),
            )
        )
    for interval in (2, 3) if quick else (2, 3, 4, 5):
        found.append(
            hook(
                "diffusers TaylorSeerCache",
                f"cache_interval={interval} (attn1, ff)",
                # Its default patterns (`^transformer_blocks.*attn`, re.fullmatch) match no module of
                # diffusers' DiT (attn1): name the branches ours caches.
                lambda clock, n=interval: TaylorSeerCacheConfig(
                    cache_interval=n,
                    disable_cache_before_step=3,
                    max_order=1,
                    taylor_factors_dtype=torch.float32,
                    cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"],
                ),
            )
        )
    for threshold in (0.06, 0.12) if quick else (0.03, 0.06, 0.12, 0.24):
        found.append(
            hook(
                "diffusers MagCache",
                f"threshold={threshold}",
                lambda clock, th=threshold: MagCacheConfig(
                    threshold=th, num_inference_steps=steps, mag_ratios=mag_ratios
                ),
            )
        )
    for skip in (2, 3) if quick else (2, 3, 4):
        found.append(
            hook(
                "diffusers PAB",
                f"spatial skip {skip}",
                lambda clock, k=skip: PyramidAttentionBroadcastConfig(
                    spatial_attention_block_skip_range=k,
                    spatial_attention_timestep_skip_range=(-1, 1000),
                    current_timestep_callback=lambda: clock["t"],
                ),
            )
        )
    for skip in (2, 3) if quick else (2, 3, 4):
        found.append(
            hook(
                "diffusers FasterCache",
                f"spatial skip {skip}, unconditional every 5",
                lambda clock, k=skip: FasterCacheConfig(
                    spatial_attention_block_skip_range=k,
                    spatial_attention_timestep_skip_range=(-1, 681),
                    unconditional_batch_skip_range=5,
                    unconditional_batch_timestep_skip_range=(-1, 641),
                    current_timestep_callback=lambda: clock["t"],
                    attention_weight_callback=lambda _: 0.5,
                    tensor_format="BCHW",
                    _unconditional_conditional_input_kwargs_identifiers=[
                        "hidden_states",
                        "timestep",
                        "class_labels",
                    ],
                ),
                unconditional_first=True,
            )
        )
    return found


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (the FID formula):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the root through the eigenvalues of
    S_a^(1/2) S_b S_a^(1/2) (symmetric, so real and non-negative up to rounding)."""
    a, b = a.double().numpy(), b.double().numpy()
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(sa)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ sb @ root_a)
    distance = mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(middle, 0, None)).sum()
    return float(max(distance, 0.0))  # equal sets give 0 up to rounding, which may be -1e-12


def _known_quality(path: str | None, args) -> dict[str, dict]:
    """Quality results by "family: setting" from an earlier run's JSON (same samples and steps)."""
    if path is None:
        return {}
    with open(path) as handle:
        earlier = json.load(handle)
    if (earlier["samples"], earlier["steps"]) != (args.samples, args.steps):
        raise SystemExit(
            f"--quality-from {path} has {earlier['samples']} samples x {earlier['steps']} steps; this run "
            f"{args.samples} x {args.steps}: quality would not be comparable."
        )
    keep = (
        "family",
        "setting",
        "ideal_speedup",
        "psnr_db",
        "accuracy",
        "frechet",
        "frechet_real",
        "cache_bytes",
    )
    return {f"{p['family']}: {p['setting']}": {k: p[k] for k in keep} for p in earlier["points"]}


def _held_out_features(classifier) -> torch.Tensor | None:
    """Classifier features of the held-out real digits (the fifth of scikit-learn's digits the
    classifier never trained on), or None without scikit-learn."""
    try:
        images, labels = load_digits_tensors()
    except ImportError as error:
        print(f"[note] no distance to real digits (pip install scikit-learn): {error}")
        return None
    return _features(classifier, images[test_mask(len(labels))])[0]


def _features(classifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features [N, 64], predicted labels)."""
    with torch.no_grad():
        hidden = classifier.head(classifier.features(images))
        return hidden, classifier.out(hidden).argmax(-1)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=500, help="quality samples (500)")
    parser.add_argument("--time-per-class", type=int, default=4, help="timing batch per digit (4)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100 samples, 1 repeat, fewer settings")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument(
        "--families",
        type=lambda text: text.split(","),
        help="comma-separated families to run (default all), e.g. 'ours forecast uniform'",
    )
    parser.add_argument(
        "--quality-from",
        help="a --json of an earlier run with the same --samples and --steps: its quality figures are "
        "taken for every method and setting it has (the timing is measured again)",
    )
    parser.add_argument("--json")
    parser.add_argument("--plot")
    parser.add_argument(
        "--plot-from",
        nargs="+",
        metavar="JSON",
        help="plot the points of these --json files (same samples and steps; a family and setting "
        "in a later file replaces the earlier one) into --plot, measuring nothing",
    )
    args = parser.parse_args(argv)
    if args.plot_from:
        if not args.plot:
            parser.error("--plot-from needs --plot FILE: where to write the plot")
        summary = merged_summaries(args.plot_from)
        _plot(summary, args.plot)
        return summary["points"]
    if args.quick:
        args.samples, args.repeats = min(args.samples, 100), 1
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_demo_model()
    classifier = load_digits_classifier()
    quality_labels = torch.arange(args.samples) % NUM_CLASSES
    timing_labels = torch.arange(NUM_CLASSES).repeat_interleave(args.time_per_class)

    def sample(net, labels, reset=lambda: None, seed=0):
        reset()
        # The SmoothCache helper prints a line per branch call.
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            return generate(net, labels, args.steps, generator=torch.Generator().manual_seed(seed))

    def run_calibration():
        for index in range(2):
            sample(base, timing_labels, seed=1000 + index)

    errors = calibrate(base, run_calibration, lookahead=3, steps=args.steps, progress=False, max_order=2)
    uncached = sample(base, quality_labels)
    uncached_features, uncached_pred = _features(classifier, uncached)
    uncached_accuracy = (uncached_pred == quality_labels).float().mean().item()
    real_features = _held_out_features(classifier)
    uncached_fd_real = None if real_features is None else frechet_distance(real_features, uncached_features)
    mag_ratios = mag_cache_ratios(base, timing_labels, args.steps)

    known = _known_quality(args.quality_from, args)
    points = []
    for method in methods(base, errors, args.steps, args.quick, mag_ratios):
        name = f"{method.family}: {method.setting}"
        if args.families and method.family not in args.families:
            continue
        try:  # a hook that does not fit this model: report it and go on
            net, reset = method.make()
            if name in known:
                method.result, method.net, method.reset = known[name], net, reset
                points.append(method)
                continue
            images = sample(net, quality_labels, reset)
        except Exception as error:
            print(f"[skip] {name}: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}")
            continue
        features, predicted = _features(classifier, images)
        method.result = {
            "family": method.family,
            "setting": method.setting,
            "ideal_speedup": method.ideal_speedup,
            "psnr_db": psnr(images, uncached),
            "accuracy": (predicted == quality_labels).float().mean().item(),
            "frechet": frechet_distance(uncached_features, features),
            "frechet_real": None if real_features is None else frechet_distance(real_features, features),
            "cache_bytes": net.smoothcache.cache_bytes if hasattr(net, "smoothcache") else None,
        }
        method.net, method.reset = net, reset
        points.append(method)
        del images

    def warm(name, compiled, net, reset):
        try:
            sample(compiled, timing_labels, reset)  # compiles here
            return compiled
        except Exception as error:
            print(f"[eager] {name}: torch.compile failed ({type(error).__name__}); timing eagerly")
            sample(net, timing_labels, reset)
            return net

    def time_beside_baseline(method) -> tuple[float, float]:
        """(row, baseline) median seconds per generation. dynamo's caches are emptied first: rows
        share code objects (the DiT's forward, each hook's `new_forward`), and their entries and
        recompiles would otherwise slow each other, which no deployment of one of them pays. So the
        compiled uncached baseline is compiled again beside each row and the two alternate, which
        also cancels the machine's drift (22% over the run that timed rows apart)."""
        name = f"{method.family}: {method.setting}"
        torch._dynamo.reset()
        gc.collect()  # not inside a timed generation
        uncached_net = own_forward(copy.deepcopy(base), "uncached")
        baseline = warm("uncached", torch.compile(uncached_net, fullgraph=True), uncached_net, lambda: None)
        compiled = method.make_compiled() if method.make_compiled else torch.compile(method.net)
        before = dynamo_counts()
        compiled = warm(name, compiled, method.net, method.reset)
        times = {"row": [], "baseline": []}
        for _ in range(args.repeats):
            for key, (model, reset) in (
                ("baseline", (baseline, lambda: None)),
                ("row", (compiled, method.reset)),
            ):
                start = time.perf_counter()
                sample(model, timing_labels, reset)
                times[key].append(time.perf_counter() - start)
        dynamo = dynamo_delta(before, dynamo_counts())
        method.result.update(
            compiled=compiled is not method.net,
            graph_breaks=dynamo["breaks"],
            recompiles=dynamo["recompiles"],
        )
        return statistics.median(times["row"]), statistics.median(times["baseline"])

    for method in points:
        row_s, baseline_s = time_beside_baseline(method)
        method.result.update(row_s=row_s, baseline_s=baseline_s, measured_speedup=baseline_s / row_s)
        method.net = None
    baselines = [method.result["baseline_s"] for method in points]
    print(
        f"uncached compiled, timed beside each row: median {statistics.median(baselines) * 1e3:.0f} ms/generation, "
        f"{min(baselines) * 1e3:.0f}-{max(baselines) * 1e3:.0f} over the run"
    )
    base_s = statistics.median(baselines)
    results = []
    print(
        f"uncached compiled: {base_s * 1e3:.0f} ms/generation ({len(timing_labels)} samples x "
        f"{args.steps} steps); quality over {args.samples} samples, uncached accuracy {uncached_accuracy:.1%}"
        + (
            ""
            if uncached_fd_real is None
            else f", uncached FD to held-out real digits {uncached_fd_real:.3f}"
        )
    )
    print(
        f"{'method':<58}{'ideal':>7}{'measured':>9}{'PSNR':>7}{'acc':>7}{'FD':>8}{'FD real':>8}"
        f"{'breaks':>7}{'recomp':>7}  bar"
    )
    for method in points:
        name = f"{method.family}: {method.setting}"
        result = dict(method.result)
        result["keeps_quality"] = (
            result["psnr_db"] >= MIN_PSNR_DB and result["accuracy"] >= uncached_accuracy - MAX_ACCURACY_DROP
        )
        results.append(result)
        ideal = "-" if result["ideal_speedup"] is None else f"{result['ideal_speedup']:.2f}x"
        print(
            f"{name[:57]:<58}{ideal:>7}{result['measured_speedup']:>8.2f}x{result['psnr_db']:>7.1f}"
            f"{result['accuracy']:>7.1%}{result['frechet']:>8.3f}"
            f"{'-' if result['frechet_real'] is None else format(result['frechet_real'], '.3f'):>8}"
            f"{result['graph_breaks']:>7}{result['recompiles']:>7}  {'kept' if result['keeps_quality'] else '-'}"
            f"{'' if result['compiled'] else ' (eager)'}"
        )
    summary = {
        "samples": args.samples,
        "timing_samples": len(timing_labels),
        "steps": args.steps,
        "repeats": args.repeats,
        "uncached_s": base_s,
        "uncached_accuracy": uncached_accuracy,
        "uncached_frechet_real": uncached_fd_real,
        "points": results,
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=1)
    if args.plot:
        _plot(summary, args.plot)
    return results


def merged_summaries(paths: list[str]) -> dict:
    """The first summary with the points of all: a (family, setting) of a later file replaces the
    same one of an earlier file. Files of other samples or steps are refused: their PSNRs differ."""
    summaries = []
    for path in paths:
        with open(path) as handle:
            summaries.append(json.load(handle))
    first = summaries[0]
    points = {}
    for path, summary in zip(paths, summaries, strict=True):
        if (summary["samples"], summary["steps"]) != (first["samples"], first["steps"]):
            raise SystemExit(
                f"--plot-from {path} has {summary['samples']} samples x {summary['steps']} steps; "
                f"{paths[0]} has {first['samples']} x {first['steps']}. Plot runs of one quality set."
            )
        points.update({(p["family"], p["setting"]): p for p in summary["points"]})
    return {**first, "points": list(points.values())}


def _plot(summary: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.2), layout="constrained")
    axis = figure.subplots()
    families = dict.fromkeys(p["family"] for p in summary["points"])
    for index, family in enumerate(families):
        chosen = sorted(
            (p for p in summary["points"] if p["family"] == family), key=lambda p: p["measured_speedup"]
        )
        # Matplotlib's cycle has ten colours: families beyond get squares and dashes.
        axis.plot(
            [p["measured_speedup"] for p in chosen],
            [p["psnr_db"] for p in chosen],
            color=f"C{index % 10}",
            marker="o" if index < 10 else "s",
            ls="-" if index < 10 else "--",
            label=family,
        )
    axis.axhline(MIN_PSNR_DB, color="black", ls="--", lw=1, label=f"quality bar {MIN_PSNR_DB:g} dB")
    axis.set_xlabel("measured speed-up vs compiled uncached")
    axis.set_ylabel("PSNR vs uncached (dB)")
    axis.set_title(
        f"demo DiT, {summary['steps']} steps, quality over {summary['samples']} samples", fontsize=10
    )
    axis.legend(fontsize=7)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
