"""An attention whose scores come from ``bias.baddbmm(q, k^T, alpha=1/sqrt(head_dim))`` (BLOOM's and
GPT-NeoX-Japanese's ALiBi): the query is the product's first operand, not the op's first argument (the
added bias). widen_into walks back from it, folds the query's ``k**-0.5`` into its projection, and fills the
model built at twice the width exactly; before, the walk started at the bias and found no query."""

from __future__ import annotations

import torch
from torch import nn

import graphscale


class AlibiAttention(nn.Module):
    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.emb, self.out = nn.Linear(3, d), nn.Linear(d, 2)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.scale = self.head_dim ** -0.5  # from the config's sizes: the larger model has its own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, _ = h.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # (b * heads, t, head_dim)
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2).reshape(b * self.heads, t, -1)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        slopes = torch.arange(1, self.heads + 1, dtype=x.dtype).repeat(b)[:, None, None]
        bias = slopes * torch.arange(t, dtype=x.dtype)[None, None, :]  # (b * heads, 1, t)
        scores = bias.baddbmm(q, k.transpose(1, 2), beta=1.0, alpha=self.scale)
        ctx = torch.softmax(scores, -1) @ v
        ctx = ctx.view(b, self.heads, t, self.head_dim).transpose(1, 2).reshape(b, t, -1)
        return self.out(h + self.o(ctx))


def test_widen_into_finds_the_query_of_a_baddbmm_attention():
    torch.manual_seed(0)
    small, large = AlibiAttention(8).double(), AlibiAttention(16).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    record = graphscale.widen_into(small, large, (x,))
    assert any("query carries a further" in n and "q.weight" in n for n in record.notes), record.notes
    with torch.no_grad():
        assert (large(x) - small(x)).abs().max().item() < 1e-12
