"""The forecast form of the fused op: Triton kernel vs its reference and vs an fp64 oracle written
here, the op's CPU path, validation, opcheck and fullgraph compile.

Without a GPU the kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from smoothcache_fx.kernels import (
    gated_residual_add_and_history,
    gated_residual_add_and_history_reference,
    gated_residual_forecast,
    gated_residual_forecast_reference,
    gated_residual_history_triton,
)

KERNEL_MODULE = importlib.import_module("smoothcache_fx.kernels.gated_residual_add")
FORECAST_OP = torch.ops.smoothcache_fx.gated_residual_forecast
AND_HISTORY_OP = torch.ops.smoothcache_fx.gated_residual_add_and_history
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_kernel = pytest.mark.skipif(
    not KERNEL_MODULE.HAS_TRITON or not (HAS_CUDA or KERNEL_MODULE.TRITON_INTERPRET),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1 set before smoothcache_fx.kernels is imported",
)

# Kernel vs the fp64 oracle rounded like the reference (prediction rounded once to the dtype): the
# kernel's fp32 sums differ from fp64 by a few fp32 ulps, and the prediction's rounding to fp16/bf16
# may land one ulp apart (then scaled by the gate, |gate| < ~4 for unit normals).
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-2, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.5e-1, "rtol": 1.6e-2},
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [((1, 1, 1), None), ((3, 17, 33), (3, 1, 33)), ((2, 65, 1152), (1152,)), ((5, 33), (5, 33))]
WEIGHTS = {1: [1.0], 2: [-0.5, 1.5], 3: [1.0, -3.0, 3.0]}


def _inputs(shape, gate_shape, slots, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    residual = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    branch = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    history = torch.randn((slots, *shape), generator=generator).to(DEVICE, dtype)
    gate = None if gate_shape is None else torch.randn(gate_shape, generator=generator).to(DEVICE, dtype)
    weights = torch.tensor(WEIGHTS[slots], dtype=torch.float32, device=DEVICE)
    return residual, branch, gate, history, weights


def _oracle_forecast(residual, history, weights, gate):
    """fp64 sum of the weighted history, rounded to the dtype once (as the op specifies), then the
    gated add in fp64 and one more rounding."""
    prediction = sum(float(w) * history[i].double() for i, w in enumerate(weights)).to(residual.dtype)
    update = prediction.double() if gate is None else gate.double() * prediction.double()
    return (residual.double() + update).to(residual.dtype)


def _case_id(case):
    shape, gate = case
    return f"{'x'.join(map(str, shape))}-gate{'x'.join(map(str, gate)) if gate else 'None'}"


@requires_kernel
@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SHAPES, ids=_case_id)
def test_kernel_forecast_matches_oracle_and_reference(case, dtype, slots):
    residual, _, gate, history, weights = _inputs(*case, slots, dtype)
    before = history.clone()
    out = gated_residual_history_triton(residual, None, gate, history, weights)
    assert out.shape == residual.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, _oracle_forecast(residual, history, weights, gate), **TOLERANCES[dtype])
    reference = gated_residual_forecast_reference(residual, history, weights, gate)
    torch.testing.assert_close(out, reference, **TOLERANCES[dtype])
    assert torch.equal(history, before), "the forecast path must not write the history"


@requires_kernel
@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SHAPES, ids=_case_id)
def test_kernel_compute_path_shifts_history(case, dtype, slots):
    residual, branch, gate, history, _ = _inputs(*case, slots, dtype)
    expected_history = torch.cat([history[1:], branch.unsqueeze(0)])
    out = gated_residual_history_triton(residual, branch, gate, history)
    exact = (residual.double() + (branch.double() if gate is None else gate.double() * branch.double())).to(
        dtype
    )
    torch.testing.assert_close(out, exact, **TOLERANCES[dtype])
    assert torch.equal(history, expected_history), "slot i takes slot i+1, the newest slot the branch"


@requires_kernel
def test_kernel_reads_non_contiguous_residual_and_branch():
    residual, branch, gate, history, weights = _inputs((3, 7, 40), (3, 1, 40), 2, torch.float32)
    transposed = residual.transpose(0, 1).contiguous().transpose(0, 1)
    strided_branch = torch.randn(3, 7, 80, device=DEVICE)[..., ::2]
    out = gated_residual_history_triton(transposed, None, gate, history, weights)
    torch.testing.assert_close(out, gated_residual_forecast_reference(residual, history, weights, gate))
    shifted = torch.stack([history[1], strided_branch])
    out = gated_residual_history_triton(transposed, strided_branch, gate, history)
    torch.testing.assert_close(out, residual + gate * strided_branch)
    assert torch.equal(history, shifted)


def test_order_0_forecast_is_exactly_reuse():
    residual, _, gate, history, _ = _inputs((2, 5, 8), (2, 1, 8), 1, torch.float32)
    out = gated_residual_forecast(residual, history, torch.ones(1, device=DEVICE), gate)
    assert torch.equal(out, residual + gate * history[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_against_oracle(dtype):
    residual, _, gate, history, weights = _inputs((2, 9, 24), (2, 1, 24), 3, dtype)
    out = gated_residual_forecast_reference(residual, history, weights, gate)
    # The reference rounds gate * prediction to the dtype before the add (eager's two roundings).
    loose = {"atol": TOLERANCES[dtype]["atol"] * 4, "rtol": TOLERANCES[dtype]["rtol"] * 2}
    torch.testing.assert_close(out, _oracle_forecast(residual, history, weights, gate), **loose)


def test_ops_on_cpu_are_the_reference():
    residual, branch, gate, history, weights = _inputs((2, 5, 8), (2, 1, 8), 3, torch.float32)
    assert torch.equal(
        gated_residual_forecast(residual.cpu(), history.cpu(), weights.cpu(), gate.cpu()),
        gated_residual_forecast_reference(residual.cpu(), history.cpu(), weights.cpu(), gate.cpu()),
    )
    h1, h2 = history.cpu().clone(), history.cpu().clone()
    a = gated_residual_add_and_history(residual.cpu(), branch.cpu(), gate.cpu(), h1)
    b = gated_residual_add_and_history_reference(residual.cpu(), branch.cpu(), gate.cpu(), h2)
    assert torch.equal(a, b) and torch.equal(h1, h2)


@pytest.mark.parametrize("gate_shape", [None, (2, 1, 8)])
def test_opcheck_cpu(gate_shape):
    residual, branch, gate, history, weights = _inputs((2, 5, 8), gate_shape, 2, torch.float32)
    residual, branch, history, weights = residual.cpu(), branch.cpu(), history.cpu(), weights.cpu()
    gate = None if gate is None else gate.cpu()
    torch.library.opcheck(FORECAST_OP, (residual, history, weights, gate))
    torch.library.opcheck(AND_HISTORY_OP, (residual, branch, gate, history))


def _step(x, branch, gate, history, other, weights):
    """A compiled step: one branch computed into its history, another forecast from its own."""
    x = gated_residual_add_and_history(x, branch, gate, history)
    return gated_residual_forecast(x, other, weights, gate) * 2


def test_compile_fullgraph_cpu_shifts_history_and_forecasts():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    residual, branch, gate, history, weights = [
        t.cpu() for t in _inputs((2, 9, 24), (2, 1, 24), 2, torch.float32)
    ]
    other = torch.randn(2, 2, 9, 24)
    expected_history = torch.stack([history[1], branch])
    expected = _step(residual, branch, gate, history.clone(), other, weights)

    out = torch.compile(_step, fullgraph=True, backend="inductor")(
        residual, branch, gate, history, other, weights
    )

    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch.equal(history, expected_history), "the compiled call must shift the history"
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda r, h, w: (r, h[:, :1], w), ValueError, r"history must be \[k \+ 1, \*residual.shape\]"),
        (lambda r, h, w: (r, h.double(), w), TypeError, "history must have residual's dtype"),
        (lambda r, h, w: (r, h.transpose(1, 2).contiguous().transpose(1, 2), w), ValueError, "contiguous"),
        (lambda r, h, w: (r, h, w.double()), ValueError, r"weights must be a float32 tensor \[2\]"),
        (lambda r, h, w: (r, h, w[:1]), ValueError, r"weights must be a float32 tensor \[2\]"),
    ],
)
def test_validation_errors(make, error, match):
    residual, _, _, history, weights = _inputs((2, 5, 8), None, 2, torch.float32)
    with pytest.raises(error, match=match):
        gated_residual_forecast(*make(residual.cpu(), history.cpu(), weights.cpu()))
