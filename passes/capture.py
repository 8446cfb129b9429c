"""Capture one transformer block as an FX graph from its real call arguments.

torch.export (non-strict) is used instead of `torch.fx.symbolic_trace` because diffusers blocks branch
on Python values and call helpers that symbolic tracing cannot follow, and because export records
clean module paths in `node.meta["nn_module_stack"]`, which the branch analysis reads.

The block's call is flattened with pytree: tensor leaves become graph inputs, every other leaf
(None, ints, strings) is baked into the graph. Parameters and buffers are lifted to inputs too, so a
graph holds no weights: the runtime passes the block's own tensors (and one compiled artifact can
serve every block of the same structure). Two clean-ups follow the export: metadata assertions
are removed, and block-level adds and muls that promote a lower-precision operand get that upcast
as an explicit cast (so a bf16 branch added in fp32 is seen through the cast).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.export.graph_signature import InputKind, OutputKind

from smoothcache_fx.kernels.compat import TreeSpec, export_functional, tree_flatten, tree_unflatten

# Root attribute under which the block sits inside the export wrapper; stripped from every path.
BLOCK_PREFIX = "block."

# Checks that export inserts; they only assert metadata, and keeping them would keep skipped
# branches alive (they count as side effects for dead-code elimination).
ASSERT_TARGETS = (
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
)

# Block-level ops whose implicit type promotion `make_promotions_explicit` writes out as a cast.
PROMOTING_TARGETS = (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor)


@dataclass(frozen=True)
class CallSignature:
    """What a captured graph was specialised on: structure, constant leaves and tensor metadata."""

    structure: Any  # ("flat", n_args, kwarg names) for flat calls, else the pytree TreeSpec
    constants: tuple[Any, ...]
    tensors: tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...]

    def describe_change(self, other: CallSignature) -> str:
        """Human-readable difference, for errors about changes in the middle of a generation."""
        if self.structure != other.structure or self.constants != other.constants:
            return "the call's non-tensor arguments or argument structure changed"
        for index, (old, new) in enumerate(zip(self.tensors, other.tensors, strict=True)):
            if old != new:
                return (
                    f"tensor argument {index} changed from shape {list(old[0])}, {old[1]}, {old[2]} "
                    f"to shape {list(new[0])}, {new[1]}, {new[2]}"
                )
        return "nothing changed"


@dataclass(frozen=True)
class CapturedBlock:
    """A block's graph with its inputs described.

    Attributes:
        graph_module: placeholders are, in order, the lifted state (`state_names`, then
            `constants`) and then the tensor leaves of the call; outputs are the flattened outputs.
        state_names: parameter/buffer paths relative to the block, in placeholder order.
        constants: lifted tensor constants (created inside forward), in placeholder order.
        signature: the call the graph was captured from.
        out_spec: how to rebuild the block's output from the graph's flat outputs.
    """

    graph_module: torch.fx.GraphModule
    state_names: tuple[str, ...]
    constants: tuple[torch.Tensor, ...]
    signature: CallSignature
    out_spec: TreeSpec

    @property
    def num_state_inputs(self) -> int:
        return len(self.state_names) + len(self.constants)


_FLAT_LEAVES = (torch.Tensor, bool, int, float, str, type(None))


def call_signature(args: tuple, kwargs: dict) -> tuple[CallSignature, list[torch.Tensor]]:
    """Flatten a call into its signature and its tensor leaves (in pytree leaf order).

    Block calls are usually flat (tensors, None, scalars): those skip pytree, whose flatten and
    TreeSpec comparison cost about 0.1 ms a call, which matters once per block per step.
    """
    values = (*args, *kwargs.values())
    if all(isinstance(value, _FLAT_LEAVES) for value in values):
        structure = ("flat", len(args), tuple(kwargs))
        leaves = values
    else:
        leaves, structure = tree_flatten((args, kwargs))
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    constants = tuple(_hashable(leaf) for leaf in leaves if not isinstance(leaf, torch.Tensor))
    meta = tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
    return CallSignature(structure, constants, meta), tensors


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


class _FlatCall(torch.nn.Module):
    """Export root: takes only the call's tensor leaves and rebuilds the original call around them."""

    def __init__(self, block: torch.nn.Module, forward: Callable, leaves: list, in_spec: TreeSpec):
        super().__init__()
        self.block = block
        self._forward = forward
        self._leaves = leaves
        self._in_spec = in_spec
        self._tensor_positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def forward(self, *tensors: torch.Tensor):
        leaves = list(self._leaves)
        for position, tensor in zip(self._tensor_positions, tensors, strict=True):
            leaves[position] = tensor
        args, kwargs = tree_unflatten(leaves, self._in_spec)
        return self._forward(self.block, *args, **kwargs)


def capture_block(block: torch.nn.Module, forward: Callable, args: tuple, kwargs: dict) -> CapturedBlock:
    """Export `forward(block, *args, **kwargs)` into a functional ATen graph with lifted state.

    Args:
        block: the transformer block.
        forward: the unbound forward to trace (the block class's original forward).
        args, kwargs: a real call of the block; shapes, dtypes and non-tensor values are baked in.

    Returns:
        The captured graph, with `_assert_tensor_metadata` checks removed.
    """
    signature, tensors = call_signature(args, kwargs)
    leaves, in_spec = tree_flatten((args, kwargs))
    root = _FlatCall(block, forward, leaves, in_spec)
    with torch.no_grad():
        exported, out_spec = export_functional(root, tuple(tensors))

    for spec in exported.graph_signature.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            raise NotImplementedError(
                f"{type(block).__name__} mutates its state in forward ({spec.kind.name} of "
                f"{spec.target!r}); smoothcache_fx needs blocks whose forward only reads parameters "
                "and buffers. Exclude this block with transform(..., blocks=[...])."
            )

    state_names, constants = [], []
    for spec in exported.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            state_names.append(spec.target.removeprefix(BLOCK_PREFIX))
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            constants.append(exported.constants[spec.target])
        elif spec.kind != InputKind.USER_INPUT:
            raise NotImplementedError(
                f"{type(block).__name__}: unsupported exported input kind {spec.kind.name} "
                f"for {spec.target!r}."
            )
    if len(state_names) + len(constants) + len(tensors) != sum(
        1 for node in exported.graph_module.graph.nodes if node.op == "placeholder"
    ):
        raise RuntimeError("captured graph inputs do not line up with the lifted state and call tensors")

    graph_module = exported.graph_module
    remove_assertions(graph_module)
    remove_layout_preserving_clones(graph_module)
    make_promotions_explicit(graph_module)
    return CapturedBlock(
        graph_module=graph_module,
        state_names=tuple(state_names),
        constants=tuple(constants),
        signature=signature,
        out_spec=out_spec,
    )


def remove_assertions(graph_module: torch.fx.GraphModule) -> int:
    """Erase metadata assertions so they do not pin otherwise dead nodes; returns how many."""
    removed = 0
    for node in list(graph_module.graph.nodes):
        if node.op == "call_function" and node.target in ASSERT_TARGETS and not node.users:
            graph_module.graph.erase_node(node)
            removed += 1
    graph_module.recompile()
    return removed


def remove_layout_preserving_clones(graph_module: torch.fx.GraphModule) -> int:
    """Erase clones that copy a tensor into the layout it already has; returns how many.

    Eval-mode dropout exports as `aten.clone` where eager returns its input: in a diffusers
    BasicTransformerBlock that is a full copy of the attention output and of the 4x-wide GELU
    activation per block and step (measured on DiT-S/2: ~6 ms of a 315 ms forward). The exported
    graph is functional, so such a copy changes nothing but time. Kept: clones of graph inputs and
    clones the graph returns (their results must not alias an input), clones that change layout or
    dtype, and clones a mutating op reads.
    """
    removed = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.clone.default:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op == "placeholder" or node.kwargs:
            continue
        before, after = source.meta.get("val"), node.meta.get("val")
        if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
            continue
        if before.stride() != after.stride() or before.dtype != after.dtype:
            continue
        if any(user.op == "output" or _mutates(user) for user in node.users):
            continue
        node.replace_all_uses_with(source)
        graph_module.graph.erase_node(node)
        removed += 1
    if removed:
        graph_module.recompile()
    return removed


def _mutates(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def make_promotions_explicit(graph_module: torch.fx.GraphModule) -> int:
    """Upcast, with an explicit `_to_copy`, the lower-precision operand of every block-level
    floating add/mul whose result has a higher precision; returns how many casts were inserted.

    Wan adds in float32 around bfloat16 branches (`h.float() + attn(x) * gate_fp32`): the residual
    pattern then sees the cast as X's pass-through, and the residual, the branch and the gate share
    the result's dtype, as the fused op needs. Only upcasts are made explicit; they are exact and
    are what type promotion does inside the op anyway.
    """
    graph = graph_module.graph
    inserted = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in PROMOTING_TARGETS or not _at_block_level(node):
            continue
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
            continue
        for arg in dict.fromkeys(node.args):
            value = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
            if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
                continue
            if value.dtype == out.dtype or torch.promote_types(value.dtype, out.dtype) != out.dtype:
                continue
            with graph.inserting_before(node):
                cast = graph.call_function(torch.ops.aten._to_copy.default, (arg,), {"dtype": out.dtype})
            # At block level, like the op it feeds: the residual pattern reads ownership from here.
            cast.meta = {
                key: node.meta[key] for key in ("nn_module_stack", "stack_trace") if key in node.meta
            }
            cast.meta["val"] = value.to(out.dtype)
            node.replace_input_with(arg, cast)
            inserted += 1
    if inserted:
        graph.lint()
        graph_module.recompile()
    return inserted


def _at_block_level(node: torch.fx.Node) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return not any(path.startswith(BLOCK_PREFIX) for path, _ in stack.values())


def structure_key(block: torch.nn.Module) -> tuple:
    """A fingerprint under which two blocks trace to the same graph.

    Two blocks share a captured graph when their module trees, state shapes/dtypes and the plain
    Python attributes that forward may branch on (norm types, head counts, chunk sizes, processor
    classes) are equal. Parameters are graph inputs, so their values do not matter.
    """
    parts = []
    for path, module in block.named_modules():
        attributes = []
        for name, value in sorted(vars(module).items()):
            if name.startswith("_") and name not in ("_chunk_size", "_chunk_dim"):
                continue
            if value is None or isinstance(value, (bool, int, float, str)):
                attributes.append((name, value))
            elif isinstance(value, (tuple, list)) and all(
                isinstance(v, (bool, int, float, str)) for v in value
            ):
                attributes.append((name, tuple(value)))
            elif not isinstance(value, torch.Tensor):
                attributes.append((name, type(value).__qualname__))
        state = tuple(
            (name, tuple(t.shape), t.dtype, t.device)
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        )
        parts.append((path, type(module).__qualname__, tuple(attributes), state))
    return tuple(parts)
