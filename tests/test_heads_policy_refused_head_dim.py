"""heads='fixed' (the default) keeps the head count and grows head_dim. Where head_dim cannot grow because
an op over it is not replication-invariant, e.g. XCiT's cross-covariance attention, a softmax over a
head_dim x head_dim matrix of channels, the heads grow instead (head_dim kept), as for a partial rotary.
Before, analyze refused the model ("node 'softmax' is not replication-invariant"); heads='grow' worked."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import graphscale


class CrossCovariance(torch.nn.Module):
    """XCiT's attention: heads x head_dim channels, attention over channels (softmax over head_dim)."""

    def __init__(self, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Linear(5, width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.temperature = torch.nn.Parameter(torch.ones(heads, 1, 1))
        self.proj, self.out = torch.nn.Linear(width, width), torch.nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, n, c = h.shape
        qkv = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)  # (b, heads, head_dim, n)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)  # head_dim x head_dim
        y = (attn @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        return self.out(h + self.proj(y))


def test_heads_grow_where_an_op_over_head_dim_is_not_replication_invariant() -> None:
    torch.manual_seed(0)
    model = CrossCovariance().double()
    with torch.no_grad():
        model.temperature.uniform_(0.5, 2.0)
    x = (torch.randn(2, 6, 5, dtype=torch.float64),)
    for tracer in ("fx", "export"):
        plan = graphscale.analyze(model, x, tracer=tracer)
        assert plan.classification.heads_grown, tracer
        assert any("head_dim cannot grow" in n and "softmax" in n for n in plan.notes), plan.notes
        wide = graphscale.widen(model, x, 2, plan=plan)
        assert tuple(wide.get_parameter("temperature").shape) == (8, 1, 1)  # the heads grew
        with torch.no_grad():
            assert (wide(*x) - model(*x)).abs().max().item() <= 1e-12
