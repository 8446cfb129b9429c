"""`transform`: turn a DiT (or a diffusers pipeline holding one) into a schedule-driven cached model."""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Iterable, Mapping

import torch

from smoothcache_fx.block import BlockState
from smoothcache_fx.compile import DEFAULT_MAX_VARIANTS, CompileConfig
from smoothcache_fx.granularity import DEFAULT_COMPILE_BUDGET
from smoothcache_fx.model_variants import ModelVariants
from smoothcache_fx.passes.specialise import KERNELS
from smoothcache_fx.runtime import SmoothCacheRuntime
from smoothcache_fx.saved_schedule import load_saved, save_beside_config
from smoothcache_fx.schedules import Schedule, as_schedule
from smoothcache_fx.schedules.forecast import MAX_ORDER, check_order

_BLOCK_CLASSES: dict[type, type] = {}
_PIPELINE_CLASSES: dict[type, type] = {}
_MODEL_CLASSES: dict[type, type] = {}
FORMS = ("variants", "graph")


def transform(
    model,
    schedule=None,
    *,
    blocks=None,
    kernel: str = "op",
    compile: bool = False,
    backend="inductor",
    mode: str | None = None,
    options: dict | None = None,
    dynamic: bool | None = False,
    max_variants: int = DEFAULT_MAX_VARIANTS,
    granularity: str = "auto",
    compile_budget: float = DEFAULT_COMPILE_BUDGET,
    form: str = "variants",
    calls_per_step: int = 1,
    strict: bool = False,
    resample: bool = False,
    max_order: int = MAX_ORDER,
):
    """Modifies `model` in place (and returns it) so each call runs one step of `schedule`.

    Every transformer block is captured as an FX graph on its first call, its residual branches
    (`h = h + gate * branch(norm(h))`) are found, and each distinct compute mask of the schedule
    becomes a specialised graph in which a skipped branch reads a persistent cache buffer and
    everything only it needed is dead code. Parameters, state_dict keys and the forward signature
    are unchanged; `model.smoothcache` holds the step clock, `branches`, `stats` and `reset()`.

    Args:
        model: a DiT-style `torch.nn.Module`, or a diffusers pipeline with a `transformer`; a
            pipeline's `__call__` then resets the clock and checks the step count per generation.
        schedule: a `Schedule`, a dict in the SmoothCache JSON format, or a path to a JSON file
            (ours, or one of Roblox's as published). Keys whose component no block has are renamed
            to an alias that one has (`attn` -> `attn1`, `mlp` -> `ff`;
            `smoothcache_fx.schedules.aliases`), with one log line. None: the schedule that
            `save_pretrained` of a transformed model wrote beside the config of the folder the
            model was loaded from (an error when there is none).
        blocks: which modules are transformer blocks: module paths or classes. By default every
            element of every `nn.ModuleList` that has child modules.
        kernel: "op" emits the fused `smoothcache_fx::gated_residual_add`; "inductor" emits plain
            torch ops for inductor to fuse.
        compile: compile every distinct variant once with `torch.compile(fullgraph=True)`; the
            step is chosen in Python outside compiled code (no recompiles across steps).
        backend, mode, options, dynamic: passed to torch.compile. mode="reduce-overhead" (CUDA
            graphs) needs CUDA; on CPU it warns and compiles with the default mode.
        max_variants: with compile=True, refuse schedules needing more compiled variants than this.
        granularity: with compile=True, what one compiled graph covers. "block": a block, per
            distinct block mask (blocks of one structure share it). "model": the whole model, per
            distinct whole-model mask (one graph per step; one CUDA graph per step with
            mode="reduce-overhead"). "graph": the single `torch.cond` graph for every step
            (form="graph"). "auto" (default): "model" when its estimated compile cost is within
            `compile_budget` times plain torch.compile's, else "block"; decided at the end of the
            first call and logged (`model.smoothcache.granularity`).
        compile_budget: the compile-cost multiple "auto" allows whole-model variants.
        form: "variants" (default) picks a specialised graph per step in Python; "graph" keeps one
            graph for every step (the step is a buffer advanced inside forward, the schedule a bool
            buffer, each component a `torch.cond`), for torch.export / AOTInductor and for
            `torch.compile(model, fullgraph=True)` of the whole model. Run one eager call first.
        calls_per_step: model calls per schedule step, for samplers that call the model more than
            once per denoising step with the same input shapes (unbatched classifier-free guidance:
            Wan, Lumina2, Flux true CFG call it twice). Each call of a step gets caches of its own,
            so a reused branch in the unconditional call reads the unconditional output. Variants
            form only.
        strict: a block that torch.export cannot capture (data-dependent routing, `.numpy()`)
            raises instead of running uncached with a warning.
        resample: pipelines only. A call with another `num_inference_steps` than the schedule's
            runs `schedule.resample(num_inference_steps)` (logged once per new step count; the
            blocks are specialised again) instead of being refused. Only where the step count is
            known before the call: a first-order scheduler and no `timesteps=`, `sigmas=` or
            `strength=` (otherwise the call is checked as it runs, as without resample).
        max_order: cap on the predictor orders of the schedule (`Schedule.orders`): a branch of
            order k keeps k + 1 outputs (k + 1 buffers of its output's size per call slot,
            `model.smoothcache.stats[...]["cache_bytes"]`); 0 reuses everywhere.

    Returns:
        The same object, transformed.

    Example::

        >>> import torch, smoothcache_fx
        >>> from diffusers import DiTTransformer2DModel
        >>> model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     num_layers=2, sample_size=8, num_embeds_ada_norm=10).eval()
        >>> schedule = smoothcache_fx.Schedule.uniform(steps=4, interval=2, components=["attn1", "ff"])
        >>> model = smoothcache_fx.transform(model, schedule)
        >>> with torch.no_grad():
        ...     for t in range(4):
        ...         out = model(torch.randn(1, 4, 8, 8), timestep=torch.tensor([t]), class_labels=torch.tensor([1]))
        >>> model.smoothcache.branches["transformer_blocks.0"]
        ('attn1', 'ff')
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}.")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}; got {form!r}.")
    if not isinstance(calls_per_step, int) or isinstance(calls_per_step, bool) or calls_per_step < 1:
        raise ValueError(f"calls_per_step must be a positive int; got {calls_per_step!r}.")
    if form == "graph" and calls_per_step != 1:
        raise ValueError(
            "form='graph' advances its step buffer once per model call; calls_per_step > 1 needs "
            "form='variants', or batch the guidance calls into one model call per step."
        )
    if form == "graph" and compile:
        raise ValueError(
            "form='graph' is compiled as one whole-model graph: pass compile=True with "
            "granularity='graph' (and the default form), or call torch.compile(model, "
            "fullgraph=True) on the transformed model yourself."
        )
    if compile and granularity == "graph":
        if calls_per_step != 1:
            raise ValueError(
                "granularity='graph' advances its step inside the graph once per model call; "
                "calls_per_step > 1 needs granularity='block' or 'model'."
            )
        form = "graph"
    if resample and not _is_pipeline(model):
        raise ValueError(
            "resample=True needs a diffusers pipeline: only a pipeline call says its step count "
            "before the model runs. Transform the pipeline, or resample yourself: "
            "model.smoothcache.set_schedule(schedule.resample(steps))."
        )
    if schedule is None:
        schedule = load_saved(model.transformer if _is_pipeline(model) else model)
    schedule = as_schedule(schedule)
    check_order(max_order, "transform(..., max_order=)")
    compile_config = CompileConfig(
        enabled=bool(compile),
        backend=backend,
        mode=mode,
        options=options or {},
        dynamic=dynamic,
        max_variants=max_variants,
        granularity=granularity,
        compile_budget=compile_budget,
    )
    if _is_pipeline(model):
        _transform_pipeline(
            model,
            schedule,
            blocks,
            kernel,
            compile_config,
            form,
            calls_per_step,
            strict,
            bool(resample),
            max_order,
        )
        return model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"transform expects a torch.nn.Module or a diffusers pipeline with a .transformer; "
            f"got {type(model).__name__}."
        )
    if "smoothcache" in model.__dict__:
        raise RuntimeError(
            f"{type(model).__name__} is already transformed by smoothcache_fx. To change the schedule "
            "call model.smoothcache.set_schedule(schedule) instead of transforming it again."
        )
    _install(
        model,
        schedule,
        find_blocks(model, blocks),
        kernel,
        compile_config,
        form,
        calls_per_step,
        strict,
        max_order=max_order,
    )
    return model


def untransform(model):
    """Modifies `model` in place (and returns it): removes what `transform` added.

    Block classes, hooks and cache buffers are restored or removed; parameters were never touched.
    A pipeline gets its original class back too.
    """
    if _is_pipeline(model):
        untransform(model.transformer)
        model.__class__ = next(k for k, v in _PIPELINE_CLASSES.items() if v is type(model))
        return model
    runtime = model.__dict__.get("smoothcache")
    if runtime is None:
        raise ValueError(f"{type(model).__name__} is not transformed by smoothcache_fx; nothing to undo.")
    runtime.remove(model)
    return model


def _install(
    model,
    schedule: Schedule,
    found: dict,
    kernel: str,
    compile_config: CompileConfig,
    form: str,
    calls_per_step: int = 1,
    strict: bool = False,
    resample: bool = False,
    *,
    max_order: int = MAX_ORDER,
) -> None:
    _check_forward_not_replaced(model, found, form, strict)
    runtime = SmoothCacheRuntime(
        model, schedule, found, kernel, compile_config, form, calls_per_step, strict, resample, max_order
    )
    for path, block in found.items():
        original = type(block)
        block._smoothcache_state = BlockState(path, original, runtime)
        block.__class__ = _block_class(original, form)
    original = type(model)
    if form == "graph":
        model.register_buffer("smoothcache_step", torch.zeros(1, dtype=torch.long), persistent=False)
    model_graphs = compile_config.enabled and (
        form == "graph" or compile_config.granularity in ("auto", "model")
    )
    model_class = _model_class(original, form, model_graphs)
    if model_class is not None:
        model.__class__ = model_class
    if model_graphs:
        runtime.model_variants = ModelVariants(
            runtime, _graph_step(original) if form == "graph" else original.forward
        )
    model.smoothcache = runtime


def find_blocks(model: torch.nn.Module, blocks=None) -> dict[str, torch.nn.Module]:
    """Transformer blocks by module path.

    Default: elements of every `nn.ModuleList` that have child modules, not nested in another block.
    """
    found = _module_list_blocks(model) if blocks is None else _selected_blocks(model, blocks)
    if not found:
        raise NotImplementedError(
            f"found no transformer blocks in {type(model).__name__}: looked for elements of "
            "nn.ModuleList with child modules. Pass them with transform(..., blocks=[paths or classes])."
        )
    return found


def _module_list_blocks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    found: dict[str, torch.nn.Module] = {}
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or _inside(path, found):
            continue
        for index, child in enumerate(module):
            if any(True for _ in child.children()):
                child_path, child = _look_through_wrappers(f"{path}.{index}" if path else str(index), child)
                found[child_path] = child
    return found


def _look_through_wrappers(path: str, module: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """A module with exactly one child, no state of its own, and a child that is block-like (two
    or more children of its own) is a wrapper (HiDream wraps each block in one): its residual
    branches sit one level down, so the block is the child. A block whose only child is one
    branch module (`x + gate * self.ff(x)`, with `ff` holding a single Linear) is not a wrapper."""
    while True:
        children = list(module.named_children())
        if len(children) != 1 or module._parameters or module._buffers:
            return path, module
        name, child = children[0]
        if sum(1 for _ in child.children()) < 2:
            return path, module
        path, module = f"{path}.{name}", child


def _selected_blocks(model: torch.nn.Module, blocks: Iterable) -> dict[str, torch.nn.Module]:
    blocks = list(blocks)
    classes = tuple(b for b in blocks if isinstance(b, type))
    paths = [b for b in blocks if isinstance(b, str)]
    bad = [b for b in blocks if not isinstance(b, (type, str))]
    if bad:
        raise TypeError(f"blocks must be module paths (str) or module classes; got {bad!r}.")
    found = {}
    for path in paths:
        try:
            found[path] = model.get_submodule(path)
        except AttributeError as error:
            raise ValueError(
                f"blocks names {path!r}, which is not a submodule of {type(model).__name__}."
            ) from error
    if classes:
        for path, module in model.named_modules():
            if isinstance(module, classes) and not _inside(path, found):
                found[path] = module
    return found


def _inside(path: str, found: Mapping[str, torch.nn.Module]) -> bool:
    return any(path.startswith(prefix + ".") for prefix in found)


def _block_class(original: type, form: str) -> type:
    """A subclass of the block's class whose forward dispatches to its BlockState."""
    cls = _BLOCK_CLASSES.get((original, form))
    if cls is None:
        if form == "graph":

            def forward(self, *args, **kwargs):
                return self._smoothcache_state.run_graph_form(self, args, kwargs)
        else:

            def forward(self, *args, **kwargs):
                state = self._smoothcache_state
                if torch.compiler.is_dynamo_compiling():
                    bindings = state.runtime.model_graph_bindings
                    if bindings is not None:  # inside a whole-model variant (model_variants.py)
                        return bindings[state.path].run(self, args, kwargs)
                    return state.run_untraced(self, args, kwargs)
                return state.run(self, args, kwargs)

        namespace = {"forward": _signed(forward, original), "__module__": original.__module__, **_NOT_PICKLED}
        cls = type(original.__name__, (original,), namespace)
        cls.__qualname__ = f"SmoothCache[{original.__qualname__}]"
        _BLOCK_CLASSES[(original, form)] = cls
    return cls


def _check_forward_not_replaced(model, found: dict, form: str, strict: bool) -> None:
    """Blocks dispatch through their class's forward; a `forward` set on the instance (a hook that
    wraps the bound method, such as a diffusers context-parallel plan entry on `blocks.0` or group
    offloading) bypasses it, so the block would run uncached. A warning (an error with strict=True),
    as for a block torch.export cannot capture. In graph form the model's forward advances the
    step, so one replaced on the model is always an error."""
    if form == "graph" and "forward" in model.__dict__:
        raise NotImplementedError(
            f"{type(model).__name__} has its forward replaced on the instance (a hook such as "
            "enable_parallelism's); the graph form advances its step in the class's forward, which that "
            "bypasses. Call transform(..., form='graph') before adding such hooks."
        )
    replaced = [path for path, block in found.items() if "forward" in block.__dict__]
    if not replaced:
        return
    message = (
        f"smoothcache_fx: blocks {replaced} have their forward replaced on the instance (a hook such as "
        "a diffusers context-parallel plan entry, enable_parallelism, or group offloading), which "
        "bypasses the cache: they would run as the hook calls them, uncached. Call transform before "
        "adding such hooks (the hooks then wrap the cached blocks)."
    )
    if strict:
        raise NotImplementedError(message + " (strict=True)")
    warnings.warn(message + " Pass transform(..., strict=True) to make this an error.", stacklevel=4)


def _signed(forward, original: type):
    """`forward` with the signature of `original.forward`: code that binds a module's arguments by
    name from its class's forward (diffusers' context-parallel plans split `hidden_states` that way)
    sees the real parameters, not ``*args, **kwargs``."""
    forward.__signature__ = inspect.signature(original.forward)
    return forward


def _graph_step(original: type):
    """Graph form: the model's forward, then the step buffer advanced inside the same graph."""

    def step(self, *args, **kwargs):
        output = original.forward(self, *args, **kwargs)
        step = self.smoothcache_step
        step.copy_(torch.remainder(step + 1, self.smoothcache.schedule.steps))
        return output

    return step


def _model_class(original: type, form: str, model_graphs: bool) -> type | None:
    """A subclass of the model's class, where the model needs one (None otherwise): in graph form
    its forward advances the step buffer in the graph; with whole-model compiled graphs
    (`model_variants.py`) its forward runs them once the blocks are captured; a diffusers model's
    `save_pretrained` also writes the schedule beside its config. Pickling it is refused with what
    to do instead."""
    saves = callable(getattr(original, "save_pretrained", None))
    if form != "graph" and not saves and not model_graphs:
        return None
    key = (original, form, model_graphs)
    cls = _MODEL_CLASSES.get(key)
    if cls is None:
        namespace = {"__module__": original.__module__, **_NOT_PICKLED}
        if form == "graph" or model_graphs:
            own_forward = _graph_step(original) if form == "graph" else original.forward

            def forward(self, *args, **kwargs):
                runtime = self.smoothcache
                if runtime.model_variants is not None and runtime.runs_model_graphs():
                    return runtime.model_variants.run(self, args, kwargs)
                return own_forward(self, *args, **kwargs)

            namespace["forward"] = _signed(forward, original)
        if saves:

            def save_pretrained(self, save_directory, *args, **kwargs):
                result = original.save_pretrained(self, save_directory, *args, **kwargs)
                if kwargs.get("is_main_process", True):
                    save_beside_config(self.smoothcache.given_schedule, save_directory)
                return result

            namespace["save_pretrained"] = save_pretrained
        cls = type(original.__name__, (original,), namespace)
        cls.__qualname__ = f"SmoothCache[{original.__qualname__}]"
        _MODEL_CLASSES[key] = cls
    return cls


def _refuse_pickling(self, protocol):
    raise TypeError(
        f"a model transformed by smoothcache_fx cannot be pickled (torch.save(model) of the whole "
        f"{type(self).__name__}): its classes and compiled variants are made at run time. Save "
        "model.state_dict() instead (it loads into the untransformed model unchanged), or "
        "model.save_pretrained(folder), which also writes the schedule so that "
        "transform(Model.from_pretrained(folder)) finds it; or smoothcache_fx.untransform(model) first."
    )


def _deepcopy(self, memo):
    """copy.deepcopy as for any module (pickling is refused, and deepcopy would otherwise go
    through `__reduce_ex__`): a new object of the same class with a deep copy of the state."""
    clone = type(self).__new__(type(self))
    memo[id(self)] = clone
    state = copy.deepcopy(self.__dict__, memo)
    if hasattr(clone, "__setstate__"):  # torch.nn.Module's fills in attributes older state lacks
        clone.__setstate__(state)
    else:
        clone.__dict__.update(state)
    return clone


_NOT_PICKLED = {"__reduce_ex__": _refuse_pickling, "__deepcopy__": _deepcopy}


# -- pipelines ------------------------------------------------------------------------------------
def _is_pipeline(obj) -> bool:
    return not isinstance(obj, torch.nn.Module) and isinstance(
        getattr(obj, "transformer", None), torch.nn.Module
    )


def _transform_pipeline(
    pipe,
    schedule: Schedule,
    blocks,
    kernel: str,
    compile_config: CompileConfig,
    form: str,
    calls_per_step: int = 1,
    strict: bool = False,
    resample: bool = False,
    max_order: int = MAX_ORDER,
) -> None:
    if "smoothcache" in pipe.transformer.__dict__:
        raise RuntimeError(
            "this pipeline's transformer is already transformed by smoothcache_fx. To change the "
            "schedule call pipe.transformer.smoothcache.set_schedule(schedule)."
        )
    found = find_blocks(pipe.transformer, blocks)
    _install(
        pipe.transformer,
        schedule,
        found,
        kernel,
        compile_config,
        form,
        calls_per_step,
        strict,
        resample,
        max_order=max_order,
    )
    pipe.__class__ = _pipeline_class(type(pipe))


def _pipeline_class(original: type) -> type:
    """A subclass of the pipeline whose __call__ is exactly one generation of the schedule."""
    cls = _PIPELINE_CLASSES.get(original)
    if cls is None:

        def __call__(self, *args, **kwargs):
            runtime = self.transformer.smoothcache
            _check_pipeline_steps(self, original.__call__, args, kwargs, runtime)
            with runtime.generation():
                output = original.__call__(self, *args, **kwargs)
                calls = runtime.clock.calls
            expected = runtime.clock.calls_per_generation
            if calls != expected and not getattr(self, "_interrupt", False):
                per_step = runtime.calls_per_step
                raise ValueError(
                    f"the pipeline called the model {calls} times but the schedule has "
                    f"{runtime.schedule.steps} steps x {per_step} calls per step = {expected}; the "
                    f"schedule must have one entry per step. Pass num_inference_steps="
                    f"{runtime.schedule.steps}, use a schedule for {calls // per_step} steps, or, if "
                    "the pipeline calls the model several times per step, transform(..., "
                    "calls_per_step=N)."
                )
            return output

        namespace = {"__call__": __call__, "__module__": original.__module__, **_NOT_PICKLED}
        cls = type(original.__name__, (original,), namespace)
        _PIPELINE_CLASSES[original] = cls
    return cls


# Arguments that make a pipeline run another number of model steps than `num_inference_steps`.
_STEP_CHANGING_ARGUMENTS = ("timesteps", "sigmas", "strength", "denoising_start", "denoising_end")


def _check_pipeline_steps(pipe, call, args: tuple, kwargs: dict, runtime) -> None:
    """Refuse a pipeline call whose step count does not match the schedule before anything runs.

    Only where the count is certain: `num_inference_steps` (given or the default) with a
    first-order scheduler and none of the arguments that change the count; otherwise the count is
    checked as the generation runs (a call past the schedule's end is refused before it runs).
    """
    if getattr(getattr(pipe, "scheduler", None), "order", 1) != 1:
        return  # Heun and other multi-stage solvers call the model more than once per step
    try:
        bound = inspect.signature(call).bind(pipe, *args, **kwargs)
    except TypeError:
        return  # the pipeline itself will say what is wrong with the call
    bound.apply_defaults()
    arguments = bound.arguments
    if any(arguments.get(name) not in (None, 1.0) for name in _STEP_CHANGING_ARGUMENTS):
        return
    steps = arguments.get("num_inference_steps")
    if isinstance(steps, int) and steps != runtime.schedule.steps and runtime.resample and steps >= 1:
        runtime.run_resampled(steps)
    elif isinstance(steps, int) and steps != runtime.schedule.steps:
        raise ValueError(
            f"pipe(...) was called with num_inference_steps={steps}, but the schedule has "
            f"{runtime.schedule.steps} steps; a schedule has one entry per step. Pass "
            f"num_inference_steps={runtime.schedule.steps}, or transform with a schedule for {steps} "
            f"steps (Schedule.from_errors(errors, alpha, steps={steps}) derives one from calibration, "
            "and transform(pipe, schedule, resample=True) resamples the schedule for each step count)."
        )
