"""Narrow a linear to the output chunks a specialised graph still reads.

adaLN-Zero blocks compute every modulation at once, `linear(silu(emb), W)` with W of [6D, D], and
split the result into shift/scale/gate for attention and MLP. In a step that reuses every branch
only the two gates are read; DCE cannot remove part of a matmul, so the block would still read all
of W, which at batch 2 is what a reused step costs (DiT-B/2: 14 MB of adaLN weights per block,
~4% of a computed step on a CPU). Rewritten here, each run of adjacent chunks still read becomes
one linear over the matching rows of W and b (contiguous views, no copy), split again if the run
holds several chunks, and the full linear and its split die: a step reusing only attention reads
chunks 2-5 with one linear, a step reusing everything reads the two gates with two.

A row slice of a GEMM computes each output from the same row of W and the same input as the
full GEMM does; on the CPU kernels measured here (MKL and inductor's extern mm) the results are
bit-identical. Cross-device bit-exactness is not promised (cuBLAS may pick another algorithm for
the narrower shape); the difference is then rounding, not a change of what is computed.
"""

from __future__ import annotations

import contextlib
import operator

import torch
from torch.fx import Graph, Node

from smoothcache_fx.kernels.compat import detect_fake_mode

aten = torch.ops.aten


def narrow_partial_linears(graph: Graph) -> int:
    """Rewrite `getitem(split(linear(x, W, b), size, -1), i)` for the chunks still read, when some
    are not; returns how many linears were narrowed. Run DCE afterwards."""
    replaced: dict[str, Node] = {}
    return _rewrite_split_linears(graph, every_chunk=False, replaced=replaced)


def split_linears_by_chunk(graph: Graph, nodes: dict[str, Node]) -> int:
    """Rewrite every `getitem(split(linear(x, W, b), size, -1), i)` into one linear per chunk, also
    when every chunk is read; returns how many linears were split. For the single-graph form: there
    the step is a tensor, nothing is dead at capture time, and a shift/scale chunk that only one
    branch reads can then move into that branch's `cond` and be skipped where the branch is reused,
    as the variants' narrowing skips it (the gates stay outside: the fused add reads them).

    `nodes` (name -> node, as callers holding residual sites keep them) is updated for every getitem
    replaced. Returns how many linears were split; run DCE afterwards."""
    replaced: dict[str, Node] = {}
    count = _rewrite_split_linears(graph, every_chunk=True, replaced=replaced)
    nodes.update(replaced)
    return count


def _rewrite_split_linears(graph: Graph, every_chunk: bool, replaced: dict[str, Node]) -> int:
    narrowed = 0
    for split in [n for n in graph.nodes if n.op == "call_function" and n.target is aten.split.Tensor]:
        pieces = _used_pieces(split, every_chunk)
        if pieces is None:
            continue
        linear, size = split.args[0], split.args[1]
        x, weight = linear.args[0], linear.args[1]
        bias = linear.args[2] if len(linear.args) > 2 else None
        out_features = weight.meta["val"].shape[0]
        runs = [[index] for index in sorted(pieces)] if every_chunk else _runs(sorted(pieces))
        for run in runs:
            start, end = run[0] * size, min((run[-1] + 1) * size, out_features)
            with graph.inserting_before(split):
                rows = _slice(graph, weight, start, end)
                args = (x, rows) if bias is None else (x, rows, _slice(graph, bias, start, end))
                narrow = _call(graph, aten.linear.default, args, linear.meta)
                if len(run) > 1:
                    parts = _call(graph, aten.split.Tensor, (narrow, size, -1), split.meta)
            for offset, index in enumerate(run):
                replacement = narrow
                if len(run) > 1:
                    with graph.inserting_before(split):
                        replacement = _call(graph, operator.getitem, (parts, offset), pieces[index].meta)
                pieces[index].replace_all_uses_with(replacement)
                replaced[pieces[index].name] = replacement
                graph.erase_node(pieces[index])
        narrowed += 1
    return narrowed


def _runs(indices: list[int]) -> list[list[int]]:
    """[0, 1, 2, 5] -> [[0, 1, 2], [5]]."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def _call(graph: Graph, target, args: tuple, meta: dict) -> Node:
    """A call_function node with the metadata of the node it stands in for and its own fake value."""
    node = graph.call_function(target, args)
    node.meta = {**meta, "val": _fake(target, args)}
    return node


def _used_pieces(split: Node, every_chunk: bool = False) -> dict[int, Node] | None:
    """{chunk index: its getitem} when `split` splits a linear's last dim and reads some chunks only
    (or, with `every_chunk`, any of them)."""
    linear = split.args[0]
    if not isinstance(linear, Node) or linear.target is not aten.linear.default or len(linear.users) != 1:
        return None
    value, weight = linear.meta.get("val"), linear.args[1]
    if value is None or not isinstance(weight, Node) or weight.meta.get("val") is None:
        return None
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if (
        dim not in (-1, value.dim() - 1)
        or weight.meta["val"].dim() != 2
        or not isinstance(split.args[1], int)
    ):
        return None
    users = list(split.users)
    if not all(u.target is operator.getitem and isinstance(u.args[1], int) for u in users):
        return None
    chunks = -(-value.shape[-1] // split.args[1])
    if len(users) >= chunks and not every_chunk:
        return None
    return {u.args[1]: u for u in users}


def _slice(graph: Graph, tensor: Node, start: int, end: int) -> Node:
    return _call(graph, aten.slice.Tensor, (tensor, 0, start, end), {})


def _fake(target, args):
    """The output's fake value, computed in the graph's fake mode from its arguments' values."""
    values = [a.meta["val"] if isinstance(a, Node) else a for a in args]
    mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    with mode if mode is not None else contextlib.nullcontext():
        return target(*values)
