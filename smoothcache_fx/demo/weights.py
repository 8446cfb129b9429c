"""Loading the weights shipped in the package (stored fp16 or fp32, loaded as fp32)."""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent


def load_shipped_weights(module: torch.nn.Module, filename: str, what: str) -> torch.nn.Module:
    """Fills `module` from `WEIGHTS_DIR/filename`; a missing file says how to get it back."""
    from safetensors.torch import load_file

    path = WEIGHTS_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} weights must exist at {path}; got no file. Run `python -m smoothcache_fx.demo.train` "
            "to write them, or reinstall the package with its package_data."
        )
    module.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return module
