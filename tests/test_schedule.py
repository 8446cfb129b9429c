"""Schedule: validation, key resolution, generators, and both on-disk formats."""

import copy
import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import roblox_files

from smoothcache_fx.schedules import FORMAT_VERSION, Schedule

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference-schedules"
REFERENCE_FILES = sorted(REFERENCE_DIR.glob("*.json")) if REFERENCE_DIR.is_dir() else []
DIT_KEYS = ("attn", "mlp")
L2C_KEYS = tuple(sorted(f"{c}-{i}" for c in DIT_KEYS for i in range(28)))  # DiT-XL/2 has 28 blocks
# name -> (steps, keys), read off the Roblox/SmoothCache files by hand.
REFERENCE_EXPECTED = {
    "30-N-2-fora.json": (30, DIT_KEYS),
    "30-N-3-threshold-0.35.json": (30, DIT_KEYS),
    "50-N-2-fora.json": (50, DIT_KEYS),
    "50-N-2-l2c.json": (50, L2C_KEYS),
    "50-N-3-threshold-0.08.json": (50, DIT_KEYS),
    "50-N-3-threshold-0.18.json": (50, DIT_KEYS),
    "70-N-2-fora.json": (70, DIT_KEYS),
    "70-N-3-threshold-0.08.json": (70, DIT_KEYS),
    "diffuser_schedule.json": (50, ("attn1",)),
}


def _schedule(**overrides):
    kwargs = {"steps": 4, "masks": {"attn1": [1, 0, 1, 0], "ff": [1, 1, 0, 1]}, "metadata": {}}
    kwargs.update(overrides)
    return Schedule(**kwargs)


# ---------------------------------------------------------------------- validation


def test_valid_schedule_normalises_masks():
    masks = {"ff": [True, False, True, True], "attn1": [1, 0, 1, 0]}
    s = Schedule(4, masks)
    masks["ff"][1] = True  # the schedule holds its own copy
    assert s.keys == ("attn1", "ff")
    assert dict(s.masks) == {"attn1": (1, 0, 1, 0), "ff": (1, 0, 1, 1)}
    assert all(type(v) is int for mask in s.masks.values() for v in mask)


def test_schedule_is_frozen_and_read_only():
    s = _schedule()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 5
    with pytest.raises(TypeError):
        s.masks["attn1"] = (1, 1, 1, 1)
    with pytest.raises(TypeError):
        s.metadata["model"] = "x"


def test_empty_schedule_raises():
    with pytest.raises(ValueError, match="at least one mask; got no keys"):
        Schedule(4, {})


def test_masks_of_different_lengths_name_keys_and_lengths():
    with pytest.raises(ValueError, match=r"same length.*attn1=4, ff=3"):
        Schedule(4, {"attn1": [1, 0, 1, 0], "ff": [1, 0, 1]})


def test_mask_length_must_match_steps():
    with pytest.raises(ValueError, match=r"steps=5 entries each; got 4 .*Pass steps=4"):
        Schedule(5, {"attn1": [1, 0, 1, 0]})


@pytest.mark.parametrize(
    ("value", "error", "shown"),
    [(2, ValueError, "2"), (-1, ValueError, "-1"), (0.5, TypeError, "0.5"), ("1", TypeError, "'1'")],
)
def test_mask_values_other_than_0_1_name_key_step_value(value, error, shown):
    with pytest.raises(error, match=rf"0 or 1.*got {shown}.* at step 2 of 'ff'"):
        Schedule(3, {"attn1": [1, 1, 1], "ff": [1, 0, value]})


def test_mask_values_accept_bools_and_numpy_ints():
    np = pytest.importorskip("numpy")
    s = Schedule(3, {"attn1": [True, False, True], "ff": list(np.array([1, 0, 0]))})
    assert s.masks == {"attn1": (1, 0, 1), "ff": (1, 0, 0)}


def _arrays():
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    return np, torch


def test_numpy_arrays_and_tensors_are_masks_with_their_step_count():
    np, torch = _arrays()
    expected = {"attn1": (1, 0, 1, 1), "ff": (1, 1, 0, 1)}
    for masks in (
        {"attn1": np.array([1, 0, 1, 1]), "ff": torch.tensor([1, 1, 0, 1])},
        {"attn1": np.array([True, False, True, True]), "ff": torch.tensor([True, True, False, True])},
        {"attn1": np.array([1, 0, 1, 1], dtype=np.uint8), "ff": list(np.array([True, True, False, True]))},
    ):
        for s in (Schedule.load(masks), Schedule.from_dict(masks), Schedule(4, masks)):
            assert s.steps == 4 and s.masks == expected
            assert all(type(v) is int for mask in s.masks.values() for v in mask)
    envelope = _schedule().to_dict() | {"masks": {"attn1": torch.tensor([1, 0, 1, 0])}}
    assert Schedule.from_dict(envelope).masks == {"attn1": (1, 0, 1, 0)}


def test_arrays_of_different_lengths_name_keys_and_lengths():
    np, torch = _arrays()
    with pytest.raises(ValueError, match=r"same length.*attn1=4, ff=3"):
        Schedule.load({"attn1": np.array([1, 0, 1, 1]), "ff": torch.tensor([1, 1, 0])})


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda np, torch: np.ones((2, 4), dtype=int),
            ValueError,
            r"mask for 'ff' must be one-dimensional, one 0/1 per step; got a 2-D ndarray of shape "
            r"\(2, 4\)\. Give each key its own 1-D mask",
        ),
        (
            lambda np, torch: torch.tensor(1),
            ValueError,
            r"mask for 'ff' must be one-dimensional.*got a 0-D Tensor of shape \(\)",
        ),
        (
            lambda np, torch: np.array([1.0, 0.5, 1.0, 1.0]),
            TypeError,
            r"mask for 'ff' must be an array of ints or bools, one 0/1 per step; got a float64 ndarray "
            r"with 0\.5 at step 1\. Turn it into 0/1 first, e\.g\. \(mask > 0\.5\)",
        ),
        (
            lambda np, torch: torch.tensor([1.0, 0.0, 1.0, 1.0]),
            TypeError,
            r"mask for 'ff' must be an array of ints or bools.*got a torch\.float32 Tensor\. .*"
            r"mask\.int\(\) \(torch\) when it holds only 0\.0 and 1\.0",
        ),
        (
            lambda np, torch: np.array([1, 2, 1, 1]),
            ValueError,
            r"mask values must be 0 or 1; got 2 at step 1 of 'ff'\. Use 1 to compute",
        ),
        (
            lambda np, torch: torch.tensor([1, 0, -1, 1]),
            ValueError,
            r"mask values must be 0 or 1; got -1 at step 2 of 'ff'\. Use 1 to compute",
        ),
    ],
    ids=["2d-numpy", "0d-tensor", "float-numpy", "float-tensor", "2-numpy", "minus-1-tensor"],
)
def test_arrays_that_are_not_1d_0_1_name_key_and_fix(make, error, message):
    mask = make(*_arrays())
    with pytest.raises(error, match=message):
        Schedule.load({"attn1": [1, 0, 1, 1], "ff": mask})
    with pytest.raises(error, match=message):
        Schedule(4, {"attn1": [1, 0, 1, 1], "ff": mask})


@pytest.mark.parametrize("mask", ["101", {"0": 1}, 1])
def test_mask_must_be_a_list(mask):
    with pytest.raises(TypeError, match="mask for 'attn1' must be a list of 0/1"):
        Schedule(3, {"attn1": mask})


def test_first_step_must_compute_and_names_keys():
    with pytest.raises(ValueError, match=r"compute at step 0.*cache is empty.*'attn1', 'ff'"):
        Schedule(2, {"attn1": [0, 1], "ff": [0, 1], "mlp": [1, 0]})


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_must_be_positive(steps):
    with pytest.raises(ValueError, match=rf"steps must be >= 1.*got {steps}"):
        Schedule(steps, {"attn1": []})


@pytest.mark.parametrize("steps", [4.0, "4", True])
def test_steps_must_be_an_int(steps):
    with pytest.raises(TypeError, match="steps must be an int"):
        Schedule(steps, {"attn1": [1, 0, 1, 0]})


@pytest.mark.parametrize("key", [3, None, ("attn1", 3)])
def test_non_string_keys_raise_type_error(key):
    with pytest.raises(TypeError, match=r"keys must be strings; got .*per-block key"):
        Schedule(2, {key: [1, 0]})


@pytest.mark.parametrize("key", ["", " ", "attn1 ", "attn 1", "blocks..attn1", ".attn1", "attn1."])
def test_malformed_keys_raise_value_error(key):
    with pytest.raises(ValueError, match=rf"keys must be non-empty.*got {key!r}"):
        Schedule(2, {key: [1, 0]})


def test_masks_must_be_a_mapping():
    with pytest.raises(TypeError, match="masks must be a mapping"):
        Schedule(2, [("attn1", [1, 0])])


def test_metadata_must_be_json_data_with_string_keys():
    with pytest.raises(TypeError, match="metadata must be JSON-serialisable"):
        _schedule(metadata={"model": object()})
    with pytest.raises(TypeError, match="metadata keys must be strings; got int 1"):
        _schedule(metadata={1: "x"})


# ---------------------------------------------------------------------- resolution


def test_resolution_prefers_full_path_then_block_then_component():
    s = Schedule(
        2,
        {"attn1": [1, 0], "attn1-3": [1, 1], "transformer_blocks.3.attn1": [1, 0], "ff-3": [1, 1]},
    )
    assert s.key_for("transformer_blocks.3.attn1") == "transformer_blocks.3.attn1"
    assert s.key_for("single_blocks.3.attn1") == "attn1-3"
    assert s.key_for("transformer_blocks.4.attn1") == "attn1"
    assert s.key_for("transformer_blocks.3.ff") == "ff-3"
    assert s.mask_for("transformer_blocks.3.attn1") == (True, False)
    assert s.mask_for("single_blocks.3.attn1") == (True, True)
    assert s.mask_for("transformer_blocks.4.attn1") == (True, False)


def test_block_index_is_the_second_to_last_segment_when_all_digits():
    s = Schedule(2, {"attn-12": [1, 1], "attn": [1, 0]})
    assert s.key_for("blocks.12.attn") == "attn-12"
    assert s.key_for("12.attn") == "attn-12"
    assert s.key_for("blocks.12.x.attn") == "attn"  # 'x' is not an index
    assert s.key_for("blocks.1.attn") == "attn"  # no prefix match: 1 is not 12
    assert s.key_for("attn") == "attn"


def test_mask_for_returns_none_when_no_key_applies():
    s = Schedule(2, {"attn1": [1, 0], "ff-0": [1, 0]})
    assert s.mask_for("transformer_blocks.0.attn2") is None
    assert s.mask_for("transformer_blocks.1.ff") is None
    assert s.mask_for("attn1.to_q") is None  # the component is the last segment only
    assert s.computes("transformer_blocks.1.ff", 1)
    assert not s.computes("transformer_blocks.0.ff", 1)
    assert s.computes("transformer_blocks.0.ff", 0)


def test_computes_rejects_steps_outside_the_schedule():
    s = _schedule()
    for step in (-1, 4):
        with pytest.raises(ValueError, match=rf"step must be in \[0, 4\).*got {step}"):
            s.computes("transformer_blocks.0.attn1", step)


def test_unmatched_keys():
    s = Schedule(
        2,
        {"attn1": [1, 0], "attn1-7": [1, 0], "ff": [1, 0], "blocks.0.norm": [1, 0], "mlp-0": [1, 0]},
    )
    paths = ["transformer_blocks.0.attn1", "transformer_blocks.0.ff", "transformer_blocks.1.attn1"]
    assert s.unmatched_keys(paths) == ["attn1-7", "blocks.0.norm", "mlp-0"]
    assert s.unmatched_keys(iter(paths + ["blocks.0.norm", "blocks.7.attn1", "x.0.mlp"])) == []
    assert s.unmatched_keys([]) == list(s.keys)


def test_a_shadowed_key_still_counts_as_matched():
    s = Schedule(2, {"attn": [1, 0], "attn-0": [1, 1]})
    assert s.unmatched_keys(["blocks.0.attn"]) == []


# ---------------------------------------------------------------------- value semantics


def test_equality_hash_pickle_and_copy():
    a, b = _schedule(), _schedule(masks={"ff": (1, 1, 0, 1), "attn1": (True, False, True, False)})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != _schedule(metadata={"model": "pixart"})
    assert a != _schedule(masks={"attn1": [1, 1, 1, 1], "ff": [1, 1, 0, 1]})
    assert pickle.loads(pickle.dumps(a)) == a
    assert copy.deepcopy(a) == a


def test_properties_repr_and_with_metadata():
    s = _schedule(metadata={"model": "pixart"})
    assert s.compute_fraction == {"attn1": 0.5, "ff": 0.75}
    assert repr(s) == "Schedule(steps=4, keys=['attn1', 'ff'], compute_fraction={'attn1': 0.50, 'ff': 0.75})"
    big = Schedule(2, {f"attn-{i}": [1, i % 2] for i in range(6)})
    assert repr(big) == (
        "Schedule(steps=2, keys=6 ['attn-0', 'attn-1', ..., 'attn-5'], compute_fraction=0.75 (min 0.50, max 1.00))"
    )
    t = s.with_metadata(alpha=0.08, model="dit")
    assert dict(t.metadata) == {"model": "dit", "alpha": 0.08}
    assert dict(s.metadata) == {"model": "pixart"}
    assert t.masks == s.masks


# ---------------------------------------------------------------------- generators


def test_all_compute():
    s = Schedule.all_compute(3, ["attn1", "ff"])
    assert s.steps == 3
    assert dict(s.masks) == {"attn1": (1, 1, 1), "ff": (1, 1, 1)}
    assert s.metadata["generator"] == "all_compute"


@pytest.mark.parametrize(
    ("steps", "interval", "mask"),
    [
        (5, 2, (1, 0, 1, 0, 1)),
        (6, 2, (1, 0, 1, 0, 1, 0)),  # plain FORA: the last step is not forced to compute
        (7, 3, (1, 0, 0, 1, 0, 0, 1)),
        (3, 1, (1, 1, 1)),
        (3, 5, (1, 0, 0)),
        (1, 4, (1,)),
    ],
)
def test_uniform(steps, interval, mask):
    s = Schedule.uniform(steps, interval, ["attn", "mlp"])
    assert dict(s.masks) == {"attn": mask, "mlp": mask}
    assert dict(s.metadata) == {"generator": "uniform", "interval": interval}


def test_uniform_extra_steps_compute_too():
    s = Schedule.uniform(10, 4, ["ff"], extra_steps=(9, 1, 1))
    assert s.masks["ff"] == (1, 1, 0, 0, 1, 0, 0, 0, 1, 1)
    assert s.metadata["extra_steps"] == [1, 9]
    for bad in ((10,), (-1,), (True,), ("1",)):
        with pytest.raises(ValueError, match=r"extra_steps must be step indices in \[0, 10\)"):
            Schedule.uniform(10, 4, ["ff"], extra_steps=bad)


def test_uniform_interval_one_matches_all_compute_masks():
    assert Schedule.uniform(4, 1, ["ff"]).masks == Schedule.all_compute(4, ["ff"]).masks


def test_piecewise_computes_each_piece_at_its_own_interval():
    s = Schedule.piecewise(12, {0: 4, 5: 2, 9: 3}, ["attn1", "ff"], extra_steps=(11,))
    # piece [0, 5): 0, 4; piece [5, 9): 5, 7; piece [9, 12): 9; extra: 11
    assert s.masks["ff"] == (1, 0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 1)
    assert s.masks["attn1"] == s.masks["ff"]
    assert dict(s.metadata) == {
        "generator": "piecewise",
        "intervals": [[0, 4], [5, 2], [9, 3]],
        "extra_steps": [11],
    }
    assert Schedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s  # the metadata is JSON data


def test_piecewise_with_one_piece_is_uniform():
    for steps, interval in ((10, 3), (7, 1), (50, 5)):
        piecewise = Schedule.piecewise(steps, {0: interval}, ["ff"], extra_steps=(1, steps - 1))
        uniform = Schedule.uniform(steps, interval, ["ff"], extra_steps=(1, steps - 1))
        assert piecewise.masks == uniform.masks


def test_piecewise_argument_errors():
    with pytest.raises(TypeError, match=r"intervals must be a mapping of first step -> interval.*got list"):
        Schedule.piecewise(10, [(0, 2)], ["ff"])
    with pytest.raises(ValueError, match=r"must start a piece at step 0.*got first steps \[3\]"):
        Schedule.piecewise(10, {3: 2}, ["ff"])
    with pytest.raises(ValueError, match=r"must start a piece at step 0.*got first steps \[\]"):
        Schedule.piecewise(10, {}, ["ff"])
    with pytest.raises(ValueError, match=r"keys must be first steps of pieces in \[0, 10\); got \[10\]"):
        Schedule.piecewise(10, {0: 2, 10: 3}, ["ff"])
    with pytest.raises(ValueError, match=r"intervals\[4\] must be >= 1"):
        Schedule.piecewise(10, {0: 2, 4: 0}, ["ff"])
    with pytest.raises(TypeError, match=r"intervals\[0\] must be an int; got float"):
        Schedule.piecewise(10, {0: 2.0}, ["ff"])
    with pytest.raises(ValueError, match=r"extra_steps must be step indices in \[0, 10\)"):
        Schedule.piecewise(10, {0: 2}, ["ff"], extra_steps=(10,))


def test_schedule_docstring_examples_run():
    import doctest

    from smoothcache_fx.schedules import forecast, schedule

    for module in (schedule, forecast):
        result = doctest.testmod(module, verbose=False)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_generator_argument_errors():
    with pytest.raises(ValueError, match=r"interval must be >= 1 .*; got 0"):
        Schedule.uniform(4, 0, ["ff"])
    with pytest.raises(TypeError, match="interval must be an int; got float"):
        Schedule.uniform(4, 2.0, ["ff"])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        Schedule.uniform(0, 2, ["ff"])
    with pytest.raises(TypeError, match=r"components must be a sequence of keys.*got str 'attn1'"):
        Schedule.all_compute(4, "attn1")
    with pytest.raises(ValueError, match=r"components must be distinct; got \['ff'\]"):
        Schedule.all_compute(4, ["ff", "attn1", "ff"])
    with pytest.raises(ValueError, match="at least one mask"):
        Schedule.all_compute(4, [])


# ---------------------------------------------------------------------- I/O


def test_to_dict_from_dict_round_trip():
    s = _schedule(metadata={"model": "pixart", "alpha": 0.08, "per_block": {"0": [1, 2]}})
    d = s.to_dict()
    assert d == {
        "format": "smoothcache_fx.schedule",
        "version": 2,  # the lowest version that holds it: no strengths
        "steps": 4,
        "masks": {"attn1": [1, 0, 1, 0], "ff": [1, 1, 0, 1]},
        "orders": {},
        "metadata": {"model": "pixart", "alpha": 0.08, "per_block": {"0": [1, 2]}},
    }
    json.dumps(d)  # plain JSON data
    assert Schedule.from_dict(d) == s
    assert Schedule.load(d) == s


def test_save_load_round_trip(tmp_path):
    s = Schedule.uniform(6, 2, ["attn1", "ff-3"]).with_metadata(model="dit", lookahead=(2, 3))
    path = s.save(tmp_path / "s.json")
    loaded = Schedule.load(path)
    assert loaded == s
    assert loaded.metadata["lookahead"] == [2, 3]  # tuples are stored as JSON lists
    assert Schedule.load(str(path)) == s
    lines = path.read_text().splitlines()
    assert '    "attn1": [1, 0, 1, 0, 1, 0],' in lines  # one mask per line
    assert json.loads(path.read_text()) == s.to_dict()


def test_roblox_format_fixture(tmp_path):
    masks = {"attn-0": [1, 0, 1], "mlp-0": [1, 1, 0], "attn-1": [1, 1, 1], "mlp-1": [1, 0, 0]}
    path = tmp_path / "3-N-2-test.json"
    path.write_text(json.dumps(masks))
    s = Schedule.load(path)
    assert s.steps == 3
    assert s.keys == ("attn-0", "attn-1", "mlp-0", "mlp-1")
    assert s.mask_for("blocks.1.mlp") == (True, False, False)
    assert s.mask_for("blocks.2.mlp") is None
    assert dict(s.metadata) == {}


@pytest.mark.parametrize("path", REFERENCE_FILES, ids=lambda p: p.name)
def test_reference_schedules_load_unchanged(path):
    raw = json.loads(path.read_text())
    s = Schedule.load(path)
    assert {k: list(v) for k, v in s.masks.items()} == raw
    assert s.steps == len(next(iter(raw.values())))
    if path.name in REFERENCE_EXPECTED:
        assert (s.steps, s.keys) == REFERENCE_EXPECTED[path.name]


def test_reference_schedules_present():
    if not REFERENCE_FILES:
        pytest.skip(f"no reference schedules at {REFERENCE_DIR}")
    assert set(REFERENCE_EXPECTED) <= {p.name for p in REFERENCE_FILES}


@pytest.mark.parametrize("steps", [30, 50, 70])
def test_published_fora_differs_from_uniform_only_at_the_last_step(steps):
    path = REFERENCE_DIR / f"{steps}-N-2-fora.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    published, uniform = Schedule.load(path), Schedule.uniform(steps, 2, DIT_KEYS)
    for key in DIT_KEYS:
        diff = [i for i in range(steps) if published.masks[key][i] != uniform.masks[key][i]]
        assert diff == [steps - 1]


@pytest.mark.parametrize("steps", [30, 50, 70])
def test_the_tests_own_fora_files_are_the_published_ones(steps):
    """tests/roblox_files.py writes FORA files for tests that must run without the reference
    schedules; where those are at hand, they show the fixture is what Roblox publishes."""
    path = roblox_files.published(f"{steps}-N-2-fora.json")
    if path is None:
        pytest.skip(f"no reference schedules at {roblox_files.REFERENCE_DIR}")
    assert json.loads(path.read_text(encoding="utf-8")) == roblox_files.fora_masks(steps)


def test_malformed_json_names_file_and_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"attn": [1, 0,\n  "mlp" [1, 0]}')
    with pytest.raises(ValueError, match=r"bad\.json.*valid JSON.*line 2, column 9.*should hold an object"):
        Schedule.load(path)


@pytest.mark.parametrize(("text", "kind"), [("[[1, 0]]", "list"), ('"attn"', "str"), ("3", "int")])
def test_json_that_is_not_an_object(tmp_path, text, kind):
    path = tmp_path / "list.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"list\.json.*must contain a JSON object; got a JSON {kind}"):
        Schedule.load(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=r"nope\.json.*does not exist"):
        Schedule.load(path)


@pytest.mark.parametrize(
    ("write", "error", "message"),
    [
        (None, FileNotFoundError, r"'[^']*s\.json', which does not exist\. Check the path"),
        (
            lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff"),
            ValueError,
            r"schedule file '[^']*s\.json' must be JSON text in UTF-8; got a byte that is not UTF-8 at "
            r"offset 0 .*not a binary file",
        ),
        (
            lambda path: path.mkdir(),
            IsADirectoryError,
            r"must name a readable JSON file; got '[^']*s\.json' \(Is a directory\)\. Pass a file",
        ),
        (
            lambda path: path.write_text('{"attn1": [1, 0'),
            ValueError,
            r"schedule file '[^']*s\.json' must contain valid JSON.*should hold an object",
        ),
        (
            lambda path: path.write_text("[1, 0]"),
            ValueError,
            r"schedule file '[^']*s\.json' must contain a JSON object.*Write an object",
        ),
        (
            lambda path: path.write_text('{"attn1": "1011"}'),
            TypeError,
            r"s\.json: the mask for 'attn1' must be a list of 0/1.*Pass a list",
        ),
        (
            lambda path: path.write_text('{"attn1": [1, 0, 2]}'),
            ValueError,
            r"s\.json: mask values must be 0 or 1; got 2 .*Use 1 to compute",
        ),
    ],
    ids=["missing", "binary", "folder", "not-json", "not-object", "mask-type", "mask-value"],
)
def test_every_load_failure_names_the_file_and_the_fix(tmp_path, write, error, message):
    path = tmp_path / "s.json"
    if write is not None:
        write(path)
    with pytest.raises(error, match=message) as info:
        Schedule.load(path)
    assert str(tmp_path) in str(info.value)


def test_load_rejects_other_types():
    with pytest.raises(TypeError, match="source must be a path"):
        Schedule.load(3)
    with pytest.raises(TypeError, match="schedule data must be a mapping; got list"):
        Schedule.from_dict([1, 0])


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_unknown_version(version):
    d = _schedule().to_dict() | {"version": version}
    with pytest.raises(
        ValueError, match=rf"version must be an int from 1 to {FORMAT_VERSION}.*got {version!r}"
    ):
        Schedule.from_dict(d)


def test_unknown_format_and_fields():
    d = _schedule().to_dict()
    with pytest.raises(ValueError, match="format must be 'smoothcache_fx.schedule'; got 'other'"):
        Schedule.from_dict(d | {"format": "other"})
    with pytest.raises(ValueError, match=r"unknown \['metdata'\] and missing \[\]"):
        Schedule.from_dict(d | {"metdata": {}})
    with pytest.raises(ValueError, match=r"missing \['masks'\]"):
        Schedule.from_dict({k: v for k, v in d.items() if k != "masks"})


def test_validation_errors_from_a_file_name_the_file(tmp_path):
    path = tmp_path / "lazy.json"
    path.write_text(json.dumps({"attn": [0, 1]}))
    with pytest.raises(ValueError, match=r"lazy\.json: every mask must compute at step 0"):
        Schedule.load(path)


def test_rename_components_in_every_key_form():
    schedule = Schedule(2, {"attn": [1, 0], "mlp-3": [1, 1], "blocks.1.attn": [1, 1]})
    renamed = schedule.rename({"attn": "attn1", "mlp": "ff"})
    assert set(renamed.keys) == {"attn1", "ff-3", "blocks.1.attn1"}
    assert renamed.masks["ff-3"] == (1, 1) and set(schedule.keys) == {"attn", "mlp-3", "blocks.1.attn"}
    assert renamed.mask_for("transformer_blocks.3.ff") == (True, True)


def test_rename_errors_say_what_to_fix():
    schedule = Schedule(2, {"attn": [1, 0], "attn1": [1, 1]})
    with pytest.raises(ValueError, match=r"two schedule keys the name 'attn1'"):
        schedule.rename({"attn": "attn1"})
    with pytest.raises(ValueError, match=r"\['mlp'\] that no schedule key has"):
        schedule.rename({"mlp": "ff"})
    with pytest.raises(TypeError, match="map component names"):
        schedule.rename(["attn"])


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\xff", ValueError, "must be JSON text in UTF-8"),
        (b"{not json", ValueError, "must contain valid JSON"),
        (b"[1, 2]", ValueError, "must contain a JSON object"),
    ],
)
def test_calibration_errors_load_failures_name_the_file(tmp_path, content, error, message):
    from smoothcache_fx.schedules.errors import CalibrationErrors

    path = tmp_path / "errors.json"
    path.write_bytes(content)
    with pytest.raises(error, match=message) as info:
        CalibrationErrors.load(path)
    assert str(path) in str(info.value) and "CalibrationErrors.save()" in str(info.value)
    with pytest.raises(FileNotFoundError, match="calibration errors path must name an existing"):
        CalibrationErrors.load(tmp_path / "missing.json")


# ---------------------------------------------------------------------- predictor orders


def test_orders_resolve_like_masks_and_round_trip(tmp_path):
    s = Schedule(4, {"attn": [1, 0, 1, 0], "attn-2": [1, 0, 0, 1], "mlp": [1, 1, 0, 1]}, orders={"attn": 2})
    assert s.order_for("blocks.0.attn") == 2
    assert s.order_for("blocks.2.attn") == 0  # decided by `attn-2`, which has no order
    assert s.order_for("blocks.0.mlp") == 0
    assert s.order_for("blocks.0.other") == 0
    assert s.to_dict()["orders"] == {"attn": 2}
    assert Schedule.load(s.save(tmp_path / "s.json")) == s
    assert Schedule.load(tmp_path / "s.json").orders == {"attn": 2}
    assert hash(s) != hash(s.with_orders({}))
    assert s != s.with_orders({"attn": 1})
    assert pickle.loads(pickle.dumps(s)) == s
    assert "orders={'attn': 2}" in repr(s)


def test_order_zero_is_the_default_and_is_dropped():
    plain = Schedule(2, {"attn": [1, 0]})
    assert plain.orders == {}
    assert Schedule(2, {"attn": [1, 0]}, orders={"attn": 0}) == plain


def test_version_1_and_roblox_files_load_with_order_0(tmp_path):
    v1 = {"format": "smoothcache_fx.schedule", "version": 1, "steps": 2, "masks": {"attn": [1, 0]}}
    assert Schedule.from_dict(v1).orders == {}
    with pytest.raises(ValueError, match=r"version-1 schedule .*got unknown \['orders'\]"):
        Schedule.from_dict(v1 | {"orders": {"attn": 1}})
    (tmp_path / "roblox.json").write_text(json.dumps({"attn": [1, 0, 1], "mlp": [1, 1, 0]}))
    assert Schedule.load(tmp_path / "roblox.json").orders == {}


def test_rename_carries_orders():
    s = Schedule(2, {"attn": [1, 0], "mlp-1": [1, 0]}, orders={"attn": 1, "mlp-1": 2})
    assert s.rename({"attn": "attn1", "mlp": "ff"}).orders == {"attn1": 1, "ff-1": 2}


@pytest.mark.parametrize(
    ("orders", "error", "match"),
    [
        ({"ff": 1}, ValueError, r"orders must name keys of the masks; got \['ff'\]"),
        ({"attn": 3}, ValueError, r"orders\['attn'\]: predictor order must be in \[0, 2\].*got 3"),
        ({"attn": 1.0}, TypeError, r"orders\['attn'\]: predictor order must be an int; got float"),
        ({"attn": True}, TypeError, r"predictor order must be an int; got bool"),
        ([("attn", 1)], TypeError, r"orders must be a mapping"),
    ],
)
def test_bad_orders_say_what_and_how(orders, error, match):
    with pytest.raises(error, match=match):
        Schedule(2, {"attn": [1, 0]}, orders=orders)


# ---------------------------------------------------------------------- forecast strengths


def test_strengths_resolve_like_orders_round_trip_and_raise_the_version(tmp_path):
    s = Schedule(4, {"attn": [1, 0, 1, 0], "attn-2": [1, 0, 0, 1]}, orders={"attn": 1, "attn-2": 2})
    damped = s.with_strengths({"attn": 0.75})
    assert damped.strength_for("blocks.0.attn") == 0.75
    assert damped.strength_for("blocks.2.attn") == 1.0  # decided by `attn-2`, which has none
    assert damped.strength_for("blocks.0.mlp") == 1.0
    assert s.to_dict()["version"] == 2 and "strengths" not in s.to_dict()
    assert damped.to_dict()["version"] == 3 and damped.to_dict()["strengths"] == {"attn": 0.75}
    path = damped.save(tmp_path / "s.json")
    assert json.loads(path.read_text())["version"] == 3
    assert Schedule.load(path) == damped and Schedule.load(path).strengths == {"attn": 0.75}
    assert damped != s and hash(damped) != hash(s)
    assert pickle.loads(pickle.dumps(damped)) == damped
    assert "strengths={'attn': 0.75}" in repr(damped)
    assert s.with_strengths(0.5).strengths == {"attn": 0.5, "attn-2": 0.5}  # every forecast key
    assert s.with_strengths({"attn": 1.0}) == s  # strength 1 is the default, dropped


def test_strengths_follow_orders_renames_and_resampling():
    s = Schedule(4, {"attn": [1, 0, 1, 0], "mlp": [1, 0, 0, 1]}, orders={"attn": 1, "mlp": 1}).with_strengths(
        0.6
    )
    assert s.with_orders({"attn": 1}).strengths == {"attn": 0.6}  # mlp reuses now: its strength goes
    assert s.rename({"attn": "attn1"}).strengths == {"attn1": 0.6, "mlp": 0.6}
    assert s.resample(8).strengths == {"attn": 0.6, "mlp": 0.6}


def test_version_2_files_load_with_strength_1_and_refuse_strengths():
    v2 = Schedule(2, {"attn": [1, 0]}, orders={"attn": 1}).to_dict()
    assert v2["version"] == 2 and Schedule.from_dict(v2).strengths == {}
    with pytest.raises(
        ValueError, match=r"version-2 schedule .*unknown \['strengths'\].*came with version 3"
    ):
        Schedule.from_dict(v2 | {"strengths": {"attn": 0.5}})


@pytest.mark.parametrize(
    ("strengths", "error", "match"),
    [
        ({"mlp": 0.5}, ValueError, r"strengths must name keys with a predictor order; got \['mlp'\]"),
        ({"attn": 1.5}, ValueError, r"strengths\['attn'\]: forecast strength must be in \[0, 1\].*got 1.5"),
        ({"attn": -0.1}, ValueError, r"forecast strength must be in \[0, 1\]"),
        ({"attn": "0.5"}, TypeError, r"forecast strength must be a number in \[0, 1\]; got str"),
        ({"attn": True}, TypeError, r"got bool"),
        ([("attn", 0.5)], TypeError, r"strengths must be a mapping"),
    ],
)
def test_bad_strengths_say_what_and_how(strengths, error, match):
    schedule = Schedule(2, {"attn": [1, 0], "mlp": [1, 0]}, orders={"attn": 1})
    with pytest.raises(error, match=match):
        Schedule(2, {"attn": [1, 0], "mlp": [1, 0]}, orders={"attn": 1}, strengths=strengths)
    if isinstance(strengths, dict):
        with pytest.raises(error, match=match):
            schedule.with_strengths(strengths)
