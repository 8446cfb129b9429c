"""Every private torch API smoothcache_fx uses, in one place, with the versions it was checked on.

It sits in the lowest layer (kernels) because every layer above may import it and none below it
may import upward (smoothcache_fx -> passes -> kernels). Each entry says what it reaches into and
why no public API does the job. Checked on torch 2.13.0 (CPU build, the version CI runs).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator

import torch

# pytree: torch has no public module for it (torch.utils._pytree; checked on 2.13.0). Block calls
# are flattened with it, and a captured block's outputs rebuilt with its TreeSpec.
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map_only, tree_unflatten  # noqa: F401

# torch._library.triton.get_inner_triton_kernels logs a WARNING ("Triton not available,
# find_triton_kernels = []") for every triton_op registered without triton installed. Without
# triton the op's body takes the reference path on every device, so there is nothing to warn about.
_TRITON_OP_LOGGER = "torch._library.triton"

# torch.utils._pytree.LeafSpec's deprecation message, raised when torch deep-copies a TreeSpec.
_LEAF_SPEC_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


@contextlib.contextmanager
def quiet_missing_triton() -> Iterator[None]:
    """Silence torch's "Triton not available" warning while triton_ops are registered."""
    logger = logging.getLogger(_TRITON_OP_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class CaptureGate:
    """Transformed-model calls share the process; a capture (torch.export) has it alone.

    torch.export and torch.compile set process-wide flags while they trace
    (`torch.compiler.is_compiling()` / `is_exporting()`, the fx traceback's `current_meta`, the
    dispatch mode stack). Two exports at once in two threads fail inside torch with mode-stack and
    fake-tensor assertions, and an eager call in another thread that passes through a
    `torch.compiler.disable` wrapper (every block dispatch does) sees the flags and races on
    `current_meta` ("KeyError: 'custom'"). So a model call holds the gate shared, and a capture
    holds it exclusively: captures are serialised and no model call runs during one. A thread that
    captures from inside its own model call (the first call of a block) gives up its share while
    it waits, so two threads capturing at once cannot deadlock. Writers are preferred, so a
    capture is not starved by a stream of calls.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writer: int | None = None
        self._writers_waiting = 0
        self._local = threading.local()

    def _shares(self) -> int:
        return getattr(self._local, "shares", 0)

    def acquire_shared(self) -> None:
        if self._shares() or self._writer == threading.get_ident():
            self._local.shares = self._shares() + 1  # nested call in this thread
            return
        with self._condition:
            while self._writer is not None or self._writers_waiting:
                self._condition.wait()
            self._readers += 1
        self._local.shares = 1

    def release_shared(self) -> None:
        shares = self._shares()
        if shares == 0:
            return  # a call whose pre-hook never ran (it raised before taking its share)
        self._local.shares = shares - 1
        if shares > 1 or self._writer == threading.get_ident():
            return
        with self._condition:
            self._readers -= 1
            self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._writer == me:
            yield  # already exclusive (a capture inside a capture)
            return
        held = self._shares()
        with self._condition:
            if held:
                self._readers -= 1  # give up this thread's share while waiting
            self._writers_waiting += 1
            while self._writer is not None or self._readers:
                self._condition.wait()
            self._writers_waiting -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._condition:
                self._writer = None
                if held:
                    self._readers += 1
                self._condition.notify_all()


CAPTURE_GATE = CaptureGate()


def export_functional(root: torch.nn.Module, args: tuple) -> tuple[torch.export.ExportedProgram, object]:
    """`torch.export.export(strict=False)` then `run_decompositions({})`: a functional ATen graph.

    Returns the program and the call's output TreeSpec. torch 2.13's `run_decompositions`
    deep-copies the program's module call graph, and deep-copying the pytree leaf specs in it trips
    the FutureWarning torch put on its own `LeafSpec` class ("`isinstance(treespec, LeafSpec)` is
    deprecated"): once per capture, from torch's code, not ours. The module call graph cannot be
    dropped (`run_decompositions` unlifts through it), so that one message is filtered for the
    duration of the call and nothing else.
    """
    with CAPTURE_GATE.exclusive():
        exported = torch.export.export(root, args, strict=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LEAF_SPEC_DEPRECATION, category=FutureWarning)
            exported = exported.run_decompositions({})
    return exported, exported.call_spec.out_spec


def cpu_sdpa_flop_formulas() -> dict:
    """FLOP formulas for the CPU attention kernel, as `FlopCounterMode(custom_mapping=...)` takes them.

    `F.scaled_dot_product_attention` on CPU dispatches to the private op
    `aten._scaled_dot_product_flash_attention_for_cpu`, which has no entry in
    `torch.utils.flop_counter.flop_registry` (checked on torch 2.13.0: only the CUDA flash,
    efficient and cudnn kernels have one), so a count on CPU leaves attention's QK^T and PV matmuls
    out. It is counted here with torch's own formula for the CUDA flash kernel, `sdpa_flop_count`
    (FlopCounterMode hands a custom formula the argument shapes). Once torch registers the op, its
    own formula is used and this returns no entry.
    """
    from torch.utils import flop_counter

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_counter.flop_registry:
        return {}

    def cpu_sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    return {op: cpu_sdpa_flop}


# -- graph building and inspection (passes/) ------------------------------------------------------
# The higher-order `cond` op, as the single-graph form writes it into graphs by hand (the nodes a
# traced `torch.cond` would produce): torch.cond itself cannot be called on fx Nodes.
COND = torch.ops.higher_order.cond

# Profiler range ops as graph nodes (passes/annotate.py): what `record_function` records when
# dynamo keeps it (`capture_profiler_record_function`); enter returns a handle exit takes.
RECORD_FUNCTION_ENTER = torch.ops.profiler._record_function_enter_new.default
RECORD_FUNCTION_EXIT = torch.ops.profiler._record_function_exit._RecordFunction


def returns_alias(target: object) -> bool:
    """Whether an ATen overload returns a view or alias of an input (its schema's alias info)."""
    return isinstance(target, torch._ops.OpOverload) and any(
        r.alias_info is not None for r in target._schema.returns
    )


def detect_fake_mode(values: list) -> object | None:
    """The fake tensor mode the values belong to (`torch._guards.detect_fake_mode`), or None."""
    from torch._guards import detect_fake_mode as detect

    return detect(values)


# -- compile settings (smoothcache_fx/compile.py, profile.py, block.py) ----------------------------
def inductor_options() -> set[str]:
    """Inductor's option names, to validate `transform(..., options=...)` before compiling."""
    return set(torch._inductor.list_options())


def inductor_kernel_profile() -> contextlib.AbstractContextManager:
    """Inductor's C++ kernels named in the profiler while compiling (restored on exit)."""
    return torch._inductor.config.patch({"cpp.enable_kernel_profile": True})


def mark_static_address(buffer: torch.Tensor) -> None:
    """CUDA graphs read and write this buffer in place instead of copying it at each replay."""
    torch._dynamo.mark_static_address(buffer, guard=False)


# -- deployment (smoothcache_fx/package.py) ---------------------------------------------------------
def aoti_compile_and_package(program, package_path: str, inductor_configs: dict):
    """AOTInductor's packager (documented, but under torch._inductor)."""
    return torch._inductor.aoti_compile_and_package(
        program, package_path=package_path, inductor_configs=inductor_configs
    )
