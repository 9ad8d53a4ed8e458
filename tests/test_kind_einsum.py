"""torch.einsum / aten.einsum: the pattern comes from the call's equation; contracted width letters are a
parameter's fan-in or get an inserted multiplier; a diagonal over a width axis is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphscale
from graphscale.errors import UnsupportedOpError
from graphscale.infer.kinds.einsum import equation_pattern


class EinsumNet(nn.Module):
    """Weights applied by einsum, an attention-like product over the hidden (width) axis, and a
    three-operand einsum that mixes positions and reads out."""

    def __init__(self, as_list: bool) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 4) / 2)
        self.w2 = nn.Parameter(torch.randn(3, 8) / 3)
        self.as_list = as_list

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.as_list:
            h = torch.tanh(torch.einsum("bti,oi->bto", [x, self.w1]))
        else:
            h = torch.tanh(torch.einsum("b t i, o i -> b t o", x, self.w1))
        scores = torch.einsum("bto,bso->bts", h, h)  # sums over width with no parameter: 1/k inserted
        return torch.einsum("bts,bso,po->btp", scores.softmax(-1), h, self.w2)


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("as_list", [False, True])
def test_einsum_widens_exactly(tracer: str, as_list: bool) -> None:
    torch.manual_seed(0)
    model = EinsumNet(as_list).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    plan = graphscale.analyze(model, (x,), tracer=tracer)
    assert [c.name for c in plan.width_classes] == ["w1[0]"]
    assert plan.rules["w2"].fan_in_axes == (1,)
    wide = graphscale.widen(model, (x,), 3, tracer=tracer)
    assert wide.get_parameter("w1").shape == (24, 4)
    with torch.no_grad():
        y, yw = model(x), wide(x)
        assert (yw - y).abs().max().item() <= 1e-12 * (1 + y.abs().max().item())


class Diagonal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        outer = torch.einsum("bi,bj->bij", h, h)
        return self.b(torch.einsum("bii->bi", outer))  # the diagonal of a width x width matrix


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_einsum_diagonal_over_a_width_axis_is_refused(tracer: str) -> None:
    with pytest.raises(UnsupportedOpError, match="takes a diagonal"):
        graphscale.analyze(Diagonal(), (torch.randn(2, 4),), tracer=tracer)


def test_equation_pattern() -> None:
    assert equation_pattern("ij,jk", [2, 2]).output == ("i", "k")
    assert equation_pattern("...ij,...jk->...ik", [3, 3]).operands[0] == ("...", "i", "j")
    with pytest.raises(ValueError):
        equation_pattern("ij,jk->ik", [2])
