"""Every ```python example in README.md runs as written.

The README's examples take `pipe` to be a diffusers DiT pipeline and `schedule.json` a 50-step
schedule; here `pipe` is the tiny DiT pipeline from tests/models.py (class labels up to 999, as
DiT-XL/2's) and `schedule.json` is Roblox's `50-N-3-threshold-0.18.json` as Roblox publishes it,
read from ../shared/reference-schedules, or where that is absent a 50-step FORA-2 file of the same
format (keys `attn`, `mlp` either way: the aliases make it run on diffusers' DiT). Each example
runs in a fresh folder with a fresh pipeline, so none depends on another. An example preceded by
`<!-- readme-test: skip -->` is left out; the one that is says why in the README.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import models
import pytest
import roblox_files

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = "<!-- readme-test: skip -->"


def readme_examples() -> list[tuple[str, str, bool]]:
    """(first line, code, skipped) for each ```python block, in order."""
    text = README.read_text(encoding="utf-8")
    examples = []
    position = 0
    for match in re.finditer(r"^( *)```python\n(.*?)^\1```", text, re.M | re.S):
        before = text[position : match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        code = textwrap.dedent(match.group(2))
        first = next(line for line in code.splitlines() if line and not line.startswith(("import", "from")))
        examples.append((first, code, before == SKIP))
        position = match.end()
    return examples


EXAMPLES = readme_examples()


def write_schedule_json(path: Path) -> None:
    """The README's `schedule.json`: Roblox's file byte for byte, or the FORA-2 fixture."""
    published = roblox_files.published("50-N-3-threshold-0.18.json")
    if published is not None:
        path.write_bytes(published.read_bytes())
    else:
        roblox_files.write(path, roblox_files.fora_masks(50))


def test_the_readme_has_its_examples_and_skips_only_the_package_one():
    assert len(EXAMPLES) >= 10
    skipped = [first for first, _, skip in EXAMPLES if skip]
    assert skipped == [
        'smoothcache_fx.export_package(model, (latents,), {"timestep": t, "class_labels": y}, path="dit.pt2")'
    ]


@pytest.mark.parametrize(
    "code",
    [code for _, code, skip in EXAMPLES if not skip],
    ids=[first[:60] for first, _, skip in EXAMPLES if not skip],
)
def test_readme_example_runs_as_written(code, tmp_path, monkeypatch):
    write_schedule_json(tmp_path / "schedule.json")
    monkeypatch.chdir(tmp_path)
    namespace = {"pipe": models.dit_pipeline(), "__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    assert os.getcwd() == str(tmp_path)
