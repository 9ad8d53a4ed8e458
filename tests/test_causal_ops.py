"""Causal-LM ops (issue 18): repeat_interleave, interleaved-rotary stepped slices, baddbmm, no_grad regions.

Each model is tiny and float64; each test widens and compares outputs, so a wrong layout (an interleave
taken for a concatenation, a 1/k on the whole baddbmm output) fails by O(1), far above the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphscale
from graphscale.errors import UnsupportedOpError

TOL = 1e-12


def _exact(model: nn.Module, inputs: tuple, tracer: str, k: int = 3) -> graphscale.Plan:
    plan = graphscale.analyze(model, inputs, tracer=tracer)
    wide = graphscale.widen(model, inputs, k, tracer=tracer)
    with torch.no_grad():
        assert (wide(*inputs) - model(*inputs)).abs().max().item() <= TOL
    return plan


class Interleave(nn.Module):
    """A width axis repeated in place (``[a, a, b, b]``) feeding a Linear; ``dim=None`` flattens."""

    def __init__(self, flat: bool = False) -> None:
        super().__init__()
        self.flat = flat
        self.a, self.b = nn.Linear(4, 6), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.flat:  # (1, 6) flattened then interleaved: (12,)
            return self.b(h.repeat_interleave(2))
        return self.b(torch.repeat_interleave(h, 2, dim=-1))


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("flat", [False, True])
def test_repeat_interleave_of_a_width_axis_widens_exactly(tracer: str, flat: bool) -> None:
    torch.manual_seed(0)
    model = Interleave(flat).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    plan = _exact(model, (x,), tracer)
    assert [c.name for c in plan.width_classes] == ["a.weight[0]"]


class RepeatKV(nn.Module):
    """Grouped-query attention written with repeat_interleave: each kv head serves 2 query heads."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv, self.o = nn.Linear(4, 16), nn.Linear(4, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 4).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, 8).transpose(1, 2).split(4, dim=-1)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, 16))


@pytest.mark.parametrize("heads", ["fixed", "grow"])
def test_repeated_kv_heads_widen_exactly(heads: str) -> None:
    torch.manual_seed(0)
    model = RepeatKV().double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    graphscale.analyze(model, (x,), heads=heads)
    wide = graphscale.widen(model, (x,), 2, heads=heads)
    with torch.no_grad():
        assert (wide(x) - model(x)).abs().max().item() <= TOL
    if heads == "grow":  # the kv heads grow; each still serves 2 query heads
        assert wide.kv.weight.shape[0] == 32 and wide.q.weight.shape[0] == 32


def test_repeat_interleave_by_a_tensor_of_counts_keeps_the_axis_fixed() -> None:
    """Per-entry counts (MoE token routing) make the layout depend on the values: the repeated axis stays
    narrow while the rest of the model widens, and the widening is exact."""
    class PerElement(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.b(torch.relu(self.a(x)))
            return self.c(h.repeat_interleave(torch.tensor([1, 2]), dim=-1))

    model = PerElement().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    plan = graphscale.analyze(model, (x,), tracer="fx")
    assert [c.name for c in plan.width_classes] == ["a.weight[0]"]
    wide = graphscale.widen(model, (x,), multiplier=2, tracer="fx")
    assert wide.b.weight.shape == (2, 16)
    with torch.no_grad():
        assert (wide(x) - model(x)).abs().max().item() <= TOL


class InterleavedRotary(nn.Module):
    """Cohere/GPT-J style rotary: frequencies interleaved (f0 f0 f1 f1 ...), pairs rotated with x[::2]."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("inv_freq", torch.linspace(0.1, 1.0, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        angle = torch.repeat_interleave(self.inv_freq, 2, dim=-1) * 3.0
        x1, x2 = h[..., ::2], h[..., 1::2]
        rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)
        return self.b(h * angle.cos() + rotated * angle.sin())


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_interleaved_rotary_grows_the_frequencies_not_the_pairs(tracer: str) -> None:
    torch.manual_seed(0)
    model = InterleavedRotary().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    plan = _exact(model, (x,), tracer)
    (cls,) = plan.width_classes
    assert cls.name == "a.weight[0]" and cls.reason == "2 fixed x 4 growing"  # 4 pairs grow, 2 per pair


class Alibi(nn.Module):
    """ALiBi-style scores: baddbmm adds a position bias to q k^T (BLOOM), contracting a width axis."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.o = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        scores = torch.baddbmm(bias, self.q(x), self.k(x).transpose(1, 2), beta=0.7, alpha=0.3)
        return self.o(scores.softmax(-1))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_baddbmm_compensates_the_product_not_the_added_bias(tracer: str) -> None:
    torch.manual_seed(0)
    model = Alibi().double()
    inputs = (torch.randn(2, 5, 4, dtype=torch.float64), 3 * torch.randn(2, 1, 5, dtype=torch.float64))
    plan = _exact(model, inputs, tracer)
    assert [c.name for c in plan.width_classes] == ["q.weight[0]"]


class NoGradGate(nn.Module):
    """A gate computed under torch.no_grad() (export wraps it in wrap_with_set_grad_enabled)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        with torch.no_grad():
            g = torch.sigmoid(2 * h)
        return self.b(h * g)


def test_no_grad_region_is_walked_into_and_keeps_its_grad_mode() -> None:
    torch.manual_seed(0)
    model = NoGradGate().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    plan = _exact(model, (x,), "export")
    assert [c.name for c in plan.width_classes] == ["a.weight[0]"]
    wide = graphscale.widen(model, (x,), 2, tracer="export")
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    model(xs[0]).sum().backward()
    wide(xs[1]).sum().backward()  # the gate stays out of autograd, so input gradients match
    assert (xs[0].grad - xs[1].grad).abs().max().item() <= TOL
    assert torch.is_grad_enabled()


class SmallOps(nn.Module):
    """eye, item, a random fill, floor_divide, masked_fill_ and a binary torch.min around a width axis."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("eps", torch.tensor(0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.min(self.a(x), self.eps)  # elementwise, not a reduction
        h = h.clone().masked_fill_(x[:, :1] > 10.0, 0.0)  # in place, kept so by export (XLM)
        scale = (x.mean() * 0 + 2).item()
        noise = torch.empty_like(x).uniform_(0.0, 1.0)  # random: its axes stay fixed
        steps = torch.floor_divide(torch.arange(3), 2).sum()
        return self.b(h * scale) + (torch.eye(3, dtype=x.dtype) @ x[:, :3]).sum() + 0 * noise.sum() + steps


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_eye_item_random_fill_floor_divide_and_binary_min(tracer: str) -> None:
    torch.manual_seed(0)
    model = SmallOps().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    plan = _exact(model, (x,), tracer)
    assert [c.name for c in plan.width_classes] == ["a.weight[0]"]


class EmptySlice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(torch.cat([h[..., :4], h[..., 4:4], h[..., 4:]], dim=-1))


def test_an_empty_axis_widens_instead_of_dividing_by_zero() -> None:
    torch.manual_seed(0)
    _exact(EmptySlice().double(), (torch.randn(3, 4, dtype=torch.float64),), "export")


def gate(x: torch.Tensor) -> torch.Tensor:
    """A function fx keeps as one call (like torchvision's stochastic_depth); export lowers it."""
    return x * torch.sigmoid(x)


torch.fx.wrap("gate")


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(gate(self.a(x)))


def test_auto_falls_back_to_export_when_fx_calls_a_function_with_no_rule() -> None:
    torch.manual_seed(0)
    model = Gated().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(UnsupportedOpError, match=r"no graphscale rule covers function .*gate"):
        graphscale.analyze(model, (x,), tracer="fx")
    plan = _exact(model, (x,), "auto")
    assert plan.frontend == "export"
    assert any("gate" in note and "no rule covers" in note for note in plan.notes)


class Clamped(nn.Module):
    """T5's relative-position buckets and xIELU clamp with torch.min(x, y): elementwise, not a reduction."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("eps", torch.tensor(0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(torch.min(h, self.eps) + torch.max(h, 0.5 * h) + h.max(-1, keepdim=True)[0])


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_binary_min_and_max_are_elementwise(tracer: str) -> None:
    torch.manual_seed(0)
    plan = _exact(Clamped().double(), (torch.randn(3, 4, dtype=torch.float64),), tracer)
    assert [c.name for c in plan.width_classes] == ["a.weight[0]"]


class Concatenate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(torch.concatenate([h, torch.tanh(h)], dim=-1))  # aten.concatenate under export


def test_concatenate_alias_is_a_concatenation() -> None:
    torch.manual_seed(0)
    plan = _exact(Concatenate().double(), (torch.randn(3, 4, dtype=torch.float64),), "export")
    assert [c.name for c in plan.width_classes] == ["a.weight[0]"]


class ComplexRotary(nn.Module):
    """Llama 4's rotary embedding: pairs as complex numbers, rotated by polar(1, angle)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("freqs", torch.linspace(0.1, 1.0, 4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.view_as_complex(self.a(x).reshape(x.shape[0], 4, 2))
        rotation = torch.polar(torch.ones_like(self.freqs), 3.0 * self.freqs)
        return self.b(torch.view_as_real(z * rotation).flatten(1))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_complex_rotary_grows_the_pairs_not_the_real_imaginary_axis(tracer: str) -> None:
    torch.manual_seed(0)
    plan = _exact(ComplexRotary().double(), (torch.randn(3, 4, dtype=torch.float64),), tracer)
    (cls,) = plan.width_classes
    assert cls.reason == "2 fixed x 4 growing"


class PairRotary(nn.Module):
    """RoFormer's rotary: sin/cos duplicated per pair with stack + reshape_as, pairs split with x[::2]."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("angle", torch.linspace(0.1, 1.0, 8, dtype=torch.float64).view(2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)  # (batch=2, 8)
        sin, cos = torch.stack([self.angle.sin()] * 2, dim=-1), torch.stack([self.angle.cos()] * 2, dim=-1)
        sin, cos = sin[0].reshape_as(h[0]), cos[0].reshape_as(h[0])
        rotated = torch.stack([-h[..., 1::2], h[..., ::2]], dim=-1).reshape_as(h)
        return self.b(h * cos + rotated * sin)


def test_stepped_pair_slices_leave_the_rotated_axis_width() -> None:
    """The stepped slices used to fix the whole axis, so the projection feeding the rotary stayed narrow
    (the two-width oracle's miss on RoFormer)."""
    torch.manual_seed(0)
    plan = _exact(PairRotary().double(), (torch.randn(2, 4, dtype=torch.float64),), "fx")
    assert [c.name for c in plan.width_classes] == ["a.weight[0]"]
