"""compile=True granularities: whole-model variants, the compiled single graph, and the automatic choice."""

from __future__ import annotations

import copy
import logging

import models
import pytest
import torch
from helpers import run_steps, tiny_call
from torch._dynamo.utils import counters

import smoothcache_fx
from smoothcache_fx import Schedule
from smoothcache_fx.granularity import estimate_compile_cost

STEPS = 8


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _schedule(steps: int = STEPS) -> Schedule:
    # attn every 2nd step, mlp every 4th: three distinct whole-model masks.
    return Schedule.from_dict(
        {"attn": [int(s % 2 == 0) for s in range(steps)], "mlp": [int(s % 4 == 0) for s in range(steps)]}
    )


def _close(got, expected):
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("granularity", "graphs"), [("model", 3), ("graph", 1), ("block", 3)])
def test_each_granularity_equals_eager_with_one_graph_per_mask_and_no_recompiles(
    granularity, graphs, forbid_recompiles
):
    original = models.TinyDiT(depth=3)
    eager = smoothcache_fx.transform(copy.deepcopy(original), _schedule())
    compiled = smoothcache_fx.transform(
        copy.deepcopy(original), _schedule(), compile=True, granularity=granularity, backend="aot_eager"
    )
    expected = run_steps(eager, tiny_call, STEPS)
    forbid_recompiles()
    for _ in range(3):
        _close(run_steps(compiled, tiny_call, STEPS), expected)
    assert compiled.smoothcache.granularity == granularity
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]
    # counters agree with the eager twin's (whole-model steps are counted around the graph)
    assert {k: v["computed"] for k, v in compiled.smoothcache.stats.items()} == {
        k: 3 * v["computed"] for k, v in eager.smoothcache.stats.items()
    }


def test_model_graphs_report_which_steps_share_a_graph():
    model = smoothcache_fx.transform(
        models.TinyDiT(depth=2), _schedule(), compile=True, granularity="model", backend="aot_eager"
    )
    run_steps(model, tiny_call, STEPS)
    rows = {tuple(row["steps"]): row for row in model.smoothcache.model_graphs}
    assert set(rows) == {(0, 4), (1, 3, 5, 7), (2, 6)}
    assert rows[(2, 6)]["compute"]["blocks.1"] == {"attn": True, "mlp": False}
    assert rows[(0, 4)]["calls"] == 2  # step 0 too: the capturing eager run is done again compiled
    assert all(row["compiled"] for row in rows.values())


def test_auto_chooses_whole_model_variants_within_the_compile_budget(caplog):
    original = models.TinyDiT(depth=3)
    with caplog.at_level(logging.INFO, logger="smoothcache_fx"):
        generous = smoothcache_fx.transform(
            copy.deepcopy(original), _schedule(), compile=True, backend="aot_eager", compile_budget=10
        )
        run_steps(generous, tiny_call, STEPS)
    assert generous.smoothcache.granularity == "model"
    assert "compile granularity 'model'" in caplog.text
    estimate = generous.smoothcache.granularity_estimate
    assert (estimate.model_graphs, estimate.block_graphs) == (3, 3)
    assert estimate.plain < estimate.model  # three whole-model graphs cost more than one plain

    tight = smoothcache_fx.transform(
        copy.deepcopy(original), _schedule(), compile=True, backend="aot_eager", compile_budget=0.5
    )
    run_steps(tight, tiny_call, STEPS)
    assert tight.smoothcache.granularity == "block"
    _close(run_steps(tight, tiny_call, STEPS), run_steps(generous, tiny_call, STEPS))


def test_compile_cost_estimate_counts_what_each_granularity_compiles():
    """An all-reuse mask keeps only the modulation and norms: its whole-model graph costs less than
    the all-compute one, and fewer distinct masks cost less."""
    fora2 = smoothcache_fx.transform(models.TinyDiT(depth=4), Schedule.uniform(4, 2, ["attn", "mlp"]))
    all_compute = smoothcache_fx.transform(models.TinyDiT(depth=4), Schedule.all_compute(4, ["attn", "mlp"]))
    every = smoothcache_fx.transform(models.TinyDiT(depth=4), _schedule(4))
    for model in (fora2, all_compute, every):
        run_steps(model, tiny_call, 1)
    two, one, three = (estimate_compile_cost(m.smoothcache) for m in (fora2, all_compute, every))
    assert (two.model_graphs, one.model_graphs, three.model_graphs) == (2, 1, 3)
    # one whole-model graph of inlined FX graphs costs less than tracing the model's own Python
    assert one.model < one.plain
    assert one.model < two.model < 2 * one.model < three.model
    assert two.block_graphs == 2 and two.block < two.model


def test_schedule_swap_chooses_again():
    original = models.TinyDiT()
    model = smoothcache_fx.transform(copy.deepcopy(original), _schedule(), compile=True, backend="aot_eager")
    run_steps(model, tiny_call, STEPS)
    model.smoothcache.set_schedule(Schedule.all_compute(4, ["attn", "mlp"]))
    assert model.smoothcache.granularity == "auto"
    expected = run_steps(original, tiny_call, 4)
    _close(run_steps(model, tiny_call, 4), expected)
    assert model.smoothcache.granularity == "model"  # one mask: the same cost as plain compile


def test_whole_model_variants_follow_a_replaced_submodule():
    """A change a captured block depends on (here a replaced linear) captures it again; the whole-model
    graphs of the old capture are not run again."""
    original = models.TinyDiT(depth=2)
    compiled = smoothcache_fx.transform(
        copy.deepcopy(original), _schedule(), compile=True, granularity="model", backend="aot_eager"
    )
    eager = smoothcache_fx.transform(copy.deepcopy(original), _schedule())
    run_steps(compiled, tiny_call, STEPS)
    replacement = torch.nn.Linear(*original.blocks[1].mlp.fc2.weight.shape[::-1])
    for model in (compiled, eager):
        model.blocks[1].mlp.fc2 = copy.deepcopy(replacement)
    _close(run_steps(compiled, tiny_call, STEPS), run_steps(eager, tiny_call, STEPS))


def test_whole_model_variants_keep_the_batch_size_of_a_generation():
    model = smoothcache_fx.transform(
        models.TinyDiT(), _schedule(), compile=True, granularity="model", backend="aot_eager"
    )
    eager = smoothcache_fx.transform(models.TinyDiT(), _schedule())
    model.load_state_dict(eager.state_dict())
    for batch in (2, 3, 2):
        _close(
            run_steps(model, tiny_call, STEPS, batch=batch), run_steps(eager, tiny_call, STEPS, batch=batch)
        )
    with torch.no_grad():
        tiny_call(model, 0, batch=2)
        with pytest.raises(RuntimeError, match="changed its input in the middle of a generation"):
            tiny_call(model, 1, batch=3)


def test_whole_model_variants_with_two_calls_per_step(forbid_recompiles):
    """Unbatched guidance: each call of a step has caches of its own, in the compiled graph too
    (one graph per mask and call: they read different cache buffers)."""
    original = models.diffusers_dit(num_layers=2)
    schedule = Schedule.uniform(4, 2, ["attn1", "ff"])
    eager = smoothcache_fx.transform(copy.deepcopy(original), schedule, calls_per_step=2)
    compiled = smoothcache_fx.transform(
        copy.deepcopy(original),
        schedule,
        calls_per_step=2,
        compile=True,
        granularity="model",
        backend="aot_eager",
    )

    def calls(model):
        out = []
        with torch.no_grad():
            for step in range(4):
                x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(step))
                t = torch.full((2,), 50 * step + 1)
                for labels in (torch.tensor([1, 2]), torch.tensor([3, 4])):  # two calls, two inputs
                    out.append(model(x, timestep=t, class_labels=labels).sample)
        return out

    forbid_recompiles()
    _close(calls(compiled), calls(eager))
    _close(calls(compiled), calls(eager))
    assert counters["stats"]["unique_graphs"] == 4


def test_untransform_restores_the_model_class():
    original = models.TinyDiT()
    model = smoothcache_fx.transform(
        original, _schedule(), compile=True, granularity="model", backend="aot_eager"
    )
    run_steps(model, tiny_call, 2)
    smoothcache_fx.untransform(model)
    assert type(model) is models.TinyDiT and "smoothcache" not in model.__dict__
    assert not any("smoothcache" in name for name, _ in model.named_buffers())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"granularity": "layer"}, "granularity must be one of"),
        ({"compile_budget": 0}, "compile_budget must be a positive number"),
        ({"compile_budget": "2"}, "compile_budget must be a positive number"),
        ({"granularity": "graph", "calls_per_step": 2}, "calls_per_step > 1 needs granularity"),
        ({"form": "graph"}, "granularity='graph'"),
    ],
)
def test_bad_granularity_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        smoothcache_fx.transform(models.TinyDiT(), _schedule(), compile=True, **kwargs)


def test_too_many_whole_model_masks_is_refused_with_the_fix():
    model = smoothcache_fx.transform(
        models.TinyDiT(), _schedule(), compile=True, granularity="model", max_variants=2
    )
    with pytest.raises(ValueError, match=r"needs 3 compiled variants.*max_variants=2"):
        run_steps(model, tiny_call, 1)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@requires_cuda
@pytest.mark.parametrize("granularity", ["model", "graph"])
def test_cuda_graphs_per_step_match_eager(granularity, forbid_recompiles):
    """mode="reduce-overhead": one CUDA graph per whole-model mask (or one for the single graph),
    replayed step after step with the caches written in place."""
    original = models.TinyDiT(depth=3).cuda()
    eager = smoothcache_fx.transform(copy.deepcopy(original), _schedule())
    compiled = smoothcache_fx.transform(
        copy.deepcopy(original), _schedule(), compile=True, granularity=granularity, mode="reduce-overhead"
    )

    def call(model, step, batch=2):
        x, y = models.tiny_dit_inputs(batch)
        return model(x.cuda(), torch.full((batch,), 50 * step + 1, device="cuda"), y.cuda()).clone()

    expected = run_steps(eager, call, STEPS)
    run_steps(compiled, call, STEPS)
    forbid_recompiles()
    for _ in range(2):
        _close(run_steps(compiled, call, STEPS), expected)
    assert not counters["inductor"].get("cudagraph_skips")


@pytest.mark.parametrize("granularity", ["model", "graph"])
def test_whole_model_graphs_forecast_like_the_eager_variants(granularity, forbid_recompiles):
    """Forecast weights change with the lag, not with the mask: they are filled in before each
    call, so every step with one mask shares one whole-model graph whatever its lag."""
    original = models.TinyDiT(depth=2)
    mask = [int(step % 3 == 0 or step == 8) for step in range(9)]
    schedule = Schedule(9, {"attn": mask, "mlp": mask}, orders={"attn": 1, "mlp": 2}, strengths={"attn": 0.5})
    eager = smoothcache_fx.transform(copy.deepcopy(original), schedule)
    compiled = smoothcache_fx.transform(
        copy.deepcopy(original), schedule, compile=True, granularity=granularity, backend="aot_eager"
    )
    expected = run_steps(eager, tiny_call, 9)
    reuse_only = run_steps(
        smoothcache_fx.transform(copy.deepcopy(original), schedule.with_orders({})), tiny_call, 9
    )
    assert not torch.allclose(expected[5], reuse_only[5], atol=1e-4)  # forecasting changes the output
    forbid_recompiles()
    for _ in range(2):
        _close(run_steps(compiled, tiny_call, 9), expected)
    assert counters["stats"]["unique_graphs"] == (2 if granularity == "model" else 1)
    assert (
        compiled.smoothcache.stats["blocks.1.mlp"]["forecast"]
        == 2 * eager.smoothcache.stats["blocks.1.mlp"]["forecast"]
    )
