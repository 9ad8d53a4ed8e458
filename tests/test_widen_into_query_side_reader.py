"""A query that another branch also reads (ConvBERT's span convolution multiplies the query projection by
a convolution of the keys; CoaT's relative-position term is ``q * conv(v)``): the query's further factor
would change that branch, so widen_into puts the inverse factor into the weights that produce the other
operand of that product, and fills the model built at twice the width exactly. A branch where no weights
can undo it (the query added to something) is refused, naming the reader."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphscale
from graphscale.errors import GraphscaleError
from tests.helpers import merge_heads, split_heads


class SideReader(nn.Module):
    def __init__(self, d: int, how: str, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.head_dim, self.how = heads, d // heads, how
        self.emb, self.out = nn.Linear(3, d), nn.Linear(d, 2)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.gate, self.mix = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        q_flat = self.q(h)

        q, k, v = (split_heads(y, self.heads, self.head_dim) for y in (q_flat, self.k(h), self.v(h)))
        att = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, -1) @ v
        side = q_flat * self.gate(h) if self.how == "product" else q_flat + h  # the other reader
        return self.out(h + self.o(merge_heads(att)) + self.mix(side))


def test_the_inverse_factor_goes_into_the_other_operands_weights():
    torch.manual_seed(0)
    small, large = SideReader(8, "product").double(), SideReader(16, "product").double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    record = graphscale.widen_into(small, large, (x,))
    assert any("gate.weight" in n and "carry its inverse" in n for n in record.notes), record.notes
    with torch.no_grad():
        assert (large(x) - small(x)).abs().max().item() < 1e-12
    # both are whole-tensor factors: in the copy scales, so the optimizer trains them like the narrow model
    gate, key = record.params["gate.weight"].copy_scale, record.params["k.weight"].copy_scale
    assert gate == pytest.approx(2 ** 0.5 * key)


def test_a_reader_no_weights_can_compensate_is_refused_by_name():
    torch.manual_seed(0)
    small, large = SideReader(8, "sum").double(), SideReader(16, "sum").double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    with pytest.raises(GraphscaleError, match="also read by"):
        graphscale.widen_into(small, large, (x,))
