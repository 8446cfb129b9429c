"""passes/capture.py: a block's call exported into a functional ATen graph, then cleaned up."""

from __future__ import annotations

import torch
from torch import nn


class _DropoutBlock(nn.Module):
    """Eval-mode dropout (exported as a copy) on a branch, and a clone that changes the layout."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        x = x + self.drop(self.ff(x))
        return x.transpose(1, 2).contiguous().transpose(1, 2)


def test_capture_drops_copies_that_keep_the_layout():
    from smoothcache_fx.passes.capture import capture_block

    block = _DropoutBlock().eval()
    x = torch.randn(2, 5, 8)
    captured = capture_block(block, type(block).forward, (x,), {})
    clones = [n for n in captured.graph_module.graph.nodes if n.target is torch.ops.aten.clone.default]
    assert len(clones) == 1 and clones[0].kwargs  # only the layout-changing `.contiguous()` is left
    state = [dict(block.named_parameters())[name] for name in captured.state_names]
    with torch.no_grad():
        (out,) = captured.graph_module(*state, *captured.constants, x)
        assert torch.equal(out, block(x)) and out.stride() == block(x).stride()
