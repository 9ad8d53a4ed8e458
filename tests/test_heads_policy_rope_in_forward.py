"""An attention whose rotary frequencies the forward computes from head_dim (``arange(0, head_dim, 2)``,
as PhiMoE's rotary does from its config at every call): head_dim is fixed by nature there, so with
heads='fixed' the query and key projections could not grow at all. Their heads grow instead (head_dim
kept), in q, k, v and o alike, and the model built with twice the heads is filled exactly."""

from __future__ import annotations

import torch
from torch import nn

import graphscale
from tests.helpers import merge_heads, split_heads


class RopeInForward(nn.Module):
    def __init__(self, heads: int, head_dim: int = 4) -> None:
        super().__init__()
        d = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.emb, self.out = nn.Linear(3, d), nn.Linear(d, 2)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        t = h.shape[1]

        q, k, v = (split_heads(p(h), self.heads, self.head_dim) for p in (self.q, self.k, self.v))
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2, dtype=x.dtype) / self.head_dim)
        angles = torch.arange(t, dtype=x.dtype)[:, None] * inv_freq[None, :]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

        def rotate(y: torch.Tensor) -> torch.Tensor:
            y1, y2 = y.chunk(2, dim=-1)
            return y * cos + torch.cat([-y2, y1], -1) * sin

        att = torch.softmax(rotate(q) @ rotate(k).transpose(-1, -2) / self.head_dim ** 0.5, -1)
        return self.out(h + self.o(merge_heads(att @ v)))


def test_heads_grow_where_the_forward_fixes_head_dim_and_the_larger_model_is_filled():
    torch.manual_seed(0)
    small, large = RopeInForward(2).double(), RopeInForward(4).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    plan = graphscale.analyze(small, (x,))
    assert plan.classification.heads_grown, plan.classification.notes
    wide = graphscale.widen(small, (x,), multiplier=2, plan=plan)
    assert wide.get_parameter("q.weight").shape == (16, 16)  # 4 heads of 4
    record = graphscale.widen_into(small, large, (x,))
    with torch.no_grad():
        want = small(x)
        assert (wide(x) - want).abs().max().item() < 1e-12
        assert (large(x) - want).abs().max().item() < 1e-12
    assert record.params["q.weight"].wide_shape == (16, 16)


class ConvOnValues(nn.Module):
    """Nystromformer's layout: a depthwise convolution over (sequence, head_dim) of the values, one channel
    per head, added to the attention's output; its window fixes the values' head_dim."""

    def __init__(self, heads: int, head_dim: int = 4) -> None:
        super().__init__()
        d = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.emb, self.out = nn.Linear(3, d), nn.Linear(d, 2)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.conv = nn.Conv2d(heads, heads, (3, 1), padding=(1, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)

        q, k, v = (split_heads(p(h), self.heads, self.head_dim) for p in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, -1) @ v + self.conv(v)
        return self.out(h + self.o(merge_heads(att)))


def test_heads_grow_where_a_convolution_fixes_the_values_head_dim():
    torch.manual_seed(0)
    small, large = ConvOnValues(2).double(), ConvOnValues(4).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    plan = graphscale.analyze(small, (x,))
    assert plan.classification.heads_grown, plan.classification.notes
    graphscale.widen_into(small, large, (x,))
    with torch.no_grad():
        assert (large(x) - small(x)).abs().max().item() < 1e-12
