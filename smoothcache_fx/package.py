"""`export_package`: a transformed model as an AOTInductor package that runs cached generations in
a process that imports torch alone.

The package is the single-graph form (`transform(..., form="graph")`): the step is a buffer the
graph advances at every call, each block's schedule a bool buffer, each cache a buffer written in
place, so one call of the loaded package is one step and the package carries its state from call
to call. A new generation starts by setting the step buffer back to 0 (`reset_package`, or the one
line it runs, which needs no smoothcache_fx):

    step = next(name for name in loaded.get_constant_fqns() if name.endswith("smoothcache_step"))
    loaded.load_constants({step: torch.zeros(1, dtype=torch.long)}, check_full_update=False)

(`update_constant_buffer` on the loader is not the same: after it, the package computed wrong
outputs from step 0 on; `load_constants` with `check_full_update=False` replaces just the step.)

Why `joint_graph_constant_folding` is off: AOTInductor holds buffers as constants, and Inductor's
joint-graph constant folding folds the step's update (`remainder(step + 1, steps)`, computed from a
constant) into the value it has at compile time, so the step advances once and then stays at 1 (a
counter buffer advanced in forward reads 0, 1, 1, 1, ... in the loaded package; checked on torch
2.13.0, CPU). A package compiled with folding on matches the eager model for two calls and then
silently reuses at steps that should compute.
"""

from __future__ import annotations

import os

import torch

from smoothcache_fx.kernels.compat import aoti_compile_and_package, tree_flatten

STEP_BUFFER = "smoothcache_step"
# Inductor settings a package needs to advance its step; see the module docstring.
PACKAGE_INDUCTOR_CONFIGS = {"joint_graph_constant_folding": False}


class _FlatOutputs(torch.nn.Module):
    """Export root: the model's outputs as a flat tuple of tensors, so a process without the
    model's library (diffusers' output dataclasses) can load the package."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return tuple(tree_flatten(self.model(*args, **kwargs))[0])


def export_package(
    model, args: tuple = (), kwargs: dict | None = None, path: str = "model.pt2", inductor_configs=None
):
    """Writes an AOTInductor package (`.pt2`) of `model`, transformed with `form="graph"`; `model`
    is left as it was (its step is reset).

    The package's call takes the same arguments as `model` and returns its outputs flattened to a
    tuple of tensors (for a diffusers transformer: `(sample,)`). Each call runs one step of the
    schedule; after the schedule's last step the next call starts over at step 0, and
    `reset_package(loaded)` starts a new generation at any point.

    Args:
        model: a model transformed with `smoothcache_fx.transform(model, schedule, form="graph")`.
        args, kwargs: one real call of the model (shapes, dtypes and devices are baked in). If the
            model has not run yet, this call runs it once eagerly to capture its blocks.
        path: where to write the package.
        inductor_configs: extra Inductor settings for `aoti_compile_and_package`.

    Returns:
        The package's path.

    Example::

        model = smoothcache_fx.transform(model, schedule, form="graph")
        smoothcache_fx.export_package(model, (latents,), {"timestep": t, "class_labels": y}, path="dit.pt2")
        loaded = torch._inductor.aoti_load_package("dit.pt2")  # in any process, torch alone
        for t in timesteps:
            (noise,) = loaded(latents, timestep=t, class_labels=y)
    """
    kwargs = dict(kwargs or {})
    runtime = model.__dict__.get("smoothcache") if isinstance(model, torch.nn.Module) else None
    if runtime is None:
        raise ValueError(
            f"export_package needs a model transformed by smoothcache_fx; got an untransformed "
            f"{type(model).__name__}. Call smoothcache_fx.transform(model, schedule, form='graph') first."
        )
    if runtime.form != "graph":
        raise ValueError(
            f"export_package needs form='graph' (the step and schedule inside the graph); this model "
            f"has form={runtime.form!r}. Transform it with smoothcache_fx.transform(model, schedule, "
            "form='graph')."
        )
    if not os.fspath(path).endswith(".pt2"):
        raise ValueError(f"path must end with .pt2 (AOTInductor's package format); got {os.fspath(path)!r}.")
    configs = {**PACKAGE_INDUCTOR_CONFIGS, **(inductor_configs or {})}
    with torch.no_grad():
        if not runtime.branches:
            model(*args, **kwargs)  # the first call captures the blocks
        runtime.reset()
        program = torch.export.export(_FlatOutputs(model), tuple(args), kwargs, strict=False)
        runtime.reset()
        return aoti_compile_and_package(program, package_path=os.fspath(path), inductor_configs=configs)


def reset_package(loaded) -> None:
    """Start a new generation in a loaded package (`torch._inductor.aoti_load_package`): its next
    call runs step 0. Caches need no clearing: step 0 computes every scheduled branch."""
    steps = [name for name in loaded.get_constant_fqns() if name.split(".")[-1] == STEP_BUFFER]
    if len(steps) != 1:
        raise ValueError(
            f"loaded must be a package written by smoothcache_fx.export_package (one {STEP_BUFFER!r} "
            f"buffer); found {steps or 'none'}."
        )
    loaded.load_constants({steps[0]: torch.zeros(1, dtype=torch.long)}, check_full_update=False)
