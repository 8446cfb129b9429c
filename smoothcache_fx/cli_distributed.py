"""`smoothcache-fx calibrate` under `torchrun`: the process group, and each rank's share of the items.

torchrun starts one process per rank with RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in
the environment; `launched` initialises the default process group from it when WORLD_SIZE > 1 (gloo
for a model on the CPU, nccl on CUDA, where each rank takes the GPU of its LOCAL_RANK) and destroys
it again at the end. `calibrate` then combines the ranks' errors over that group. Bad input raises
ValueError, which the command prints and exits on with status 2.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    """This process's place in the job: rank, number of ranks, and the device it runs the model on."""

    rank: int
    world: int
    device: str


@contextlib.contextmanager
def launched(device: str) -> Iterator[Launch]:
    """This process's `Launch`; under torchrun with WORLD_SIZE > 1, with the default process group
    initialised for the duration (unless the caller initialised one already)."""
    import torch
    import torch.distributed as dist

    world = _environment_int("WORLD_SIZE", 1)
    if world == 1:
        yield Launch(0, 1, device)
        return
    rank = _environment_int("RANK", 0)
    if torch.device(device).type == "cuda":
        device = f"cuda:{_environment_int('LOCAL_RANK', 0)}"
        torch.cuda.set_device(device)  # nccl's collectives run on the current device
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield Launch(rank, world, device)
    except BaseException:
        if owned:  # another rank may never reach a barrier now: tear down without one
            dist.destroy_process_group()
        raise
    if owned:
        # Every rank done with the group before any tears it down: a gloo rank whose peer closed
        # its connections first can abort in teardown ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


def share(items: Sequence, launch: Launch, flag: str) -> list:
    """This rank's items: contiguous chunks in rank order, the first ``len(items) % world`` ranks one
    item more (1,2,3 over two ranks: rank 0 gets 1,2 and rank 1 gets 3). Each rank generates its
    share as one batch, so the union in rank order is the command's item list."""
    count, world = len(items), launch.world
    if count < world:
        raise ValueError(
            f"{flag} must give at least one item per process; got {count} for {world} processes "
            f"(WORLD_SIZE={world}). Pass at least {world} items, or run fewer processes."
        )
    base, extra = divmod(count, world)
    start = launch.rank * base + min(launch.rank, extra)
    return list(items[start : start + base + (launch.rank < extra)])


def _environment_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"{name} must be an integer, as torchrun sets it; got {text!r}. Launch with torchrun, or unset it."
        ) from None
