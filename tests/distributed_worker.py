"""One rank of a distributed calibration test, run by tests/test_distributed.py under torchrun (gloo).

`python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py CASE OUT`
makes every rank calibrate tests/models.py's TinyDiT on its own generations (`GENERATIONS`), then
write what it got into OUT/rank<r>.json: the errors and schedule, or the error it raised.

Cases: "calibrate" (rank 0 runs two generations, rank 1 one: unequal counts check the weighting),
"steps" (rank 1 runs generations of another step count), "failure" (rank 1's run raises).
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
    model = tiny_dit()
    steps = STEPS + 1 if case == "steps" and rank == 1 else STEPS

    def run():
        if case == "failure" and rank == 1:
            raise RuntimeError("this rank's sampler broke")
        for seed in GENERATIONS[rank]:
            generate(model, steps, seed)

    try:
        errors = smoothcache_fx.calibrate(model, run, lookahead=LOOKAHEAD, progress=True)
        schedule = smoothcache_fx.Schedule.from_errors(errors, alpha=ALPHA)
        result = {"errors": errors.to_dict(), "schedule": schedule.to_dict()}
    except Exception as error:
        result = {"raised": type(error).__name__, "message": str(error)}
    finally:
        dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
