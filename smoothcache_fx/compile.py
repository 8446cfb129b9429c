"""Compiling specialised variants with torch.compile.

Each distinct variant is compiled once with `fullgraph=True`: per block (block structure x call
signature x compute mask) or per whole model (call signature x whole-model mask), see
`smoothcache_fx.granularity`. Parameters and caches are graph inputs, so every block of one
structure shares a compiled block variant, and the step is chosen in Python outside compiled code:
no step value ever reaches dynamo, so a 50-step generation causes no recompiles.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from smoothcache_fx.granularity import DEFAULT_COMPILE_BUDGET, GRANULARITIES
from smoothcache_fx.kernels.compat import inductor_options

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# A 28-block DiT with a per-block schedule needs a few per structure; far more means a schedule
# with nearly every step different, where compile time would dwarf the saving (see BENCHMARKS.md).
DEFAULT_MAX_VARIANTS = 32


@dataclass(frozen=True)
class CompileConfig:
    """How variants are compiled; `enabled=False` runs the specialised graphs eagerly.

    Attributes:
        enabled: compile each variant with torch.compile.
        backend: torch.compile backend ("inductor", "aot_eager", ...).
        mode: torch.compile mode; "reduce-overhead" (CUDA graphs) needs CUDA tensors and falls
            back to the default mode, with a warning, for CPU variants.
        options: inductor options (`torch._inductor.list_options()`), e.g. {"max_autotune": True}.
        dynamic: passed to torch.compile; False (default) specialises on shapes.
        max_variants: refuse schedules that need more compiled variants than this.
        granularity: "auto", "block", "model" or "graph" (`smoothcache_fx.granularity`).
        compile_budget: with "auto", whole-model variants are chosen when their estimated compile
            cost is at most this multiple of plain torch.compile's.
    """

    enabled: bool = False
    backend: str | Callable = "inductor"
    mode: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    dynamic: bool | None = False
    max_variants: int = DEFAULT_MAX_VARIANTS
    granularity: str = "auto"
    compile_budget: float = DEFAULT_COMPILE_BUDGET

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}; got {self.granularity!r}.")
        budget = self.compile_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise ValueError(
                f"compile_budget must be a positive number (a multiple of plain torch.compile's "
                f"compile time); got {budget!r}."
            )
        if self.mode not in MODES:
            raise ValueError(f"compile mode must be one of {MODES}; got {self.mode!r}.")
        if self.mode is not None and self.options:
            raise ValueError(
                "torch.compile takes either mode or options, not both; got "
                f"mode={self.mode!r} and options={dict(self.options)}. Drop one of them."
            )
        if self.options and self.backend == "inductor":
            known = inductor_options()
            unknown = sorted(set(self.options) - known)
            if unknown:
                raise ValueError(
                    f"compile options {unknown} are not inductor options; see "
                    "torch._inductor.list_options() for the valid names."
                )
        if not isinstance(self.max_variants, int) or self.max_variants < 1:
            raise ValueError(f"max_variants must be a positive int; got {self.max_variants!r}.")

    def compile(self, graph_module: Callable, device: torch.device) -> Callable:
        """Compile one variant (a GraphModule, or a whole-model forward) for tensors on `device`."""
        mode = self.mode
        if mode == "reduce-overhead" and device.type != "cuda":
            warnings.warn(
                f"compile mode 'reduce-overhead' uses CUDA graphs, but this variant runs on {device}; "
                "compiling it with the default mode instead.",
                stacklevel=2,
            )
            mode = None
        return torch.compile(
            graph_module,
            fullgraph=True,
            backend=self.backend,
            mode=mode,
            options=dict(self.options) or None,
            dynamic=self.dynamic,
        )

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.enabled and self.mode == "reduce-overhead"


def fresh_code_copy(function: types.FunctionType, suffix: str) -> types.FunctionType:
    """`function` with a code object of its own. Dynamo keeps one cache per code object: compiling
    copies keeps each whole-model variant's graph apart (no guard failures between them, so no
    recompiles), and two models of one class never share or evict each other's graphs."""
    code = function.__code__
    name = f"{code.co_name}_{suffix}"
    copy = types.FunctionType(
        code.replace(co_name=name, co_qualname=f"{code.co_qualname}_{suffix}"),
        function.__globals__,
        name,
        function.__defaults__,
        function.__closure__,
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy
