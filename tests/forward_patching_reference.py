"""A forward-patching SmoothCache reference, the oracle that smoothcache_fx is checked against.

Independent of smoothcache_fx on purpose: it reads the schedule as a plain dict in the SmoothCache
JSON format and patches `forward` of each scheduled child module (attn1, attn2, ff, attn, mlp, or the
names passed as `components`) of each transformer block (an element of an `nn.ModuleList`), as
Roblox/SmoothCache's helpers do for attn1 only. On a reuse step the patched forward returns the
module output cached at the last compute step. One model call is one step. It caches the *module
output*; smoothcache_fx caches the tensor that enters the gate multiplication, which is the same
tensor for the test models (and for every family in COVERAGE.md: where a branch is a slice of a
module's output, CogVideoX's ff, every slice is reused together with the module).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

COMPONENTS = ("attn1", "attn2", "ff", "attn", "mlp")


class ForwardPatchingReference:
    """Step-indexed output caching by patching child-module forwards; use as a context manager.

    Args:
        model: the denoiser; its blocks are the elements of its `nn.ModuleList`s.
        schedule: key -> one 0/1 per step (1 = compute, 0 = reuse). Keys are a component name
            (`"ff"`), `"<component>-<block index>"` (`"ff-1"`) or a full module path
            (`"transformer_blocks.1.ff"`); the most specific key wins.
        components: names of the child modules that may be patched; default `COMPONENTS`. Models
            whose residual branches come from other children (Flux's `ff_context`, `proj_out`) pass
            theirs here.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Mapping[str, Sequence[int]],
        components: Sequence[str] = COMPONENTS,
    ):
        self.model = model
        self.components = tuple(components)
        self.schedule = {key: [int(v) for v in mask] for key, mask in schedule.items()}
        self.step = 0
        self.cache: dict[str, object] = {}
        self.patched: dict[str, nn.Module] = {}
        self.used_keys: set[str] = set()
        self.computed: dict[str, int] = {}  # path -> calls that ran the module, since enable()
        self.reused: dict[str, int] = {}
        self._hook = None

    def key_for(self, path: str) -> str | None:
        *_, index, component = path.split(".")
        for key in (path, f"{component}-{index}", component):
            if key in self.schedule:
                return key
        return None

    def reset(self) -> None:
        self.step = 0
        self.cache.clear()

    def enable(self) -> ForwardPatchingReference:
        self.reset()
        for list_path, module_list in self.model.named_modules():
            if not isinstance(module_list, nn.ModuleList):
                continue
            for index, block in enumerate(module_list):
                for name in self.components:
                    child = getattr(block, name, None)
                    path = f"{list_path}.{index}.{name}" if list_path else f"{index}.{name}"
                    key = self.key_for(path)
                    if isinstance(child, nn.Module) and key is not None:
                        child.forward = self._patched_forward(path, self.schedule[key], child.forward)
                        self.patched[path] = child
                        self.computed[path] = self.reused[path] = 0
                        self.used_keys.add(key)
        self._hook = self.model.register_forward_hook(self._advance)
        return self

    def disable(self) -> None:
        for child in self.patched.values():
            del child.forward  # the instance attribute; the class's forward shows through again
        self.patched.clear()
        self._hook.remove()
        self.reset()

    def __enter__(self) -> ForwardPatchingReference:
        return self.enable()

    def __exit__(self, *exc) -> None:
        self.disable()

    def _advance(self, module, args, output) -> None:
        self.step += 1

    def _patched_forward(self, path: str, mask: list[int], forward):
        def patched(*args, **kwargs):
            if mask[self.step]:
                self.cache[path] = forward(*args, **kwargs)
            counter = self.computed if mask[self.step] else self.reused
            counter[path] += 1
            return self.cache[path]  # KeyError: reuse before any compute, a broken schedule

        return patched
