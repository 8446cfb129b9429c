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


# torch.export keeps process-wide state while it traces (the dispatch mode stack, the active fake
# tensor mode): two exports running at once in two threads fail inside torch with mode-stack and
# fake-tensor assertions. Every capture takes this lock; one process, one export at a time.
EXPORT_LOCK = threading.RLock()


def export_functional(root: torch.nn.Module, args: tuple) -> tuple[torch.export.ExportedProgram, object]:
    """`torch.export.export(strict=False)` then `run_decompositions({})`: a functional ATen graph.

    Returns the program and the call's output TreeSpec. torch 2.13's `run_decompositions`
    deep-copies the program's module call graph, and deep-copying the pytree leaf specs in it trips
    the FutureWarning torch put on its own `LeafSpec` class ("`isinstance(treespec, LeafSpec)` is
    deprecated"): once per capture, from torch's code, not ours. The module call graph cannot be
    dropped (`run_decompositions` unlifts through it), so that one message is filtered for the
    duration of the call and nothing else.
    """
    with EXPORT_LOCK:
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
