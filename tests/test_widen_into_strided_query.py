"""A fused q|k|v projection laid out per head, ``heads x 3 x head_dim`` (BLOOM's query_key_value): with
heads='fixed' the query's rows are one block per head, not one leading block. widen_into folds the query's
``k**-0.5`` into each head's block, fills the model built at twice the width exactly, and marks the partial
fold (SliceFoldWarning) as for any fused projection; the key and value rows keep their copy scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphscale
from graphscale.errors import SliceFoldWarning
from tests.helpers import merge_heads


class FusedAttention(nn.Module):
    """One fused q|k|v projection in one of two layouts: ``"per_head"``, ``heads x 3 x head_dim`` (BLOOM's
    query_key_value, the query picked by ``fused[..., 0, :]``); ``"leading"``, timm's
    ``qkv.reshape(b, t, 3, heads, head_dim).permute(2, 0, 3, 1, 4)`` with the query taken as ``qkv[0]``
    (CaiT), whose other parts are read from the same tensor and are no readers of the query."""

    def __init__(self, d: int, layout: str, heads: int = 2) -> None:
        super().__init__()
        self.layout, self.heads, self.head_dim = layout, heads, d // heads
        self.emb, self.out = nn.Linear(3, d), nn.Linear(d, 2)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, _ = h.shape
        if self.layout == "per_head":
            fused = self.qkv(h).view(b, t, self.heads, 3, self.head_dim)
            q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
            scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
        else:  # the scale on the query itself, as CaiT writes it
            qkv = self.qkv(h).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0] * self.head_dim ** -0.5, qkv[1], qkv[2]
            scores = q @ k.transpose(-1, -2)
        att = torch.softmax(scores, -1) @ v
        return self.out(h + self.o(merge_heads(att)))


@pytest.mark.parametrize("tracer", ["fx", "export"])  # fx indexes fused[..., 0, :]; export selects
def test_a_per_head_fused_query_is_folded_head_by_head(tracer: str):
    torch.manual_seed(0)
    small, large = FusedAttention(8, "per_head").double(), FusedAttention(16, "per_head").double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    with pytest.warns(SliceFoldWarning):
        record = graphscale.widen_into(small, large, (x,), tracer=tracer)
    with torch.no_grad():
        assert (large(x) - small(x)).abs().max().item() < 1e-12
    # 2 heads of 8 wide rows each: the query's rows are 0:8 and 24:32 of the 48, never the k or v rows
    folds = {(lo, hi) for axis, lo, hi, *_ in record.params["qkv.weight"].slice_folds}
    assert folds == {(0, 8), (24, 32)}


def test_an_indexed_leading_part_is_the_query_and_the_other_parts_are_no_side_readers():
    torch.manual_seed(0)
    small, large = FusedAttention(8, "leading").double(), FusedAttention(16, "leading").double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    with pytest.warns(SliceFoldWarning):
        record = graphscale.widen_into(small, large, (x,), tracer="fx")
    with torch.no_grad():
        assert (large(x) - small(x)).abs().max().item() < 1e-12
    assert {(lo, hi) for _, lo, hi, *_ in record.params["qkv.weight"].slice_folds} == {(0, 16)}
