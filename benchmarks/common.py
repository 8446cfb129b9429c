"""Measurement helpers for the benchmarks: a synchronising timer, peak memory, summaries, environment.

Kept free of anything model specific so that any benchmark script can import it (run the scripts from
the repository root: `python benchmarks/<name>.py`, which puts `benchmarks/` on `sys.path`).

Importing it also puts `tests/` on `sys.path`, after `benchmarks/`: benchmarks import the test
suite's models and references (`from models import randomise_zero_init`) instead of keeping copies
that drift from them. tests/ is not a package; its modules import each other by name, as they do
under pytest, which puts tests/ on `sys.path` the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import resource
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from smoothcache_fx.compile import fresh_code_copy

# Linux resets a process's peak RSS (VmHWM in /proc/self/status) when "5" is written to
# /proc/self/clear_refs (proc(5), "clear_refs", since Linux 4.0). That gives a per-interval high-water
# mark; getrusage's ru_maxrss cannot be reset, so it only moves when a new lifetime peak is reached.
_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"

TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(1, str(TESTS))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """Run `fn()` once; returns (its result, wall seconds, process CPU seconds), synchronising the
    device around it.

    CPU seconds (all threads of this process) are the steadier figure on a CPU shared with other
    work when torch runs one thread: time slices lost to other processes do not count. With more
    threads, spinning OpenMP workers inflate them; on CUDA they mean nothing. Use wall time there.
    """
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start, time.process_time() - start_cpu


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values), len(values))


class PeakMemory:
    """Peak memory above the level at `start()`, over the interval up to `stop()`, in bytes.

    CUDA: `torch.cuda.max_memory_allocated` (tensors only, allocator caching excluded). CPU: the
    process's resident set high-water mark (VmHWM, reset through /proc/self/clear_refs), which counts
    everything the process touches, torch's allocations included (tracemalloc does not see them).
    glibc keeps freed memory mapped, so a later allocation can reuse pages already counted in the
    starting RSS and show no rise; `malloc_trim(0)` before the start returns what it can to the OS.
    Where clear_refs cannot be written it falls back to getrusage's ru_maxrss delta, which reads 0
    unless the interval sets a new lifetime peak. `method` names what was measured.
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = "cuda max_memory_allocated"
        elif _can_reset_rss_peak():
            self.method = (
                "cpu peak RSS above the start (VmHWM reset via /proc/self/clear_refs, after malloc_trim)"
            )
        else:
            self.method = "cpu ru_maxrss delta (lifetime peak; 0 unless a new peak)"
        self._base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("cpu peak RSS"):
            _malloc_trim()
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
            self._base = _status_kib("VmRSS") * 1024
        else:
            self._base = _maxrss_bytes()

    def stop(self) -> int:
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self.method.startswith("cpu peak RSS"):
            return _status_kib("VmHWM") * 1024 - self._base
        return _maxrss_bytes() - self._base


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _can_reset_rss_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return _status_kib("VmHWM") > 0
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{_STATUS} has no {field} field")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def environment(device: torch.device) -> dict:
    """What the numbers were measured on, for the JSON record."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# -- dynamo and inductor accounting (shared by the compiled benchmarks) --
DYNAMO_KEYS = ("graphs", "breaks", "recompiles")


def dynamo_counts() -> dict:
    """Graphs compiled, graph breaks, and each frame's compile count so far. torch 2.13 no longer
    increments counters["recompiles"], so recompiles are read from dynamo's per-frame compile counter
    (the `[frame/compile]` ids of TORCH_LOGS=recompiles)."""
    frames = getattr(torch._dynamo.convert_frame, "FRAME_COMPILE_COUNTER", {})
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
        "frames": dict(frames),
    }


def dynamo_delta(before: dict, after: dict) -> dict[str, int]:
    """What happened between two `dynamo_counts`. A recompile is a frame compiled more than once in
    between: a row's first compile of a frame that an earlier row (another model instance of the
    same class) compiled too is its own first compile, not a recompile."""
    frames = after["frames"]
    return {
        "graphs": after["graphs"] - before["graphs"],
        "breaks": after["breaks"] - before["breaks"],
        "recompiles": sum(max(0, n - before["frames"].get(f, 0) - 1) for f, n in frames.items()),
    }


def dynamo_compile_seconds() -> float:
    """Wall seconds dynamo spent compiling frames so far (tracing, AOT and inductor included)."""
    return sum(torch._dynamo.utils.compilation_time_metrics.get("_compile.compile_inner", []))


def prime_compiler(device) -> None:
    """Pay inductor's once-per-process start-up (hashing torch and triton, worker pools) before any
    row, so that it is not charged to the first compiled row's compile time."""
    with fresh_inductor_cache():
        torch.compile(lambda x: torch.nn.functional.gelu(x) + 1, fullgraph=True)(torch.ones(4, device=device))


@contextlib.contextmanager
def fresh_inductor_cache():
    """A clean inductor cache (disk and memory) so compile times do not benefit from earlier rows."""
    from torch._inductor.utils import fresh_cache

    with fresh_cache():
        yield


def own_forward(model: torch.nn.Module, row: str) -> torch.nn.Module:
    """`model` with a forward whose code object is its own. Dynamo keeps its compiled entries per
    code object and, with nn modules inlined, does not guard on which instance calls. Without this,
    a baseline compiled beside a peer of the same class runs the peer's entries: in bench_overhead
    the baseline's calls after the helper's warm-up ran the helper's graph-broken entries (seen in
    torch.profiler as the helper's `Torch-Compiled Region`s), and in frontier.py a FirstBlockCache
    row's entries made the baseline recompile a block at its next call (a 25x "speed-up" in a quick run)."""
    model.forward = types.MethodType(fresh_code_copy(type(model).forward, f"bench_{row}"), model)
    return model
