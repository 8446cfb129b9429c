"""`calibrate` across processes: every rank records its own generations; the error sums are combined.

The errors `calibrate` returns are means over generations, so what one process contributes is its
per-(branch, call of the step, lag, step) error sums and its generation count (`ErrorSums`). Every
rank gathers every rank's sums and adds them in rank order, so every rank computes the same bits,
and the result equals a single process that ran all the generations (rank 0's first, then rank 1's,
...) up to the order of float additions.

One `all_gather_object` carries everything: the sums, a description of what was recorded (branches,
steps, lookahead, calls per step, model class, metadata) and a rank's failure, if it had one. So a
rank whose model, arguments or run differ, or whose calibration raised, makes every rank raise with
the reason, instead of leaving the others waiting in a collective that never completes (an
`all_reduce` of the sums alone would hang or add mismatched curves). The payload is small: branches
x calls x lags x steps floats (8,400 for DiT-XL/2 at 50 steps, lookahead 3). With nccl, each rank
must have called `torch.cuda.set_device` first, as torch's object collectives require.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from smoothcache_fx.schedules.errors import CalibrationErrors

__all__ = ["ErrorSums", "gather_sums", "resolve_group"]


@dataclass
class ErrorSums:
    """What calibration recorded, as sums over `generations` generations (one process's or several).

    FLOPs are those of the first model call (rank 0's, when combined): the FLOPs a single process
    running every rank's generations in rank order would have measured. They scale with the batch,
    so ranks with different batch sizes agree on branches and errors but not on FLOPs.
    """

    steps: int
    lookahead: int
    sums: dict[str, list[list[np.ndarray]]]  # branch path -> call of the step -> lag -> per-step sums
    generations: int
    flops: dict[str, int] = field(default_factory=dict)
    total_flops: int = 0
    model_class: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    # max_order > 0: branch path -> call of the step -> predictor key -> per-step error sums
    forecast_sums: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)

    def description(self) -> dict[str, Any]:
        """What every rank must agree on for the sums to be added."""
        calls = len(next(iter(self.sums.values()))) if self.sums else 0
        return {
            "model class": self.model_class,
            "steps": self.steps,
            "lookahead": self.lookahead,
            "calls per step": calls,
            "branches": sorted(self.sums),
            "predictors": {path: sorted(calls[0]) for path, calls in sorted(self.forecast_sums.items())},
            "metadata": dict(sorted(self.metadata.items())),
        }

    def errors(self) -> CalibrationErrors:
        """The mean over the generations, as `calibrate` returns it."""
        means = {
            path: [[(curve / self.generations).tolist() for curve in per_lag] for per_lag in calls]
            for path, calls in self.sums.items()
        }
        # A forecast's error at a step is the worst of its calls' (as for the reuse errors).
        forecast = {
            path: {
                key: np.max([call[key] / self.generations for call in calls], axis=0).tolist()
                for key in calls[0]
            }
            for path, calls in self.forecast_sums.items()
        }
        return CalibrationErrors.from_calls(
            self.steps,
            self.lookahead,
            means,
            flops=self.flops,
            total_flops=self.total_flops,
            generations=self.generations,
            model_class=self.model_class,
            metadata=self.metadata,
            forecast=forecast,
        )


def resolve_group(process_group: Any):
    """The process group to combine over, or None to calibrate this process alone.

    None (calibrate's default): the default group when `torch.distributed` is initialised, else
    this process alone. False: this process alone, even under an initialised group. A group of one
    process needs no combining and gives None as well.
    """
    if process_group is False:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        if process_group is None:
            return None
        raise ValueError(
            f"process_group must belong to an initialised torch.distributed; got {process_group!r} while "
            "no process group is initialised. Call torch.distributed.init_process_group(...) first (torchrun "
            "sets its environment), or pass process_group=False to calibrate this process alone."
        )
    # new_group() gives the ranks outside the new group this marker instead of a group.
    outside = type(process_group) is int and process_group == dist.GroupMember.NON_GROUP_MEMBER
    if outside or (isinstance(process_group, dist.ProcessGroup) and dist.get_rank(process_group) < 0):
        raise ValueError(
            f"process_group must include this process (rank {dist.get_rank()}); it does not. Call calibrate "
            "only on the ranks of the group, or pass process_group=False to calibrate this process alone."
        )
    if process_group is None:
        group = dist.group.WORLD
    elif isinstance(process_group, dist.ProcessGroup):
        group = process_group
    else:
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup, None (the default group when one is "
            f"initialised) or False (this process alone); got {type(process_group).__name__}."
        )
    return group if dist.get_world_size(group) > 1 else None


def gather_sums(group, record: Callable[[], ErrorSums]) -> ErrorSums:
    """Run `record` here, then combine every rank's sums; raises on every rank if any rank failed or
    recorded something the others did not (see the module docstring)."""
    import torch.distributed as dist

    failure: Exception | None = None
    try:
        local: ErrorSums | None = record()
    except Exception as error:  # re-raised below, after the other ranks have heard of it
        failure, local = error, None
    sent = {"sums": local, "failure": None if failure is None else f"{type(failure).__name__}: {failure}"}
    received: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(received, sent, group=group)
    if failure is not None:
        raise failure
    for rank, item in enumerate(received):
        if item["failure"] is not None:
            raise RuntimeError(
                f"calibrate failed on rank {rank} of {len(received)}, so no rank can finish it: "
                f"{item['failure']}. Fix that rank's error; every rank stops instead of waiting for it."
            )
    parts: list[ErrorSums] = [item["sums"] for item in received]
    _check_agreement(parts)
    first = parts[0]
    sums = {
        path: [
            [np.sum([part.sums[path][call][lag] for part in parts], axis=0) for lag in range(len(per_lag))]
            for call, per_lag in enumerate(calls)
        ]
        for path, calls in first.sums.items()
    }
    forecast_sums = {
        path: [
            {key: np.sum([part.forecast_sums[path][call][key] for part in parts], axis=0) for key in keys}
            for call, keys in enumerate(calls)
        ]
        for path, calls in first.forecast_sums.items()
    }
    generations = sum(part.generations for part in parts)
    return ErrorSums(
        first.steps,
        first.lookahead,
        sums,
        generations,
        first.flops,
        first.total_flops,
        first.model_class,
        first.metadata,
        forecast_sums,
    )


def _check_agreement(parts: list[ErrorSums]) -> None:
    reference = parts[0].description()
    for rank, part in enumerate(parts[1:], start=1):
        found = part.description()
        differs = [name for name in reference if found[name] != reference[name]]
        if differs:
            details = "; ".join(f"{name}: {found[name]!r} vs {reference[name]!r}" for name in differs)
            raise ValueError(
                f"calibrate across {len(parts)} processes must record the same branches and steps on every "
                f"rank; rank {rank} differs from rank 0 in {details}. Give every rank the same model, "
                "lookahead=, components=, calls_per_step= and steps per generation; only what is "
                "generated (labels, prompts, seeds) may differ."
            )
