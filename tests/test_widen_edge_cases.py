"""Widening cases that need a graph edit of their own: slices of width axes written with an Ellipsis,
sums over a width axis with no parameter to absorb them, sizes read at run time, depthwise convolution."""

from __future__ import annotations

import torch
from torch import nn

import graphscale


def _exact(model: nn.Module, x: torch.Tensor, k: int = 3) -> float:
    model = model.double()
    x = x.double()
    wide = graphscale.widen(model, (x,), k)
    with torch.no_grad():
        return ((wide(x) - model(x)).abs().max() / (1 + model(x).abs().max())).item()


class HalfSwap(nn.Module):
    """Rotary-style halves of a width axis, sliced with literal bounds after an Ellipsis."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        a, b = h[..., :4], h[..., 4:]
        return self.out(torch.cat([-b, a], -1) * torch.tanh(h))


class HiddenSum(nn.Module):
    """A sum over hidden units (grows with the multiplier unless graphscale inserts 1/k)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        return self.out(h) + h.sum(-1, keepdim=True)


class SizeViews(nn.Module):
    """Shapes read off the tensor at run time (x.size()) and used to split hidden units into heads."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        b, t, c = h.size()
        heads = h.view(b, t, 3, c // 3).softmax(dim=2)  # softmax over the fixed head axis: allowed
        return self.out(heads.reshape(b, t, c))


def test_ellipsis_slices_of_a_width_axis_get_wide_bounds() -> None:
    assert _exact(HalfSwap(), torch.randn(2, 5, 4)) <= 1e-12


def test_sum_over_a_width_axis_gets_an_inserted_multiplier() -> None:
    model = HiddenSum()
    plan = graphscale.analyze(model, (torch.randn(2, 4),))
    assert [m.node for m in plan.walk.requests.multipliers] == ["sum_1"]
    assert _exact(model, torch.randn(2, 4)) <= 1e-12


def test_sizes_read_at_run_time_keep_batch_and_sequence_dynamic() -> None:
    model = SizeViews().double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    wide = graphscale.widen(model, (x,), 2)
    other = torch.randn(3, 7, 4, dtype=torch.float64)  # another batch and sequence length
    with torch.no_grad():
        assert torch.allclose(wide(other), model(other), atol=1e-12, rtol=0)


def test_depthwise_convolution_widens_its_groups() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(2, 1, 6, 6)
    wide = graphscale.widen(model, (x,), 3)
    conv = wide.get_submodule("2")
    assert (conv.groups, conv.in_channels, conv.out_channels) == (12, 12, 12)
    assert _exact(model, x) <= 1e-12


class RuntimeScale(nn.Module):
    """Attention whose scale is computed from a size read at run time (q.size(-1) ** -0.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.out = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.q(x), self.k(x)
        att = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
        return self.out(att.softmax(-1))


def test_sizes_read_off_a_width_axis_keep_their_narrow_value_in_arithmetic() -> None:
    # Without freezing q.size(-1) to its narrow value the scale would shrink by sqrt(k) on top of the
    # inserted 1/k, and the softmax would see different logits.
    assert _exact(RuntimeScale(), torch.randn(2, 5, 4)) <= 1e-12


class ShapeOnlySelect(nn.Module):
    """BART's ``embed_positions(inputs_embeds[:, :, -1])  # needed for the shape only`` (``shape_only``:
    a select of the hidden axis whose value only its shape is read), and a select nothing reads."""

    def __init__(self, shape_only: bool) -> None:
        super().__init__()
        self.shape_only = shape_only
        self.embed, self.pos, self.out = nn.Embedding(11, 8), nn.Embedding(16, 8), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        unused = h[..., 0]  # noqa: F841 - dead code, as models carry it
        like = h[:, :, -1] if self.shape_only else ids
        return self.out(torch.tanh(h + self.pos(torch.arange(like.shape[1], device=like.device))))


def test_a_select_whose_value_is_unused_does_not_pin_the_width() -> None:
    """Before: the walk fixed the hidden axis as "an axis indexed at one position" for a select nothing
    reads (fx and export) and for export's shape-only select (static shapes leave it unused): BART and
    mBART widened nothing. Now unused pure values are dropped at capture; the hidden axis is width and
    widens exactly. (fx keeps a shape-only select: its shape is read at run time.)"""
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    for tracer, shape_only in (("fx", False), ("export", False), ("export", True)):
        model = ShapeOnlySelect(shape_only).double()
        plan = graphscale.analyze(model, (ids,), tracer=tracer)
        names = [c.name for c in plan.width_classes]
        assert "embed.weight[1]" in names, (tracer, shape_only, names)
        wide = graphscale.widen(model, (ids,), 2, plan=plan)
        assert tuple(wide.get_parameter("out.weight").shape) == (3, 16)
        with torch.no_grad():
            assert (wide(ids) - model(ids)).abs().max().item() <= 1e-12


class ThreeSlices(nn.Module):
    """Phi-3's fused q|k|v: one projection cut by three slices with different bounds (``[:8]``,
    ``[8:12]``, ``[12:]``), so its output axis has three decompositions, each part read alone."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 16)
        self.q_out, self.k_out, self.v_out = nn.Linear(8, 3), nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.qkv(x))
        return self.q_out(h[..., :8]) + self.k_out(h[..., 8:12]) * self.v_out(h[..., 12:])


def test_every_slicing_of_a_fused_projection_is_related_to_its_parts() -> None:
    """Before: width inference aligned only the first two decompositions of an axis, so the third slice's
    bounds were not tied to the parts and stayed narrow ([12:] read the wrong rows of the wide
    projection): Phi-3 widened with error 0.19 and no complaint."""
    for tracer in ("fx", "export"):
        model = ThreeSlices().double()
        x = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        plan = graphscale.analyze(model, (x,), tracer=tracer)
        wide = graphscale.widen(model, (x,), 2, plan=plan)
        assert tuple(wide.get_parameter("v_out.weight").shape) == (3, 8), tracer
        with torch.no_grad():
            assert (wide(x) - model(x)).abs().max().item() <= 1e-12, tracer
