"""Reading the JSON files schedules and calibration errors are saved as: every failure names the
file and says what to do (shared by `Schedule.load` and `CalibrationErrors.load`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, what: str, expected: str) -> dict[str, Any]:
    """The JSON object in `path`. `what` names the file's role ("schedule", "calibration errors")
    and `expected` what a valid file holds, for the messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{what} path must name an existing JSON file; got {str(path)!r}, which does not exist. "
            "Check the path (relative paths are from the current directory)."
        ) from err
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{what} file {str(path)!r} must be JSON text in UTF-8; got a byte that is not UTF-8 at "
            f"offset {err.start} ({err.reason}). Pass {expected}, not a binary file such as weights "
            "or a picture."
        ) from err
    except OSError as err:  # a folder, no permission, ...: same type, with the path and the fix
        raise type(err)(
            f"{what} path must name a readable JSON file; got {str(path)!r} "
            f"({err.strerror or err}). Pass a file, not a folder, that you may read."
        ) from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{what} file {str(path)!r} must contain valid JSON; got an error at line {err.lineno}, "
            f"column {err.colno}: {err.msg}. The file should hold {expected}."
        ) from err
    if not isinstance(data, dict):
        raise ValueError(
            f"{what} file {str(path)!r} must contain a JSON object; got a JSON "
            f"{type(data).__name__}. Write {expected}."
        )
    return data
