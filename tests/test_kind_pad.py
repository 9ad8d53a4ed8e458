"""Padding on fixed axes widens exactly; padding a width axis is refused, naming the node."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphscale
from graphscale.errors import UnsupportedOpError


class PadTime(nn.Module):
    """A causal-conv-style left pad of the time axis between two linear layers (hidden: width)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.how = how
        self.zero = nn.ConstantPad1d((2, 1), 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x)).transpose(1, 2)  # (batch, hidden, time)
        if self.how == "module":
            h = self.zero(h)
        elif self.how == "reflect":
            h = F.pad(h, (2, 1), mode="reflect")
        else:
            h = F.pad(h, (2, 1, 0, 0), value=0.5)  # explicit zero pad of the hidden axis: a no-op there
        return self.b(h.transpose(1, 2))


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("how", ["functional", "reflect", "module"])
def test_pad_on_a_fixed_axis_widens_exactly(tracer: str, how: str) -> None:
    torch.manual_seed(0)
    model = PadTime(how).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    plan = graphscale.analyze(model, (x,), tracer=tracer)
    assert [c.name for c in plan.width_classes] == ["a.weight[0]"]
    wide = graphscale.widen(model, (x,), 3, tracer=tracer)
    with torch.no_grad():
        assert (wide(x) - model(x)).abs().max().item() <= 1e-12


class PadHidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.pad(self.a(x), (1, 1)))  # pads the hidden (width) axis


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_pad_on_a_width_axis_is_refused(tracer: str) -> None:
    with pytest.raises(UnsupportedOpError, match=r"node 'pad.*not replication-invariant.*pads it"):
        graphscale.analyze(PadHidden(), (torch.randn(2, 4),), tracer=tracer, outputs="fixed")
