"""Data-parallel cached generation: one transformed pipeline per process, started by torchrun.

Each rank loads the same pipeline, calibrates on its share of the class labels (`calibrate` adds
every rank's error sums, so every rank derives the same schedule) or loads `--schedule`, transforms
its own pipeline, and generates its share from seed ``--seed + rank``. Nothing in smoothcache_fx is
shared between processes: each has its own step clock, caches, captures and compiled variants (the
capture gate in kernels/compat.py is a lock within one process). Rank 0 gathers the images and the
per-rank timings and prints them; with `--out` it writes every rank's images in label order.

Usage (from the repository root; gloo on the CPU, nccl with --device cuda, one GPU per rank)::

    torchrun --standalone --nproc-per-node 2 benchmarks/data_parallel.py --labels 1,2,3,4 --steps 20
    torchrun --standalone --nproc-per-node 2 benchmarks/data_parallel.py --pipeline dit-cached \\
        --schedule schedule.json --labels 207,360,387,974 --steps 50 --device cuda --compile

Without `--pipeline` it runs tests/models.py's tiny DiT pipeline (random weights, seeded alike on
every rank). Each rank reports its uncached and cached generation time and the PSNR of its cached
images against its uncached ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import common  # also puts tests/ on sys.path, for `models`
import numpy as np
import torch
import torch.distributed as dist

import smoothcache_fx
from smoothcache_fx.cli_distributed import Launch, share


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pipeline", help="a diffusers DiT pipeline folder (default: the tests' tiny DiT)")
    parser.add_argument(
        "--labels", default="1,2,3,4", help="comma-separated class labels, shared out (1,2,3,4)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--schedule", help="a schedule JSON file instead of calibrating one")
    parser.add_argument("--alpha", type=float, default=0.18, help="threshold when calibrating (0.18)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="transform(..., compile=True)")
    parser.add_argument("--out", help="write every rank's cached images here (.npz, label order)")
    args = parser.parse_args(argv)

    cuda = torch.device(args.device).type == "cuda"
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else args.device
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        launch = Launch(rank, world, device)
        report = _run(args, launch)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, report)
        dist.barrier()  # every rank done with the group before any tears it down (gloo teardown race)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        _print(gathered, args)
        if args.out:
            images = np.concatenate([part["images"] for part in gathered])
            np.savez(args.out, images=images, labels=[label for part in gathered for label in part["labels"]])
    return 0


def _run(args, launch: Launch) -> dict:
    pipe = _pipeline(args.pipeline).to(launch.device)
    labels = share([int(x) for x in args.labels.split(",")], launch, "--labels")

    def generate():
        return pipe(
            class_labels=labels,
            num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(args.seed + launch.rank),
            output_type="np",
        ).images

    uncached, uncached_s = _timed(generate, launch.device)
    if args.schedule:
        schedule = smoothcache_fx.Schedule.load(args.schedule)
    else:  # every rank calls calibrate; it combines the ranks' errors, so the schedules agree
        errors = smoothcache_fx.calibrate(pipe, generate, progress=False)
        schedule = smoothcache_fx.Schedule.from_errors(errors, alpha=args.alpha)
    smoothcache_fx.transform(pipe, schedule, compile=args.compile)
    generate()  # warm-up: captures the blocks (and compiles with --compile)
    cached, cached_s = _timed(generate, launch.device)
    return {
        "rank": launch.rank,
        "labels": labels,
        "images": cached,
        "uncached_s": uncached_s,
        "cached_s": cached_s,
        "psnr": _psnr(cached, uncached),
        "schedule": json.dumps(schedule.to_dict(), sort_keys=True),
    }


def _pipeline(folder: str | None):
    if folder is None:
        import models

        pipe = models.dit_pipeline()
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _timed(fn, device: str):
    common.synchronize(torch.device(device))
    start = time.perf_counter()
    result = fn()
    common.synchronize(torch.device(device))
    return result, time.perf_counter() - start


def _psnr(images: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((images.astype(np.float64) - reference) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)  # images in [0, 1]


def _print(parts: list[dict], args) -> None:
    same = len({part["schedule"] for part in parts}) == 1
    print(f"{len(parts)} processes, {args.steps} steps; one schedule on every rank: {same}")
    print("rank  labels            uncached   cached  speedup  PSNR cached/uncached")
    for part in parts:
        print(
            f"{part['rank']:4d}  {','.join(map(str, part['labels'])):<16}  {part['uncached_s']:7.2f}s "
            f"{part['cached_s']:7.2f}s  {part['uncached_s'] / part['cached_s']:6.2f}x  {part['psnr']:.1f} dB"
        )


if __name__ == "__main__":
    raise SystemExit(main())
