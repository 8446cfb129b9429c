"""Bad input gets a clear error that names the problem and the fix."""

from __future__ import annotations

import json

import models
import pytest
import torch
from helpers import dit_call, run_steps, tiny_call
from torch import nn

import smoothcache_fx
from smoothcache_fx import Schedule


def test_malformed_schedule_json_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"attn1": [1, 0,')
    with pytest.raises(ValueError, match="bad.json"):
        smoothcache_fx.transform(models.diffusers_dit(), path)


def test_schedule_of_the_wrong_type():
    with pytest.raises(TypeError, match="schedule must be"):
        smoothcache_fx.transform(models.diffusers_dit(), 42)


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        ({}, "empty|at least one"),
        ({"attn1": [1, 0, 1], "ff": [1, 0]}, "length"),
        ({"attn1": [1, 2, 1]}, "0 or 1|0/1"),
        ({"attn1": [0, 1, 1]}, "first step"),
    ],
)
def test_invalid_schedule_dicts(masks, message):
    with pytest.raises(ValueError, match=message):
        smoothcache_fx.transform(models.diffusers_dit(), masks)


def test_schedule_keys_that_match_no_branch_list_the_branches():
    # `feedforward` has no alias (`mlp` would be renamed to `ff`: test_aliases.py)
    model = smoothcache_fx.transform(models.diffusers_dit(), {"attn1": [1, 0], "feedforward": [1, 0]})
    with pytest.raises(
        ValueError, match=r"\['feedforward'\] match no residual branch.*transformer_blocks.0.*attn1"
    ):
        run_steps(model, dit_call, 1)


class NoResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_model_without_residual_branches_names_the_block_classes():
    model = smoothcache_fx.transform(NoResidual(), {"attn": [1, 0]})
    with pytest.raises(NotImplementedError, match=r"no residual branch.*\['Sequential'\]"), torch.no_grad():
        model(torch.randn(2, 8))


def test_model_without_blocks():
    with pytest.raises(NotImplementedError, match="found no transformer blocks.*blocks="):
        smoothcache_fx.transform(nn.Linear(4, 4), {"attn": [1, 0]})


def test_transform_twice():
    model = smoothcache_fx.transform(models.TinyDiT(), Schedule.uniform(2, 2, ["attn"]))
    with pytest.raises(RuntimeError, match="already transformed.*set_schedule"):
        smoothcache_fx.transform(model, Schedule.uniform(2, 2, ["attn"]))


def test_set_schedule_replaces_the_schedule():
    model = smoothcache_fx.transform(models.TinyDiT(), Schedule.uniform(2, 2, ["attn"]))
    run_steps(model, tiny_call, 2)
    model.smoothcache.set_schedule(Schedule.uniform(3, 3, ["mlp"]))
    run_steps(model, tiny_call, 3)
    assert model.smoothcache.stats["blocks.0.mlp"]["reused"] == 2


@pytest.mark.parametrize("change", ["batch", "dtype", "device"])
def test_input_change_in_the_middle_of_a_generation(change):
    model = smoothcache_fx.transform(models.diffusers_dit(), Schedule.uniform(4, 2, ["attn1"]))
    run_steps(model, dit_call, 2)  # timesteps 1, 51: the generation goes on at 101
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([101, 101]), torch.tensor([1, 2])
    if change == "batch":
        x, t, y = x[:1], t[:1], y[:1]
    elif change == "dtype":
        model.double()
        x = x.double()
    else:
        model.to("meta")  # another device; the check fires before any block compute
        x, t, y = x.to("meta"), t.to("meta"), y.to("meta")
    with (
        pytest.raises(RuntimeError, match=r"middle of a generation \(step 2 of 4\).*reset\(\)"),
        torch.no_grad(),
    ):
        model(x, timestep=t, class_labels=y)


def test_gradients_enabled_says_why_not():
    model = smoothcache_fx.transform(models.TinyDiT(), Schedule.uniform(2, 2, ["attn"]))
    x, y = models.tiny_dit_inputs()
    with pytest.raises(RuntimeError, match=r"inference only.*torch.no_grad\(\)"):
        model(x, torch.tensor([1, 1]), y)
    model.requires_grad_(False)
    model(x, torch.tensor([1, 1]), y)  # no parameter needs a gradient: runs


def test_unknown_kernel():
    with pytest.raises(ValueError, match="kernel must be one of"):
        smoothcache_fx.transform(models.TinyDiT(), Schedule.uniform(2, 2, ["attn"]), kernel="cuda")


def test_bad_blocks_argument():
    with pytest.raises(ValueError, match="not a submodule"):
        smoothcache_fx.transform(models.TinyDiT(), Schedule.uniform(2, 2, ["attn"]), blocks=["blocks.9"])
    with pytest.raises(TypeError, match="module paths"):
        smoothcache_fx.transform(models.TinyDiT(), Schedule.uniform(2, 2, ["attn"]), blocks=[3])


def test_transform_of_something_else():
    with pytest.raises(TypeError, match="torch.nn.Module or a diffusers pipeline"):
        smoothcache_fx.transform(object(), Schedule.uniform(2, 2, ["attn"]))


def test_schedule_file_in_roblox_format(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"attn1": [1, 0, 1], "ff": [1, 1, 0]}))
    model = smoothcache_fx.transform(models.diffusers_dit(), path)
    run_steps(model, dit_call, 3)
    assert model.smoothcache.stats["transformer_blocks.1.ff"]["reused"] == 1
