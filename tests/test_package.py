"""`export_package`: an AOTInductor package of the graph form that a process importing torch alone
loads and runs over whole generations, equal to the eager transformed model (reuse and forecast
branches), with a step reset."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import smoothcache_fx
from smoothcache_fx import Schedule
from smoothcache_fx.demo.model import load_demo_model, make_scheduler

STEPS = 6
# attn1 reuses; ff forecasts (order 1: its history buffer and per-step weights table travel in the
# package too), at lag 1 after two computes (step 2) and after a gap (step 4: computes at 1 and 3).
SCHEDULE = (
    Schedule.from_dict({"attn1": [1, 0, 1, 0, 0, 1], "ff": [1, 1, 0, 1, 0, 1]})
    .with_orders({"ff": 1})
    .with_strengths(0.75)
)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 1, 8, 8, generator=g), torch.tensor([1, 2, 3, 10])


def _eager_generation(model, x, y):
    timesteps = make_scheduler(STEPS).timesteps
    with torch.no_grad(), model.smoothcache.generation():
        return [model(x, timestep=torch.full((4,), int(t)), class_labels=y).sample for t in timesteps]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    folder = tmp_path_factory.mktemp("package")
    base = load_demo_model()
    x, y = _inputs()
    graph = smoothcache_fx.transform(copy.deepcopy(base), SCHEDULE, form="graph")
    path = smoothcache_fx.export_package(
        graph, (x,), {"timestep": torch.full((4,), 999), "class_labels": y}, path=str(folder / "dit.pt2")
    )
    want = _eager_generation(smoothcache_fx.transform(copy.deepcopy(base), SCHEDULE), x, y)
    torch.save({"x": x, "y": y, "want": want, "timesteps": make_scheduler(STEPS).timesteps}, folder / "io.pt")
    return path, folder / "io.pt"


def test_package_runs_whole_generations_in_a_process_with_torch_alone(package):
    """Two and a half generations: one whole (the step wraps by itself), half of one, a reset, one
    whole again. Before `joint_graph_constant_folding` was turned off, calls from the third on
    differed (the step stayed at 1)."""
    path, io = package
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["smoothcache_fx"] = None  # torch alone: no op, no class of ours
        data = torch.load({str(io)!r})
        loaded = torch._inductor.aoti_load_package({path!r})

        def run(count):
            return [loaded(data["x"], timestep=torch.full((4,), int(t)), class_labels=data["y"])[0]
                    for t in data["timesteps"][:count]]

        def reset():  # what smoothcache_fx.reset_package(loaded) runs
            step = next(n for n in loaded.get_constant_fqns() if n.endswith("smoothcache_step"))
            loaded.load_constants({{step: torch.zeros(1, dtype=torch.long)}}, check_full_update=False)

        worst = 0.0
        for outputs in (run({STEPS}), run(3)):
            worst = max([worst] + [(a - b).abs().max().item() for a, b in zip(outputs, data["want"])])
        reset()
        worst = max([worst] + [(a - b).abs().max().item() for a, b in zip(run({STEPS}), data["want"])])
        print(worst)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-4


def test_reset_package_in_this_process(package):
    path, io = package
    data = torch.load(io)
    loaded = torch._inductor.aoti_load_package(path)
    first = loaded(data["x"], timestep=torch.full((4,), 999), class_labels=data["y"])[0]
    loaded(data["x"], timestep=torch.full((4,), 999), class_labels=data["y"])
    smoothcache_fx.reset_package(loaded)
    again = loaded(data["x"], timestep=torch.full((4,), 999), class_labels=data["y"])[0]
    assert torch.equal(first, again)


def test_export_package_refuses_other_forms(tmp_path):
    model = smoothcache_fx.transform(load_demo_model(), SCHEDULE)
    with pytest.raises(ValueError, match="form='graph'"):
        smoothcache_fx.export_package(model, (torch.randn(1, 1, 8, 8),), path=str(tmp_path / "m.pt2"))
    with pytest.raises(ValueError, match="transform\\(model, schedule, form='graph'\\) first"):
        smoothcache_fx.export_package(load_demo_model(), path=str(tmp_path / "m.pt2"))
    graph = smoothcache_fx.transform(load_demo_model(), SCHEDULE, form="graph")
    with pytest.raises(ValueError, match="must end with .pt2"):
        smoothcache_fx.export_package(graph, path=str(tmp_path / "m.so"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_package_holds_the_triton_kernel_and_runs_a_generation(tmp_path):
    """On CUDA the fused op is the Triton kernel, compiled into the package (its name appears in
    the package's generated code), and the loaded package runs a whole generation equal to eager."""
    import zipfile

    base = load_demo_model(device="cuda")
    x, y = (t.cuda() for t in _inputs())
    graph = smoothcache_fx.transform(copy.deepcopy(base), SCHEDULE, form="graph")
    path = smoothcache_fx.export_package(
        graph,
        (x,),
        {"timestep": torch.full((4,), 999, device="cuda"), "class_labels": y},
        path=str(tmp_path / "dit.pt2"),
    )
    with zipfile.ZipFile(path) as archive:
        text = b"".join(
            archive.read(name) for name in archive.namelist() if name.endswith((".cpp", ".py", ".json"))
        )
    assert b"gated_residual_add_kernel" in text
    want = _eager_generation(smoothcache_fx.transform(copy.deepcopy(base), SCHEDULE), x, y)
    loaded = torch._inductor.aoti_load_package(path)
    timesteps = make_scheduler(STEPS).timesteps
    for generation in range(2):
        got = [
            loaded(x, timestep=torch.full((4,), int(t), device="cuda"), class_labels=y)[0] for t in timesteps
        ]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=f"generation {generation}")
