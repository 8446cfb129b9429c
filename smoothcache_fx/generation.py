"""Where a generation starts and ends: the step clock of one transformed model.

A cached step may only read what an earlier step of the same generation wrote, so the clock must
know where each generation starts. Three ways, most explicit first:

- `with model.smoothcache.generation():` (custom loops): step 0 at entry, the generation ends at
  exit however the loop left; a call past the schedule's last step is refused before it runs.
- A transformed diffusers pipeline: each `pipe(...)` is one generation (the same context).
- The model alone (`pipe.transformer = transform(pipe.transformer, schedule)`): from the timesteps
  it receives, `TimestepRule`. Where the model takes no timestep argument it can read, every
  `steps x calls_per_step` calls are one generation.

A generation that ends early (an exception, an interrupt, a callback that stops the loop) never
leaks into the next: the next starts at step 0, and blocks refuse to read a cache that the current
generation did not write.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence

import torch

# Argument names read as the timestep (diffusers' transformers use `timestep`).
TIMESTEP_ARGUMENTS = ("timestep", "timesteps", "t")

_MARK_GENERATIONS = (
    "Mark generations explicitly: call the transformed pipeline, wrap the loop in "
    "`with model.smoothcache.generation():`, or call model.smoothcache.reset() before it."
)


class AmbiguousGenerationError(RuntimeError):
    """The timesteps a model received do not say where its generation started."""


def timestep_of(model: torch.nn.Module, args: tuple, kwargs: dict) -> float | None:
    """The first element of the call's timestep argument, or None when there is none to read."""
    value = next((kwargs[name] for name in TIMESTEP_ARGUMENTS if name in kwargs), None)
    if value is None and args:
        names = _positional_names(type(model))
        value = next(
            (args[i] for i, name in enumerate(names[: len(args)]) if name in TIMESTEP_ARGUMENTS), None
        )
    if isinstance(value, torch.Tensor):
        # One host sync per call on CUDA: what the transformer-only form pays for finding its
        # generations; pipelines and generation() do not read it.
        if not value.numel() or value.device.type == "meta":
            return None
        return float(value.reshape(-1)[0])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


_POSITIONAL: dict[type, tuple[str, ...]] = {}


def _positional_names(cls: type) -> tuple[str, ...]:
    """Positional parameter names of `cls.forward` (without self), computed once per class."""
    names = _POSITIONAL.get(cls)
    if names is None:
        try:
            parameters = list(inspect.signature(cls.forward).parameters.values())[1:]
        except (TypeError, ValueError):
            parameters = []
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = tuple(p.name for p in parameters if p.kind in kinds)
        _POSITIONAL[cls] = names
    return names


class TimestepRule:
    """Decides from timesteps whether a model call starts a new generation (transformer-only form).

    Within one generation the timesteps of successive steps are monotone: decreasing for most
    diffusers transformers, increasing for some (Lumina passes `1 - t`), with repeats where a
    second-order sampler evaluates one timestep twice (Heun: t0, t1, t1, t2, t2, ...). So a call
    at step k starts a new generation when it moves against the direction the generation has
    shown. What the timesteps cannot tell apart is refused rather than guessed:

    - step 1 with step 0's timestep: a warm-up call followed by a generation, or a sampler that
      repeats its first timestep (Heun never does);
    - step 2 moving back, to a timestep other than step 0's: the step-0 call was most likely a
      stray call (a warm-up at another timestep) and step 1 already reused its cache.

    Only the first call of each step is read; the other `calls_per_step` calls follow it.
    """

    def __init__(self) -> None:
        self.timesteps: list[float] = []

    def reset(self) -> None:
        self.timesteps = []

    def starts_generation(self, timestep: float) -> bool:
        """Whether `timestep` (the next step's) starts a new generation; raises where ambiguous."""
        seen = self.timesteps
        if not seen:
            return False
        step = len(seen)
        if step == 1:
            if timestep == seen[0]:
                raise AmbiguousGenerationError(
                    f"the model was called twice in a row with timestep {timestep:g}: a warm-up call "
                    "(or a loop that stopped after one step) followed by a generation, or a sampler "
                    "that calls the model more than once per step? smoothcache_fx cannot tell which. "
                    f"{_MARK_GENERATIONS} A sampler with N calls per step needs "
                    "transform(..., calls_per_step=N)."
                )
            return False
        direction = _direction(seen)
        if direction == 0 or (timestep - seen[-1]) * direction >= 0:
            return False
        if timestep == seen[0]:
            return True  # back to this generation's first timestep: the previous one ended early
        if step == 2:
            raise AmbiguousGenerationError(
                f"timesteps {seen[0]:g}, {seen[1]:g}, {timestep:g}: the step-1 call moved away from "
                "step 0 and this call moves back, so the step-0 call was most likely not part of "
                "this generation (a warm-up call?) and step 1 may have reused its cache. "
                f"{_MARK_GENERATIONS}"
            )
        return True

    def record(self, timestep: float) -> None:
        self.timesteps.append(timestep)


def _direction(timesteps: Sequence[float]) -> int:
    for a, b in zip(timesteps, timesteps[1:], strict=False):
        if a != b:
            return 1 if b > a else -1
    return 0


class GenerationClock:
    """Step, call slot and generation count of one transformed model, and which thread owns the
    generation in progress.

    Attributes:
        steps: steps per generation (the schedule's).
        calls_per_step: model calls per step (unbatched guidance: 2).
        step / slot: the step and call of the step that the next (or current) model call runs.
        generation: generations started since transform.
        explicit: the generation in progress was opened by `generation()` (or a pipeline call).
    """

    def __init__(self, steps: int, calls_per_step: int):
        self.steps = steps
        self.calls_per_step = calls_per_step
        self.step = 0
        self.slot = 0
        self.generation = 0
        self.open = False  # a generation has started and not ended
        self.explicit = False
        self.calls = 0  # model calls in the generation in progress
        self.owner: int | None = None  # thread that runs the generation in progress
        self.rule = TimestepRule()

    @property
    def calls_per_generation(self) -> int:
        return self.steps * self.calls_per_step

    def reset(self) -> None:
        """End the generation in progress; the next call starts a new one at step 0."""
        self.step = 0
        self.slot = 0
        self.open = False
        self.explicit = False
        self.calls = 0
        self.owner = None
        self.rule.reset()

    def begin(self, explicit: bool) -> None:
        self.reset()
        self.open = True
        self.explicit = explicit
        self.owner = threading.get_ident()
        self.generation += 1

    def check_thread(self) -> None:
        """Refuse a call from another thread while a generation is in progress: its caches would
        be read and overwritten by two generations at once."""
        if not self.open or self.owner in (None, threading.get_ident()):
            return
        if not self.explicit and self.calls >= self.calls_per_generation:
            return  # that generation is complete; a new one may start in any thread
        raise RuntimeError(
            "this transformed model is in the middle of a generation run by another thread "
            f"(step {self.step} of {self.steps}); one model runs one generation at a time. Give each "
            "thread its own transformed model (transform a copy.deepcopy of the model per thread)."
        )

    def before_call(self, timestep: float | None) -> bool:
        """Place the next model call; returns whether it starts a generation. Raises for calls that
        cannot be placed (past an explicit generation's end, an ambiguous timestep)."""
        if self.explicit:
            if self.calls >= self.calls_per_generation:
                raise ValueError(
                    f"this generation already ran the schedule's {self.steps} steps x "
                    f"{self.calls_per_step} calls per step; the schedule must have one entry per step. "
                    f"Use a schedule made for this step count (Schedule.uniform / Schedule.from_errors "
                    "with steps=...), or transform(..., calls_per_step=N) if the sampler calls the "
                    "model N times per step."
                )
            return False
        starts = not self.open or self.calls >= self.calls_per_generation
        if not starts and timestep is not None and self.slot == 0:
            starts = self.rule.starts_generation(timestep)
        if starts:
            self.begin(explicit=False)
        if timestep is not None and self.slot == 0:
            self.rule.record(timestep)
        return starts

    def after_call(self) -> None:
        self.calls += 1
        self.slot += 1
        if self.slot < self.calls_per_step:
            return
        self.slot = 0
        self.step += 1
        if self.step == self.steps:
            self.step = 0  # the generation is complete; the next call starts another
