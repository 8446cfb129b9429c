"""A forward-patching SmoothCache reference, the oracle that smoothcache_fx is checked against.

Independent of smoothcache_fx on purpose: it reads the schedule as a plain dict in the SmoothCache
JSON format and patches `forward` of each scheduled child module (attn1, attn2, ff, attn, mlp, or the
names passed as `components`) of each transformer block (an element of an `nn.ModuleList`), as
Roblox/SmoothCache's helpers do for attn1 only. On a reuse step the patched forward returns the
module output cached at the last compute step, or, for a key given a predictor order k in `orders`,
the polynomial in step index through the outputs of its last k+1 compute steps (Newton's divided
differences in float64: a different construction from smoothcache_fx's Lagrange weights, so the two
check each other), moved only `strengths[key]` of the way from the newest output when given. One model call is one step. It caches the *module
output*; smoothcache_fx caches the tensor that enters the gate multiplication, which is the same
tensor for the test models (and for every family in COVERAGE.md: where a branch is a slice of a
module's output, CogVideoX's ff, every slice is reused together with the module).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
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
        orders: key -> predictor order (0 reuse, 1 linear, 2 quadratic); keys left out reuse.
        strengths: key -> s in [0, 1]: the forecast is `newest + s * (polynomial - newest)`;
            keys left out 1.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Mapping[str, Sequence[int]],
        components: Sequence[str] = COMPONENTS,
        orders: Mapping[str, int] | None = None,
        strengths: Mapping[str, float] | None = None,
    ):
        self.model = model
        self.components = tuple(components)
        self.schedule = {key: [int(v) for v in mask] for key, mask in schedule.items()}
        self.step = 0
        self.orders = dict(orders or {})
        self.strengths = dict(strengths or {})
        self.cache: dict[str, list[tuple[int, torch.Tensor]]] = {}  # path -> (step, output) computed
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
                        order, strength = self.orders.get(key, 0), self.strengths.get(key, 1.0)
                        child.forward = self._patched_forward(
                            path, self.schedule[key], order, strength, child.forward
                        )
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

    def _patched_forward(self, path: str, mask: list[int], order: int, strength: float, forward):
        def patched(*args, **kwargs):
            if mask[self.step]:
                output = forward(*args, **kwargs)
                self.cache[path] = [*self.cache.get(path, []), (self.step, output)][-(order + 1) :]
                self.computed[path] += 1
                return output
            self.reused[path] += 1
            points = self.cache[path]  # KeyError: reuse before any compute
            newest = points[-1][1]
            forecast = _extrapolate(points, self.step)
            if strength == 1.0:
                return forecast
            return (newest.double() + strength * (forecast.double() - newest.double())).to(newest.dtype)

        return patched


def _extrapolate(points: list[tuple[int, torch.Tensor]], step: int) -> torch.Tensor:
    """The polynomial through (step_i, output_i) read at `step`, by Newton's divided differences in
    float64, in the outputs' dtype. One point: that output itself."""
    if len(points) == 1:
        return points[0][1]
    steps = [s for s, _ in points]
    table = [y.double() for _, y in points]
    coefficients = [table[0]]
    for level in range(1, len(points)):
        table = [(table[i + 1] - table[i]) / (steps[i + level] - steps[i]) for i in range(len(table) - 1)]
        coefficients.append(table[0])
    value, product = coefficients[0], 1.0
    for level in range(1, len(points)):
        product *= step - steps[level - 1]
        value = value + product * coefficients[level]
    return value.to(points[-1][1].dtype)
