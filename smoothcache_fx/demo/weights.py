"""Loading the weights shipped in the package (stored fp16 or fp32, loaded as fp32)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent


def load_shipped_weights(
    module: torch.nn.Module, filename: str, what: str, directory: str | os.PathLike[str] = WEIGHTS_DIR
) -> torch.nn.Module:
    """Fills `module` from `directory/filename`; a missing or damaged file says how to get it back.

    Args:
        module: the freshly built model whose state dict the file holds.
        filename: the file's name inside `directory`.
        what: what the weights are for, as error messages name it ("demo", "classifier").
        directory: where the file lies; the package's own folder unless a test or a retrained copy
            points elsewhere.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} weights must exist at {path}; got no file. Run `python -m smoothcache_fx.demo.train` "
            "to write them, or reinstall the package with its package_data."
        )
    try:
        tensors = load_file(str(path))
    except SafetensorError as err:  # truncated or overwritten: the file, not the caller, is wrong
        size = path.stat().st_size
        expected = _expected_size(path)
        sizes = f"{size} bytes" if expected is None else f"{size} bytes of the {expected} its header names"
        raise ValueError(
            f"{what} weights at {path} must be a complete safetensors file; got {sizes}, which "
            f"safetensors cannot read ({err}). The file is damaged, e.g. by an interrupted copy: "
            "reinstall the package (`pip install --force-reinstall smoothcache-fx`), or in a source "
            "checkout restore it with `git checkout -- <file>`."
        ) from err
    module.load_state_dict({k: v.float() for k, v in tensors.items()})
    return module


def _expected_size(path: Path) -> int | None:
    """The size a safetensors file should have, read from its header; None when the header itself
    is unreadable (the format: 8-byte little-endian header length, JSON header, then the data)."""
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if not 0 < length <= path.stat().st_size - 8:  # cut short, or garbage not to allocate
            return None
        header = file.read(length)
    try:
        entries = json.loads(header)
    except ValueError:  # not UTF-8 or not JSON: nothing tells how large the data was
        return None
    if not isinstance(entries, dict):
        return None
    ends = [
        entry["data_offsets"][-1]
        for entry in entries.values()
        if isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list) and entry["data_offsets"]
    ]
    return 8 + length + max(ends, default=0)
