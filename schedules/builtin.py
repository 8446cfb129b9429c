"""Named schedules shipped with the package (`schedules/data/*.json`, installed as package data).

The `roblox-dit-xl2-256-*` files are the DiT-XL/2 256x256 schedules published with Roblox's
SmoothCache (github.com/Roblox/SmoothCache, `smoothcache_schedules/`, Apache-2.0), with their
components renamed to diffusers' DiT names (`attn` -> `attn1`, `mlp` -> `ff`); each file's
metadata names its source file.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def builtin_names() -> tuple[str, ...]:
    """The names `Schedule.builtin` accepts, sorted."""
    return tuple(sorted(path.stem for path in DATA_DIR.glob("*.json")))


def builtin_path(name: str) -> Path:
    """The JSON file of the built-in schedule `name`; ValueError naming the choices otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"a built-in schedule name must be a str; got {type(name).__name__} {name!r}.")
    names = builtin_names()
    if name not in names:
        raise ValueError(
            f"built-in schedule name must be one of {list(names)}; got {name!r}. For a file of your "
            "own use Schedule.load(path)."
        )
    return DATA_DIR / f"{name}.json"
