"""The gated residual add: Triton kernel vs its reference, the op's CPU path, validation, compile.

Without a GPU the kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before anything imports triton); with one, the same tests run the compiled kernel on CUDA.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from smoothcache_fx.kernels import (
    gated_residual_add,
    gated_residual_add_and_cache,
    gated_residual_add_decomposed,
    gated_residual_add_reference,
    gated_residual_add_triton,
)

# `smoothcache_fx.kernels.gated_residual_add` as an attribute is the op; the module is in sys.modules.
KERNEL_MODULE = importlib.import_module("smoothcache_fx.kernels.gated_residual_add")
OP = torch.ops.smoothcache_fx.gated_residual_add
AND_CACHE_OP = torch.ops.smoothcache_fx.gated_residual_add_and_cache
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

requires_kernel = pytest.mark.skipif(
    not KERNEL_MODULE.HAS_TRITON or not (HAS_CUDA or KERNEL_MODULE.TRITON_INTERPRET),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1 set before smoothcache_fx.kernels is imported",
)
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# Kernel vs the exact result (fp64, rounded once): within 1 ulp. 1 ulp is at most 2**-10 relative
# for fp16 and 2**-7 for bf16; the interpreter truncates fp32 -> bf16 instead of rounding to nearest
# (triton/runtime/interpreter.py cast_impl passes no rounding mode), which stays within that ulp.
EXACT_TOLERANCES = {
    torch.float32: {"atol": 1e-6, "rtol": 1e-6},
    torch.float16: {"atol": 1e-5, "rtol": 1e-3},
    torch.bfloat16: {"atol": 1e-5, "rtol": 8e-3},
}
# Kernel vs eager `residual + gate * branch`: eager also rounds the product to the dtype, which adds
# half an ulp of |gate * branch| (up to ~16 for unit normals) on top of the output's ulp.
EAGER_TOLERANCES = {
    torch.float32: {"atol": 1e-6, "rtol": 1e-6},
    torch.float16: {"atol": 1e-2, "rtol": 1e-3},
    torch.bfloat16: {"atol": 6e-2, "rtol": 8e-3},
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (residual shape, gate shape or None): every gate layout real DiTs produce, on odd sizes.
GATE_CASES = [
    (shape, gate)
    for shape in [(1, 1, 1), (3, 17, 33), (2, 257, 1152)]
    for gate in [None, (shape[0], 1, shape[2]), (1, 1, shape[2]), (shape[2],)]
] + [(shape, gate) for shape in [(1, 1), (5, 33), (16, 1152)] for gate in [None, shape, (shape[1],)]]


def _case_id(case):
    shape, gate = case
    return f"{'x'.join(map(str, shape))}-gate{'x'.join(map(str, gate)) if gate else 'None'}"


def _inputs(shape, gate_shape, dtype, device=DEVICE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    residual = torch.randn(shape, generator=generator).to(device, dtype)
    branch = torch.randn(shape, generator=generator).to(device, dtype)
    gate = None if gate_shape is None else torch.randn(gate_shape, generator=generator).to(device, dtype)
    return residual, branch, gate


def _eager(residual, branch, gate):
    return residual + (branch if gate is None else gate * branch)


def _exact(residual, branch, gate):
    update = branch.double() if gate is None else gate.double() * branch.double()
    return (residual.double() + update).to(residual.dtype)


def _fused(residual, branch, gate=None, cache=None):
    """The op a rewritten site runs: the cache-writing op where a cache is given, else the pure one."""
    if cache is None:
        return OP(residual, branch, gate)
    return AND_CACHE_OP(residual, branch, gate, cache)


def _assert_fresh(out, *inputs):
    pointers = {t.data_ptr() for t in inputs if t is not None}
    assert out.data_ptr() not in pointers, "out must not alias an input"


@requires_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GATE_CASES, ids=_case_id)
def test_kernel_matches_reference_and_writes_cache(case, dtype):
    shape, gate_shape = case
    residual, branch, gate = _inputs(shape, gate_shape, dtype)
    cache = torch.full_like(branch, float("nan"))

    out = gated_residual_add_triton(residual, branch, gate, cache)

    assert out.shape == residual.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, _exact(residual, branch, gate), **EXACT_TOLERANCES[dtype])
    torch.testing.assert_close(out, _eager(residual, branch, gate), **EAGER_TOLERANCES[dtype])
    assert torch.equal(cache, branch), "cache must hold exactly branch"
    _assert_fresh(out, residual, branch, gate, cache)


@requires_kernel
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 17, 33), (5, 33)], ids=str)
def test_kernel_without_cache_and_reuse_path(shape):
    residual, branch, gate = _inputs(shape, (shape[-1],), torch.float32)
    cache = branch.clone()

    computed = gated_residual_add_triton(residual, branch, gate)
    reused = gated_residual_add_triton(residual, cache, gate)  # what a cached step runs

    torch.testing.assert_close(computed, _eager(residual, branch, gate), **EXACT_TOLERANCES[torch.float32])
    assert torch.equal(computed, reused)
    assert torch.equal(cache, branch), "the reuse path must not write its input"


@requires_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_non_contiguous_inputs_and_cache(dtype):
    batch, tokens, dim = 3, 19, 40
    generator = torch.Generator().manual_seed(1)

    def randn(*size):
        return torch.randn(*size, generator=generator).to(DEVICE, dtype)

    residual = randn(batch, dim, tokens).transpose(1, 2)  # transposed
    branch = randn(batch, tokens, 2 * dim)[..., ::2]  # strided along D
    gate = randn(batch, 6 * dim).chunk(6, dim=1)[2].unsqueeze(1)  # an adaLN chunk, [B, 1, D]
    buffer = torch.zeros(batch, tokens + 3, dim, device=DEVICE, dtype=dtype)
    cache = buffer[:, 1 : tokens + 1]  # a non-contiguous view of a bigger buffer
    assert not any(t.is_contiguous() for t in (residual, branch, gate, cache))

    out = gated_residual_add_triton(residual, branch, gate, cache)

    torch.testing.assert_close(out, _exact(residual, branch, gate), **EXACT_TOLERANCES[dtype])
    assert torch.equal(cache, branch), "a strided cache must be written in place"
    assert not buffer[:, 0].any() and not buffer[:, tokens + 1 :].any(), "writes must stay in the view"
    _assert_fresh(out, residual, branch, gate, cache)


@requires_kernel
def test_kernel_non_contiguous_2d():
    residual = torch.randn(33, 5).to(DEVICE).t()
    branch = torch.randn(5, 66).to(DEVICE)[:, 1::2]
    gate = torch.randn(5, 99).to(DEVICE)[:, :33]
    cache = torch.empty(33, 5, device=DEVICE).t()

    out = gated_residual_add_triton(residual, branch, gate, cache)

    torch.testing.assert_close(out, _eager(residual, branch, gate), **EXACT_TOLERANCES[torch.float32])
    assert torch.equal(cache, branch)


@requires_kernel
def test_kernel_empty_input():
    residual = torch.empty(2, 0, 8, device=DEVICE)
    out = gated_residual_add_triton(residual, torch.empty_like(residual), None, torch.empty_like(residual))
    assert out.shape == (2, 0, 8)


@requires_kernel
@pytest.mark.skipif(
    os.environ.get("CI") == "true" and not HAS_CUDA,
    reason="25M elements take ~10 s in the Triton interpreter (numpy, ~0.3 us/element); run it locally",
)
def test_kernel_dit_sized_input():
    residual, branch, gate = _inputs((2, 4096, 3072), (2, 1, 3072), torch.float16)
    cache = torch.empty_like(branch)
    out = gated_residual_add_triton(residual, branch, gate, cache)
    torch.testing.assert_close(out, _exact(residual, branch, gate), **EXACT_TOLERANCES[torch.float16])
    assert torch.equal(cache, branch)


@requires_kernel
def test_kernel_rejects_fp64():
    residual = torch.randn(2, 3, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="for the Triton kernel"):
        gated_residual_add_triton(residual, residual.clone())


@pytest.mark.skipif(HAS_CUDA or not KERNEL_MODULE.HAS_TRITON, reason="CPU-only, with triton installed")
def test_kernel_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setattr(KERNEL_MODULE, "TRITON_INTERPRET", False)
    residual = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        gated_residual_add_triton(residual, residual.clone())


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("case", GATE_CASES[:8] + GATE_CASES[-3:], ids=_case_id)
def test_op_on_cpu_is_bit_identical_to_eager(case, dtype):
    shape, gate_shape = case
    residual, branch, gate = _inputs(shape, gate_shape, dtype, device="cpu")
    cache = torch.empty_like(branch)

    out = AND_CACHE_OP(residual, branch, gate, cache)

    assert torch.equal(out, _eager(residual, branch, gate))
    assert torch.equal(cache, branch)
    _assert_fresh(out, residual, branch, gate, cache)
    assert torch.equal(gated_residual_add(residual, cache, gate), out), "reuse path"
    assert torch.equal(gated_residual_add_reference(residual, branch, gate), out)


def test_op_and_reference_return_contiguous_results_for_a_transposed_residual():
    """As the Triton kernel: a transposed residual (a DiT's patch embedding output) must not hand
    its layout to every later block."""
    residual = torch.randn(2, 16, 7).transpose(1, 2)
    branch, gate = torch.randn(2, 7, 16), torch.randn(2, 1, 16)
    for out in (
        AND_CACHE_OP(residual, branch, gate, torch.empty_like(branch)),
        OP(residual, branch, gate),
        gated_residual_add_reference(residual, branch, gate),
    ):
        assert out.is_contiguous()
        assert torch.equal(out, residual + gate * branch)


def test_decomposed_matches_reference():
    residual, branch, gate = _inputs((2, 7, 16), (2, 1, 16), torch.float32, device="cpu")
    cache = torch.zeros_like(branch)
    out = gated_residual_add_decomposed(residual, branch, gate, cache)
    assert torch.equal(out, _eager(residual, branch, gate)) and torch.equal(cache, branch)


@pytest.mark.parametrize(
    "gate_shape, with_cache, shape",
    [
        ((2, 1, 8), True, (2, 5, 8)),
        (None, False, (2, 5, 8)),
        ((8,), False, (2, 5, 8)),
        ((3, 8), True, (3, 8)),
    ],
)
def test_opcheck_cpu(gate_shape, with_cache, shape):
    residual, branch, gate = _inputs(shape, gate_shape, torch.float32, device="cpu")
    if with_cache:
        torch.library.opcheck(AND_CACHE_OP, (residual, branch, gate, torch.zeros_like(branch)))
    else:
        torch.library.opcheck(OP, (residual, branch, gate))


def _block(x, branch, gate, cache, reuse_cache):
    """A compiled step: one computed branch writing its cache, one reused branch reading another."""
    x = gated_residual_add_and_cache(x, branch, gate, cache)
    return gated_residual_add(x, reuse_cache, gate) * 2


def test_compile_fullgraph_cpu_writes_cache():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    residual, branch, gate = _inputs((2, 9, 24), (2, 1, 24), torch.float32, device="cpu")
    reuse_cache = torch.randn(2, 9, 24)
    cache = torch.zeros_like(branch)

    compiled = torch.compile(_block, fullgraph=True, backend="inductor")
    out = compiled(residual, branch, gate, cache, reuse_cache)

    assert not torch._dynamo.utils.counters["graph_break"], "the op must not break the graph"
    assert torch.equal(cache, branch), "the compiled call must write the cache buffer"
    expected = _block(residual, branch, gate, torch.empty_like(cache), reuse_cache)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


# Each validation case builds (residual, branch, gate, cache) on CPU and names the error to expect.
def _mismatched_devices():
    residual = torch.randn(2, 5, 8)
    return residual, residual.clone(), None, torch.empty(2, 5, 8, device="meta")


VALIDATION_CASES = {
    "branch-shape": (
        lambda: (torch.randn(2, 5, 8), torch.randn(2, 5, 9), None, None),
        ValueError,
        "branch must have residual's shape",
    ),
    "gate-not-broadcastable": (
        lambda: (torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(3, 1, 8), None),
        ValueError,
        "gate must broadcast",
    ),
    "gate-bd-on-3d": (
        lambda: (torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 8), None),
        ValueError,
        r"unsqueeze a \[B, D\] gate",
    ),
    "branch-dtype": (
        lambda: (torch.randn(2, 5, 8), torch.randn(2, 5, 8, dtype=torch.float16), None, None),
        TypeError,
        "branch must have residual's dtype",
    ),
    "cache-dtype": (
        lambda: (
            torch.randn(2, 5, 8),
            torch.randn(2, 5, 8),
            None,
            torch.empty(2, 5, 8, dtype=torch.bfloat16),
        ),
        TypeError,
        "cache must have branch's dtype",
    ),
    "gate-promotes": (
        lambda: (
            torch.randn(2, 5, 8, dtype=torch.bfloat16),
            torch.randn(2, 5, 8, dtype=torch.bfloat16),
            torch.randn(2, 1, 8),
            None,
        ),
        TypeError,
        "Cast the gate",
    ),
    "cache-shape": (
        lambda: (torch.randn(2, 5, 8), torch.randn(2, 5, 8), None, torch.empty(2, 6, 8)),
        ValueError,
        "cache must have branch's shape",
    ),
    "devices": (_mismatched_devices, ValueError, "must be on residual's device"),
    "rank": (
        lambda: (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), None, None),
        NotImplementedError,
        "2-D",
    ),
}


def _run_fake(*args):
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fakes = [None if t is None else mode.from_tensor(t) for t in args]
        return _fused(*fakes)


PATHS = {
    "op": _fused,
    "fake": _run_fake,
    "triton": pytest.param(
        gated_residual_add_triton,
        marks=pytest.mark.skipif(not KERNEL_MODULE.HAS_TRITON, reason="needs triton"),
    ),
}


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("name", VALIDATION_CASES)
def test_validation_errors(name, path):
    make, error, message = VALIDATION_CASES[name]
    with pytest.raises(error, match=message):
        path(*make())


def test_module_imports_and_op_works_without_triton():
    """Simulate a machine without triton: the import, the op, opcheck and the launcher's error."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # importlib.util.find_spec("triton") now returns None
        import importlib
        import torch
        import smoothcache_fx.kernels
        module = importlib.import_module("smoothcache_fx.kernels.gated_residual_add")
        assert not module.HAS_TRITON
        op = torch.ops.smoothcache_fx.gated_residual_add_and_cache
        residual, branch, gate = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 1, 8)
        cache = torch.zeros_like(branch)
        assert torch.equal(op(residual, branch, gate, cache), residual + gate * branch)
        assert torch.equal(cache, branch)
        torch.library.opcheck(op, (residual, branch, gate, cache))
        reuse = torch.ops.smoothcache_fx.gated_residual_add
        assert torch.equal(reuse(residual, cache, gate), residual + gate * branch)
        torch.library.opcheck(reuse, (residual, cache, gate))
        try:
            smoothcache_fx.kernels.gated_residual_add_triton(residual, branch)
        except ModuleNotFoundError as error:
            assert "pip install triton" in str(error)
        else:
            raise AssertionError("gated_residual_add_triton must say triton is missing")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.skipif(not KERNEL_MODULE.HAS_TRITON, reason="needs triton")
def test_cuda_path_traces_to_the_kernel_without_a_gpu():
    """What torch.compile sees on CUDA, checked on any machine: fake CUDA tensors, a stand-in driver.

    AOT export functionalizes the op into Triton's kernel HOP; the kernel must be compiled (not
    interpreted), hence the subprocess without TRITON_INTERPRET. The stand-in driver only names a
    target (sm_90) so Triton can lower the kernel to TTIR for the mutation analysis: it must find
    that only `out` and `cache` are written, or functionalization would clone read-only inputs.
    """
    script = textwrap.dedent(
        """
        import torch, triton
        from triton.backends.compiler import GPUTarget
        from torch._functorch.aot_autograd import aot_export_module
        from torch._subclasses.fake_tensor import FakeTensorMode

        class TargetOnlyDriver:
            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)

        triton.runtime.driver.set_active(TargetOnlyDriver())
        import smoothcache_fx.kernels

        class Compute(torch.nn.Module):
            def forward(self, residual, branch, gate, cache):
                return (torch.ops.smoothcache_fx.gated_residual_add_and_cache(residual, branch, gate, cache),)

        class Reuse(torch.nn.Module):
            def forward(self, residual, cache, gate):
                return (torch.ops.smoothcache_fx.gated_residual_add(residual, cache, gate),)

        for with_cache in (True, False):
            with FakeTensorMode():
                empty = lambda *shape: torch.empty(*shape, device="cuda", dtype=torch.float16)
                args = (empty(2, 5, 8), empty(2, 5, 8), empty(2, 1, 8))
                step = Compute() if with_cache else Reuse()
                graph, _ = aot_export_module(step, args + ((empty(2, 5, 8),) if with_cache else ()), trace_joint=False)
            hops = [n for n in graph.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
            assert len(hops) == 1, graph.code
            expected = ["out_ptr", "cache_ptr"] if with_cache else ["out_ptr"]
            assert hops[0].kwargs["tensors_to_clone"] == expected, hops[0].kwargs["tensors_to_clone"]
        print("ok")
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.skipif(not KERNEL_MODULE.HAS_TRITON, reason="needs triton")
def test_kernel_compiles_to_vectorized_ptx_without_a_gpu():
    """The interpreter runs numpy and forgives what the real compiler rejects: lower the kernel to
    PTX for sm_90 (the triton wheel bundles ptxas) in every constexpr combination, and check that
    contiguous fp16 rows load and store 128 bits at a time, with the specialisation Triton's launcher
    applies to a [2, 256, 1152] contiguous input (16-aligned pointers, D % 16 == 0, unit D strides).
    """
    script = textwrap.dedent(
        """
        import importlib, itertools, re
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = importlib.import_module("smoothcache_fx.kernels.gated_residual_add")._gated_residual_add_kernel.fn
        names = list(fn.arg_names)
        pointers, ints = names[:5], names[5:20]
        unit = ["stride_rd", "stride_bd", "stride_gd", "stride_cd"]
        aligned = pointers + ["n_cols", "stride_rb", "stride_rn", "stride_bb", "stride_bn", "stride_gb", "stride_gn", "stride_cb", "stride_cn"]
        for has_gate, write_cache, contiguous in itertools.product((True, False), repeat=3):
            values = {"HAS_GATE": has_gate, "WRITE_CACHE": write_cache, "CONTIGUOUS": contiguous,
                      "BLOCK_ROWS": 8, "BLOCK_COLS": 512, **dict.fromkeys(unit, 1)}
            signature = {**dict.fromkeys(pointers, "*fp16"), **dict.fromkeys(ints, "i32"),
                         **dict.fromkeys(values, "constexpr")}
            source = ASTSource(
                fn, signature=signature,
                constexprs={(names.index(k),): v for k, v in values.items()},
                attrs={(names.index(k),): [["tt.divisibility", 16]] for k in aligned},
            )
            ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
            loads = re.findall(r"ld\\.global\\S*", ptx)
            stores = re.findall(r"st\\.global\\S*", ptx)
            assert loads and all(op.endswith(".v4.b32") for op in loads + stores), (loads, stores)
        print("ok")
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_op_launches_kernel(dtype):
    residual, branch, gate = _inputs((2, 257, 1152), (2, 1, 1152), dtype, device="cuda")
    cache = torch.empty_like(branch)
    out = AND_CACHE_OP(residual, branch, gate, cache)
    assert torch.equal(out, gated_residual_add_triton(residual, branch, gate)), "the op must run the kernel"
    assert torch.equal(OP(residual, cache, gate), out), "the reuse op must run the kernel too"
    torch.testing.assert_close(out, _eager(residual, branch, gate), **EAGER_TOLERANCES[dtype])
    assert torch.equal(cache, branch)


@requires_cuda
def test_cuda_compile_emits_triton_kernel():
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    residual, branch, gate = _inputs((2, 64, 256), (2, 1, 256), torch.float16, device="cuda")
    cache = torch.empty_like(branch)
    compiled = torch.compile(_block, fullgraph=True)
    out, code = run_and_get_code(compiled, residual, branch, gate, cache, branch.clone())
    torch.testing.FileCheck().check("_gated_residual_add_kernel").run("\n".join(code))
    assert torch.equal(cache, branch)
    expected = _block(residual, branch, gate, torch.empty_like(cache), branch)
    torch.testing.assert_close(out, expected, **EAGER_TOLERANCES[torch.float16])


@requires_cuda
def test_cuda_graph_capture_reduce_overhead():
    torch._dynamo.reset()
    residual, branch, gate = _inputs((2, 64, 256), (2, 1, 256), torch.bfloat16, device="cuda")
    cache = torch.zeros_like(branch)
    reuse_cache = torch.randn_like(branch)
    compiled = torch.compile(_block, fullgraph=True, mode="reduce-overhead")
    for step in range(3):  # warm-up, record, replay
        branch.normal_(generator=None)
        out = compiled(residual, branch, gate, cache, reuse_cache).clone()
        assert torch.equal(cache, branch), f"step {step}: cache not written under CUDA graphs"
        expected = _block(residual, branch, gate, torch.empty_like(cache), reuse_cache)
        torch.testing.assert_close(out, expected, **EAGER_TOLERANCES[torch.bfloat16])
