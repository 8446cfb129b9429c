"""End-to-end DiT generation: smoothcache_fx against eager, torch.compile, dit-smoothcache and diffusers.

One process builds a diffusers `DiTTransformer2DModel` with random weights (zero-initialised adaLN
gates and output projections are randomised, so every branch matters), fixed latents and class
labels, and runs a plain DDIM denoising loop (no classifier-free guidance: one model call per step on
`--batch` latents; learned-sigma configs predict 8 channels and the first 4 are the noise, as in
DiTPipeline). Every row shares the same parameter tensors and inputs:

- eager        the original model
- compile      `torch.compile(original, fullgraph=True)` (inductor)
- helper       dit-smoothcache's `DiffuserCacheHelper` (eager; it caches `attn1` only, so it runs the
               schedule's attn1 mask)
- fbc / pab    diffusers' First Block Cache / Pyramid Attention Broadcast hooks (eager)
- sc-eager     `smoothcache_fx.transform(model, schedule)`
- sc-compile   `smoothcache_fx.transform(model, schedule, compile=True)`
- sc-graph     `torch.compile(smoothcache_fx.transform(model, schedule, form="graph"), fullgraph=True)`:
               the deployment form (one graph, a `torch.cond` per component), after one eager call

Timing: one warm-up generation per row (its excess over the steady state is the compile/capture
time), then `--repeats` timed generations, interleaved across rows (row A, B, C, A, B, C, ...) so that
drift on a shared machine hits every row alike; the median is reported. Ideal speedup is
FLOPs(uncached)/FLOPs(row) from `smoothcache_fx.flops` over one whole generation. Every row's final
latents are compared with an exact reference (all-compute rows with eager original, compiled rows
with their eager twin, smoothcache_fx with dit-smoothcache for attn1-only schedules), so a
fast-but-wrong row shows.

Usage::

    python benchmarks/bench_pipeline.py --config S --steps 50 --json s50.json
    python benchmarks/bench_pipeline.py --config tiny --steps 4 --repeats 1 --rows eager,sc-eager
    python benchmarks/bench_pipeline.py --config B --rows compile,sc-compile --schedules fora2-4

See BENCHMARKS.md ("Pipeline: bench_pipeline.py") for recorded figures and what they mean.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import (
    DYNAMO_KEYS,
    PeakMemory,
    Summary,
    dynamo_compile_seconds,
    dynamo_counts,
    dynamo_delta,
    environment,
    fresh_inductor_cache,
    prime_compiler,
    synchronize,
    timed,
)
from models import randomise_zero_init  # tests/models.py, on sys.path through common

import smoothcache_fx
from smoothcache_fx import Schedule
from smoothcache_fx.flops import flop_counter

PATCH = 2
IN_CHANNELS = 4
NUM_CLASSES = 1000
COMPONENTS = ("attn1", "ff")


# -- models ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiTConfig:
    layers: int
    heads: int
    head_dim: int
    sample_size: int  # latent side; tokens = (sample_size / PATCH) ** 2
    out_channels: int  # 2 * IN_CHANNELS: learned sigma, as the DiT-*/2 checkpoints
    gpu_only: bool = False


CONFIGS = {
    "tiny": DiTConfig(2, 2, 8, 8, 4),  # tests/models.py diffusers_dit
    "S": DiTConfig(12, 6, 64, 32, 8),  # DiT-S/2: hidden 384, 256 tokens
    "B": DiTConfig(12, 12, 64, 32, 8),  # DiT-B/2: hidden 768, 256 tokens
    "XL": DiTConfig(28, 16, 72, 32, 8, gpu_only=True),  # DiT-XL/2: hidden 1152, 256 tokens
}


def build_model(config: DiTConfig, seed: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The DiT with random weights; on the meta device (for FLOP counting) the values are left alone."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    with torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
        model = DiTTransformer2DModel(
            num_attention_heads=config.heads,
            attention_head_dim=config.head_dim,
            in_channels=IN_CHANNELS,
            out_channels=config.out_channels,
            num_layers=config.layers,
            sample_size=config.sample_size,
            patch_size=PATCH,
            num_embeds_ada_norm=NUM_CLASSES,
        )
    if device.type != "meta":
        randomise_zero_init(model)
    return model.to(device, dtype).eval().requires_grad_(False)


def share(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy that shares every parameter and buffer tensor: same weights, independent modules."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


# -- schedules ------------------------------------------------------------------------------------
SCHEDULES = ("all-compute", "fora2", "fora3", "alpha", "fora2-4", "fora2-attn1")
REFERENCE_SCHEDULE = "50-N-3-threshold-0.18.json"
# The reference files are keyed for facebookresearch DiT; diffusers' BasicTransformerBlock names them:
REFERENCE_KEYS = {"attn": "attn1", "mlp": "ff"}


def reference_schedule_dir() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "reference-schedules"


def make_schedule(name: str, steps: int) -> Schedule:
    if name == "all-compute":
        return Schedule.all_compute(steps, COMPONENTS)
    if name == "fora2":
        return Schedule.uniform(steps, 2, COMPONENTS)
    if name == "fora3":
        return Schedule.uniform(steps, 3, COMPONENTS)
    if name == "fora2-attn1":
        return Schedule.uniform(steps, 2, ["attn1"])
    if name == "fora2-4":  # attn1 every 2nd step, ff every 4th: 3 distinct variants per block
        masks = {
            "attn1": [int(i % 2 == 0) for i in range(steps)],
            "ff": [int(i % 4 == 0) for i in range(steps)],
        }
        return Schedule(steps, masks, {"generator": "fora2-4"})
    if name == "alpha":
        return alpha_schedule(steps)
    raise ValueError(f"schedule must be one of {SCHEDULES}; got {name!r}.")


def alpha_schedule(steps: int) -> Schedule:
    """SmoothCache's alpha=0.18 schedule (50 steps), keys remapped for diffusers, resampled to `steps`."""
    path = reference_schedule_dir() / REFERENCE_SCHEDULE
    if path.is_file():
        raw = json.loads(path.read_text(encoding="utf-8"))
        masks = {REFERENCE_KEYS.get(key, key): list(mask) for key, mask in raw.items()}
        source = f"{REFERENCE_SCHEDULE} (Roblox/SmoothCache)"
    else:
        masks = {key: alpha_like_mask(50) for key in COMPONENTS}
        source = "an alpha-like pattern of this benchmark's own (reference schedules not found)"
    masks = {key: resample_mask(mask, steps) for key, mask in masks.items()}
    return Schedule(steps, masks, {"generator": "alpha", "source": source})


def resample_mask(mask: list[int], steps: int) -> list[int]:
    """Nearest index on normalised time; the first and last step always compute."""
    n = len(mask)
    if steps == n:
        return list(mask)
    out = [mask[int(i * (n - 1) / max(steps - 1, 1) + 0.5)] for i in range(steps)]
    out[0] = out[-1] = 1
    return out


def alpha_like_mask(steps: int) -> list[int]:
    """Like the alpha=0.18 files: every 3rd step over the first fifth (where outputs change least
    from step to step at these thresholds), every 2nd afterwards, the last step computed."""
    mask, next_compute = [], 0
    for i in range(steps):
        on = i >= next_compute
        if on:
            next_compute = i + (3 if i < steps / 5 else 2)
        mask.append(int(on))
    mask[-1] = 1
    return mask


def effective_masks(masks) -> tuple:
    """Masks with all-compute components dropped: what decides the FLOPs (() = uncached)."""
    return tuple(sorted((k, tuple(int(v) for v in m)) for k, m in masks.items() if not all(m)))


# -- rows -----------------------------------------------------------------------------------------
ROWS = ("eager", "compile", "helper", "fbc", "pab", "sc-eager", "sc-compile", "sc-graph")
SCHEDULED_ROWS = ("helper", "sc-eager", "sc-compile", "sc-graph")
COMPILED_ROWS = ("compile", "sc-compile", "sc-graph")


@dataclass
class Row:
    kind: str
    schedule: str | None
    model: torch.nn.Module
    masks: tuple = ()  # effective masks (what is skipped), for FLOPs and references
    reset: Callable[[], None] = lambda: None
    run_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    step_context: Callable[[int], contextlib.AbstractContextManager] = lambda t: contextlib.nullcontext()
    cache_bytes: Callable[[], int] = lambda: 0
    note: Callable[[], str] = lambda: ""
    result: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.kind if self.schedule is None else f"{self.kind} {self.schedule}"


@dataclass
class Context:
    steps: int
    compile_mode: str | None
    fbc_threshold: float
    clock: dict = field(default_factory=lambda: {"t": 0})  # PAB reads the current timestep here


def build_row(kind: str, schedule_name: str | None, base: torch.nn.Module, ctx: Context) -> Row | None:
    """A row's model (sharing `base`'s tensors) and how to reset it; None (with a message) if n/a."""
    if kind == "eager":
        return Row(kind, None, share(base))
    if kind == "compile":
        return Row(kind, None, torch.compile(share(base), fullgraph=True, mode=ctx.compile_mode))
    if kind in ("fbc", "pab"):
        return _diffusers_cache_row(kind, base, ctx)
    schedule = make_schedule(schedule_name, ctx.steps)
    if kind == "helper":
        return _helper_row(schedule_name, schedule, base)
    if kind == "sc-graph":
        transformed = smoothcache_fx.transform(share(base), schedule, form="graph")
        runtime = transformed.smoothcache
        return Row(
            kind,
            schedule_name,
            _CaptureThenCompile(transformed, ctx.compile_mode),
            masks=effective_masks(schedule.masks),
            reset=runtime.reset,
            cache_bytes=lambda: runtime.cache_bytes,
            note=lambda: "one graph, torch.cond per component",
        )
    compiled = kind == "sc-compile"
    options = {"compile": True, "mode": ctx.compile_mode} if compiled else {}
    model = smoothcache_fx.transform(share(base), schedule, **options)
    runtime = model.smoothcache
    return Row(
        kind,
        schedule_name,
        model,
        masks=effective_masks(schedule.masks),
        reset=runtime.reset,
        cache_bytes=lambda: runtime.cache_bytes,
        note=lambda: f"{runtime.distinct_variants()} variants",
    )


class _CaptureThenCompile:
    """The graph form's deployment path: one eager call captures the blocks (export needs real
    arguments), the clock is reset, and the whole model compiles as one graph on that same call."""

    def __init__(self, model: torch.nn.Module, mode: str | None):
        self.model, self.mode, self.compiled = model, mode, None

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            self.model(*args, **kwargs)
            self.model.smoothcache.reset()
            self.compiled = torch.compile(self.model, fullgraph=True, mode=self.mode)
        return self.compiled(*args, **kwargs)


def _helper_row(name: str, schedule: Schedule, base: torch.nn.Module) -> Row | None:
    if "attn1" not in schedule.masks:
        print(f"[skip] helper {name}: DiffuserCacheHelper caches attn1 only; this schedule has no attn1 key.")
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # SmoothCache prints warnings on import
        from SmoothCache import DiffuserCacheHelper
    model = share(base)
    masks = {"attn1": list(schedule.masks["attn1"])}
    helper = DiffuserCacheHelper(model, schedule=masks)
    helper.enable()
    devnull = open(os.devnull, "w")  # noqa: SIM115  (lives as long as the row)
    ignored = sorted(set(schedule.masks) - {"attn1"})
    return Row(
        "helper",
        name,
        model,
        masks=effective_masks(masks),
        reset=helper.reset_state,  # its step counters never wrap: reset before every generation
        run_context=lambda: contextlib.redirect_stdout(devnull),  # it prints on every branch call
        cache_bytes=lambda: _tensor_bytes(list(helper.cache.values())),
        note=lambda: f"attn1 only; ignores {ignored}" if ignored else "",
    )


def _diffusers_cache_row(kind: str, base: torch.nn.Module, ctx: Context) -> Row | None:
    from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig
    from diffusers.models.cache_utils import CacheMixin

    model = share(base)
    if not isinstance(model, CacheMixin):
        # DiTTransformer2DModel has no enable_cache/cache_context, but its BasicTransformerBlocks are in
        # diffusers' TransformerBlockRegistry and its attn1 are diffusers Attention: the hooks apply.
        model.__class__ = type(type(model).__name__, (type(model), CacheMixin), {})
    if kind == "pab":
        # spatial attention every 2nd step over the whole timestep range: attn1 FORA n=2.
        model.enable_cache(
            PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=2,
                spatial_attention_timestep_skip_range=(-1, 1000),
                current_timestep_callback=lambda: ctx.clock["t"],
            )
        )
        hooks = [m for m in model.modules() if _hook(m, "pyramid_attention_broadcast") is not None]
        if not hooks:
            print("[skip] pab: PyramidAttentionBroadcastConfig matched no attention layer of this model.")
            return None

        def pab_bytes():
            return _tensor_bytes([_hook(m, "pyramid_attention_broadcast").state.cache for m in hooks])

        def set_clock(t):
            ctx.clock["t"] = int(t)
            return contextlib.nullcontext()

        masks = {"attn1": [int(i % 2 == 0) for i in range(ctx.steps)]}
        return Row(
            "pab",
            None,
            model,
            masks=effective_masks(masks),
            reset=model._reset_stateful_cache,
            step_context=set_clock,
            cache_bytes=pab_bytes,
            note=lambda: f"attn1 every 2nd step in {len(hooks)} layers (= fora2-attn1)",
        )
    model.enable_cache(FirstBlockCacheConfig(threshold=ctx.fbc_threshold))
    head = _hook(model.transformer_blocks[0], "fbc_leader_block_hook")
    decisions: list[bool] = []
    model.register_forward_hook(lambda *_: decisions.append(head.state_manager.get_state().should_compute))

    def fbc_reset():
        model._reset_stateful_cache()
        decisions.clear()

    def fbc_bytes():
        state = head.state_manager._state_cache.get("cond")
        return 0 if state is None else _tensor_bytes([state.head_block_residual, state.tail_block_residuals])

    return Row(
        "fbc",
        None,
        model,
        masks=("fbc",),
        reset=fbc_reset,
        step_context=lambda t: model.cache_context("cond"),
        cache_bytes=fbc_bytes,
        note=lambda: f"threshold {ctx.fbc_threshold}: {sum(decisions)}/{len(decisions)} steps full",
    )


def _hook(module: torch.nn.Module, name: str):
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(name)


def _tensor_bytes(items) -> int:
    total = 0
    for item in items:
        if isinstance(item, torch.Tensor):
            total += item.nbytes
        elif isinstance(item, (list, tuple)):
            total += _tensor_bytes(item)
    return total


# -- generation -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Inputs:
    latents: torch.Tensor  # [B, 4, H, W], fp32: the sampler runs in fp32 whatever the model dtype
    labels: torch.Tensor
    timesteps: torch.Tensor  # the scheduler's, on CPU
    model_timesteps: tuple[torch.Tensor, ...]  # [B] per step, on the device
    scheduler: object
    dtype: torch.dtype

    def to(self, device) -> Inputs:
        return Inputs(
            self.latents.to(device),
            self.labels.to(device),
            self.timesteps,
            tuple(t.to(device) for t in self.model_timesteps),
            self.scheduler,
            self.dtype,
        )


def make_inputs(config: DiTConfig, steps: int, batch: int, seed: int, device, dtype) -> Inputs:
    from diffusers import DDIMScheduler

    # clip_sample=False: clipping x0 to [-1, 1] would hide differences between rows.
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed + 1)
    latents = torch.randn(batch, IN_CHANNELS, config.sample_size, config.sample_size, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    model_timesteps = tuple(t.expand(batch).to(device) for t in scheduler.timesteps)
    return Inputs(
        latents.to(device), labels.to(device), scheduler.timesteps, model_timesteps, scheduler, dtype
    )


class Generation:
    """One generation of `row`, advanced a step at a time (so that rows can run in lockstep)."""

    def __init__(self, row: Row, inputs: Inputs):
        row.reset()
        self.row, self.inputs = row, inputs
        self.x = inputs.latents.clone()  # the final latents once every step ran

    def step(self, i: int) -> None:
        row, inputs, t = self.row, self.inputs, self.inputs.timesteps[i]
        with torch.no_grad(), row.run_context(), row.step_context(t):
            out = row.model(
                self.x.to(inputs.dtype), timestep=inputs.model_timesteps[i], class_labels=inputs.labels
            )
            eps = out.sample[:, :IN_CHANNELS].float()
            self.x = inputs.scheduler.step(eps, t, self.x).prev_sample


def generate(row: Row, inputs: Inputs, limit: int | None = None) -> torch.Tensor:
    """One generation (or its first `limit` steps); returns the final latents (fp32)."""
    run = Generation(row, inputs)
    for i in range(len(inputs.timesteps[:limit])):
        run.step(i)
    return run.x


def warm_up(row: Row, inputs: Inputs, device, fresh_compile_cache: bool) -> None:
    """First generation: includes compilation (compiled rows) or capture (sc-eager). Records its
    wall time and the time dynamo itself spent compiling (immune to the machine's speed drifting
    between this generation and the timed ones)."""
    fresh = fresh_compile_cache and row.kind in COMPILED_ROWS
    before, compiling = dynamo_counts(), dynamo_compile_seconds()
    with fresh_inductor_cache() if fresh else contextlib.nullcontext():
        output, seconds, _ = timed(lambda: generate(row, inputs), device)
    row.result.update(
        first_s=seconds,
        first_output=output,
        dynamo_compile_s=dynamo_compile_seconds() - compiling,
        warmup_dynamo=dynamo_delta(before, dynamo_counts()),
    )


def measure(rows: list[Row], inputs: Inputs, repeats: int, device) -> None:
    """`repeats` generations per row, all rows in lockstep: step i of every row (starting from a
    different row each step) before step i + 1 of any. A shared machine that speeds up or slows
    down then does so for every row alike, which per-generation interleaving does not guarantee
    (a 50-step DiT-B generation takes minutes on a CPU). Times are summed per row from per-step
    timers (wall and process CPU; on CUDA each step is synchronised)."""
    for row in rows:
        row.result.update(times=[], cpu_times=[], step_times=[], timed_dynamo=dict.fromkeys(DYNAMO_KEYS, 0))
    steps = len(inputs.timesteps)
    for _ in range(repeats):
        runs = [Generation(row, inputs) for row in rows]
        wall = {id(run): [] for run in runs}
        cpu = {id(run): [] for run in runs}
        for i in range(steps):
            shift = i % len(runs)
            for run in runs[shift:] + runs[:shift]:
                before = dynamo_counts()
                _, seconds, cpu_seconds = timed(lambda run=run, i=i: run.step(i), device)
                wall[id(run)].append(seconds)
                cpu[id(run)].append(cpu_seconds)
                delta = dynamo_delta(before, dynamo_counts())
                result = run.row.result
                result["timed_dynamo"] = {k: v + delta[k] for k, v in result["timed_dynamo"].items()}
        for run in runs:
            result = run.row.result
            result["times"].append(sum(wall[id(run)]))
            result["cpu_times"].append(sum(cpu[id(run)]))
            result["step_times"].append(cpu[id(run)])
            result["output"] = run.x


# A few steps cover every variant of the benchmark's schedules (fora2-4 has all three by step 3), and
# the peak is per step: caches persist between steps and are reported on their own (cache MiB).
MEMORY_STEPS = 4


def measure_memory(rows: list[Row], inputs: Inputs, memory: PeakMemory) -> None:
    """Peak memory above the start over the first MEMORY_STEPS steps of a generation, per row; a
    separate pass, because resetting the peak (malloc_trim on CPU) would perturb the timed steps."""
    for row in rows:
        memory.start()
        generate(row, inputs, limit=MEMORY_STEPS)
        row.result["peak_bytes"] = memory.stop()


def count_flops(row: Row, inputs: Inputs) -> int:
    """Matmul/conv/attention FLOPs of one whole generation of `row` (eager)."""
    generate(row, inputs, limit=1)  # capture/first-call work stays outside the count
    with flop_counter() as counter:
        generate(row, inputs)
    return counter.get_total_flops()


def flops_by_masks(rows: list[Row], base, meta_base, ctx: Context, inputs: Inputs) -> dict:
    """FLOPs per distinct effective mask set. Matmul FLOPs depend only on which modules run, so one
    eager smoothcache_fx instance per mask set serves helper, pab and sc rows alike, run on the meta
    device (shapes only: the same counts, without the arithmetic). FBC decides per step from the
    data, so it is counted on a real instance."""
    meta_inputs = inputs.to("meta")
    found: dict = {}
    for masks in dict.fromkeys(row.masks for row in rows):
        start = time.perf_counter()
        if masks == ("fbc",):
            found[masks] = count_flops(build_row("fbc", None, base, ctx), inputs)
        else:
            schedule = Schedule(ctx.steps, {k: list(v) for k, v in masks}) if masks else None
            model = share(meta_base)
            if schedule is not None:
                model = smoothcache_fx.transform(model, schedule)
            reset = model.smoothcache.reset if schedule else (lambda: None)
            found[masks] = count_flops(Row("flops", None, model, reset=reset), meta_inputs)
        print(
            f"  flops {_masks_label(masks)}: {found[masks] / 1e9:.4g} GFLOP ({time.perf_counter() - start:.0f} s)"
        )
    return found


def _masks_label(masks: tuple) -> str:
    if masks == ("fbc",):
        return "fbc"
    return ", ".join(f"{k} {sum(m)}/{len(m)}" for k, m in masks) or "uncached"


# -- the glue outside the blocks ------------------------------------------------------------------
class _PassThrough(torch.nn.Module):
    """Stands in for a block: returns its input. Holds block 0's norm1, whose `emb` the DiT's final
    layer reads (`self.transformer_blocks[0].norm1.emb`)."""

    def __init__(self, norm1: torch.nn.Module):
        super().__init__()
        self.norm1 = norm1

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def glue_breakdown(base, inputs: Inputs, device, clock: str, calls: int = 30) -> dict:
    """Per-call time of the model without its blocks (patch embedding, final adaLN, projection,
    unpatchify), eager and compiled. With compile=True smoothcache_fx compiles the blocks only, so
    this glue runs eagerly at every step; the difference is what that costs against `compile`."""
    glue = share(base)
    glue.transformer_blocks = torch.nn.ModuleList([_PassThrough(glue.transformer_blocks[0].norm1)])
    compiled = torch.compile(share(glue), fullgraph=True)
    x = inputs.latents.to(inputs.dtype)
    clock_index = 2 if clock == "cpu" else 1
    result = {}
    with torch.no_grad():
        for name, model in (("eager", glue), ("compiled", compiled)):
            for _ in range(3):
                model(x, timestep=inputs.model_timesteps[0], class_labels=inputs.labels)
            samples = []
            for i in range(calls):
                t = inputs.model_timesteps[i % len(inputs.model_timesteps)]
                samples.append(
                    timed(lambda m=model, t=t: m(x, timestep=t, class_labels=inputs.labels), device)[
                        clock_index
                    ]
                )
            result[f"glue_{name}_ms"] = statistics.median(samples) * 1e3
    return result


# -- report ---------------------------------------------------------------------------------------
def reference_for(row: Row, by_label: dict[str, Row]) -> Row | None:
    """The row whose output `row` must reproduce exactly (up to compiler reordering), if run."""
    if row.kind == "eager":
        return None
    uncached = by_label.get("eager")
    if row.kind == "compile" or (row.masks == () and row.kind != "fbc"):
        return uncached
    if row.kind in ("sc-compile", "sc-graph"):
        return by_label.get(f"sc-eager {row.schedule}") or _attn1_twin(row, by_label, ("helper",))
    if row.kind in ("sc-eager", "pab"):
        return _attn1_twin(row, by_label, ("helper", "sc-eager") if row.kind == "pab" else ("helper",))
    return None


def _attn1_twin(row: Row, by_label: dict[str, Row], kinds) -> Row | None:
    """A row of `kinds` that skips exactly the same steps of the same branches (same schedule first)."""
    twins = [
        o
        for o in by_label.values()
        if o.kind in kinds and o is not row and o.masks == row.masks and row.masks
    ]
    twins.sort(key=lambda o: (o.schedule != row.schedule, o.schedule != "fora2-attn1"))
    return twins[0] if twins else None


def summarise(rows: list[Row], flops: dict, dtype: torch.dtype, clock: str) -> None:
    by_label = {row.label: row for row in rows}
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2  # relative to max |reference|, over N steps
    baselines = {"eager": by_label.get("eager"), "compile": by_label.get("compile")}
    uncached_flops = flops.get(())
    for row in rows:
        r = row.result
        r["wall"], r["cpu"] = Summary.of(r["times"]), Summary.of(r["cpu_times"])
        r["summary"] = r[clock]
    for row in rows:
        r = row.result
        steady = r["summary"].median
        r["compile_s"] = r["first_s"] - r["wall"].median  # wall: compiler workers run in subprocesses
        base = baselines["compile" if row.kind in COMPILED_ROWS else "eager"]
        r["vs_base"] = base.result["summary"].median / steady if base else None
        compile_row = baselines["compile"]
        r["vs_compile"] = compile_row.result["summary"].median / steady if compile_row else None
        r["flops"] = flops.get(row.masks)
        r["ideal"] = uncached_flops / r["flops"] if uncached_flops and r["flops"] else None
        r["ach_ideal"] = r["vs_base"] / r["ideal"] if r["vs_base"] and r["ideal"] else None
        r["repeatable"] = bool(torch.equal(r["first_output"], r["output"]))
        r["step_anatomy"] = step_anatomy(row)
        ref = reference_for(row, by_label)
        r["ref"] = ref.label if ref else None
        r["ref_diff"] = _diff(r["output"], ref.result["output"]) if ref else None
        r["ref_ok"] = None if ref is None else r["ref_diff"][1] <= tolerance
        eager = baselines["eager"]
        r["err_uncached"] = _diff(r["output"], eager.result["output"]) if eager and row is not eager else None


def step_anatomy(row: Row) -> dict[str, float] | None:
    """Median ms of the row's steps, grouped by which scheduled branches computed (CPU only: per-step
    times need no device sync there). Shows what a fully cached step still costs."""
    runs = [times for times in row.result["step_times"] if times]
    if not runs or row.masks == ("fbc",):
        return None
    groups: dict[str, list[float]] = {}
    for times in runs:
        for step, seconds in enumerate(times):
            on = [name for name, mask in row.masks if mask[step]]
            label = "all steps" if not row.masks else "computing " + ("+".join(on) or "none")
            groups.setdefault(label, []).append(seconds * 1e3)
    return {label: statistics.median(values) for label, values in sorted(groups.items())}


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, that over max |b|)."""
    diff = (a.float() - b.float()).abs().max().item()
    return diff, diff / max(b.float().abs().max().item(), 1e-30)


def print_table(rows: list[Row], clock: str) -> None:
    other = "wall" if clock == "cpu" else "cpu"
    header = (
        "row", f"{clock} ms/gen", "min-max", f"{other} ms", "x compile", "x base", "ideal", "ach/ideal",
        "compile s", "dynamo s", "graphs", "breaks", "recomp", "peak MiB", "cache MiB", "ref |diff| (rel)", "err vs eager", "note",
    )  # fmt: skip
    lines = []
    for row in rows:
        r = row.result
        s = r["summary"]
        dyn_w, dyn_t = r["warmup_dynamo"], r["timed_dynamo"]
        ref = (
            "-"
            if r["ref"] is None
            else f"{r['ref_diff'][0]:.1e} ({r['ref_diff'][1]:.0e}) {'ok' if r['ref_ok'] else 'MISMATCH'} vs {r['ref']}"
        )
        lines.append(
            (
                row.label,
                f"{s.median * 1e3:.0f}",
                f"{s.low * 1e3:.0f}-{s.high * 1e3:.0f}",
                f"{r[other].median * 1e3:.0f}",
                _fmt(r["vs_compile"], "{:.2f}x"),
                _fmt(r["vs_base"], "{:.2f}x"),
                _fmt(r["ideal"], "{:.2f}x"),
                _fmt(r["ach_ideal"], "{:.3f}"),
                f"{r['compile_s']:.1f}",
                f"{r['dynamo_compile_s']:.1f}",
                str(dyn_w["graphs"] + dyn_t["graphs"]),
                str(dyn_w["breaks"] + dyn_t["breaks"]),
                str(dyn_w["recompiles"] + dyn_t["recompiles"] + dyn_t["graphs"]),
                f"{r['peak_bytes'] / 2**20:.0f}",
                f"{r['cache_bytes'] / 2**20:.1f}",
                ref,
                "-" if r["err_uncached"] is None else f"{r['err_uncached'][1]:.1e}",
                r["note"] + ("" if r["repeatable"] else " NOT REPEATABLE"),
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    for line in (header, *lines):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())


def _fmt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def targets(rows: list[Row]) -> list[dict]:
    """The issue's targets (stated for DiT-B/2, 50 steps); evaluated for whatever config ran."""
    by_label = {row.label: row.result for row in rows}
    found = []

    def add(name, value, limit, higher_is_better, unit=""):
        if value is None:
            return
        met = value >= limit if higher_is_better else value <= limit
        by = (limit - value) if higher_is_better else (value - limit)
        found.append(
            {
                "target": name,
                "value": value,
                "limit": limit,
                "met": met,
                "missed_by": None if met else by,
                "unit": unit,
            }
        )

    for schedule in ("fora2", "alpha"):
        r = by_label.get(f"sc-compile {schedule}")
        add(f"sc-compile {schedule} achieved/ideal >= 0.95", r and r["ach_ideal"], 0.95, True)
    compile_r, all_compute = by_label.get("compile"), by_label.get("sc-compile all-compute")
    if compile_r and all_compute:
        overhead = all_compute["summary"].median / compile_r["summary"].median - 1
        add("sc-compile all-compute overhead vs compile <= 2%", overhead, 0.02, False, "%")
    three = by_label.get("sc-compile fora2-4")
    for key, what in (("compile_s", "first-generation excess"), ("dynamo_compile_s", "dynamo compile time")):
        if compile_r and three and compile_r[key] > 0:
            name = f"sc-compile fora2-4 (3 variants) {what} <= 1.5x compile's"
            add(name, three[key] / compile_r[key], 1.5, False, "x")
    return found


def print_targets(found: list[dict]) -> None:
    for t in found:
        value = f"{t['value'] * 100:.1f}%" if t["unit"] == "%" else f"{t['value']:.3f}{t['unit']}"
        status = (
            "met"
            if t["met"]
            else "MISSED by "
            + (f"{t['missed_by'] * 100:.1f} points" if t["unit"] == "%" else f"{t['missed_by']:.3f}")
        )
        print(f"  {t['target']}: {value} -> {status}")


def to_json(
    args, rows: list[Row], found: list[dict], env: dict, memory: PeakMemory, clock: str, extra: dict
) -> dict:
    records = []
    for row in rows:
        r = row.result
        records.append(
            {
                "row": row.label,
                "kind": row.kind,
                "schedule": row.schedule,
                "skipped_masks": {k: list(v) for k, v in row.masks}
                if row.masks != ("fbc",)
                else "data-dependent",
                "median_s": r["summary"].median,
                "min_s": r["summary"].low,
                "max_s": r["summary"].high,
                "wall_median_s": r["wall"].median,
                "cpu_median_s": r["cpu"].median,
                "wall_times_s": r["times"],
                "cpu_times_s": r["cpu_times"],
                "first_generation_s": r["first_s"],
                "compile_s": r["compile_s"],
                "dynamo_compile_s": r["dynamo_compile_s"],
                "speedup_vs_compile": r["vs_compile"],
                "speedup_vs_base": r["vs_base"],
                "ideal_speedup": r["ideal"],
                "achieved_over_ideal": r["ach_ideal"],
                "gflop_per_generation": None if r["flops"] is None else r["flops"] / 1e9,
                "dynamo_warmup": r["warmup_dynamo"],
                "dynamo_timed": r["timed_dynamo"],
                "peak_memory_bytes": r["peak_bytes"],
                "cache_bytes": r["cache_bytes"],
                "reference": r["ref"],
                "ref_max_abs_diff": None if r["ref_diff"] is None else r["ref_diff"][0],
                "ref_max_rel_diff": None if r["ref_diff"] is None else r["ref_diff"][1],
                "ref_ok": r["ref_ok"],
                "rel_err_vs_eager": None if r["err_uncached"] is None else r["err_uncached"][1],
                "repeatable": r["repeatable"],
                "note": r["note"],
                "step_anatomy_ms": r["step_anatomy"],
                "step_cpu_times_s": r["step_times"],
            }
        )
    return {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "args": vars(args),
        "environment": env,
        "memory_method": memory.method,
        "clock": clock,
        "rows": records,
        "targets": found,
        **extra,
    }


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=tuple(CONFIGS), default="S", help="DiT size (XL needs CUDA)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per generation")
    parser.add_argument("--batch", type=int, default=2, help="latents per generation (no CFG)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per row, after one warm-up")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument(
        "--schedules",
        default=",".join(SCHEDULES),
        help=f"for {', '.join(SCHEDULED_ROWS)}: subset of {','.join(SCHEDULES)}",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        help="what ratios are computed from: wall time, or process CPU time (steadier on a shared CPU; "
        "only meaningful with --threads 1). Default: cpu on CPU with one thread, wall otherwise",
    )
    parser.add_argument("--compile-mode", help="torch.compile mode for compile and sc-compile rows")
    # With random weights the first block's residual moves 12-19% (mean abs, relative) per step at 50
    # steps (measured on S), so diffusers' default 0.05 never skips; 0.15 skips about half the steps.
    parser.add_argument("--fbc-threshold", type=float, default=0.15, help="FirstBlockCacheConfig threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warm-compile-cache",
        action="store_true",
        help="let compiles reuse inductor's caches (compile times then understate)",
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also time the model's non-block glue, eager vs compiled"
    )
    parser.add_argument("--json", type=Path, help="write every figure, per-step times included, here")
    args = parser.parse_args(argv)
    args.rows = _choices(args.rows, ROWS, "rows")
    args.schedules = _choices(args.schedules, SCHEDULES, "schedules")
    if args.steps < 1 or args.batch < 1 or args.repeats < 1:
        parser.error(
            f"steps, batch and repeats must be >= 1; got {args.steps}, {args.batch}, {args.repeats}."
        )
    return args


def _choices(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"--{what} must be a comma-separated subset of {','.join(allowed)}; got {text!r}.")
    return [item for item in allowed if item in chosen]  # canonical order


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    config = CONFIGS[args.config]
    if config.gpu_only and device.type != "cuda":
        print(f"--config {args.config} (DiT-XL/2, {config.layers} layers) is GPU only; skipped on {device}.")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    )
    clock = args.clock or ("cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall")
    env = environment(device)
    memory = PeakMemory(device)
    print(
        f"DiT config {args.config} {config}, {args.steps} DDIM steps, batch {args.batch}, {dtype}, {device}, "
        f"{torch.get_num_threads()} threads, repeats {args.repeats}, clock {clock}, "
        f"load average {env.get('load_average_at_start')}"
    )
    base = build_model(config, args.seed, device, dtype)
    inputs = make_inputs(config, args.steps, args.batch, args.seed, device, dtype)
    ctx = Context(args.steps, args.compile_mode, args.fbc_threshold)

    if any(kind in COMPILED_ROWS for kind in args.rows):
        prime_compiler(device)
    rows: list[Row] = []
    for kind in args.rows:
        for schedule in args.schedules if kind in SCHEDULED_ROWS else [None]:
            row = build_row(kind, schedule, base, ctx)
            if row is None:
                continue
            twin = next((r for r in rows if r.kind == "helper" == kind and r.masks == row.masks), None)
            if twin is not None:  # the helper runs attn1 only: fora2, fora2-4 and fora2-attn1 coincide
                print(f"[skip] {row.label}: the helper runs the same attn1 mask as {twin.label}.")
                continue
            warm_up(row, inputs, device, fresh_compile_cache=not args.warm_compile_cache)
            print(f"  warm-up {row.label}: {row.result['first_s']:.1f} s")
            rows.append(row)
    if not rows:
        raise SystemExit("no row applies to the chosen --rows and --schedules.")
    meta_base = build_model(config, args.seed, torch.device("meta"), dtype)
    flops = flops_by_masks(rows, base, meta_base, ctx, inputs)
    measure(rows, inputs, args.repeats, device)
    for row in rows:  # notes describe the last full generation: before the (partial) memory pass
        row.result.update(cache_bytes=row.cache_bytes(), note=row.note())
    measure_memory(rows, inputs, memory)
    summarise(rows, flops, dtype, clock)
    extra = {}
    if args.breakdown:
        extra["breakdown"] = glue_breakdown(base, inputs, device, clock)

    print(
        f"\nper generation, median of {args.repeats}; ratios from {clock} time; x base: vs eager for eager rows, "
        f"vs compile for compiled rows; compile s: first generation minus steady state (wall); dynamo s: "
        f"time dynamo spent compiling; peak memory over {MEMORY_STEPS} steps: {memory.method}"
    )
    print_table(rows, clock)
    if extra.get("breakdown"):
        b = extra["breakdown"]
        print(
            f"\nglue outside the blocks, per model call: eager {b['glue_eager_ms']:.2f} ms, compiled {b['glue_compiled_ms']:.2f} ms"
        )
        print("median step time by which scheduled branches computed:")
        for row in rows:
            if row.result["step_anatomy"]:
                parts = ", ".join(f"{k} {v:.1f} ms" for k, v in row.result["step_anatomy"].items())
                print(f"  {row.label}: {parts}")
    found = targets(rows)
    if found:
        print(f"\ntargets (stated for DiT-B/2, 50 steps, CPU; this run: {args.config}, {args.steps} steps):")
        print_targets(found)
    mismatched = [row.label for row in rows if row.result["ref_ok"] is False]
    if mismatched:
        print(f"\nWARNING: outputs differ from their reference beyond tolerance: {mismatched}")
    if args.json:
        args.json.write_text(
            json.dumps(to_json(args, rows, found, env, memory, clock, extra), indent=1, default=str)
        )
        print(f"\nwrote {args.json}")
    synchronize(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
