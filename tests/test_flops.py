"""smoothcache_fx.flops: one FLOP count, attention included on CPU, that profile and calibrate share.

Hand computations: a linear of `rows` inputs costs 2 * rows * fan_in * fan_out (one multiply and one
add per weight and row); scaled dot-product attention costs its two matmuls, QK^T and PV, each
2 * batch * heads * queries * keys * head_dim, so 4 * B * H * N * N * d for self-attention.
"""

from __future__ import annotations

import models
import pytest
import torch
import torch.nn.functional as F

import smoothcache_fx
from smoothcache_fx import Schedule
from smoothcache_fx.flops import flop_counter

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 2
HEADS = models.HEADS
DIM = models.HIDDEN
HEAD_DIM = DIM // HEADS
STEPS = 4
# TinyDiT at 256 tokens: attention is about half of each call's FLOPs (16 tokens: under a tenth), so
# a count that left it out would be far from the one below.
LONG = 256


def _linear(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def _attention(batch: int, heads: int, queries: int, keys: int, head_dim: int) -> int:
    return 4 * batch * heads * queries * keys * head_dim


@pytest.mark.parametrize(
    ("queries", "keys", "kv_heads"),
    [(16, 16, HEADS), (7, 33, HEADS), (5, 9, 1)],
    ids=["self", "cross-odd-lengths", "grouped-query"],
)
def test_cpu_attention_counts_qkt_and_pv(queries, keys, kv_heads):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, HEADS, queries, HEAD_DIM, generator=g)
    k = torch.randn(BATCH, kv_heads, keys, HEAD_DIM, generator=g)
    v = torch.randn(BATCH, kv_heads, keys, HEAD_DIM, generator=g)
    with flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != HEADS)
    # grouped-query attention broadcasts the key/value heads: each query head does the full work
    assert counter.get_total_flops() == _attention(BATCH, HEADS, queries, keys, HEAD_DIM)


def test_attention_module_counts_projections_and_attention():
    torch.manual_seed(0)
    attention = models.Attention(DIM, HEADS).eval()
    x = torch.randn(BATCH, models.TOKENS, DIM)
    with torch.no_grad(), flop_counter() as counter:
        attention(x)
    rows = BATCH * models.TOKENS
    want = (
        _linear(rows, DIM, 3 * DIM)  # qkv
        + _attention(BATCH, HEADS, models.TOKENS, models.TOKENS, HEAD_DIM)
        + _linear(rows, DIM, DIM)  # proj
    )
    assert counter.get_total_flops() == want


def _long_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, LONG, DIM, generator=g), torch.arange(BATCH) % 10


def _generation(model) -> None:
    """One generation: STEPS calls with a decreasing timestep (calibrate's generation rule)."""
    x, y = _long_inputs()
    with torch.no_grad():
        for step in range(STEPS):
            model(x, torch.full((BATCH,), 999 - 250 * step), y)


def test_profile_and_calibrate_count_the_same_flops():
    torch.manual_seed(0)
    model = models.TinyDiT()
    x, y = _long_inputs()
    with torch.no_grad(), flop_counter() as counter:
        model(x, torch.full((BATCH,), 999), y)
    one_call = counter.get_total_flops()
    attention = len(model.blocks) * _attention(BATCH, HEADS, LONG, LONG, HEAD_DIM)
    assert attention > 0.4 * one_call  # a count without attention would be off by that much

    errors = smoothcache_fx.calibrate(model, lambda: _generation(model), lookahead=1, progress=False)
    assert errors.total_flops == one_call
    schedule = Schedule.from_dict({"attn": [1, 0, 1, 0], "mlp": [1, 0, 0, 0]})
    model = smoothcache_fx.transform(model, schedule)
    report = smoothcache_fx.profile(model, lambda: _generation(model), branches=False)

    assert report.steps[0].flops == one_call  # step 0 computes every branch
    assert report.all_compute_flops == STEPS * one_call
    # Calibrate prices a schedule from its per-branch FLOPs; profile counts the cached run. They
    # differ only by the pass narrowing each block's modulation linear to the chunks a step still
    # reads (a reused branch's shift and scale: 2 * 2 * BATCH * DIM * DIM each, 0.08% here), which
    # calibrate does not attribute to branches. Without attention they would differ by ~40%.
    priced = STEPS * errors.remainder_flops + sum(
        flops * sum(schedule.mask_for(path)) for path, flops in errors.flops.items()
    )
    assert priced * (1 - 1e-3) < report.flops <= priced
    assert report.ideal_speedup == pytest.approx(errors.ideal_speedup(schedule), rel=1e-3)
