"""Choosing what `compile=True` compiles: per-block variants or whole-model variants.

- "block": one compiled graph per distinct block-level mask, shared by every block of a structure,
  chosen in Python at each block call. Cheapest to compile (one block's graph per mask); pays a
  Python dispatch per block per step.
- "model": one compiled graph of the whole model per distinct whole-model mask (every block's mask
  at one step), shared by every step with that mask. No Python between blocks, one graph per step
  (one CUDA graph per step under mode="reduce-overhead"); costs a whole-model compile per mask.
- "graph": the single `torch.cond` graph (`form="graph"`), compiled once; chosen explicitly.

The automatic rule ("auto", the default) compares estimated compile costs once the blocks are
captured (the first call): whole-model variants when their cost is within `compile_budget` times
that of plain `torch.compile` of the model, per-block variants otherwise. Costs are in operator
units (one FX `call_function` node lowered by inductor):
- every compiled graph pays a fixed part, `FIXED_GRAPH_COST` (dynamo and AOT set-up, code
  generation, and above all the C++ or Triton build of the generated code);
- plus its operators;
- plain torch.compile also pays dynamo's symbolic run of the model's own Python for every operator
  (`PYTHON_TRACE_COST` per operator: attention processors, norms, embeddings), which our variants
  skip: dynamo inlines their already-captured FX graphs.
Both constants are fitted to dynamo's compile seconds on the demo model with a fresh inductor cache
(BENCHMARKS.md, "Compile granularity": plain 18.3 s, whole-model for two masks 26.4 s, per-block for
two block masks 9.9 s). There, FORA-2 and Roblox's alpha=0.18 schedule (two whole-model masks: all
computed, all reused; a reuse mask's graph keeps only the norms and the modulation) estimate 1.45x
plain and measured 1.44x, within the 1.5x budget; three masks or more estimate ~2x and stay
per-block, whose compiles are one small block graph each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smoothcache_fx.runtime import SmoothCacheRuntime

GRANULARITIES = ("auto", "block", "model", "graph")
DEFAULT_COMPILE_BUDGET = 1.5
# Operator-equivalents of the fixed work every compiled graph costs, and of dynamo tracing the
# model's Python per operator in plain torch.compile (see the module docstring).
FIXED_GRAPH_COST = 100
PYTHON_TRACE_COST = 0.1


@dataclass(frozen=True)
class CompileEstimate:
    """Estimated compile costs, in operator units, of each granularity for one schedule.

    Attributes:
        plain: plain torch.compile of the model (its blocks' operators and Python, one graph).
        block: per-block variants (one graph per distinct block-level mask per structure).
        model: whole-model variants (one whole-model graph per distinct whole-model mask).
        block_graphs / model_graphs: how many graphs each compiles.
    """

    plain: float
    block: float
    model: float
    block_graphs: int
    model_graphs: int

    def __str__(self) -> str:
        return (
            f"estimated compile cost vs plain torch.compile: per-block {self.block / self.plain:.2f}x "
            f"({self.block_graphs} graphs), whole-model {self.model / self.plain:.2f}x "
            f"({self.model_graphs} graphs)"
        )


def estimate_compile_cost(runtime: SmoothCacheRuntime) -> CompileEstimate:
    """Compile-cost estimate from the captured blocks and the schedule's distinct masks (builds
    the specialised graphs it counts; they are needed by either granularity)."""
    states = runtime.captured_states() or []
    operators = sum(_operators(state.current.captured.graph_module) for state in states)
    plain = FIXED_GRAPH_COST + (1 + PYTHON_TRACE_COST) * operators
    steps = runtime.schedule.steps
    block_keys: dict[tuple[int, tuple], int] = {}
    model_keys: dict[tuple, int] = {}
    for step in range(steps):
        whole = []
        for state in states:
            compute = {name: mask[step] for name, mask in state.current.masks.items()}
            key = (id(state.current.shared), tuple(compute.items()))
            if key not in block_keys:
                block_keys[key] = _operators(state.specialised(state.current, compute).graph_module)
            whole.append(block_keys[key])
        model_keys.setdefault(tuple(key for key in _step_keys(states, step)), sum(whole))
    block = sum(FIXED_GRAPH_COST + count for count in block_keys.values())
    # A whole-model graph names its cache buffers, so each call slot of a step (calls_per_step)
    # has graphs of its own; block variants take the caches as inputs and serve every slot.
    slots = runtime.calls_per_step
    model = slots * sum(FIXED_GRAPH_COST + count for count in model_keys.values())
    return CompileEstimate(plain, block, model, len(block_keys), slots * len(model_keys))


def choose_granularity(
    estimate: CompileEstimate, budget: float, max_variants: int, model_graphs_possible: bool
) -> str:
    """ "model" where whole-model variants fit the compile budget (and max_variants), else "block"."""
    if (
        model_graphs_possible
        and estimate.model_graphs <= max_variants
        and estimate.model <= budget * estimate.plain
    ):
        return "model"
    return "block"


def _step_keys(states, step: int):
    for state in states:
        yield tuple((name, mask[step]) for name, mask in state.current.masks.items())


def _operators(graph_module) -> int:
    return sum(1 for node in graph_module.graph.nodes if node.op == "call_function")
