"""`smoothcache-fx demo`: calibrate, schedule, compile and measure on the shipped digits DiT.

What a newcomer should see in a few minutes on a laptop CPU: real denoising with a trained model,
a real calibration, the schedule it gives, the speed of compiled cached generation against compiled
uncached generation, and whether the samples stayed the same digits (PSNR against the uncached
samples from the same noise, and the shipped classifier's accuracy on both).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from smoothcache_fx.calibrate import calibrate
from smoothcache_fx.demo.candidates import (
    calibrated_families,
    orders_note,
    piecewise_family,
    scan_candidates,
    uniform_family,
)
from smoothcache_fx.demo.classifier import classify, load_digits_classifier
from smoothcache_fx.demo.model import (
    DEFAULT_GUIDANCE_SCALE,
    DEMO_CONFIG,
    NUM_CLASSES,
    generate,
    load_demo_model,
)
from smoothcache_fx.plots import plot_errors, plot_schedule
from smoothcache_fx.schedules import Schedule
from smoothcache_fx.transform import transform

# The quality bar of the project's issue 6: cached samples within 2 accuracy points of uncached
# ones and at least 25 dB PSNR against them (8x8 pixels in [-1, 1], peak-to-peak 2).
MIN_PSNR_DB = 25.0
MAX_ACCURACY_DROP = 0.02
# Targets tried when none is given: the fastest one that keeps the quality bar is used, among
# reuse schedules and forecast schedules (predictor orders up to `DemoOptions.max_order`, at full
# strength and damped to `DemoOptions.strength`), uniform damped forecasts at these intervals, and
# piecewise ones denser in the middle of the generation.
CANDIDATE_TARGETS = (1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0)
CANDIDATE_INTERVALS = (2, 3, 4, 5, 6, 8)
CANDIDATE_MIDDLES = (2, 3, 4, 5)  # piecewise: every 2m / m / 2m steps


@dataclass
class DemoOptions:
    """What `smoothcache-fx demo` was asked for."""

    steps: int = 50
    per_class: int = 4
    # Samples per digit that judge the quality bar (the candidates' and the chosen schedule's):
    # 100 in all, so that one sample is 1 accuracy point of the 2 the bar allows (40 samples made
    # it 2.5, and single samples decided).
    quality_per_class: int = 10
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    target: float | None = None
    alpha: float | None = None
    schedule: str | None = None
    compile: bool = True
    repeats: int = 3
    out: str = "smoothcache_demo"
    seed: int = 0
    calibration_generations: int = 2
    progress: bool = True
    # Highest predictor order calibrated and considered for skipped steps (0: reuse only).
    max_order: int = 2
    # Forecast strength of the damped candidates and of --alpha/--target schedules: measured over
    # 500 samples on this model, full extrapolation loses up to 4 accuracy points where 0.75 keeps
    # them (BENCHMARKS.md, "Damped forecasting").
    strength: float = 0.75


def run_demo(options: DemoOptions, log=print) -> dict:
    """Runs the whole demo and returns its results (also written to `<out>/results.json`).

    A `--schedule` file is checked first, before the output folder and any model work, so that a
    bad one fails in a moment rather than after sampling and calibration.
    """
    given = None if options.schedule is None else load_schedule_for_demo(options.schedule, options.steps)
    out = _output_folder(options.out)
    model = load_demo_model()
    classifier = load_digits_classifier()
    labels = torch.arange(NUM_CLASSES).repeat_interleave(options.per_class)
    quality_labels = torch.arange(NUM_CLASSES).repeat_interleave(options.quality_per_class)

    def sample(net, seed=options.seed, labels=labels):
        generator = torch.Generator().manual_seed(seed)
        return generate(net, labels, options.steps, options.guidance_scale, generator=generator)

    def sample_quality(net):
        return sample(net, labels=quality_labels)

    log(
        f"demo DiT: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{DEMO_CONFIG['num_layers']} blocks; {len(labels)} samples x {options.steps} DDIM steps timed, "
        f"{len(quality_labels)} judge quality"
    )
    uncached = sample_quality(model)
    errors = _calibrate(model, options, labels, log)
    errors.save(out / "calibration_errors.json")

    schedule, curve = _choose_schedule(
        model, errors, options, given, uncached, quality_labels, classifier, sample_quality, log
    )
    schedule.save(out / "schedule.json")
    cached = sample_quality(transform(copy.deepcopy(model), schedule))

    timings = _time_rows(model, schedule, options, sample, log)
    results = {
        "steps": options.steps,
        "samples": len(labels),
        "quality_samples": len(quality_labels),
        "schedule": schedule.to_dict(),
        "schedule_kind": ("damped forecast" if schedule.strengths else "forecast")
        if schedule.orders
        else "reuse",
        "ideal_speedup": errors.ideal_speedup(schedule),
        "psnr_db": psnr(cached, uncached),
        "accuracy_uncached": _accuracy(uncached, quality_labels, classifier),
        "accuracy_cached": _accuracy(cached, quality_labels, classifier),
        "timings_s": timings,
        "speed_quality_curve": curve,
    }
    base = timings.get("compiled") or timings["eager"]
    fast = timings.get("compiled + SmoothCache") or timings["eager + SmoothCache"]
    results["achieved_speedup"] = base / fast
    _write_pictures(out, uncached, cached, errors, schedule, model, log)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    log(format_table(results))
    log(f"wrote {out}/: samples.png, schedule.png, errors.png, schedule.json, results.json")
    return results


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = torch.mean((images.float() - reference.float()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def format_table(results: dict) -> str:
    rows = [f"{'generation':<26}{'time/gen':>10}{'speedup':>9}"]
    base = results["timings_s"].get("compiled") or results["timings_s"]["eager"]
    for name, seconds in results["timings_s"].items():
        rows.append(f"{name:<26}{seconds * 1e3:>8.0f}ms{base / seconds:>8.2f}x")
    rows += [
        f"achieved speedup {results['achieved_speedup']:.2f}x of ideal {results['ideal_speedup']:.2f}x "
        f"({results['achieved_speedup'] / results['ideal_speedup']:.0%})",
        f"schedule: {results.get('schedule_kind', 'reuse')}"
        + (f", orders {results['schedule']['orders']}" if results["schedule"].get("orders") else ""),
        f"over {results.get('quality_samples', results['samples'])} samples: PSNR cached vs uncached "
        f"{results['psnr_db']:.1f} dB; classifier accuracy uncached "
        f"{results['accuracy_uncached']:.1%}, cached {results['accuracy_cached']:.1%}",
    ]
    return "\n".join(rows)


# -- steps of the demo -------------------------------------------------------------------------------
def _output_folder(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(
            f"--out must be a writable folder; got {str(out)!r} ({error.strerror}). "
            "Pass --out with a folder you can write to."
        ) from error
    return out


def _calibrate(model, options: DemoOptions, labels, log):
    log(
        f"calibrating on {options.calibration_generations} generations (lookahead 3, predictor "
        f"orders up to {options.max_order})..."
    )

    def run():
        for index in range(options.calibration_generations):
            generator = torch.Generator().manual_seed(1000 + index)
            generate(model, labels, options.steps, options.guidance_scale, generator=generator)

    return calibrate(
        model, run, lookahead=3, steps=options.steps, progress=options.progress, max_order=options.max_order
    )


def _choose_schedule(model, errors, options, given, uncached, labels, classifier, sample, log):
    """The --schedule already loaded (`given`), --alpha or --target (forecasting where it computes
    less); otherwise the fastest candidate, by ideal speed-up, whose samples keep the quality bar,
    among reuse, forecast and damped forecast schedules, calibrated per component and per block,
    and uniform and piecewise damped forecasts, each family scanned up to its first failure
    (`scan_candidates`).
    Returns the schedule and the speed/quality curve (one point per kind, keying and target)."""
    if given is not None:
        return given, []
    if options.alpha is not None:
        schedule = Schedule.from_errors(errors, alpha=options.alpha, max_order=options.max_order)
        return schedule.with_strengths(options.strength), []
    if options.target is not None:
        schedule = Schedule.for_speedup(errors, target=options.target, max_order=options.max_order)
        return schedule.with_strengths(options.strength), []
    accuracy = _accuracy(uncached, labels, classifier)

    def evaluate(schedule: Schedule) -> dict:
        cached = sample(transform(copy.deepcopy(model), schedule))
        point = {
            "ideal_speedup": errors.ideal_speedup(schedule),
            "psnr_db": psnr(cached, uncached),
            "accuracy": _accuracy(cached, labels, classifier),
        }
        point["keeps_quality"] = (
            point["psnr_db"] >= MIN_PSNR_DB and point["accuracy"] >= accuracy - MAX_ACCURACY_DROP
        )
        return point

    families = calibrated_families(errors, "reuse", 0, 1.0, CANDIDATE_TARGETS)
    if options.max_order:
        families += calibrated_families(errors, "forecast", options.max_order, 1.0, CANDIDATE_TARGETS)
        if options.strength < 1.0:
            families += calibrated_families(
                errors, "damped", options.max_order, options.strength, CANDIDATE_TARGETS
            )
        families.append(uniform_family(options.steps, ("attn1", "ff"), options.strength, CANDIDATE_INTERVALS))
        families.append(piecewise_family(options.steps, ("attn1", "ff"), options.strength, CANDIDATE_MIDDLES))
    best, curve = scan_candidates(families, evaluate, log)
    if best is None:
        log("no candidate kept the quality bar; using the mildest reuse schedule")
        return Schedule.for_speedup(errors, target=CANDIDATE_TARGETS[0]), curve
    schedule, point = best
    log(
        f"chose the {point['kind']} schedule {point['keying']}, {point['setting']} (ideal "
        f"{point['ideal_speedup']:.2f}x){orders_note(schedule)}: the fastest that keeps the quality bar"
    )
    return schedule, curve


def load_schedule_for_demo(path: str, steps: int | None) -> Schedule:
    """A schedule file checked against the demo DiT: its model, step count (None: any) and keys.

    Every problem is a ValueError (FileNotFoundError for a missing file), because for the CLI a
    malformed or unreadable file is a bad --schedule value like any other: it reports both as a
    usage error (exit 2) without catching TypeError or OSError around the model work.
    """
    try:
        schedule = Schedule.load(path)
    except FileNotFoundError:
        raise
    except (TypeError, OSError) as error:  # Schedule.load's message names the file and the fix
        raise ValueError(str(error)) from error
    model_class = schedule.metadata.get("model")
    if model_class not in (None, "DiTTransformer2DModel"):
        raise ValueError(
            f"--schedule must be made for the demo's DiTTransformer2DModel; {path} was made for "
            f"{model_class}. Calibrate one with `smoothcache-fx demo` (it writes schedule.json)."
        )
    if steps is not None and schedule.steps != steps:
        raise ValueError(
            f"--schedule must have one entry per step: {path} has {schedule.steps} steps but the "
            f"demo runs --steps {steps}. Pass --steps {schedule.steps}."
        )
    unknown = schedule.unmatched_keys(
        f"transformer_blocks.{i}.{c}" for i in range(DEMO_CONFIG["num_layers"]) for c in ("attn1", "ff")
    )
    if unknown:
        raise ValueError(
            f"--schedule keys {unknown} match no branch of the demo DiT (attn1 and ff of "
            f"transformer_blocks.0-{DEMO_CONFIG['num_layers'] - 1}); is {path} for another model?"
        )
    return schedule


def _time_rows(model, schedule, options: DemoOptions, sample, log) -> dict[str, float]:
    rows = {"eager": copy.deepcopy(model), "eager + SmoothCache": transform(copy.deepcopy(model), schedule)}
    if options.compile:
        log("compiling (torch.compile, inductor): the original, then each SmoothCache variant once...")
        rows["compiled"] = torch.compile(copy.deepcopy(model), fullgraph=True)
        rows["compiled + SmoothCache"] = transform(copy.deepcopy(model), schedule, compile=True)
    for net in rows.values():
        sample(net)  # warm-up: capture and compile stay out of the timings
    samples = {name: [] for name in rows}
    for _ in range(options.repeats):  # interleaved, so load on the machine hits every row alike
        for name, net in rows.items():
            start = time.perf_counter()
            sample(net)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def _accuracy(images, labels, classifier) -> float:
    return (classify(images, classifier) == labels).float().mean().item()


def _write_pictures(out: Path, uncached, cached, errors, schedule, model, log) -> None:
    _save_grid(out / "samples.png", uncached, cached)
    try:
        plot_errors(errors, out / "errors.png", alpha=schedule.metadata.get("alpha"))
        plot_schedule(schedule, out / "schedule.png")
    except ImportError as error:
        log(f"skipped errors.png and schedule.png: {error}")


def _save_grid(path: Path, left: torch.Tensor, right: torch.Tensor, scale: int = 6) -> None:
    """Uncached samples (left) beside cached ones (right): one row per class."""
    from PIL import Image

    def grid(images):
        per_class = images.shape[0] // NUM_CLASSES
        tiles = (
            images[:, 0]
            .reshape(NUM_CLASSES, per_class, 8, 8)
            .permute(0, 2, 1, 3)
            .reshape(NUM_CLASSES * 8, per_class * 8)
        )
        return tiles

    gap = torch.ones(NUM_CLASSES * 8, 2)
    canvas = torch.cat([grid(left), gap, grid(right)], dim=1)
    pixels = ((canvas.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels, mode="L").resize(
        (pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST
    )
    image.save(path)
