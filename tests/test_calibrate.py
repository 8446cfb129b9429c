"""calibrate, CalibrationErrors, and the schedules derived from them (from_errors, for_speedup, plots)."""

from __future__ import annotations

import copy
import io
import math
import sys

import models
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from helpers import random_errors
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import smoothcache_fx
from smoothcache_fx import CalibrationErrors, Schedule
from smoothcache_fx.plots import plot_errors, plot_schedule
from smoothcache_fx.schedules.from_errors import smoothcache_mask

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DDIM_STEPS = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def _errors(curves: dict, steps: int, flops: dict | None = None, total_flops: int = 0, **kwargs):
    lookahead = len(next(iter(curves.values())))
    return CalibrationErrors(steps, lookahead, curves, flops or {}, total_flops, **kwargs)


def _ddim_dit(model, steps: int = DDIM_STEPS, seed: int = 0):
    """A short DDIM generation with the diffusers DiT (epsilon prediction, 4 latent channels)."""
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor([1, 7])
    for t in scheduler.timesteps:
        eps = model(x, timestep=t.expand(2), class_labels=labels).sample
        x = scheduler.step(eps, t, x).prev_sample
    return x


def _ddim_tiny(model, steps: int, seed: int = 0):
    """The same for TinyDiT, whose forward is (x, t, y) on token sequences."""
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    x, labels = models.tiny_dit_inputs(seed=seed)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(2), labels), t, x).prev_sample
    return x


def _tiny_dit():
    torch.manual_seed(0)
    return models.TinyDiT()


def _assert_untransformed(model: nn.Module, blocks) -> None:
    assert "smoothcache" not in model.__dict__
    assert not model._forward_hooks and not model._forward_pre_hooks
    for block in blocks:
        assert type(block).__qualname__ in ("BasicTransformerBlock", "DiTBlock")
        assert not any(name.startswith("smoothcache") for name in block._buffers)
        assert not block._forward_pre_hooks
        for child in block.children():
            assert not child._forward_hooks and not child._forward_pre_hooks


# ---------------------------------------------------------------------- the SmoothCache scan

# One branch, 6 steps, lookahead 2: e_1[i] (5 values) and e_2[i] (4 values).
SCAN_CURVES = [[0.1, 0.1, 0.1, 0.1, 0.1], [0.2, 0.3, 0.2, 0.2]]


def test_scan_takes_the_largest_lag_within_alpha_ties_included():
    # i=0: e_2[0]=0.2 <= 0.2 (a tie reuses) -> compute 0, reuse 1, 2; i=3: e_2[3]=0.2 -> compute 3,
    # reuse 4, 5; the last step is then forced to compute.
    schedule = Schedule.from_errors(_errors({"blocks.0.attn": SCAN_CURVES}, steps=6), alpha=0.2)
    assert schedule.masks == {"attn": (1, 0, 0, 1, 0, 1)}


def test_scan_falls_back_to_smaller_lags():
    # alpha just below the e_2 values: every jump is k=1 (compute 0, 2, 4); at i=4, k=2 would run
    # past the end (4 + 2 = 6); the last step (5) is forced.
    schedule = Schedule.from_errors(_errors({"blocks.0.attn": SCAN_CURVES}, steps=6), alpha=0.15)
    assert schedule.masks == {"attn": (1, 0, 1, 0, 1, 1)}
    nothing = Schedule.from_errors(_errors({"blocks.0.attn": SCAN_CURVES}, steps=6), alpha=0.05)
    assert nothing.masks == {"attn": (1, 1, 1, 1, 1, 1)}


def test_scan_never_uses_a_lag_that_runs_past_the_end():
    # Curves padded to full length: only the i + k < steps rule keeps i=4 from taking k=3.
    curves = [[9.0] * 6, [9.0] * 6, [0.0] * 6]
    assert smoothcache_mask(curves, alpha=0.5, steps=6) == (1, 0, 0, 0, 1, 1)


def test_scan_first_and_last_steps_always_compute():
    assert smoothcache_mask([[0.0, 0.0, 0.0]], alpha=1.0, steps=4) == (1, 0, 1, 1)  # last forced
    assert smoothcache_mask([[0.0] * 4, [0.0] * 3, [0.0] * 2], alpha=1.0, steps=5) == (1, 0, 0, 0, 1)
    assert smoothcache_mask([[]], alpha=1.0, steps=1) == (1,)


def test_component_schedule_averages_blocks_and_per_block_does_not():
    errors = _errors({"blocks.0.attn": [[0.1, 0.3]], "blocks.1.attn": [[0.3, 0.1]]}, steps=3)
    # Mean e_1 = [0.2, 0.2]: reuse at step 1 on a tie.
    assert Schedule.from_errors(errors, alpha=0.2).masks == {"attn": (1, 0, 1)}
    per_block = Schedule.from_errors(errors, alpha=0.2, per_block=True)
    assert per_block.masks == {"attn-0": (1, 0, 1), "attn-1": (1, 1, 1)}
    assert per_block.mask_for("blocks.1.attn") == (True, True, True)
    np.testing.assert_allclose(errors.curve("attn", 1), [0.2, 0.2])
    assert set(errors.by_block()) == {"blocks.0", "blocks.1"}
    np.testing.assert_allclose(errors.by_component()["attn"][0], [0.2, 0.2])


def test_per_block_keys_fall_back_to_full_paths_when_indices_repeat():
    errors = _errors({"in_blocks.0.attn": [[0.1]], "out_blocks.0.attn": [[0.5]]}, steps=2)
    schedule = Schedule.from_errors(errors, alpha=0.2, per_block=True)
    assert schedule.keys == ("in_blocks.0.attn", "out_blocks.0.attn")


def test_scan_is_not_monotone_in_alpha_and_for_speedup_still_finds_the_smallest_alpha():
    # 7 steps, lookahead 2. alpha=0.1 computes 0, 2, 5 (+6 forced) = 4 steps; alpha=0.2 jumps
    # 0 -> 3, where nothing fits: computes 0, 3, 4, 5, 6 = 5 steps. Bisection would miss this.
    curves = [[0.1, 9.0, 0.5, 0.5, 0.5, 0.1], [0.2, 9.0, 0.1, 0.5, 0.5]]
    errors = _errors({"blocks.0.attn": curves}, steps=7, flops={"blocks.0.attn": 90}, total_flops=100)
    assert sum(Schedule.from_errors(errors, 0.1).masks["attn"]) == 4
    assert sum(Schedule.from_errors(errors, 0.2).masks["attn"]) == 5
    best = Schedule.from_errors(errors, 0.1).metadata["ideal_speedup"]
    found = Schedule.for_speedup(errors, target=best)
    assert found.metadata["alpha"] == 0.1 and found.metadata["ideal_speedup"] == best


def test_schedule_metadata_records_where_it_came_from():
    errors = _errors(
        {"blocks.0.attn": SCAN_CURVES},
        steps=6,
        flops={"blocks.0.attn": 50},
        total_flops=80,
        model_class="TinyDiT",
        metadata={"solver": "DDIMScheduler"},
    )
    metadata = Schedule.from_errors(errors, alpha=0.2).metadata
    assert {
        k: metadata[k] for k in ("model_class", "steps", "solver", "alpha", "lookahead", "per_block")
    } == {
        "model_class": "TinyDiT",
        "steps": 6,
        "solver": "DDIMScheduler",
        "alpha": 0.2,
        "lookahead": 2,
        "per_block": False,
    }
    # (1, 0, 0, 1, 0, 1) computes 3 of 6: 6*80 / (6*30 + 3*50)
    assert metadata["ideal_speedup"] == 6 * 80 / (6 * 30 + 3 * 50)


def test_ideal_speedup_counts_branch_flops_only_where_they_compute():
    errors = _errors(
        {"blocks.0.attn": [[0.0, 0.0]], "blocks.0.mlp": [[0.0, 0.0]]},
        steps=3,
        flops={"blocks.0.attn": 30, "blocks.0.mlp": 60},
        total_flops=100,
    )
    schedule = Schedule(3, {"attn": [1, 0, 1]})  # mlp has no key: computes every step
    assert errors.ideal_speedup(schedule) == 300 / (3 * 10 + 2 * 30 + 3 * 60)


# ---------------------------------------------------------------------- for_speedup


@pytest.mark.parametrize("per_block", [False, True])
def test_for_speedup_gives_the_smallest_alpha_reaching_the_target(per_block):
    errors = random_errors()
    values = sorted({0.0, *(v for curves in errors.errors.values() for c in curves for v in c)})
    if not per_block:
        values = sorted({0.0, *(v for c in errors.components for k in (1, 2, 3) for v in errors.curve(c, k))})
    speedups = [
        Schedule.from_errors(errors, a, per_block=per_block).metadata["ideal_speedup"] for a in values
    ]
    for target in (1.0, 1.2, 1.5, 1.8, 2.0):
        if target > max(speedups):
            continue
        schedule = Schedule.for_speedup(errors, target=target, per_block=per_block)
        expected = next(a for a, s in zip(values, speedups, strict=True) if s >= target)
        assert schedule.metadata["alpha"] == expected
        assert schedule.metadata["ideal_speedup"] >= target
        assert schedule.metadata["target"] == target
        assert schedule == Schedule.from_errors(errors, expected, per_block=per_block).with_metadata(
            generator="for_speedup", target=target
        )


def test_for_speedup_is_monotonic_in_the_target():
    errors = random_errors(seed=1)
    reached, alphas = [], []
    for target in np.linspace(1.0, 2.2, 25):
        try:
            schedule = Schedule.for_speedup(errors, target=float(target))
        except ValueError:
            break
        reached.append(schedule.metadata["ideal_speedup"])
        alphas.append(schedule.metadata["alpha"])
    assert len(reached) > 5
    assert reached == sorted(reached) and alphas == sorted(alphas)


def test_for_speedup_names_the_maximum_when_the_target_is_out_of_reach():
    errors = random_errors()
    with pytest.raises(ValueError, match=r"maximum ideal speed-up for these errors is \d+\.\d+") as info:
        Schedule.for_speedup(errors, target=50.0)
    best = float(str(info.value).split("is ")[1].split(" ")[0])
    assert Schedule.for_speedup(errors, target=best - 1e-3).metadata["ideal_speedup"] >= best - 1e-3
    with pytest.raises(ValueError, match="target must be a speed-up >= 1"):
        Schedule.for_speedup(errors, target=0.5)
    with pytest.raises(ValueError, match="no FLOP counts|needs FLOP counts"):
        Schedule.for_speedup(_errors({"blocks.0.attn": SCAN_CURVES}, steps=6), target=1.5)


# ---------------------------------------------------------------------- another step count


def test_resampling_interpolates_over_normalised_time_and_keeps_lags():
    steps, new = 5, 9
    # e_k[i] = u_i = i / (steps - 1): linear in normalised time, so interpolation is exact.
    curves = [[i / (steps - 1) for i in range(steps - k)] for k in (1, 2)]
    errors = _errors({"blocks.0.attn": curves}, steps=steps, flops={"blocks.0.attn": 5}, total_flops=9)
    moved = errors.resampled(new)
    for k in (1, 2):
        last = (steps - k - 1) / (steps - 1)  # held constant past the calibrated end
        expected = [min(j / (new - 1), last) for j in range(new - k)]
        np.testing.assert_allclose(moved.errors["blocks.0.attn"][k - 1], expected)
    assert moved.flops == errors.flops and moved.metadata["resampled_from_steps"] == steps
    direct = Schedule.from_errors(errors, alpha=0.3, steps=new)  # resamples with lags="time"
    timed = errors.resampled(new, lags="time")
    assert direct.steps == new and direct.masks == Schedule.from_errors(timed, alpha=0.3).masks
    assert direct.metadata["calibrated_steps"] == steps and direct.metadata["steps"] == new


def test_resampling_in_time_scales_lags_with_the_step_spacing():
    steps, new = 21, 11  # one new step spans two calibrated steps
    # e_k = 0.1 * k: linear in the lag, so interpolating and extrapolating in the lag are exact.
    curves = [[0.1 * k] * (steps - k) for k in (1, 2, 3)]
    moved = _errors({"blocks.0.attn": curves}, steps=steps).resampled(new, lags="time")
    for k in (1, 2, 3):
        np.testing.assert_allclose(moved.errors["blocks.0.attn"][k - 1], [0.1 * 2 * k] * (new - k))
    with pytest.raises(ValueError, match="lags must be"):
        _errors({"blocks.0.attn": curves}, steps=steps).resampled(new, lags="seconds")


# ---------------------------------------------------------------------- data, files and plots


def test_errors_validate_their_shape():
    with pytest.raises(ValueError, match="lookahead must be >= 1"):
        CalibrationErrors(3, 0, {"blocks.0.attn": []})
    with pytest.raises(ValueError, match="lag 2 must have steps - k = 1 values"):
        _errors({"blocks.0.attn": [[0.1, 0.2], [0.1, 0.2]]}, steps=3)
    with pytest.raises(ValueError, match="non-negative"):
        _errors({"blocks.0.attn": [[0.1, -0.2]]}, steps=3)
    with pytest.raises(ValueError, match="branch paths"):
        _errors({"attn": [[0.1, 0.2]]}, steps=3)


@pytest.mark.parametrize(("alpha", "error"), [(-0.1, ValueError), (math.nan, ValueError), ("0.1", TypeError)])
def test_bad_alpha(alpha, error):
    with pytest.raises(error, match="alpha must be"):
        Schedule.from_errors(_errors({"blocks.0.attn": SCAN_CURVES}, steps=6), alpha=alpha)


def test_errors_and_schedule_round_trip_through_json(tmp_path):
    errors = random_errors().resampled(9)
    errors = CalibrationErrors(
        errors.steps,
        errors.lookahead,
        {**errors.errors, "blocks.9.attn": [[math.inf] * 8, [0.5] * 7, [0.25] * 6]},
        errors.flops,
        errors.total_flops,
        generations=3,
        model_class="Random",
        metadata={"solver": "DDIM"},
    )
    loaded = CalibrationErrors.load(errors.save(tmp_path / "errors.json"))
    assert loaded == errors and loaded.metadata == errors.metadata and loaded.flops == errors.flops
    schedule = Schedule.from_errors(tmp_path / "errors.json", alpha=0.3, per_block=True)  # a path works too
    assert Schedule.load(schedule.save(tmp_path / "schedule.json")) == schedule
    with pytest.raises(ValueError, match="calibration_errors"):
        CalibrationErrors.load(tmp_path / "schedule.json")


def test_plots_write_png_files(tmp_path):
    errors = random_errors()
    schedule = Schedule.from_errors(errors, alpha=0.2, per_block=True)
    paths = [
        plot_errors(errors, tmp_path / "errors.png", alpha=0.2),
        plot_errors(errors, tmp_path / "errors_blocks.png", per_block=True),
        plot_schedule(schedule, tmp_path / "schedule.png"),
        plot_schedule(
            Schedule.from_errors(errors, alpha=0.2),
            tmp_path / "branches.png",
            branches={"blocks.0": ("attn", "mlp"), "blocks.1": ("attn", "mlp")},
        ),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install smoothcache-fx\[plot\]"):
        plot_schedule(Schedule.uniform(4, 2, ["attn"]), tmp_path / "schedule.png")


# ---------------------------------------------------------------------- calibrate on real models


@pytest.fixture(scope="module")
def dit_calibration():
    """diffusers DiT, 2 layers, DDIM 10 steps, two generations (seeds 0 and 1), lookahead 3."""
    model = models.diffusers_dit()
    reference = copy.deepcopy(model)

    def run():
        _ddim_dit(model, seed=0)
        _ddim_dit(model, seed=1)

    errors = smoothcache_fx.calibrate(model, run, lookahead=3, progress=False)
    return model, reference, errors


def _hand_errors(model, lookahead: int = 3) -> dict[str, list[np.ndarray]]:
    """Forward hooks on attn1/ff of the untransformed model; e_k[i] = |L_i - L_(i+k)| / |L_(i+k)|."""
    outputs: dict[str, list[torch.Tensor]] = {}
    hooks = [
        getattr(block, name).register_forward_hook(
            lambda m, a, out, key=f"transformer_blocks.{i}.{name}": outputs.setdefault(key, []).append(
                out.clone()
            )
        )
        for i, block in enumerate(model.transformer_blocks)
        for name in ("attn1", "ff")
    ]
    totals: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for seed in (0, 1):
            outputs.clear()
            _ddim_dit(model, seed=seed)
            for key, series in outputs.items():
                sums = totals.setdefault(key, [np.zeros(DDIM_STEPS - k) for k in range(1, lookahead + 1)])
                for k in range(1, lookahead + 1):
                    for i in range(DDIM_STEPS - k):
                        later = series[i + k].float()
                        sums[k - 1][i] += (
                            (series[i].float() - later).abs().sum() / later.abs().sum()
                        ).item() / 2
    for hook in hooks:
        hook.remove()
    return totals


def test_calibrated_errors_equal_a_hand_computation(dit_calibration):
    model, reference, errors = dit_calibration
    assert (errors.steps, errors.lookahead, errors.generations) == (DDIM_STEPS, 3, 2)
    assert errors.model_class == "DiTTransformer2DModel" and errors.metadata["generation_rule"] == "timestep"
    expected = _hand_errors(reference)
    assert set(errors.branches) == set(expected) and len(expected) == 4
    for path, curves in expected.items():
        for k in (1, 2, 3):
            np.testing.assert_allclose(
                errors.errors[path][k - 1], curves[k - 1], rtol=1e-4, err_msg=f"{path} k={k}"
            )


def test_calibrated_flops_match_module_level_flop_counts(dit_calibration):
    _, reference, errors = dit_calibration
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        reference(x, timestep=torch.tensor([999, 999]), class_labels=torch.tensor([1, 7]))
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    # torch has no FLOP formula for CPU attention; calibrate adds torch's own (QK^T and PV).
    attention = sdpa_flop_count((2, 2, 16, 8), (2, 2, 16, 8), (2, 2, 16, 8))
    for i in range(2):
        prefix = f"DiTTransformer2DModel.transformer_blocks.{i}"
        assert errors.flops[f"transformer_blocks.{i}.attn1"] == counts[f"{prefix}.attn1"] + attention
        assert errors.flops[f"transformer_blocks.{i}.ff"] == counts[f"{prefix}.ff"]
    assert errors.total_flops == counter.get_total_flops() + 2 * attention
    assert errors.remainder_flops > 0


def test_calibrate_restores_the_model(dit_calibration):
    model, reference, _ = dit_calibration
    _assert_untransformed(model, model.transformer_blocks)
    with torch.no_grad():
        torch.testing.assert_close(_ddim_dit(model, seed=3), _ddim_dit(reference, seed=3), rtol=0, atol=0)


def test_calibrated_schedules_drive_the_model(dit_calibration, tmp_path):
    model, reference, errors = dit_calibration
    errors = CalibrationErrors.load(errors.save(tmp_path / "errors.json"))
    for schedule in (
        Schedule.from_errors(errors, alpha=0.3),
        Schedule.for_speedup(errors, 1.3, per_block=True),
    ):
        schedule = Schedule.load(schedule.save(tmp_path / "schedule.json"))
        cached = smoothcache_fx.transform(copy.deepcopy(reference), schedule)
        with torch.no_grad():
            _ddim_dit(cached)
        branches = cached.smoothcache.branches
        png = plot_schedule(schedule, tmp_path / "schedule.png", branches=branches)
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        for path, stats in cached.smoothcache.stats.items():
            assert stats["reused"] == schedule.mask_for(path).count(False), path
    assert plot_errors(errors, tmp_path / "errors.png", alpha=0.3).read_bytes()[:8] == PNG_SIGNATURE


def test_calibrate_a_pipeline_one_generation_per_call():
    pipe = models.dit_pipeline()
    pipeline_class = type(pipe)

    def run():
        for seed in (0, 1):
            pipe(class_labels=[1, 7], num_inference_steps=4, generator=torch.Generator().manual_seed(seed))

    errors = smoothcache_fx.calibrate(pipe, run, lookahead=2, progress=False)
    assert (errors.steps, errors.generations, errors.lookahead) == (4, 2, 2)
    assert errors.metadata["solver"] == "DDIMScheduler" and errors.metadata["generation_rule"] == "pipeline"
    assert errors.components == ("attn1", "ff")
    assert type(pipe) is pipeline_class
    _assert_untransformed(pipe.transformer, pipe.transformer.transformer_blocks)
    assert Schedule.from_errors(errors, alpha=0.5).metadata["solver"] == "DDIMScheduler"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_calibrate_components_and_progress(monkeypatch):
    """Progress is shown on a terminal (and only there: test_cli_demo checks a non-terminal)."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    model = _tiny_dit()
    errors = smoothcache_fx.calibrate(model, lambda: _ddim_tiny(model, 4), components=["mlp"], lookahead=1)
    assert errors.branches == ("blocks.0.mlp", "blocks.1.mlp")
    assert errors.metadata["generation_rule"] == "timestep"  # TinyDiT's timestep argument is `t`
    assert "calibrate" in terminal.getvalue()


class _NoTimestep(nn.Module):
    """A model whose noise-level argument has a name calibrate does not read as a timestep."""

    def __init__(self):
        super().__init__()
        self.inner = _tiny_dit()

    def forward(self, x, noise_level, y):
        return self.inner(x, noise_level, y)


def test_generations_by_step_count_when_there_is_no_timestep(capsys):
    model = _NoTimestep()
    with pytest.raises(ValueError, match="timestep argument"):
        smoothcache_fx.calibrate(model, lambda: _ddim_tiny(model, 3), progress=False)
    errors = smoothcache_fx.calibrate(
        model,
        lambda: [_ddim_tiny(model, 3, seed) for seed in range(2)],
        steps=3,
        components=["attn"],
        progress=False,
    )
    assert (errors.steps, errors.generations, errors.metadata["generation_rule"]) == (3, 2, "steps")
    _assert_untransformed(model, model.inner.blocks)
    assert capsys.readouterr().err == ""  # progress=False is silent


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("lookahead", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError)])
def test_bad_lookahead(lookahead, error):
    model = _tiny_dit()
    with pytest.raises(error, match="lookahead must be"):
        smoothcache_fx.calibrate(model, lambda: _ddim_tiny(model, 3), lookahead=lookahead)


def test_run_that_never_calls_the_model():
    model = _tiny_dit()
    with pytest.raises(ValueError, match="run must call the model"):
        smoothcache_fx.calibrate(model, lambda: None, progress=False)
    _assert_untransformed(model, model.blocks)


def test_generations_of_different_lengths_by_timestep():
    model = _tiny_dit()

    def run():
        _ddim_tiny(model, 5)
        _ddim_tiny(model, 3)

    with pytest.raises(ValueError, match="generation 2 has 3, but the first generation's count is 5"):
        smoothcache_fx.calibrate(model, run, components=["attn"], progress=False)
    _assert_untransformed(model, model.blocks)


def test_generations_of_different_lengths_by_steps():
    model = _tiny_dit()  # 6 model calls with steps=4: a generation of 4, then one of 2
    with pytest.raises(ValueError, match="generation 2 has 2, but steps is 4"):
        smoothcache_fx.calibrate(
            model,
            lambda: [_ddim_tiny(model, 3, seed) for seed in range(2)],
            steps=4,
            components=["attn"],
            progress=False,
        )
    _assert_untransformed(model, model.blocks)


def test_already_transformed_model_is_refused():
    model = smoothcache_fx.transform(_tiny_dit(), Schedule.uniform(3, 2, ["attn"]))
    with pytest.raises(RuntimeError, match="already transformed.*untransform"):
        smoothcache_fx.calibrate(model, lambda: _ddim_tiny(model, 3))
    assert model.smoothcache.schedule.steps == 3  # left as it was


def test_unknown_component_is_refused_and_the_model_restored():
    model = _tiny_dit()
    with pytest.raises(ValueError, match="match no residual branch"):
        smoothcache_fx.calibrate(
            model, lambda: _ddim_tiny(model, 3), components=["feedforward"], progress=False
        )
    _assert_untransformed(model, model.blocks)
