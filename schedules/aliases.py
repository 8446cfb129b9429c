"""Component aliases: one branch, different names in different code bases.

Roblox's SmoothCache DiT schedules are keyed by facebookresearch DiT's module names (`attn`, `mlp`);
diffusers calls the same branches `attn1` and `ff` in its DiT, PixArt, Hunyuan-DiT, CogVideoX,
Sana, Stable Audio and Latte blocks, `attn` and `ff` in SD3, Flux and AuraFlow blocks, and
`attn1` and `ffn` in Wan. A schedule key whose component names no branch of the model is renamed
to the first alias that does; anything else is left alone (and refused as a typo if still unmatched).

Lumina's branches are its post-norms (`norm2`, `ffn_norm2`), which are not aliases of `attn`/`mlp`
in any sense a reader would guess; Flux's single-stream branch is `proj_out` (attention and MLP in
one residual). Schedules for those name them directly.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping

# Key component -> what the same branch is called elsewhere, in order of preference.
COMPONENT_ALIASES: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
    {
        "attn": ("attn1",),  # facebookresearch DiT / SD3, Flux -> diffusers BasicTransformerBlock
        "attn1": ("attn",),  # diffusers BasicTransformerBlock -> SD3, Flux, AuraFlow, facebookresearch DiT
        "mlp": ("ff", "ffn"),  # facebookresearch DiT -> diffusers FeedForward (`ffn` in Wan)
        "ff": ("mlp", "ffn"),  # diffusers -> facebookresearch DiT / U-ViT, Wan
        "ffn": ("ff", "mlp"),  # Wan -> other diffusers blocks, facebookresearch DiT
    }
)


def alias_renames(key_components: Iterable[str], branch_components: Iterable[str]) -> dict[str, str]:
    """Which key components to rename, and to what, so that they name branches of the model.

    A component is renamed only when it names no branch and one of its aliases does, and only to
    a component no other key already uses (two keys must not end up deciding one branch).

    Args:
        key_components: the components the schedule's keys name (`attn` for `attn`, `attn-3` and
            `blocks.3.attn`).
        branch_components: the components the model's branches are called.

    Example::

        >>> alias_renames(["attn", "mlp"], ["attn1", "ff"])
        {'attn': 'attn1', 'mlp': 'ff'}
        >>> alias_renames(["attn", "mlp"], ["attn", "mlp"])
        {}
    """
    keys = sorted(set(key_components))
    branches = set(branch_components)
    renames: dict[str, str] = {}
    for component in keys:
        if component in branches:
            continue
        target = next((alias for alias in COMPONENT_ALIASES.get(component, ()) if alias in branches), None)
        if target is not None and target not in keys and target not in renames.values():
            renames[component] = target
    return renames
