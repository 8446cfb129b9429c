"""smoothcache_fx.profile: ranges in the trace, per-step schedule, totals, FLOPs, kernels, bad input."""

from __future__ import annotations

import json

import models
import pytest
import torch
from helpers import dit_call, run_steps, tiny_call

import smoothcache_fx
from smoothcache_fx import Schedule
from smoothcache_fx.flops import flop_counter
from smoothcache_fx.passes.annotate import branch_range, step_range
from smoothcache_fx.runtime import ToolOptions

STEPS = 4
COMPONENTS = ("attn1", "ff")


pytestmark = pytest.mark.usefixtures("one_thread")


def _schedule():
    # attn1 every 2nd step, ff only at step 0: steps compute 4, 0, 2, 0 of the 4 branches.
    return Schedule.from_dict({"attn1": [1, 0, 1, 0], "ff": [1, 0, 0, 0]})


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    torch.set_num_threads(1)
    model = smoothcache_fx.transform(models.diffusers_dit(), _schedule())
    trace = tmp_path_factory.mktemp("profile") / "trace.json"
    report = smoothcache_fx.profile(
        model, lambda: run_steps(model, dit_call, STEPS), trace=trace, baseline=True
    )
    return model, report, json.loads(trace.read_text())


def _ranges(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e.get("ph") == "X" and e["name"].startswith("smoothcache/")]


def test_trace_is_json_with_step_and_branch_ranges_over_the_ops(profiled):
    model, report, trace = profiled
    names = {e["name"] for e in _ranges(trace)}
    assert {step_range(step) for step in range(STEPS)} <= names
    for block in ("transformer_blocks.0", "transformer_blocks.1"):
        assert f"smoothcache/{block}" in names
        for component in COMPONENTS:
            assert branch_range(block, component, True) in names
            assert branch_range(block, component, False) in names
    steps = [e for e in _ranges(trace) if e["name"].startswith("smoothcache/step ")]
    branches = [e for e in _ranges(trace) if e["name"].endswith((" computed", " reused"))]
    assert len(branches) == 2 * len(COMPONENTS) * STEPS
    for branch in branches:  # every branch range lies inside a step range
        assert any(
            s["ts"] <= branch["ts"] and branch["ts"] + branch["dur"] <= s["ts"] + s["dur"] for s in steps
        )
    ops = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e["name"] == "aten::linear"]
    attn = [b for b in branches if b["name"].endswith("attn1 computed")]
    assert any(b["ts"] <= op["ts"] <= b["ts"] + b["dur"] for b in attn for op in ops)
    assert report.trace is not None


def test_per_step_computed_counts_equal_the_schedule(profiled):
    model, report, _ = profiled
    schedule = _schedule()
    assert [s.step for s in report.steps] == list(range(STEPS))
    for s in report.steps:
        want = {
            f"transformer_blocks.{b}.{c}"
            for b in range(2)
            for c in COMPONENTS
            if schedule.mask_for(f"transformer_blocks.{b}.{c}")[s.step]
        }
        assert set(s.computed) == want
        assert set(s.reused) == {f"transformer_blocks.{b}.{c}" for b in range(2) for c in COMPONENTS} - want
    assert [len(s.computed) for s in report.steps] == [4, 0, 2, 0]
    by_path = {b.path: b for b in report.branches}
    assert (
        by_path["transformer_blocks.0.attn1"].computed == 2 and by_path["transformer_blocks.0.ff"].reused == 3
    )


def test_totals_add_up_to_the_wall_time(profiled):
    _, report, trace = profiled
    assert report.model_s + report.outside_s == pytest.approx(report.wall_s)
    # The step ranges in the trace and the hook-timed step walls measure the same intervals.
    step_us = sum(e["dur"] for e in _ranges(trace) if e["name"].startswith("smoothcache/step "))
    assert step_us / 1e6 == pytest.approx(report.model_s, rel=0.05)
    # Ops' self time plus the interpreter time inside ranges covers every step, and what run() did
    # around the model calls; only Python outside any op or range is left (preemption on a shared
    # machine lands there too, so no tighter bound than the wall).
    assert report.model_s <= report.kernel_s + report.interpreter_s <= report.wall_s
    assert 0 < report.branch_s <= report.model_s
    assert sum(s.branch_s for s in report.steps) == pytest.approx(report.branch_s)
    for s in report.steps:
        assert s.branch_s <= s.wall_s
    assert sum(b.share for b in report.branches) == pytest.approx(report.branch_s / report.model_s)


def test_flops_give_the_ideal_speedup_and_the_baseline_the_achieved(profiled):
    model, report, _ = profiled
    original = models.diffusers_dit()
    with torch.no_grad(), flop_counter() as counter:  # the project's one count, CPU attention included
        dit_call(original, 0)
    assert report.all_compute_flops == STEPS * counter.get_total_flops()
    assert report.steps[0].flops == counter.get_total_flops()
    assert report.flops == sum(s.flops for s in report.steps) < report.all_compute_flops
    assert report.ideal_speedup == pytest.approx(report.all_compute_flops / report.flops)
    assert report.baseline_model_s > 0 and report.achieved_speedup == pytest.approx(
        report.baseline_model_s / report.model_s
    )
    assert report.cache_bytes == model.smoothcache.cache_bytes > 0


def test_kernel_rows_name_the_fused_residual_add(profiled):
    _, report, _ = profiled
    fused = {k.name: k for k in report.kernels if "gated_residual_add" in k.name}
    compute = fused.pop("smoothcache_fx::gated_residual_add_and_cache")
    reuse = fused.pop("smoothcache_fx::gated_residual_add")
    assert not fused
    computed = sum(len(step.computed) for step in report.steps)
    assert compute.calls == computed  # the cache-writing op where a branch computes
    assert reuse.calls == 2 * len(COMPONENTS) * STEPS - computed  # the pure op where it is reused
    assert compute.calls + reuse.calls == 2 * len(COMPONENTS) * STEPS  # every site of every step
    assert all(not k.name.startswith("smoothcache/") for k in report.kernels)
    selfs = [k.self_s for k in report.kernels if k not in (compute, reuse)]
    assert selfs == sorted(selfs, reverse=True)


def test_text_and_json(profiled, tmp_path):
    _, report, _ = profiled
    text = str(report)
    assert "ideal speedup" in text and "achieved" in text
    assert "transformer_blocks.1.ff" in text and "gated_residual_add" in text
    report.to_json(tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["format_version"] == 1
    assert [len(s["computed"]) for s in data["steps"]] == [4, 0, 2, 0]
    assert data["ideal_speedup"] == pytest.approx(report.ideal_speedup)


def test_profiling_leaves_the_model_as_it_was(profiled):
    model, _, _ = profiled
    runtime = model.smoothcache
    assert runtime.tools == ToolOptions() and runtime.step == 0
    assert not model._forward_hooks.keys() - set(h.id for h in runtime._hooks)
    fresh = smoothcache_fx.transform(models.diffusers_dit(), _schedule())
    for want, have in zip(run_steps(fresh, dit_call, STEPS), run_steps(model, dit_call, STEPS), strict=True):
        assert torch.equal(want, have)


def test_compiled_variants_are_profiled_split_with_their_ranges(tmp_path):
    schedule = Schedule.uniform(STEPS, 2, ["attn", "mlp"])
    model = smoothcache_fx.transform(models.TinyDiT(), schedule, compile=True, backend="aot_eager")
    trace = tmp_path / "trace.json"
    report = smoothcache_fx.profile(
        model, lambda: run_steps(model, tiny_call, STEPS), trace=trace, flops=False
    )
    names = {e["name"] for e in _ranges(json.loads(trace.read_text()))}
    assert {branch_range("blocks.1", "mlp", c) for c in (True, False)} <= names
    assert "split at branch boundaries" in report.mode
    assert [len(s.computed) for s in report.steps] == [4, 0, 4, 0]
    assert report.flops is None and report.ideal_speedup is None


# -- bad input --------------------------------------------------------------------------------------
def _model():
    return smoothcache_fx.transform(models.TinyDiT(), Schedule.uniform(2, 2, ["attn"]))


def test_unwritable_trace_path_fails_before_running(tmp_path):
    model = _model()
    calls = []
    with pytest.raises(ValueError, match="trace must be a writable file path.*No such file"):
        smoothcache_fx.profile(model, lambda: calls.append(1), trace=tmp_path / "missing" / "trace.json")
    with pytest.raises(ValueError, match="trace must be a writable file path"):
        smoothcache_fx.profile(model, lambda: calls.append(1), trace=tmp_path)
    assert not calls


def test_run_that_never_calls_the_model():
    model = _model()
    with pytest.raises(ValueError, match=r"run must call the model.*0 model calls"):
        smoothcache_fx.profile(model, lambda: None)
    assert model.smoothcache.tools == ToolOptions()
    assert len(model._forward_hooks) == 2 and len(model._forward_pre_hooks) == 1  # the runtime's own


def test_untransformed_model_and_bad_arguments():
    original = models.TinyDiT()
    with pytest.raises(ValueError, match=r"not.*smoothcache_fx.transform\(model, schedule\) first"):
        smoothcache_fx.profile(original, lambda: run_steps(original, tiny_call, 1))
    with pytest.raises(TypeError, match="profile expects a model"):
        smoothcache_fx.profile(object(), lambda: None)
    model = _model()
    with pytest.raises(TypeError, match="run must be a callable"):
        smoothcache_fx.profile(model, [1])
    graph_form = smoothcache_fx.transform(models.TinyDiT(), Schedule.uniform(2, 2, ["attn"]), form="graph")
    with pytest.raises(NotImplementedError, match="branches=False"):
        smoothcache_fx.profile(graph_form, lambda: run_steps(graph_form, tiny_call, 2))
    report = smoothcache_fx.profile(
        graph_form, lambda: run_steps(graph_form, tiny_call, 2), branches=False, baseline=True
    )
    assert [s.step for s in report.steps] == [0, 1] and report.branch_s == 0


def test_profile_docstring_example_runs():
    import doctest
    import sys

    module = sys.modules["smoothcache_fx.profile"]  # the package attribute is the function
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0 and result.failed == 0
