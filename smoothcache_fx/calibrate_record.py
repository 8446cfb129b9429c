"""What `calibrate` keeps while `run` generates: the last outputs of every branch and the error sums.

After each model call the recorder is handed every branch's output of that call. Call c of step t
is compared only with call c of steps t-1 .. t-lookahead: with unbatched classifier-free guidance
the unconditional call's earlier output is the earlier unconditional output, exactly what its own
cache would hold under `transform(..., calls_per_step=N)`. Comparing with whatever call came
before would measure the difference between the conditional and the unconditional prediction.

With `max_order` > 0 the recorder also forecasts every step from every history a schedule could
give it (`schedules.forecast.predictor_histories`) and sums the relative L1 error of each; that
needs the last `lookahead + max_order * (lookahead + 1)` outputs per branch and call instead of
`lookahead`. There are 60 such histories per branch and step at lookahead 3 and order 2, so their
errors are measured on a fixed random subset of at most `FORECAST_SAMPLE` elements of each output
(all of them when it is smaller): on the demo DiT (outputs of 164k elements) the exact errors cost
0.37 s per branch and step on a 2-core CPU, 7 minutes for the demo's calibration.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from smoothcache_fx.schedules.forecast import (
    history_steps,
    lagrange_weights,
    predictor_histories,
    predictor_key,
)

__all__ = ["Progress", "Recorder"]

# Elements per branch output on which predictor errors are measured (see the module docstring): the
# relative L1 error of a 8192-element uniform sample has a relative standard error of about 1% for
# outputs whose elementwise errors vary by one order of magnitude.
FORECAST_SAMPLE = 8192


class Recorder:
    """Ring buffers of the last `lookahead` outputs per branch and call of the step, and the running
    error sums per branch, call and lag.

    Args:
        lookahead: the largest lag recorded.
        steps: steps per generation when the caller fixed it (`calibrate(steps=...)`), else None:
            the first generation's count, which every later one must match.
        calls_per_step: model calls per step; a generation must have a whole number of steps.
        progress: show progress (see `Progress`).
        max_order: record predictor errors for orders 1..max_order (0: reuse errors only).
    """

    def __init__(
        self, lookahead: int, steps: int | None, calls_per_step: int, progress: bool, max_order: int = 0
    ):
        self.lookahead = lookahead
        self.histories = predictor_histories(max_order, lookahead)
        # Outputs a forecast reaches back to: the lag, then max_order gaps of up to lookahead + 1.
        self.depth = lookahead + max_order * (lookahead + 1)
        self.expected = steps
        self.calls_per_step = calls_per_step
        self.call = -1  # model call index within the current generation; -1 before the first call
        self.length: int | None = None  # steps per generation, from the first one
        self.generations = 0
        self.branches: list[str] = []
        self.dtype: str | None = None
        # (branch path, call of the step) -> `lookahead` slots of that call's outputs.
        self.ring: dict[tuple[str, int], list[list[torch.Tensor]]] = {}
        # (branch path, call of the step) -> lag -> this generation's 0-d errors, in step order.
        self.pending: dict[tuple[str, int], list[list[torch.Tensor]]] = {}
        self.sums: dict[str, list[list[np.ndarray]]] = {}  # branch path -> call -> lag
        # (branch path, call) -> this generation's (step, predictor keys, errors [keys]); then the sums.
        self.pending_forecast: dict[tuple[str, int], list[tuple[int, tuple[str, ...], torch.Tensor]]] = {}
        self.stacks: dict[tuple[str, int], torch.Tensor] = {}  # the last `depth` outputs, flattened
        self.plans: dict = {}
        self.samples: dict = {}
        self.forecast_sums: dict[str, list[dict[str, np.ndarray]]] = {}  # path -> call -> key
        self.progress = Progress(progress)

    @property
    def next_slot(self) -> int:
        """Which call of its step the next model call is, if it continues this generation."""
        return (self.call + 1) % self.calls_per_step

    def start_generation(self) -> None:
        self.finish_generation()

    def record(self, outputs: dict[str, list[torch.Tensor]]) -> None:
        """Errors of one model call's branch outputs against the same call of earlier steps."""
        if self.call == -1 and self.generations == 0 and not self.branches:
            self.branches = sorted(outputs)
            self.dtype = str(next(iter(outputs.values()))[0].dtype) if outputs else None
        if sorted(outputs) != self.branches:
            raise RuntimeError(
                f"calibration saw branches {sorted(outputs)} at a step where it expected {self.branches}; "
                "every block must run at every step."
            )
        self.call += 1
        t, slot = divmod(self.call, self.calls_per_step)
        for path, tensors in outputs.items():
            slots = self._slots(path, slot, tensors, t)
            current = [x.float() for x in tensors]
            norm = sum(x.abs().sum() for x in current)
            lags = self.pending.setdefault((path, slot), [[] for _ in range(self.lookahead)])
            for k in range(1, min(self.lookahead, t) + 1):
                previous = slots[(t - k) % self.lookahead]
                diff = sum((x - p.float()).abs().sum() for x, p in zip(current, previous, strict=True))
                lags[k - 1].append(torch.nan_to_num(diff / norm, nan=0.0, posinf=math.inf))
            if self.histories:
                self._record_forecasts(path, slot, current, norm, t)
            for buffer, x in zip(slots[t % self.lookahead], tensors, strict=True):
                buffer.copy_(x)
        if slot == self.calls_per_step - 1:
            self.progress.update(self.generations + 1, t)

    def _record_forecasts(self, path: str, slot: int, current, norm, t: int) -> None:
        """Every history's forecast of step t against the output it computed, as errors [H]: one
        matrix product of the histories' weights [H, depth] with the last outputs [depth, numel]
        (one pass over the outputs instead of one per history)."""
        flat = torch.cat([x.reshape(-1) for x in current])
        if flat.numel() > FORECAST_SAMPLE:
            key = (flat.numel(), flat.device)
            if key not in self.samples:  # one fixed subset per output size, the same at every step
                chosen = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))
                self.samples[key] = chosen[:FORECAST_SAMPLE].sort().values.to(flat.device)
            flat = flat.index_select(0, self.samples[key])
            norm = flat.abs().sum()
        ring = self.stacks.get((path, slot))
        if ring is None or ring.shape[1] != flat.numel() or ring.device != flat.device:
            with torch.inference_mode(False):
                ring = torch.zeros(self.depth, flat.numel(), device=flat.device)
            self.stacks[(path, slot)] = ring
        keys, weights = self._plan(t, flat.device)
        if keys:
            errors = (weights @ ring - flat).abs().sum(dim=1) / norm
            errors = torch.nan_to_num(errors, nan=0.0, posinf=math.inf)
            self.pending_forecast.setdefault((path, slot), []).append((t, keys, errors))
        ring[t % self.depth].copy_(flat)

    def _plan(self, t: int, device: torch.device) -> tuple[tuple[str, ...], torch.Tensor]:
        """The histories that fit before step t, and their weights over the ring's rows."""
        found = self.plans.get((t, device))
        if found is None:
            keys, rows = [], []
            for order, lag, gaps in self.histories:
                nodes = history_steps(t, lag, gaps)
                if nodes[0] < 0:
                    continue
                row = [0.0] * self.depth
                for node, weight in zip(nodes, lagrange_weights(nodes, t), strict=True):
                    row[node % self.depth] += weight
                keys.append(predictor_key(order, lag, gaps))
                rows.append(row)
            found = (
                tuple(keys),
                torch.tensor(rows, dtype=torch.float32, device=device).reshape(len(rows), self.depth),
            )
            self.plans[(t, device)] = found
        return found

    def _slots(self, path: str, slot: int, tensors: list[torch.Tensor], t: int) -> list[list[torch.Tensor]]:
        slots = self.ring.get((path, slot))
        shapes = [(x.shape, x.dtype, x.device) for x in tensors]
        if slots is None or [(b.shape, b.dtype, b.device) for b in slots[0]] != shapes:
            if t > 0:
                raise ValueError(
                    f"branch {path!r} must keep its output shape within a generation; it changed at step "
                    f"{t}. Keep batch size and resolution fixed within a generation, or pass steps= "
                    "(and calls_per_step=) so generations are delimited correctly."
                )
            with torch.inference_mode(False):  # writable later whether or not run uses inference mode
                slots = [[torch.empty_like(x) for x in tensors] for _ in range(self.lookahead)]
            self.ring[(path, slot)] = slots
        return slots

    def finish_generation(self) -> None:
        """Check the generation's step count and add its errors to the sums (one device sync)."""
        if self.call < 0:
            return
        calls, self.call = self.call + 1, -1
        if calls % self.calls_per_step:
            raise ValueError(
                f"a generation must be a whole number of steps of calls_per_step={self.calls_per_step} "
                f"model calls; generation {self.generations + 1} has {calls}. Pass calls_per_step=<model "
                "calls per step> (1 when the sampler batches its guidance into one call)."
            )
        length = calls // self.calls_per_step
        expected = self.expected if self.expected is not None else self.length
        if expected is not None and length != expected:
            source = "steps" if self.expected is not None else "the first generation's count"
            raise ValueError(
                f"generations must all have the same number of steps; generation {self.generations + 1} "
                f"has {length}, but {source} is {expected}. Calibrate each step count separately "
                "(Schedule.from_errors(errors, alpha, steps=N) adapts errors to another count)."
            )
        self.length = length
        calls_of_step = range(self.calls_per_step)
        flat = [
            value
            for path in self.branches
            for slot in calls_of_step
            for lag in self.pending[(path, slot)]
            for value in lag
        ]
        values = iter(torch.stack(flat).tolist() if flat else [])
        for path in self.branches:
            sums = self.sums.setdefault(
                path,
                [[np.zeros(max(length - k, 0)) for k in range(1, self.lookahead + 1)] for _ in calls_of_step],
            )
            for per_lag in sums:
                for curve in per_lag:
                    curve += [next(values) for _ in range(len(curve))]
        self.pending.clear()
        self._sum_forecasts(length)
        self.generations += 1

    def _sum_forecasts(self, length: int) -> None:
        """Add this generation's predictor errors to the sums (one device sync); steps a history
        cannot reach stay inf."""
        entries = [
            (path, slot, key, t)
            for (path, slot), records in self.pending_forecast.items()
            for t, keys, _ in records
            for key in keys
        ]
        tensors = [errors for records in self.pending_forecast.values() for _, _, errors in records]
        values = torch.cat(tensors).tolist() if tensors else []
        for (path, slot, key, t), value in zip(entries, values, strict=True):
            calls = self.forecast_sums.setdefault(path, [{} for _ in range(self.calls_per_step)])
            sums = calls[slot].setdefault(key, np.full(length, math.inf))
            sums[t] = value if math.isinf(sums[t]) and self.generations == 0 else sums[t] + value
        self.pending_forecast.clear()

    def close(self) -> None:
        self.ring.clear()
        self.stacks.clear()
        self.progress.close()


class Progress:
    """tqdm when installed, else one rewritten line on stderr; silent when disabled, and when stderr
    is not a terminal (a redrawn bar in a log file is one line per update)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.bar = None
        if self.enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(desc="calibrate", unit="step", file=sys.stderr)

    def update(self, generation: int, step: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix(generation=generation, step=step + 1, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            sys.stderr.write(f"\rcalibrate: generation {generation}, step {step + 1}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")
        self.enabled = False
        self.bar = None
