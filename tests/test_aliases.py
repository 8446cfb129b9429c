"""Component aliases: Roblox's DiT schedules (`attn`, `mlp`) run as-is on diffusers models, and
diffusers-keyed schedules on facebookresearch-style blocks."""

from __future__ import annotations

import copy
import json
import logging

import models
import pytest
import roblox_files
import torch
from helpers import dit_call, pipeline_images, run_steps, tiny_call

import smoothcache_fx
from smoothcache_fx import Schedule
from smoothcache_fx.schedules.aliases import alias_renames


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


# -- Roblox's files as Roblox publishes them ---------------------------------------------------


@pytest.mark.parametrize("source", ["published", "fixture"])
def test_a_roblox_file_runs_on_a_diffusers_dit_pipeline_as_published(source, tmp_path):
    """Roblox's 30-step alpha=0.35 file from ../shared/reference-schedules (skipped without it),
    and a file of the same format written here, so that this runs without it: given by path,
    unchanged, its `attn`/`mlp` run as diffusers' `attn1`/`ff`."""
    if source == "published":
        path = roblox_files.published("30-N-3-threshold-0.35.json")
        if path is None:
            pytest.skip(f"no reference schedules at {roblox_files.REFERENCE_DIR}")
    else:
        path = roblox_files.write(tmp_path / "30-N-2-fora.json", roblox_files.fora_masks(30))
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert sorted(raw) == ["attn", "mlp"] and all(len(mask) == 30 for mask in raw.values())
    original = models.dit_pipeline()
    pipe = smoothcache_fx.transform(copy.deepcopy(original), str(path))
    assert dict(pipe.transformer.smoothcache.schedule.masks) == {
        "attn1": tuple(raw["attn"]),
        "ff": tuple(raw["mlp"]),
    }
    images = pipeline_images(pipe, 30)
    for key, component in (("attn", "attn1"), ("mlp", "ff")):
        stats = pipe.transformer.smoothcache.stats[f"transformer_blocks.0.{component}"]
        assert (stats["computed"], stats["reused"]) == (sum(raw[key]), 30 - sum(raw[key])), key
    assert abs(images - pipeline_images(original, 30)).max() > 1e-4
