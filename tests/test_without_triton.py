"""What a CPU user without triton gets (torch's CPU wheel brings none): compiled variants with
inductor, the single-graph form compiled and exported, and the demo job itself.

Each test runs in a subprocess whose `sitecustomize` makes triton unimportable, so nothing this
test session imported (triton is in the test extra) can leak into it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).parent
WITHOUT_TRITON = TESTS / "without_triton"


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(WITHOUT_TRITON), str(TESTS), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def _python(script: str, timeout: int = 600) -> str:
    result = _run([sys.executable, "-c", textwrap.dedent(script)], timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_triton_is_hidden_in_the_subprocess():
    out = _python(
        """
        import importlib.util, torch
        from torch.utils._triton import has_triton
        from smoothcache_fx.kernels.gated_residual_add import HAS_TRITON
        print(importlib.util.find_spec("triton"), has_triton(), HAS_TRITON)
        """
    )
    assert out.split() == ["None", "False", "False"]


def test_compiled_variants_with_inductor_equal_eager_without_triton():
    """Reuse and compute sites in every variant, compiled with inductor (not aot_eager), over two
    whole generations: equal to the eager transformed model and, where everything computes, to the
    original; one compiled graph per distinct variant, no graph break, no recompile."""
    out = _python(
        """
        import copy, torch
        from torch._dynamo.utils import counters
        import models, smoothcache_fx
        from helpers import dit_call, run_steps
        from smoothcache_fx import Schedule

        torch.manual_seed(0)
        original = models.diffusers_dit(num_layers=2)
        schedule = Schedule.from_dict({"attn1": [1, 0, 1, 0, 1, 1], "ff": [1, 1, 0, 0, 1, 1]})
        eager = smoothcache_fx.transform(copy.deepcopy(original), schedule)
        compiled = smoothcache_fx.transform(copy.deepcopy(original), schedule, compile=True)
        expected = run_steps(eager, dit_call, 6)
        first = run_steps(compiled, dit_call, 6)
        assert counters["stats"]["unique_graphs"] == compiled.smoothcache.distinct_variants() == 4
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = run_steps(compiled, dit_call, 6)
        assert not counters["graph_break"] and not counters["recompiles"]
        for want, a, b in zip(expected, first, second, strict=True):
            torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(a, b)
        plain = run_steps(original, dit_call, 1)[0]
        torch.testing.assert_close(first[0], plain, rtol=1e-5, atol=1e-5)
        kinds = sorted(list(v["compute"].values()) for v in compiled.smoothcache.variants)
        print("ok", kinds)
        """
    )
    assert out.startswith("ok")
    assert "[False, False]" in out and "[True, True]" in out  # pure reuse and pure compute variants


def test_graph_form_compiles_and_exports_without_triton():
    """The single graph: torch.compile(fullgraph=True) with inductor and torch.export, both ops in
    the exported program, a whole generation equal to the eager variants."""
    out = _python(
        """
        import copy, torch
        from torch._dynamo.utils import counters
        import models, smoothcache_fx
        from helpers import tiny_call, run_steps
        from smoothcache_fx import Schedule

        torch.manual_seed(0)
        original = models.TinyDiT(depth=2)
        schedule = Schedule.uniform(4, 2, ["attn", "mlp"])
        variants = smoothcache_fx.transform(copy.deepcopy(original), schedule)
        graph = smoothcache_fx.transform(copy.deepcopy(original), schedule, form="graph")
        expected = run_steps(variants, tiny_call, 4)
        run_steps(graph, tiny_call, 1)
        graph.smoothcache.reset()
        x, y = models.tiny_dit_inputs(2)
        with torch.no_grad():
            program = torch.export.export(graph, (x, torch.tensor([1, 1]), y), strict=False)
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any("gated_residual_add_and_cache" in t for t in targets), targets
        compiled = torch.compile(graph, fullgraph=True)
        got = run_steps(compiled, tiny_call, 4)
        assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
        for want, have in zip(expected, got, strict=True):
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_demo_job_runs_without_triton(tmp_path):
    """The README's main job at reduced size, compiled, in a process without triton."""
    command = "from smoothcache_fx.cli import main; raise SystemExit(main())"
    args = [
        "demo",
        "--steps",
        "10",
        "--per-class",
        "1",
        "--quality-per-class",
        "2",
        "--repeats",
        "1",
        "--no-progress",
    ]
    result = _run([sys.executable, "-c", command, *args, "--out", str(tmp_path / "demo")], timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    table = result.stdout
    for row in ("eager", "eager + SmoothCache", "compiled", "compiled + SmoothCache"):
        assert re.search(rf"^{re.escape(row)} +\d+ms +\d+\.\d+x$", table, re.MULTILINE), table
    assert re.search(r"^achieved speedup \d+\.\d+x of ideal \d+\.\d+x", table, re.MULTILINE), table
    assert re.search(r"^over 20 samples: PSNR cached vs uncached \d+\.\d dB", table, re.MULTILINE), table
    assert "FutureWarning" not in result.stderr, result.stderr[-2000:]


def test_import_prints_nothing_without_triton():
    """torch logs "Triton not available" for a triton_op registered without triton; the kernels
    module registers its ops with that warning silenced, since the reference path is then used."""
    result = _run([sys.executable, "-c", "import smoothcache_fx"], timeout=300)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stderr


def test_both_ops_export_and_compile_without_triton():
    """A compute site and a reuse site: torch.export keeps both ops (with the cache write as the
    program's only mutation), and inductor compiles them with no graph break, equal to eager."""
    out = _python(
        """
        import torch
        from torch._dynamo.utils import counters
        import smoothcache_fx.kernels  # registers the ops
        ops = torch.ops.smoothcache_fx

        class Step(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("cache", torch.zeros(2, 5, 8))
                self.register_buffer("held", torch.randn(2, 5, 8))

            def forward(self, residual, branch, gate):
                x = ops.gated_residual_add_and_cache(residual, branch, gate, self.cache)
                return ops.gated_residual_add(x, self.held, gate)

        residual, branch, gate = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 1, 8)
        eager = Step()
        want = eager(residual, branch, gate)
        program = torch.export.export(Step(), (residual, branch, gate), strict=False).run_decompositions({})
        text = str(program.graph)
        assert "gated_residual_add_and_cache" in text and "gated_residual_add.default" in text, text
        mutated = [s.target for s in program.graph_signature.output_specs if s.kind.name == "BUFFER_MUTATION"]
        assert mutated == ["cache"], mutated
        exported = program.module()
        exported.held.copy_(eager.held)
        assert torch.equal(exported(residual, branch, gate), want)
        assert torch.equal(exported.cache, branch)
        compiled_step = Step()
        compiled_step.held.copy_(eager.held)
        compiled = torch.compile(compiled_step, fullgraph=True, backend="inductor")
        torch.testing.assert_close(compiled(residual, branch, gate), want, rtol=1e-6, atol=1e-6)
        assert torch.equal(compiled_step.cache, branch) and not counters["graph_break"]
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_forecast_ops_export_and_compile_without_triton():
    """The forecast form: a compute site shifting its history and a forecast site, exported (the
    history shift as the program's only mutation) and compiled with inductor, equal to eager."""
    out = _python(
        """
        import torch
        from torch._dynamo.utils import counters
        import smoothcache_fx.kernels  # registers the ops
        ops = torch.ops.smoothcache_fx

        class Step(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("history", torch.randn(2, 2, 5, 8))
                self.register_buffer("other", torch.randn(3, 2, 5, 8))

            def forward(self, residual, branch, gate, weights):
                x = ops.gated_residual_add_and_history(residual, branch, gate, self.history)
                return ops.gated_residual_forecast(x, self.other, weights, gate)

        args = (torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 1, 8), torch.tensor([1.0, -3.0, 3.0]))
        eager = Step()
        start = eager.history.clone()
        want = eager(*args)
        program = torch.export.export(Step(), args, strict=False).run_decompositions({})
        text = str(program.graph)
        assert "gated_residual_add_and_history" in text and "gated_residual_forecast" in text, text
        mutated = [s.target for s in program.graph_signature.output_specs if s.kind.name == "BUFFER_MUTATION"]
        assert mutated == ["history"], mutated
        step = Step()
        step.history.copy_(start)
        step.other.copy_(eager.other)
        compiled = torch.compile(step, fullgraph=True, backend="inductor")
        torch.testing.assert_close(compiled(*args), want, rtol=1e-6, atol=1e-6)
        assert torch.equal(step.history, eager.history) and not counters["graph_break"]
        print("ok")
        """
    )
    assert out.strip() == "ok"
