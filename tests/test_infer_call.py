"""Canonical calls and no silent constants: arguments are read by name, a parameter read through ``.T``
or ``.mT`` keeps its identity (and its tie), and a value the engine cannot describe is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphscale
from graphscale.errors import UnsupportedOpError


class TiedReadout(nn.Module):
    """Embedding -> MLP -> readout tied to the embedding. Nothing but the readout ties the MLP's output
    width to the embedding width, so losing the tie splits them into two classes."""

    def __init__(self, attr: str) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.attr = attr

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(self.emb(i))))
        w = self.emb.weight
        return h @ (w.t() if self.attr == "t()" else getattr(w, self.attr))


@pytest.mark.parametrize("attr", ["T", "mT", "H", "mH", "t()"])
def test_tied_readout_through_a_transpose_attribute_widens_exactly_per_class(attr: str) -> None:
    torch.manual_seed(0)
    model = TiedReadout(attr).double()
    i = torch.randint(0, 10, (2, 5))
    plan = graphscale.analyze(model, (i,), tracer="fx")
    assert [c.name for c in plan.width_classes] == ["emb.weight[1]", "fc1.weight[0]"]
    assert plan.rules["emb.weight"].use_multipliers  # the readout is a use of the embedding
    wide = graphscale.widen(model, (i,), {"emb.weight[1]": 2, "fc1.weight[0]": 3}, tracer="fx")
    assert wide.get_parameter("emb.weight").shape == (10, 16)
    assert wide.get_parameter("fc1.weight").shape == (48, 16)
    with torch.no_grad():
        assert (wide(i) - model(i)).abs().max().item() <= 1e-12


class ComplexImag(nn.Module):
    def __init__(self, read_shape: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.w = nn.Parameter(torch.randn(8, 3, dtype=torch.complex128))
        self.read_shape = read_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.read_shape:
            return h[..., : self.w.imag.shape[1]]
        return h @ self.w.imag


@pytest.mark.parametrize("read_shape", [False, True])
def test_an_attribute_the_engine_cannot_describe_is_refused_naming_the_node(read_shape: bool) -> None:
    model = ComplexImag(read_shape).double()
    with pytest.raises(UnsupportedOpError, match=r"cannot describe.*'imag'.*getattr"):
        graphscale.analyze(model, (torch.randn(2, 4, dtype=torch.float64),), tracer="fx")


class NormOverBatch(nn.Module):
    """A norm over a fixed (batch) axis between two layers: exact under widening."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.how == "method":
            n = h.norm(dim=0, keepdim=True)
        elif self.how == "torch.norm":
            n = torch.norm(h, 2, 0, True)  # p, dim, keepdim by position: dim is NOT at position 1
        else:
            n = torch.linalg.vector_norm(h, 2, 0, True)
        return self.b(h / n)


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("how", ["method", "torch.norm", "vector_norm"])
def test_norm_reads_dim_by_name_not_position(tracer: str, how: str) -> None:
    torch.manual_seed(0)
    model = NormOverBatch(how).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    wide = graphscale.widen(model, (x,), 3, tracer=tracer)
    with torch.no_grad():
        assert (wide(x) - model(x)).abs().max().item() <= 1e-12


class NormOverWidth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h / torch.norm(h, 2, -1, True))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_norm_over_a_width_axis_is_refused(tracer: str) -> None:
    with pytest.raises(UnsupportedOpError, match="not replication-invariant"):
        graphscale.analyze(NormOverWidth(), (torch.randn(3, 4),), tracer=tracer)


class DtypeOfOpaque(ComplexImag):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).to(self.w.imag.dtype)  # a dtype read off an opaque value is just a dtype


def test_a_constant_attribute_of_an_opaque_value_is_fine() -> None:
    x = torch.randn(2, 4, dtype=torch.float64)
    plan = graphscale.analyze(DtypeOfOpaque().double(), (x,), tracer="fx")
    assert "fc.weight[0]" not in [c.name for c in plan.width_classes]  # the model's output: fixed
