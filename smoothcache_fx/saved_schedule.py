"""The schedule saved beside a diffusers model: `save_pretrained` of a transformed model (or of a
pipeline holding one) writes it next to the model's `config.json`, and `transform` without a
schedule reads it back from the folder the model was loaded from (`config._name_or_path`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from smoothcache_fx.schedules import Schedule

LOGGER = logging.getLogger("smoothcache_fx")
SCHEDULE_FILE = "smoothcache_schedule.json"


def save_beside_config(schedule: Schedule, save_directory: str | os.PathLike[str]) -> Path:
    """Write `schedule` into the folder `save_pretrained` just wrote; returns its path."""
    path = schedule.save(Path(save_directory) / SCHEDULE_FILE)
    LOGGER.info("smoothcache_fx: wrote the schedule to %s", path)
    return path


def load_saved(model) -> Schedule:
    """The schedule saved beside `model`'s config, logged; a clear error when there is none."""
    folder = _loaded_from(model)
    name = type(model).__name__
    if folder is None or not (folder / SCHEDULE_FILE).is_file():
        where = (
            f"it was loaded from {str(folder)!r}, which has no {SCHEDULE_FILE}"
            if folder is not None
            else "it was not loaded from a local folder (no config._name_or_path that is a folder)"
        )
        raise ValueError(
            f"transform without a schedule must find one saved beside {name}'s config; {where}. "
            "Pass a schedule: transform(model, Schedule.load(path)) (our JSON or a SmoothCache/Roblox "
            "file), or one from Schedule.from_errors(...). save_pretrained of a transformed model or "
            f"pipeline writes {SCHEDULE_FILE} for next time."
        )
    path = folder / SCHEDULE_FILE
    schedule = Schedule.load(path)
    LOGGER.info("smoothcache_fx: using the schedule saved with %s: %s (%s)", name, path, schedule)
    return schedule


def _loaded_from(model) -> Path | None:
    config = getattr(model, "config", None)
    source = getattr(config, "_name_or_path", None) if config is not None else None
    if not isinstance(source, (str, os.PathLike)) or not source or not Path(source).is_dir():
        return None
    return Path(source)
