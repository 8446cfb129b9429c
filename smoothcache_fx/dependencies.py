"""What a block's captured graph depends on besides its call signature, checked on every call.

A capture bakes in everything its forward read as Python: which submodules exist (a LoRA wrapper
replacing a Linear adds work), which objects they are (the graph reads parameters through the
modules found at capture time), the training flags (dropout), the attention processors (their
code is the attention), and PEFT's adapter state (active adapters, scales, disabled or merged),
which LoRA layers read as Python values. When any of it changes the block is captured again.

The check runs once per block per model call, so it compares identities along a list flattened at
capture time instead of walking the module tree: a replaced submodule shows as a changed child of
its parent, a replaced parameter as a changed entry of its module's parameter dict. Parameter
values are graph inputs, so in-place weight edits need no new capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _peft_state(module: torch.nn.Module) -> tuple:
    """PEFT's adapter state on a tuner layer (peft.tuners.tuners_utils.BaseTunerLayer): the
    attributes its forward branches on. Empty for every other module."""
    state = module.__dict__
    scaling = state.get("scaling")
    if not isinstance(scaling, dict):
        return ()
    return (
        tuple(sorted(scaling.items())),
        state.get("_disable_adapters"),
        repr(state.get("_active_adapter")),
        tuple(state.get("merged_adapters", ())),
    )


@dataclass(frozen=True)
class _ModuleState:
    module: torch.nn.Module
    path: str
    training: bool
    children: tuple[int, ...]
    parameters: tuple[int, ...]
    processor: object
    peft: tuple


def _state_of(path: str, module: torch.nn.Module) -> _ModuleState:
    return _ModuleState(
        module=module,
        path=path,
        training=module.training,
        children=tuple(map(id, module._modules.values())),
        parameters=tuple(map(id, module._parameters.values())),
        processor=module.__dict__.get("processor"),
        peft=_peft_state(module),
    )


class CaptureDependencies:
    """A snapshot of one block's module tree; `changed(block)` says what differs now, or None.

    The snapshot keeps the objects it saw alive, so an id it compares can never be reused.
    """

    def __init__(self, block: torch.nn.Module):
        self.block = block
        self.states = tuple(_state_of(path, module) for path, module in block.named_modules())
        self._keep = [
            (s.module, list(s.module._modules.values()), list(s.module._parameters.values()))
            for s in self.states
        ]

    def changed(self) -> str | None:
        for state in self.states:
            module = state.module
            where = state.path or "the block"
            if module.training is not state.training:
                return f"{where} switched to {'train' if module.training else 'eval'} mode"
            if tuple(map(id, module._modules.values())) != state.children:
                return f"a submodule of {where} was added, removed or replaced"
            if tuple(map(id, module._parameters.values())) != state.parameters:
                return f"a parameter of {where} was replaced"
            if module.__dict__.get("processor") is not state.processor:
                return f"{where} has another attention processor"
            if state.peft and _peft_state(module) != state.peft:
                return f"{where} changed its adapters (active, scale, enabled or merged)"
        return None

    def key(self) -> tuple:
        """What blocks must share, besides structure and signature, to share a captured graph:
        PEFT scales are Python floats baked into the graph, so they differ per block."""
        return tuple(state.peft for state in self.states)
