"""Saving a transformed model: `save_pretrained` writes the schedule beside the config and
`transform` without a schedule finds it; `torch.save` of the whole model is refused with the fix."""

from __future__ import annotations

import copy
import io
import logging
import pickle

import models
import numpy as np
import pytest
import torch
from helpers import dit_call, pipeline_images, run_steps

import smoothcache_fx
from smoothcache_fx import Schedule
from smoothcache_fx.saved_schedule import SCHEDULE_FILE

STEPS = 4
SCHEDULE = Schedule(STEPS, {"attn1": [1, 0, 1, 1], "ff-1": [1, 1, 0, 1]})


def test_transformer_save_pretrained_writes_the_schedule_and_transform_reads_it(tmp_path, caplog):
    from diffusers import DiTTransformer2DModel

    model = smoothcache_fx.transform(models.diffusers_dit(), SCHEDULE)
    want = run_steps(model, dit_call, STEPS)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and Schedule.load(tmp_path / SCHEDULE_FILE) == SCHEDULE

    loaded = DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert not hasattr(loaded, "smoothcache")  # from_pretrained gives the plain model
    with caplog.at_level(logging.INFO, logger="smoothcache_fx"):
        smoothcache_fx.transform(loaded)
    assert any(
        "using the schedule saved with DiTTransformer2DModel" in r.getMessage() for r in caplog.records
    )
    assert loaded.smoothcache.schedule == SCHEDULE
    got = run_steps(loaded, dit_call, STEPS)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_pipeline_save_pretrained_round_trip(tmp_path):
    from diffusers import DiffusionPipeline

    original = models.dit_pipeline()
    pipe = smoothcache_fx.transform(copy.deepcopy(original), SCHEDULE)
    want = pipeline_images(pipe, STEPS)
    pipe.save_pretrained(tmp_path)
    assert Schedule.load(tmp_path / "transformer" / SCHEDULE_FILE) == SCHEDULE
    assert not (tmp_path / SCHEDULE_FILE).exists()  # beside the transformer's config only

    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    smoothcache_fx.transform(loaded)
    np.testing.assert_array_equal(pipeline_images(loaded, STEPS), want)


def test_save_pretrained_writes_the_given_schedule_not_a_resampled_one(tmp_path):
    pipe = smoothcache_fx.transform(models.dit_pipeline(), SCHEDULE, resample=True)
    pipeline_images(pipe, 7)
    pipe.transformer.save_pretrained(tmp_path)
    assert Schedule.load(tmp_path / SCHEDULE_FILE) == SCHEDULE


def test_transform_without_a_schedule_refuses_when_none_was_saved(tmp_path):
    from diffusers import DiTTransformer2DModel

    models.diffusers_dit().save_pretrained(tmp_path)  # untransformed: no schedule written
    assert not (tmp_path / SCHEDULE_FILE).exists()
    with pytest.raises(
        ValueError, match=rf"loaded from '{tmp_path}', which has no {SCHEDULE_FILE}.*Pass a schedule"
    ):
        smoothcache_fx.transform(DiTTransformer2DModel.from_pretrained(tmp_path))
    with pytest.raises(ValueError, match=r"not loaded from a local folder.*Schedule\.load\(path\)"):
        smoothcache_fx.transform(models.TinyDiT())


def test_untransform_gives_the_model_its_class_and_save_pretrained_back(tmp_path):
    model = models.diffusers_dit()
    original_class = type(model)
    smoothcache_fx.transform(model, SCHEDULE)
    assert type(model) is not original_class and isinstance(model, original_class)
    smoothcache_fx.untransform(model)
    assert type(model) is original_class
    model.save_pretrained(tmp_path)
    assert not (tmp_path / SCHEDULE_FILE).exists()


@pytest.mark.parametrize("factory", [models.diffusers_dit, models.TinyDiT], ids=["diffusers", "plain-module"])
def test_torch_save_of_a_transformed_model_is_refused_with_the_fix(factory):
    model = smoothcache_fx.transform(factory(), Schedule.uniform(STEPS, 2, ["attn1", "ff"]))
    for save in (lambda m: torch.save(m, io.BytesIO()), pickle.dumps):
        with pytest.raises(
            TypeError, match=r"cannot be pickled.*state_dict\(\).*save_pretrained.*untransform"
        ):
            save(model)
    torch.save(model.state_dict(), buffer := io.BytesIO())  # what the message says works
    buffer.seek(0)
    plain = factory()
    plain.load_state_dict(torch.load(buffer))
    smoothcache_fx.untransform(model)
    torch.save(model, io.BytesIO())  # untransformed: plain pickling again


def test_torch_save_of_a_transformed_pipeline_is_refused():
    pipe = smoothcache_fx.transform(models.dit_pipeline(), SCHEDULE)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(pipe)


def test_deepcopy_of_a_transformed_diffusers_model_still_works():
    model = smoothcache_fx.transform(models.diffusers_dit(), SCHEDULE)
    want = run_steps(model, dit_call, STEPS)
    clone = copy.deepcopy(model)
    assert type(clone) is type(model) and clone.smoothcache is not model.smoothcache
    got = run_steps(clone, dit_call, STEPS)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_deepcopy_of_a_transformed_pipeline_still_works():
    pipe = smoothcache_fx.transform(models.dit_pipeline(), SCHEDULE)
    clone = copy.deepcopy(pipe)
    assert type(clone) is type(pipe) and clone.transformer.smoothcache is not pipe.transformer.smoothcache
    np.testing.assert_array_equal(pipeline_images(clone, STEPS), pipeline_images(pipe, STEPS))
