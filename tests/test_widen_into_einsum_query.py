"""An attention written with ``torch.einsum`` (torchvision's MaxViT): the equation is the op's first
argument, so the query is the first tensor operand. widen_into follows it back to its projection, folds
the query's ``k**-0.5`` there and fills the model built at twice the width exactly (before, the walk
started at the equation string and crashed with an AttributeError)."""

from __future__ import annotations

import torch
from torch import nn

import graphscale
from tests.helpers import merge_heads, split_heads


class EinsumAttention(nn.Module):
    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.emb, self.out = nn.Linear(3, d), nn.Linear(d, 2)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)

        q, k, v = (split_heads(p(h), self.heads, self.head_dim) for p in (self.q, self.k, self.v))
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / self.head_dim ** 0.5
        ctx = torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, -1), v)
        return self.out(h + self.o(merge_heads(ctx)))


def test_widen_into_finds_the_query_of_an_einsum_attention():
    torch.manual_seed(0)
    small, large = EinsumAttention(8).double(), EinsumAttention(16).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    record = graphscale.widen_into(small, large, (x,))
    assert any("query carries a further" in n and "q.weight" in n for n in record.notes), record.notes
    with torch.no_grad():
        assert (large(x) - small(x)).abs().max().item() < 1e-12
