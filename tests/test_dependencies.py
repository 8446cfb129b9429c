"""What a capture depends on besides its call: train/eval, submodules, processors, PEFT adapters.

Each change between generations makes the transformed model capture its blocks again, once, with
one log line, and then equal a fresh transform of the changed model. Each test also checks that
the change matters to the untransformed model (otherwise an ignored change would pass).
"""

from __future__ import annotations

import copy
import logging

import models
import pytest
import torch
from coverage_families import FAMILIES
from diffusers import DiTTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor2_0

import smoothcache_fx
from smoothcache_fx import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4


def _run(model, call, steps=STEPS):
    with torch.no_grad(), model.smoothcache.generation():
        return [call(model, step) for step in range(steps)]


def _plain(model, call, steps=STEPS):
    with torch.no_grad():
        return [call(model, step) for step in range(steps)]


def _dit_call(model, step):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    return model(x, timestep=torch.full((2,), 999 - 250 * step), class_labels=torch.tensor([1, 7])).sample


def _assert_like_fresh(model, changed_original, schedule, call):
    fresh = smoothcache_fx.transform(copy.deepcopy(changed_original), schedule)
    for got, want in zip(_run(model, call), _run(fresh, call), strict=True):
        assert torch.equal(got, want)


def _recapture_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "again" in r.getMessage()]


SCHEDULE = Schedule.from_dict({"attn1": [1, 0, 1, 0], "ff": [1, 1, 0, 1]})


def test_train_then_eval_captures_again(caplog):
    original = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        num_layers=2,
        sample_size=8,
        num_embeds_ada_norm=10,
        dropout=0.5,
    ).train()
    model = smoothcache_fx.transform(copy.deepcopy(original), SCHEDULE)
    _run(model, _dit_call)  # captured in train mode: dropout is in the graph
    model.eval()
    with caplog.at_level(logging.INFO, logger="smoothcache_fx"):
        _assert_like_fresh(model, original.eval(), SCHEDULE, _dit_call)
    lines = _recapture_lines(caplog)
    assert len(lines) == 1 and "switched to eval mode" in lines[0] and "captured 2 block(s)" in lines[0]


def test_replaced_submodule_captures_again(caplog):
    original = models.diffusers_dit()
    model = smoothcache_fx.transform(copy.deepcopy(original), SCHEDULE)
    before = _run(model, _dit_call)
    old = original.transformer_blocks[0].attn1.to_q
    torch.manual_seed(3)
    new = torch.nn.Linear(old.in_features, old.out_features)  # same type and shapes, other object
    original.transformer_blocks[0].attn1.to_q = new
    model.transformer_blocks[0].attn1.to_q = copy.deepcopy(new)
    assert not torch.equal(_plain(original, _dit_call)[0], before[0])  # the change matters
    with caplog.at_level(logging.INFO, logger="smoothcache_fx"):
        _assert_like_fresh(model, original, SCHEDULE, _dit_call)
    lines = _recapture_lines(caplog)
    assert (
        len(lines) == 1
        and "transformer_blocks.0: a submodule of attn1 was added, removed or replaced" in lines[0]
    )


class _HalfAttention(AttnProcessor2_0):
    """A processor whose attention output is halved: a visible change of the attention's code."""

    def __call__(self, *args, **kwargs):
        return 0.5 * super().__call__(*args, **kwargs)


def test_attention_processor_change_captures_again(caplog):
    original = models.diffusers_dit()
    model = smoothcache_fx.transform(copy.deepcopy(original), SCHEDULE)
    before = _run(model, _dit_call)
    for m in (model, original):
        m.transformer_blocks[1].attn1.set_processor(_HalfAttention())
    assert not torch.equal(_plain(original, _dit_call)[0], before[0])
    with caplog.at_level(logging.INFO, logger="smoothcache_fx"):
        _assert_like_fresh(model, original, SCHEDULE, _dit_call)
    lines = _recapture_lines(caplog)
    assert len(lines) == 1 and "transformer_blocks.1: attn1 has another attention processor" in lines[0]


def test_in_place_weight_edits_need_no_capture(caplog):
    original = models.diffusers_dit()
    model = smoothcache_fx.transform(copy.deepcopy(original), SCHEDULE)
    _run(model, _dit_call)
    with torch.no_grad():
        for m in (model, original):
            m.transformer_blocks[0].ff.net[2].weight.mul_(1.5)
    with caplog.at_level(logging.INFO, logger="smoothcache_fx"):
        _assert_like_fresh(model, original, SCHEDULE, _dit_call)
    assert not _recapture_lines(caplog)


# -- PEFT adapters, on a family whose model has diffusers' PeftAdapterMixin ------------------------
SD3 = FAMILIES["sd3"]
SD3_SCHEDULE = Schedule.from_dict({"attn": [1, 0, 1, 0], "ff": [1, 1, 0, 1]})


def _sd3_call(model, step):
    return model(**SD3.inputs(2, step)).sample


def _lora(model):
    from peft import LoraConfig

    model.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False),
        adapter_name="style",
    )


@pytest.fixture
def sd3_pair():
    pytest.importorskip("peft")
    original = SD3.build(seed=0)
    model = smoothcache_fx.transform(copy.deepcopy(original), SD3_SCHEDULE)
    before = _run(model, _sd3_call)
    return original, model, before


def test_adapter_added_then_reweighted_then_disabled_captures_again_each_time(sd3_pair, caplog):
    original, model, before = sd3_pair
    torch.manual_seed(5)
    _lora(original)
    _lora(model)
    model.load_state_dict(original.state_dict())  # the same adapter weights in both
    assert not torch.equal(_plain(original, _sd3_call)[0], before[0])
    steps = [
        ("added", lambda m: None, "was added, removed or replaced"),
        ("reweighted", lambda m: m.set_adapters(["style"], weights=[0.3]), "changed its adapters"),
        ("disabled", lambda m: m.disable_adapters(), "changed its adapters"),
        ("enabled", lambda m: m.enable_adapters(), "changed its adapters"),
    ]
    for name, change, reason in steps:
        change(original)
        change(model)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="smoothcache_fx"):
            _assert_like_fresh(model, original, SD3_SCHEDULE, _sd3_call)
        lines = _recapture_lines(caplog)
        assert len(lines) == 1 and reason in lines[0], (name, lines)


def test_blocks_with_different_adapter_scales_do_not_share_a_graph(sd3_pair):
    """LoRA scales are Python floats baked into a captured graph: two blocks of one structure but
    different scales must not share it."""
    original, model, _ = sd3_pair
    torch.manual_seed(5)
    _lora(original)
    _lora(model)
    model.load_state_dict(original.state_dict())
    for m in (original, model):
        m.transformer_blocks[0].attn.to_q.set_scale("style", 0.25)
    _assert_like_fresh(model, original, SD3_SCHEDULE, _sd3_call)
