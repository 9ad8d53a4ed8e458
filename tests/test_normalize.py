"""F.normalize along a fixed axis widens exactly; along a width axis (including its default dim=1) it
is refused: the L2 norm of k copies is sqrt(k) times the norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphscale
from graphscale.errors import UnsupportedOpError


class NormalizeTime(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, time, 4)
        return self.b(F.normalize(torch.tanh(self.a(x)), dim=1))  # along time (fixed)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_normalize_along_a_fixed_axis_widens_exactly(tracer: str) -> None:
    torch.manual_seed(0)
    model = NormalizeTime().double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    wide = graphscale.widen(model, (x,), 3, tracer=tracer)
    assert wide.state_dict()["a.weight"].shape == (24, 4)
    with torch.no_grad():
        assert (wide(x) - model(x)).abs().max().item() <= 1e-12


class NormalizeHidden(nn.Module):
    def __init__(self, explicit: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.explicit = explicit

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 4)
        h = self.a(x)
        return self.b(F.normalize(h, dim=-1) if self.explicit else F.normalize(h))  # default dim=1


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("explicit", [True, False])
def test_normalize_along_a_width_axis_is_refused(tracer: str, explicit: bool) -> None:
    with pytest.raises(UnsupportedOpError, match=r"not replication-invariant.*norm"):
        graphscale.analyze(NormalizeHidden(explicit), (torch.randn(3, 4),), tracer=tracer)
