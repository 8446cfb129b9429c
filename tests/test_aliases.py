"""Component aliases: Roblox's DiT schedules (`attn`, `mlp`) run as-is on diffusers models, and
diffusers-keyed schedules on facebookresearch-style blocks; the shipped built-in schedules."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import models
import pytest
import torch
from helpers import dit_call, pipeline_images, run_steps, tiny_call

import smoothcache_fx
from smoothcache_fx import Schedule
from smoothcache_fx.schedules.aliases import alias_renames

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference-schedules"


def _alias_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "renamed" in r.getMessage()]


def test_alias_renames_only_components_that_name_no_branch():
    assert alias_renames(["attn", "mlp"], ["attn1", "attn2", "ff", "norm1"]) == {"attn": "attn1", "mlp": "ff"}
    assert alias_renames(["attn1", "ff"], ["attn", "mlp"]) == {"attn1": "attn", "ff": "mlp"}
    assert alias_renames(["mlp"], ["attn1", "ffn"]) == {"mlp": "ffn"}  # Wan
    assert alias_renames(["attn", "mlp"], ["attn", "ff", "ff_context"]) == {"mlp": "ff"}  # SD3, Flux
    assert alias_renames(["attn1", "ff"], ["attn1", "ff"]) == {}
    # a key that already names the alias keeps both apart: nothing is renamed onto it
    assert alias_renames(["attn", "attn1"], ["attn1"]) == {}
    assert alias_renames(["feedforward"], ["ff"]) == {}


def test_roblox_keys_run_on_diffusers_dit_as_its_own_names(caplog):
    original = models.diffusers_dit()
    with caplog.at_level(logging.INFO, logger="smoothcache_fx"):
        roblox = smoothcache_fx.transform(copy.deepcopy(original), Schedule.uniform(4, 2, ["attn", "mlp"]))
    diffusers = smoothcache_fx.transform(copy.deepcopy(original), Schedule.uniform(4, 2, ["attn1", "ff"]))
    assert _alias_lines(caplog) == [
        "smoothcache_fx: no block of DiTTransformer2DModel has 'attn', 'mlp'; the schedule's keys are "
        "renamed attn -> attn1, mlp -> ff (aliases in smoothcache_fx.schedules.aliases)"
    ]
    got, want = run_steps(roblox, dit_call, 4), run_steps(diffusers, dit_call, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert roblox.smoothcache.stats["transformer_blocks.1.ff"]["reused"] == 2
    assert not torch.equal(got[-1], run_steps(original, dit_call, 4)[-1])  # it reused


def test_per_block_and_path_keys_are_renamed_too():
    schedule = Schedule(2, {"attn-1": [1, 0], "transformer_blocks.0.mlp": [1, 0]})
    model = smoothcache_fx.transform(models.diffusers_dit(), schedule)
    assert model.smoothcache.schedule.keys == ("attn1-1", "transformer_blocks.0.ff")
    run_steps(model, dit_call, 2)
    assert model.smoothcache.stats["transformer_blocks.1.attn1"]["reused"] == 1
    assert model.smoothcache.stats["transformer_blocks.0.ff"]["reused"] == 1


def test_diffusers_keys_run_on_facebook_style_blocks():
    original = models.TinyDiT()
    aliased = smoothcache_fx.transform(copy.deepcopy(original), Schedule.uniform(4, 2, ["attn1", "ff"]))
    own = smoothcache_fx.transform(copy.deepcopy(original), Schedule.uniform(4, 2, ["attn", "mlp"]))
    got, want = run_steps(aliased, tiny_call, 4), run_steps(own, tiny_call, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_set_schedule_applies_aliases():
    model = smoothcache_fx.transform(models.diffusers_dit(), Schedule.uniform(2, 2, ["attn1"]))
    model.smoothcache.set_schedule({"mlp": [1, 0]})
    assert model.smoothcache.schedule.keys == ("ff",)


def test_an_alias_that_is_no_branch_still_fails_with_the_branch_list():
    # both `attn` and `attn1` given: `attn` is not renamed onto the existing key, so it is refused
    model = smoothcache_fx.transform(models.diffusers_dit(), {"attn": [1, 0], "attn1": [1, 0]})
    with pytest.raises(ValueError, match=r"\['attn'\] match no residual branch"):
        run_steps(model, dit_call, 1)


# -- built-in schedules ------------------------------------------------------------------------


def test_builtin_names_and_their_step_counts():
    names = Schedule.builtin_names()
    assert "roblox-dit-xl2-256-50-alpha-0.18" in names and len(names) == 8
    for name in names:
        schedule = Schedule.builtin(name)
        assert schedule.steps == int(name.split("-")[4]), name
        assert schedule.components == ("attn1", "ff"), name
        assert schedule.metadata["name"] == name
        assert schedule.metadata["source"].startswith("Roblox/SmoothCache smoothcache_schedules/")


def test_unknown_builtin_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"must be one of \[.*roblox-dit-xl2-256-50-fora.*got 'dit-50'"):
        Schedule.builtin("dit-50")
    with pytest.raises(TypeError, match="must be a str"):
        Schedule.builtin(50)


@pytest.mark.skipif(not REFERENCE_DIR.is_dir(), reason="needs ../shared/reference-schedules")
@pytest.mark.parametrize("name", Schedule.builtin_names())
def test_builtins_are_the_roblox_files_renamed(name):
    builtin = Schedule.builtin(name)
    source = REFERENCE_DIR / Path(builtin.metadata["source"]).name
    assert builtin.masks == Schedule.load(source).rename({"attn": "attn1", "mlp": "ff"}).masks


def test_a_builtin_runs_on_a_diffusers_dit_pipeline():
    original = models.dit_pipeline()
    schedule = Schedule.builtin("roblox-dit-xl2-256-30-alpha-0.35")
    pipe = smoothcache_fx.transform(copy.deepcopy(original), "roblox-dit-xl2-256-30-alpha-0.35")  # by name
    assert pipe.transformer.smoothcache.schedule == schedule
    images = pipeline_images(pipe, 30)
    stats = pipe.transformer.smoothcache.stats["transformer_blocks.0.attn1"]
    assert stats == {
        "computed": sum(schedule.masks["attn1"]),
        "reused": 30 - sum(schedule.masks["attn1"]),
        "cache_bytes": stats["cache_bytes"],
    }
    assert abs(images - pipeline_images(original, 30)).max() > 1e-4


def test_a_file_named_like_a_builtin_wins_over_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Schedule.uniform(4, 2, ["attn1"]).save(tmp_path / "roblox-dit-xl2-256-50-fora")
    model = smoothcache_fx.transform(models.diffusers_dit(), "roblox-dit-xl2-256-50-fora")
    assert model.smoothcache.schedule.steps == 4
    with pytest.raises(FileNotFoundError, match="does not exist"):
        smoothcache_fx.transform(models.diffusers_dit(), "roblox-dit-xl2-256-51-fora")
