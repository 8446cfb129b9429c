"""Model coverage, the checks: one contract suite run on every family of `coverage_families.py`.

Each family is built from a tiny config with random weights (every all-zero parameter, such as an
adaLN-Zero gate or a zero-initialised output projection, gets small noise so every branch matters)
and put through:

(a) all-compute: `Schedule.all_compute` over every branch found equals the original model (such a
    schedule leaves never-reused branches as the model wrote them: this checks the capture), and
    so do the steps of (b) that compute every branch through the fused op, in fp32 and (within two
    ulps) in bfloat16, where some blocks add in fp32 around a bf16 branch;
(b) cached: `Schedule.uniform(STEPS, INTERVAL, components)` equals the forward-patching reference
    (`forward_patching_reference.py`, which patches each branch's child module), and changes the
    output (the schedule did something);
(c) compiled: `transform(..., compile=True)` runs with no graph breaks and, after a warm-up
    generation, no recompiles, and equals the eager cached run;
(d) the branches found per block are the expected ones, written per family in `FAMILIES`;
(e) graph form: `transform(..., form="graph")` (torch.cond per component, the deployment form that
    torch.export takes) equals the cached run of (b).

A family's failure is recorded in its `FamilyResult`, not raised, so one table shows every family.
"""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from coverage_families import FAMILIES, Family
from forward_patching_reference import ForwardPatchingReference
from torch._dynamo.utils import counters
from torch.utils._pytree import tree_map_only

from smoothcache_fx import Schedule, transform
from smoothcache_fx.transform import find_blocks

STEPS = 4
INTERVAL = 2
BATCH = 2
# fp32 throughout: the fused op computes `residual + gate * branch` with the same ops in the same
# order as the blocks, so all-compute and cached runs are expected to match to rounding (measured:
# 0 or a few 1e-7 on these models); 1e-5 leaves room for reassociation, none for a wrong branch.
ALL_COMPUTE_TOL = 1e-5
CACHED_TOL = 1e-5
# bf16 fused-op steps: the op computes eager's own `residual + gate * branch` into a contiguous
# tensor; where the model's own add left another layout (Sana's conv feed-forward, permuted back to
# tokens), a following bf16 linear rounds differently: 1 ulp of the output seen on Sana, exact on
# the rest. Two ulps of the largest output, relative: 2 * 2^-8.
BF16_REL_TOL = 2.0**-7
# Compiled variants may fuse and reorder float ops (inductor's C++ kernels); 1e-4 on outputs of
# magnitude ~1 is still far below the effect of a single reused branch (>1e-2 on every family).
COMPILED_TOL = 1e-4
# A reuse step must move the output by more than this, or the cached run tested nothing.
MIN_CACHE_EFFECT = 1e-3


# -- the contract suite -------------------------------------------------------------------------------
@dataclass
class FamilyResult:
    """What the contract suite found for one family; `None` where a check did not run."""

    family: str
    model_class: str = ""
    blocks: dict[str, str] = field(default_factory=dict)  # block path -> class name
    branches: dict[str, tuple[str, ...]] = field(default_factory=dict)  # block path -> components
    expected_ok: bool | None = None
    all_compute_diff: float | None = None
    bf16_diff: float | None = None
    bf16_scale: float | None = None  # max |output| of the bf16 model
    cached_diff: float | None = None
    cache_effect: float | None = None
    counts_ok: bool | None = None
    compile_backend: str | None = None
    compile_diff: float | None = None
    graph_breaks: int | None = None
    recompiles: int | None = None
    compiled_graphs: int | None = None
    graph_form_diff: float | None = None
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def all_compute_ok(self) -> bool:
        return self.all_compute_diff is not None and self.all_compute_diff <= ALL_COMPUTE_TOL

    @property
    def bf16_ok(self) -> bool | None:
        if self.bf16_diff is None:
            return None
        return self.bf16_diff <= BF16_REL_TOL * self.bf16_scale

    @property
    def cached_ok(self) -> bool:
        return (
            self.cached_diff is not None
            and self.cached_diff <= CACHED_TOL
            and bool(self.counts_ok)
            and (self.cache_effect or 0.0) > MIN_CACHE_EFFECT
        )

    @property
    def compile_ok(self) -> bool | None:
        if self.compile_backend is None:
            return None
        return (
            self.compile_diff is not None
            and self.compile_diff <= COMPILED_TOL
            and self.graph_breaks == 0
            and self.recompiles == 0
        )

    @property
    def graph_form_ok(self) -> bool:
        return self.graph_form_diff is not None and self.graph_form_diff <= CACHED_TOL

    @property
    def green(self) -> bool:
        return (
            bool(self.expected_ok)
            and self.all_compute_ok
            and self.bf16_ok is not False
            and self.cached_ok
            and self.compile_ok is not False
            and self.graph_form_ok
            and not self.errors
        )

    @property
    def components(self) -> list[str]:
        return list(dict.fromkeys(c for found in self.branches.values() for c in found))


def _generation(model: torch.nn.Module, family: Family, dtype: torch.dtype = torch.float32) -> list:
    """One generation's outputs, floating inputs cast to `dtype`."""
    outputs = []
    with torch.no_grad():
        for step in range(STEPS):
            inputs = tree_map_only(
                torch.Tensor, partial(_cast_floating, dtype=dtype), family.inputs(BATCH, step)
            )
            outputs.append(model(**inputs, return_dict=False)[0])
    return outputs


def _cast_floating(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _max_diff(expected: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(expected, got, strict=True))


def run_family(name: str, compile_backend: str | None = "inductor", bf16: bool = True) -> FamilyResult:
    """Run the contract suite (a)-(e) on one family; failures are recorded, not raised.

    Args:
        name: a key of `FAMILIES`.
        compile_backend: torch.compile backend for (c); None skips it.
        bf16: also run (a) with the model and inputs in bfloat16.
    """
    family = FAMILIES[name]
    result = FamilyResult(name, family.model_class)
    start = time.perf_counter()
    try:
        original = family.build()
        result.blocks = {path: type(block).__name__ for path, block in find_blocks(original).items()}
        expected = _generation(original, family)

        # (a) all-compute equals the original; (d) the runtime's own branches are the expected ones
        model, outputs = _all_compute(original, family, family.components)
        result.branches = model.smoothcache.branches
        result.expected_ok = all(
            family.expected_for(path) == result.branches.get(path, ()) for path in result.blocks
        )
        components = result.components
        if outputs is None:  # an expected component was not found: rerun on what was
            model, outputs = _all_compute(original, family, components)
        result.all_compute_diff = _max_diff(expected, outputs)
        schedule = Schedule.uniform(STEPS, INTERVAL, components)
        fused_steps = list(range(0, STEPS, INTERVAL))  # every branch computes, through the fused op
        if bf16:  # the same in bfloat16, where residual adds may promote to fp32 around the branch
            low = copy.deepcopy(original).to(torch.bfloat16)
            want = _generation(low, family, torch.bfloat16)
            model = transform(low, schedule)
            got = _generation(model, family, torch.bfloat16)
            result.bf16_diff = _max_diff([want[i] for i in fused_steps], [got[i] for i in fused_steps])
            result.bf16_scale = max(out.float().abs().max().item() for out in want)

        # (b) a caching schedule equals forward patching of the same branches
        model = transform(copy.deepcopy(original), schedule)
        cached = _generation(model, family)
        result.all_compute_diff = max(
            result.all_compute_diff,
            _max_diff([expected[i] for i in fused_steps], [cached[i] for i in fused_steps]),
        )
        result.cache_effect = _max_diff(expected, cached)
        want, reference_counts = _reference_run(original, family, result.branches, schedule)
        result.cached_diff = _max_diff(want, cached)
        stats = model.smoothcache.stats
        result.counts_ok = reference_counts == {p: (s["computed"], s["reused"]) for p, s in stats.items()}

        # (e) the single-graph form gives the same outputs as the variants
        graph_form = transform(copy.deepcopy(original), schedule, form="graph")
        result.graph_form_diff = _max_diff(cached, _generation(graph_form, family))

        # (c) compiled: no graph breaks, no recompiles after a warm-up generation
        if compile_backend is not None:
            result.compile_backend = compile_backend
            _run_compiled(result, original, family, schedule, cached, compile_backend)
    except Exception as error:  # a family's failure is a row of the table, not the end of the run
        result.errors.append(_describe(error))
    result.seconds = time.perf_counter() - start
    return result


def _all_compute(original, family: Family, components: Sequence[str]):
    """A transformed copy under `Schedule.all_compute` and its outputs; outputs are None when a
    schedule key named no branch (the runtime raised after the first call, branches are known)."""
    model = transform(copy.deepcopy(original), Schedule.all_compute(STEPS, components))
    try:
        return model, _generation(model, family)
    except ValueError as error:
        if "match no residual branch" not in str(error):
            raise
        return model, None


def _reference_run(original, family: Family, branches: Mapping, schedule) -> tuple[list, dict]:
    """Outputs of the forward-patching reference under `schedule`, and its (computed, reused) counts."""
    # Full branch paths, so the reference patches exactly the modules the pass found.
    masks = {
        f"{path}.{c}": list(schedule.mask_for(f"{path}.{c}"))
        for path, found in branches.items()
        for c in found
    }
    components = sorted({c for found in branches.values() for c in found})
    model = copy.deepcopy(original)
    with ForwardPatchingReference(model, masks, components=components) as reference:
        outputs = _generation(model, family)
        counts = {path: (reference.computed[path], reference.reused[path]) for path in reference.patched}
    return outputs, counts


def _run_compiled(result, original, family, schedule, eager, backend) -> None:
    torch._dynamo.reset()
    counters.clear()
    try:
        model = transform(copy.deepcopy(original), schedule, compile=True, backend=backend)
        first = _generation(model, family)
        result.compiled_graphs = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
        counters.clear()
        again = _generation(model, family)
        result.graph_breaks = breaks + sum(counters["graph_break"].values())
        result.recompiles = sum(counters["recompiles"].values()) + counters["stats"]["unique_graphs"]
        result.compile_diff = max(_max_diff(eager, first), _max_diff(eager, again))
    finally:
        torch._dynamo.reset()


def _describe(error: BaseException) -> str:
    frame = traceback.extract_tb(error.__traceback__)[-1]
    message = " ".join(str(error).split())
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{type(error).__name__} at {Path(frame.filename).name}:{frame.lineno}: {message}"
