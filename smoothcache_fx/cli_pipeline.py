"""`smoothcache-fx calibrate` and `smoothcache-fx show`: the library's calibrate, schedules and plots
on a local diffusers pipeline folder and on schedule files, from the command line."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from smoothcache_fx.cli_distributed import Launch, launched, share
from smoothcache_fx.schedules import Schedule
from smoothcache_fx.schedules.errors import CalibrationErrors
from smoothcache_fx.schedules.schedule import component_of

DEFAULT_ALPHA = 0.18  # SmoothCache's DiT-XL/2 setting (arXiv 2411.10510, 50 DDIM steps)


class CommandError(ValueError):
    """A bad argument or input: the command prints it and exits with status 2."""


def run_calibrate(args, out=print) -> Path:
    """Calibrate the pipeline in `args.pipeline`, then write the errors, the schedule and plots into
    `args.out`; returns the folder.

    Under torchrun (WORLD_SIZE > 1) every rank generates its share of the labels or prompts
    (`cli_distributed.share`) as one batch from seed ``--seed + rank``, `calibrate` combines the
    ranks' errors, and only rank 0 writes and prints: the result equals one process generating every
    rank's share in rank order."""
    with launched(getattr(args, "device", "cpu")) as launch:
        return _calibrate(args, launch, out if launch.rank == 0 else _silent)


def _calibrate(args, launch: Launch, out) -> Path:
    import torch

    from smoothcache_fx.calibrate import calibrate

    pipe = _load_pipeline(args.pipeline).to(launch.device)
    name, items = _conditioning(pipe, args)
    mine = share(items, launch, f"--{name.replace('_', '-')}")
    folder = _output_folder(args.out) if launch.rank == 0 else Path(args.out)
    ranks = f" on {launch.world} processes" if launch.world > 1 else ""
    out(
        f"calibrating {type(pipe).__name__} ({type(pipe.transformer).__name__}) over {args.steps} steps{ranks}..."
    )

    def run():
        pipe(
            **{name: mine},
            num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(args.seed + launch.rank),
            output_type="np",
        )

    max_order = args.max_order
    errors = calibrate(
        pipe, run, lookahead=args.lookahead, progress=not args.no_progress, max_order=max_order
    )
    if launch.rank != 0:
        return folder
    errors.save(folder / "calibration_errors.json")  # first: kept when no schedule reaches --target
    if args.target is not None:
        schedule = Schedule.for_speedup(
            errors, target=args.target, per_block=args.per_block, max_order=max_order
        )
    else:
        alpha = DEFAULT_ALPHA if args.alpha is None else args.alpha
        schedule = Schedule.from_errors(errors, alpha=alpha, per_block=args.per_block, max_order=max_order)
    schedule = schedule.with_strengths(args.strength)
    schedule.save(folder / "schedule.json")
    written = ["calibration_errors.json", "schedule.json"]
    written += _plots(folder, errors, schedule, out)
    out(summary(schedule, errors))
    out(f"wrote {folder}/: {', '.join(written)}")
    return folder


def run_show(args, out=print) -> Path | None:
    """Print a summary of the schedule `args.schedule` (a JSON file, ours or Roblox's) and write its
    heatmap; returns the heatmap's path (None when matplotlib is missing)."""
    schedule = _load_schedule(args.schedule)
    errors = CalibrationErrors.load(args.errors) if args.errors else None
    out(summary(schedule, errors))
    plot = Path(args.plot) if args.plot else Path(f"{Path(args.schedule).stem}.png")
    try:
        from smoothcache_fx.plots import plot_schedule

        plot_schedule(schedule, plot)
    except ImportError as error:
        out(f"skipped the heatmap: {error}")
        return None
    out(f"wrote {plot}")
    return plot


def summary(schedule: Schedule, errors: CalibrationErrors | None = None) -> str:
    """Steps, computed/reused per component (summed over its keys), and the ideal speed-up where
    known (from `errors`, else as recorded in the schedule's metadata)."""
    per_component: dict[str, list[int]] = {}
    for key, mask in schedule.masks.items():
        counts = per_component.setdefault(component_of(key), [0, 0, 0])
        counts[0] += 1
        counts[1] += sum(mask)
        counts[2] += len(mask) - sum(mask)
    lines = [f"{schedule.steps} steps, {len(schedule.masks)} keys"]
    width = max(len(name) for name in per_component)
    for component, (keys, computed, reused) in sorted(per_component.items()):
        share = computed / (computed + reused)
        lines.append(
            f"  {component:<{width}}  {keys:3d} key(s)  computed {computed:5d}  reused {reused:5d}  "
            f"({share:.0%} computed)"
        )
    if errors is not None:
        lines.append(
            f"ideal speedup {errors.ideal_speedup(schedule):.2f}x (FLOPs from the calibration errors)"
        )
    elif "ideal_speedup" in schedule.metadata:
        lines.append(f"ideal speedup {schedule.metadata['ideal_speedup']:.2f}x (recorded in the schedule)")
    else:
        lines.append("ideal speedup unknown: pass --errors calibration_errors.json (FLOPs per branch)")
    if schedule.orders:
        orders = ", ".join(f"{key} {order}" for key, order in schedule.orders.items())
        lines.append(f"forecast (predictor order) on skipped steps: {orders}")
        if schedule.strengths:
            strengths = ", ".join(f"{key} {value:g}" for key, value in schedule.strengths.items())
            lines.append(f"forecast strength: {strengths} (others 1)")
    for name in ("alpha", "target", "source"):
        value = schedule.metadata.get(name)
        if value is not None:
            lines.append(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
    return "\n".join(lines)


def _load_pipeline(folder: str):
    path = Path(folder)
    if not (path / "model_index.json").is_file():
        raise CommandError(
            f"PIPELINE_DIR must be a diffusers pipeline folder (with model_index.json, as "
            f"save_pretrained writes); got {folder!r}. Pass the folder of a saved pipeline."
        )
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    quiet = not sys.stderr.isatty() and diffusers_logging.is_progress_bar_enabled()
    if quiet:  # diffusers' "Loading pipeline components" bar: on a terminal only, as calibrate's
        diffusers_logging.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(path)
    finally:
        if quiet:
            diffusers_logging.enable_progress_bar()
    if not hasattr(pipe, "transformer"):
        raise CommandError(
            f"the pipeline in {folder!r} ({type(pipe).__name__}) has no transformer; smoothcache_fx "
            "caches Diffusion Transformer blocks. Pass a DiT-style pipeline (DiT, PixArt, SD3, Flux...)."
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _conditioning(pipe, args) -> tuple[str, list]:
    """The pipeline argument the command line gives ("class_labels" or "prompt") and its items,
    checked against what `pipe` takes."""
    takes = inspect.signature(type(pipe).__call__).parameters
    name = type(pipe).__name__
    if args.class_labels is not None:
        if "class_labels" not in takes:
            raise CommandError(f"{name} takes no class labels; pass --prompt TEXT instead of --class-labels.")
        return "class_labels", _class_labels(args.class_labels)
    if args.prompt is not None:
        if "prompt" not in takes:
            raise CommandError(f"{name} takes no prompt; pass --class-labels 1,2 instead of --prompt.")
        prompts = [args.prompt] if isinstance(args.prompt, str) else list(args.prompt)
        return "prompt", prompts
    wanted = "--class-labels 1,2" if "class_labels" in takes else "--prompt TEXT"
    raise CommandError(f"calibrate must know what to generate; pass {wanted} for {name}.")


def _class_labels(text: str) -> list[int]:
    try:
        labels = [int(part) for part in text.split(",")]
    except ValueError:
        raise CommandError(
            f"--class-labels must be comma-separated integers such as 1,2; got {text!r}."
        ) from None
    return labels


def _load_schedule(source: str) -> Schedule:
    if not Path(source).exists():
        raise CommandError(
            f"SCHEDULE must be a schedule JSON file (ours, or a SmoothCache/Roblox one); got {source!r}, "
            "which does not exist."
        )
    return Schedule.load(source)


def _plots(folder: Path, errors: CalibrationErrors, schedule: Schedule, out) -> list[str]:
    try:
        from smoothcache_fx.plots import plot_errors, plot_schedule

        plot_errors(errors, folder / "errors.png", alpha=schedule.metadata.get("alpha"), per_block=True)
        plot_schedule(schedule, folder / "schedule.png")
    except ImportError as error:
        out(f"skipped errors.png and schedule.png: {error}")
        return []
    return ["errors.png", "schedule.png"]


def _output_folder(path: str) -> Path:
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(
            f"--out must be a folder that can be written; got {path!r} ({error.strerror}). Pass another folder."
        ) from error
    return folder


def _silent(*args) -> None:
    """`out` on ranks other than 0: one rank reports for the job."""


def fail(command: str, error: Exception) -> int:
    print(f"smoothcache-fx {command}: error: {error}", file=sys.stderr)
    return 2
