"""One rank of a distributed calibration test, run by tests/test_distributed.py under torchrun (gloo).

`python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py CASE OUT`
makes every rank calibrate tests/models.py's TinyDiT on its own generations (`GENERATIONS`), then
write what it got into OUT/rank<r>.json: the errors and schedule, or the error it raised.

Cases: "calibrate" (rank 0 runs two generations, rank 1 one: unequal counts check the weighting),
"steps" (rank 1 runs generations of another step count), "failure" (rank 1's run raises), and
"context-parallel-flux" / "context-parallel-wan": diffusers' context parallelism (Ulysses over the two
ranks) on a transformed tiny Flux or Wan (`context_parallel`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import models
import torch
from diffusers import DDIMScheduler

STEPS = 5
ALPHA = 0.3
LOOKAHEAD = 2
MAX_ORDER = 2  # predictor errors are summed over the ranks like the reuse errors
GENERATIONS = {0: [0, 1], 1: [2]}  # rank -> the seeds of its generations


def tiny_dit() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.TinyDiT()


def generate(model, steps: int, seed: int) -> torch.Tensor:
    """A DDIM generation with TinyDiT (forward(x, t, y) on token sequences) from `seed`."""
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    x, labels = models.tiny_dit_inputs(seed=seed)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(2), labels), t, x).prev_sample
    return x


def main(case: str, out: Path) -> None:
    import torch.distributed as dist

    import smoothcache_fx

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if case.startswith("context-parallel-"):
        try:
            result = context_parallel(case.removeprefix("context-parallel-"))
        finally:
            close_group()
        (out / f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")
        return
    model = tiny_dit()
    steps = STEPS + 1 if case == "steps" and rank == 1 else STEPS

    def run():
        if case == "failure" and rank == 1:
            raise RuntimeError("this rank's sampler broke")
        for seed in GENERATIONS[rank]:
            generate(model, steps, seed)

    try:
        errors = smoothcache_fx.calibrate(model, run, lookahead=LOOKAHEAD, progress=True, max_order=MAX_ORDER)
        schedule = smoothcache_fx.Schedule.from_errors(errors, alpha=ALPHA, max_order=MAX_ORDER)
        result = {"errors": errors.to_dict(), "schedule": schedule.to_dict()}
        if case == "calibrate":  # a group of rank 0 alone: rank 0 calibrates alone, rank 1 is refused
            result["subgroup"] = _subgroup(model, run)
    except Exception as error:
        result = {"raised": type(error).__name__, "message": str(error)}
    finally:
        close_group()
    (out / f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")


def close_group() -> None:
    """Every rank done with the group before any rank tears it down: a gloo rank whose peer closed
    its connections first can abort in teardown ("terminate called without an active exception",
    seen once in CI under load)."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _subgroup(model, run) -> str:
    import torch.distributed as dist

    import smoothcache_fx

    alone = dist.new_group([0])  # every rank must call new_group
    try:
        errors = smoothcache_fx.calibrate(
            model, run, lookahead=LOOKAHEAD, progress=False, process_group=alone
        )
    except ValueError as error:
        return str(error)
    return f"generations={errors.generations}"


# -- context parallelism ---------------------------------------------------------------------------
CP_STEPS = 4


def enable_context_parallel(model) -> None:
    """What diffusers' `model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))`
    does, on the CPU.

    diffusers 0.42 cannot resolve a device without an accelerator: `_resolve_parallel_config` runs
    `rank % torch.accelerator.device_count()` before it looks at a `mesh=`, which divides by zero.
    So this does what the call does after that point, with the CPU as the device: set the config up
    on a ("ring", "ulysses") = (1, 2) mesh, hand it to every attention processor, and apply the
    model's `_cp_plan` hooks (diffusers itself is not patched).
    """
    import torch.distributed as dist
    from diffusers import ContextParallelConfig, ParallelConfig
    from diffusers.hooks.context_parallel import apply_context_parallel
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("ring", "ulysses"))
    cp_config = ContextParallelConfig(ulysses_degree=dist.get_world_size(), mesh=mesh)
    config = ParallelConfig(context_parallel_config=cp_config)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    model._parallel_config = config
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(model, cp_config, model._cp_plan)


def context_parallel(name: str) -> dict:
    """Transform, then enable context parallelism, and run CP_STEPS steps; the same without context
    parallelism in this process is the reference. Also the other order, which must warn for a model
    whose plan hooks a block (Wan's `blocks.0`)."""
    import warnings

    import coverage_families

    import smoothcache_fx

    family = coverage_families.FAMILIES[name]
    components = sorted({c for names in family.expected.values() for c in names})
    schedule = smoothcache_fx.Schedule.uniform(CP_STEPS, 2, components)
    inputs = family.inputs(1, 0)
    if name == "flux":  # the plan splits the text tokens too: as many as the ranks divide
        inputs["encoder_hidden_states"] = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1))
        inputs["txt_ids"] = torch.zeros(6, 3)

    def steps(model) -> list[torch.Tensor]:
        outputs = []
        with torch.no_grad():
            for step in range(CP_STEPS):
                kwargs = {**inputs, "timestep": family.inputs(1, step)["timestep"], "return_dict": False}
                outputs.append(model(**kwargs)[0])
        return outputs

    parallel = smoothcache_fx.transform(family.build().eval(), schedule)
    enable_context_parallel(parallel)
    found = steps(parallel)
    expected = steps(smoothcache_fx.transform(family.build().eval(), schedule))
    uncached = steps(family.build().eval())
    late = family.build().eval()
    enable_context_parallel(late)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        smoothcache_fx.transform(late, schedule)
    return {
        "differences": [(a - b).abs().max().item() for a, b in zip(found, expected, strict=True)],
        "uncached_differences": [(a - b).abs().max().item() for a, b in zip(found, uncached, strict=True)],
        "stats": {path: dict(s) for path, s in parallel.smoothcache.stats.items()},
        "late_warnings": [str(w.message) for w in caught if "smoothcache_fx" in str(w.message)],
    }


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
