"""What widen_into refuses, and how it says so, where no fill of the larger model can be exact
(docs/math.md §8): a plain sum over a grown axis that no tensor carries (an L2 norm of the query over
head_dim, ``q * rsqrt(sum(q * q) + eps)``, as Olmo-Hybrid's and Bailing's linear attentions and nGPT's
hidden norm write it: the larger model's sum is k-fold and its eps keeps any factor from compensating),
and a query that passes through a nonlinearity before its attention (MiniMax's ``silu(qkv)``). Before,
the sum of squares was walked as if it were an attention, and the walk passed ``pow``/``silu`` as if the
query's factor went through them; the refusals named neither.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphscale
from graphscale.errors import WidthConflictError
from tests.helpers import rel_error


class L2NormQuery(torch.nn.Module):
    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        torch.manual_seed(heads * head_dim)
        width = heads * head_dim
        self.heads = heads
        self.emb = torch.nn.Linear(3, width)
        self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))
        self.out = torch.nn.Linear(width, 2)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, c = h.shape
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c))


def test_an_l2_norm_over_head_dim_is_refused_naming_the_sum_and_heads_grow_fills_it() -> None:
    small, large = L2NormQuery(2, 4), L2NormQuery(2, 8)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    refusal = (r"would insert 1/k after sum(_\d+)? .*no weight of the larger model can carry"
               r".*heads='grow' \(more heads, head_dim kept\)")
    with pytest.raises(WidthConflictError, match=refusal):
        graphscale.widen_into(small, large, (x,))
    large = L2NormQuery(4, 4)
    graphscale.widen_into(small, large, (x,), heads="grow")
    with torch.no_grad():
        assert rel_error(large(x), small(x)) <= 1e-12


class SiluLinearAttention(torch.nn.Module):
    """Linear attention on ``silu`` features (MiniMax's lightning attention), no scale of its own."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        torch.manual_seed(heads * head_dim)
        width = heads * head_dim
        self.heads = heads
        self.emb = torch.nn.Linear(3, width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, 2)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, c = h.shape
        q, k, v = F.silu(self.qkv(h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q @ k.transpose(-1, -2)).tril()
        return self.out((scores @ v).transpose(1, 2).reshape(b, t, c))


def test_a_query_through_a_nonlinearity_is_refused_naming_it() -> None:
    small, large = SiluLinearAttention(2, 4), SiluLinearAttention(2, 8)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    with pytest.raises(WidthConflictError, match=r"its query passes through silu at node 'silu'"):
        graphscale.widen_into(small, large, (x,))
    large = SiluLinearAttention(4, 4)
    graphscale.widen_into(small, large, (x,), heads="grow")
    with torch.no_grad():
        assert rel_error(large(x), small(x)) <= 1e-12


class GroupedQKV(torch.nn.Module):
    """CodeGen's layout: the fused projection is read as ``groups`` blocks (a literal of the code, its
    ``mp_num``), each ``q | v | k`` of the heads in that group. With one head per group in the small model,
    its graph shows no factor "heads per group": widening grows the groups, the larger model (more heads,
    as many groups) grows the heads in each."""

    def __init__(self, heads: int, head_dim: int = 4, groups: int = 2) -> None:
        super().__init__()
        torch.manual_seed(heads)
        width = heads * head_dim
        self.heads, self.groups = heads, groups
        self.emb = torch.nn.Linear(3, width)
        self.qkv = torch.nn.Linear(width, 3 * width, bias=False)
        self.out = torch.nn.Linear(width, 2)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, c = h.shape
        fused = self.qkv(h).reshape(b, t, self.groups, -1)
        q, v, k = torch.split(fused, fused.shape[-1] // 3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c))


def test_a_layout_the_small_model_cannot_show_is_refused_naming_the_op() -> None:
    small, large = GroupedQKV(2), GroupedQKV(4)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    refusal = (r"computes other shapes than the widened small one, at (view|reshape)(_\d+)? \(\w+\): "
               r"widening gives \(2, 5, 4, 12\), the larger model computes \(2, 5, 2, 24\)")
    with pytest.raises(WidthConflictError, match=refusal):
        graphscale.widen_into(small, large, (x,), heads="grow")
    wide = graphscale.widen(small, (x,), 2, heads="grow")  # its own graph keeps the small layout: exact
    with torch.no_grad():
        assert rel_error(wide(x), small(x)) <= 1e-12
