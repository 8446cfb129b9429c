"""`smoothcache-fx`: the command line (`demo`; `profile` of the demo model; `calibrate` a local
diffusers pipeline folder; `show` a schedule)."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import warnings


def _version() -> str:
    """The installed distribution's version (setup.py's), or a note for an uninstalled tree."""
    try:
        return importlib.metadata.version("smoothcache-fx")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: run `pip install -e .`)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smoothcache-fx", description=__doc__)
    parser.add_argument("--version", action="version", version=f"smoothcache-fx {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="calibrate, schedule, compile and measure on the shipped digits DiT"
    )
    demo.add_argument("--steps", type=_positive_int, default=50, help="DDIM steps per generation (50)")
    demo.add_argument("--per-class", type=_positive_int, default=4, help="timed samples per digit class (4)")
    demo.add_argument(
        "--quality-per-class",
        type=_positive_int,
        default=10,
        help="samples per digit class that judge the quality bar (10)",
    )
    demo.add_argument(
        "--target", type=float, help="ideal speedup to reach (default: fastest that keeps quality)"
    )
    demo.add_argument("--alpha", type=float, help="SmoothCache error threshold instead of --target")
    demo.add_argument("--schedule", help="a schedule JSON file instead of calibrating one")
    demo.add_argument(
        "--strength",
        type=_unit_float,
        default=0.75,
        help="forecast strength of the damped candidates and of --alpha/--target schedules, in [0, 1] (0.75)",
    )
    demo.add_argument("--no-compile", action="store_true", help="time eager execution only")
    demo.add_argument("--repeats", type=_positive_int, default=3, help="timed generations per row (3)")
    demo.add_argument("--out", default="smoothcache_demo", help="output folder (smoothcache_demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")

    prof = commands.add_parser(
        "profile", help="profile the shipped digits DiT under a schedule (per step, branch, kernel)"
    )
    prof.add_argument("--model", choices=("demo",), default="demo", help="which model (demo)")
    prof.add_argument("--schedule", help="schedule JSON (default: FORA-2 on attn1 and ff over --steps steps)")
    prof.add_argument("--steps", type=_positive_int, help="steps per generation (the schedule's, or 20)")
    prof.add_argument("--per-class", type=_positive_int, default=1, help="samples per digit class (1)")
    prof.add_argument("--compile", action="store_true", help="profile compiled variants")
    prof.add_argument(
        "--no-branches", action="store_true", help="step ranges only (compiled variants run unsplit)"
    )
    prof.add_argument("--trace", help="write the Chrome/Perfetto trace here")
    prof.add_argument("--json", help="write the report as JSON here")

    cal = commands.add_parser(
        "calibrate",
        help="calibrate a local diffusers pipeline folder: errors, schedule and plots",
        description="Calibrate the transformer of a diffusers pipeline saved with save_pretrained "
        "(DiffusionPipeline.from_pretrained), derive a schedule, and write calibration_errors.json, "
        "schedule.json, errors.png and schedule.png into --out. Under torchrun every process calibrates its share "
        "of the labels or prompts and rank 0 writes the combined result.",
    )
    cal.add_argument("pipeline", metavar="PIPELINE_DIR", help="a folder written by pipe.save_pretrained")
    cal.add_argument("--steps", type=_positive_int, required=True, help="num_inference_steps per generation")
    what = cal.add_mutually_exclusive_group()
    what.add_argument(
        "--prompt",
        action="append",
        help="text prompt (text-to-image pipelines); repeat for several, shared out under torchrun",
    )
    what.add_argument("--class-labels", help="comma-separated class labels (DiT), e.g. 1,2")
    how = cal.add_mutually_exclusive_group()
    how.add_argument("--alpha", type=float, help="SmoothCache error threshold (default 0.18)")
    how.add_argument("--target", type=float, help="ideal speedup to reach instead of --alpha")
    cal.add_argument("--per-block", action="store_true", help="one mask per block, not per component")
    cal.add_argument("--lookahead", type=_positive_int, default=3, help="largest reuse lag recorded (3)")
    cal.add_argument(
        "--max-order",
        type=int,
        choices=(0, 1, 2),
        default=0,
        help="also calibrate forecasting skipped steps up to this predictor order, and let the schedule "
        "use it where it computes less (0: reuse only, the default)",
    )
    cal.add_argument(
        "--strength",
        type=_unit_float,
        default=1.0,
        help="forecast strength in [0, 1] of the schedule's forecast keys (1.0; 0.75 kept accuracy on "
        "the demo DiT where 1 lost up to 4 points)",
    )
    cal.add_argument("--seed", type=int, default=0, help="generator seed of the calibration run (0)")
    cal.add_argument("--out", required=True, help="output folder")
    cal.add_argument("--no-progress", action="store_true", help="no progress bar (shown only on a terminal)")
    cal.add_argument(
        "--device", default="cpu", help="device to run on (cpu); under torchrun cuda means cuda:LOCAL_RANK"
    )

    show = commands.add_parser(
        "show",
        help="summarise a schedule and write its heatmap",
        description="Print a schedule's "
        "steps, computed/reused counts per component and ideal speedup, and write its heatmap.",
    )
    show.add_argument(
        "schedule", metavar="SCHEDULE", help="a schedule JSON file (ours, or a SmoothCache/Roblox one)"
    )
    show.add_argument("--errors", help="calibration_errors.json, for the ideal speedup")
    show.add_argument("--plot", help="heatmap PNG to write (default: SCHEDULE's name with .png, here)")

    args = parser.parse_args(argv)
    # torch.export deep-copies pytree specs, which warns about torch's own deprecated LeafSpec.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    if args.command == "demo":
        return _demo(args, parser)
    if args.command in ("calibrate", "show"):
        return _pipeline_command(args)
    return _profile(args)


def _pipeline_command(args) -> int:
    from smoothcache_fx.cli_pipeline import fail, run_calibrate, run_show

    try:
        (run_calibrate if args.command == "calibrate" else run_show)(args)
    except (ValueError, FileNotFoundError) as error:
        return fail(args.command, error)
    return 0


def _demo(args, parser) -> int:
    if sum(x is not None for x in (args.target, args.alpha, args.schedule)) > 1:
        parser.error("give at most one of --target, --alpha and --schedule")
    from smoothcache_fx.demo.job import DemoOptions, run_demo

    options = DemoOptions(
        steps=args.steps,
        per_class=args.per_class,
        quality_per_class=args.quality_per_class,
        target=args.target,
        alpha=args.alpha,
        schedule=args.schedule,
        compile=not args.no_compile,
        repeats=args.repeats,
        out=args.out,
        seed=args.seed,
        progress=not args.no_progress,
        strength=args.strength,
    )
    try:
        run_demo(options)
    except (ValueError, FileNotFoundError) as error:
        print(f"smoothcache-fx demo: error: {error}", file=sys.stderr)
        return 2
    return 0


def _profile(args) -> int:
    """`smoothcache-fx profile`: the demo model, one generation of every digit, under the schedule."""
    import torch

    from smoothcache_fx.demo.job import load_schedule_for_demo
    from smoothcache_fx.demo.model import NUM_CLASSES, generate, load_demo_model
    from smoothcache_fx.profile import profile
    from smoothcache_fx.schedules import Schedule
    from smoothcache_fx.transform import transform

    try:
        if args.schedule is not None:
            schedule = load_schedule_for_demo(args.schedule, args.steps)
        else:
            schedule = Schedule.uniform(args.steps or 20, 2, ["attn1", "ff"])
        model = transform(load_demo_model(), schedule, compile=args.compile)
        labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)

        def run():
            generate(model, labels, schedule.steps, generator=torch.Generator().manual_seed(0))

        report = profile(model, run, trace=args.trace, baseline=True, branches=not args.no_branches)
    except (ValueError, FileNotFoundError) as error:
        print(f"smoothcache-fx profile: error: {error}", file=sys.stderr)
        return 2
    print(report)
    if args.json:
        report.to_json(args.json)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (1: full extrapolation, 0: reuse); got {text}")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
