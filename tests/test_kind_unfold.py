"""Sliding windows (``F.unfold`` / ``aten.im2col``, ConvBERT's span convolution): the channel axis of the
windows' rows (channels x window positions, channels outermost) grows and the model widens exactly; the
window positions, the window count and the spatial axes stay fixed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphscale


class Windows(nn.Module):
    """Hidden (width) -> windows of 3 time steps -> a per-position mix of each channel's window."""

    def __init__(self, module: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.mix = nn.Parameter(torch.randn(3))  # one weight per window position (fixed axis)
        self.unfold = nn.Unfold((3, 1), padding=(1, 0)) if module else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, _ = x.shape
        h = torch.tanh(self.a(x)).transpose(1, 2).unsqueeze(-1)  # (batch, hidden, time, 1)
        cols = self.unfold(h) if self.unfold is not None else F.unfold(h, (3, 1), padding=(1, 0))
        cols = cols.reshape(batch, -1, 3, time)  # (batch, hidden, window, time)
        mixed = (cols * self.mix[:, None]).sum(2)  # a sum over the fixed window axis only
        return self.b(mixed.transpose(1, 2))


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("module", [False, True])
def test_unfold_grows_the_channels_and_widens_exactly(tracer: str, module: bool) -> None:
    torch.manual_seed(0)
    model = Windows(module).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    plan = graphscale.analyze(model, (x,), tracer=tracer)
    assert [c.name for c in plan.width_classes] == ["a.weight[0]"]
    assert "mix[0]" in {c.name for c in plan.classification.fixed}  # the window positions stay fixed
    wide = graphscale.widen(model, (x,), multiplier=2, tracer=tracer)
    assert wide.get_parameter("a.weight").shape == (16, 4)
    with torch.no_grad():
        assert (wide(x) - model(x)).abs().max().item() < 1e-12
