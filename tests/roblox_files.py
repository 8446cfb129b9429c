"""Schedule files in the format Roblox/SmoothCache publishes, for tests.

The format: a bare JSON object mapping a component (`attn`, `mlp`: facebookresearch DiT's names) or
a per-block key (`attn-3`) to one 0/1 per denoising step. Roblox's own files (github.com/Roblox/
SmoothCache, `smoothcache_schedules/`, Apache-2.0) are kept, data only, in
`../shared/reference-schedules/` beside the project and never copied into it: `published(name)`
gives one of them, or None where that folder is absent. The writers below make files of the same
format for tests that must run without it.
"""

from __future__ import annotations

import json
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference-schedules"


def published(name: str) -> Path | None:
    """Roblox's file `name` (e.g. "50-N-2-l2c.json") as Roblox publishes it, or None if absent."""
    path = REFERENCE_DIR / name
    return path if path.is_file() else None


def fora_masks(steps: int, interval: int = 2, components=("attn", "mlp")) -> dict[str, list[int]]:
    """FORA-`interval` as Roblox's `{steps}-N-2-fora.json` has it: every `interval`-th step
    computes, and so does the last one."""
    mask = [int(step % interval == 0) for step in range(steps)]
    mask[-1] = 1
    return {component: list(mask) for component in components}


def per_block_masks(steps: int, blocks: int, components=("attn", "mlp")) -> dict[str, list[int]]:
    """Per-block keys (`attn-0` ... `mlp-{blocks - 1}`) in the style of Roblox's `50-N-2-l2c.json`:
    each key alternates compute/reuse from step 0 up to a step of its own, then always computes."""
    masks = {}
    for block in range(blocks):
        for index, component in enumerate(components):
            until = steps // 2 + (5 * block + 11 * index) % (steps // 2)
            masks[f"{component}-{block}"] = [int(step >= until or step % 2 == 0) for step in range(steps)]
    return masks


def write(path: Path, masks: dict[str, list[int]]) -> Path:
    """`masks` written as Roblox writes its files: the bare object, no envelope."""
    path.write_text(json.dumps(masks), encoding="utf-8")
    return path
