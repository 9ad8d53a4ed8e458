"""Every deliberate graphscale error says what went wrong, where, and what to do about it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphscale
from graphscale.errors import (
    GraphscaleError,
    MultiplierError,
    TraceError,
    UnsupportedOpError,
    WidthConflictError,
)
from graphscale.infer.dims import DimSystem


class Around(nn.Module):
    """``Linear(3, 8) -> op -> Linear(8, 2)``: the op acts on a hidden (width) activation."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fc_in = nn.Linear(3, 8)
        self.fc_out = nn.Linear(8, 2)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.op(self.fc_in(x)))


def _x() -> torch.Tensor:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(0))


def _suggested_target(message: str) -> str:
    m = re.search(r'targets = \["([^"]+)"\]', message)
    assert m, f"the message must show the rule to add: {message}"
    return m.group(1)


@pytest.mark.parametrize("op, name", [(torch.sinh, "sinh"), (lambda h: torch.fft.fft(h).real, "fft"),
                                      (lambda h: torch.kron(h, h[:, :1]), "kron")])
def test_op_without_rule(op: Callable[[torch.Tensor], torch.Tensor], name: str) -> None:
    with pytest.raises(UnsupportedOpError) as info:
        graphscale.analyze(Around(op), (_x(),), tracer="fx")
    msg = str(info.value)
    assert "no graphscale rule covers" in msg
    assert name in _suggested_target(msg)  # names the op
    assert re.search(rf"node '\w*{name}\w*'", msg), msg  # names the node
    assert "[[rule]]" in msg and "rules=" in msg and "--rules" in msg  # says how to add a rule
    assert "test_errors.py" in msg  # points at the user's source line


def _sinh_rule(path: Path, target: str) -> Path:
    path.write_text(f'[[rule]]\nname = "my_sinh"\nkind = "elementwise"\ntargets = ["{target}"]\n')
    return path


def test_user_rule_file_makes_op_work(tmp_path: Path) -> None:
    """sinh is elementwise; a user rule file saying so makes the model analyze and widen exactly."""
    model = Around(torch.sinh).double()
    x = _x().double()
    rule = _sinh_rule(tmp_path / "sinh.toml", "torch.sinh")
    plan = graphscale.analyze(model, (x,), tracer="fx", rules=rule)
    assert [c.name for c in plan.width_classes] == ["fc_in.weight[0]"]
    wide = graphscale.widen(model, (x,), 3, tracer="fx", rules=str(rule))
    assert wide.get_submodule("fc_in").out_features == 24
    assert (wide(x) - model(x)).abs().max().item() <= 1e-12
    folder = tmp_path / "rules"  # a folder of rule files works too
    folder.mkdir()
    _sinh_rule(folder / "a.toml", "torch.sinh")
    assert len(graphscale.analyze(model, (x,), tracer="fx", rules=folder).width_classes) == 1


def test_rule_with_the_suggested_target_works(tmp_path: Path) -> None:
    model = Around(torch.sinh)
    with pytest.raises(UnsupportedOpError) as info:
        graphscale.analyze(model, (_x(),), tracer="fx")
    rule = _sinh_rule(tmp_path / "sinh.toml", _suggested_target(str(info.value)))
    assert len(graphscale.analyze(model, (_x(),), tracer="fx", rules=rule).width_classes) == 1


def test_bad_rule_file_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nname = "x"\nkind = "no_such_kind"\ntargets = ["torch.sinh"]\n')
    with pytest.raises(GraphscaleError, match="no_such_kind"):
        graphscale.analyze(Around(torch.sinh), (_x(),), rules=bad)
    with pytest.raises(GraphscaleError, match="no .toml"):
        graphscale.analyze(Around(torch.sinh), (_x(),), rules=tmp_path / "missing.toml")


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if x.sum() > 0:
            h = h * 2
        return self.out(h)


@pytest.mark.parametrize("tracer", ["auto", "fx", "export"])
def test_untraceable_model(tracer: str) -> None:
    with pytest.raises(TraceError) as info:
        graphscale.analyze(DataDependent(), (_x(),), tracer=tracer)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "DataDependent" in msg  # names the model
    if tracer == "fx":
        assert "symbolic_trace" in msg and "tracer='export'" in msg  # suggests the other frontend
    else:
        assert "torch.export" in msg and "data-dependent" in msg


def test_unknown_tracer() -> None:
    with pytest.raises(TraceError, match="'auto', 'fx' or 'export'"):
        graphscale.analyze(Around(torch.tanh), (_x(),), tracer="jit")  # type: ignore[arg-type]


def test_width_conflict_in_dim_system() -> None:
    ds = DimSystem()
    a, b = ds.new(8, "fc.weight[0]"), ds.new(16, "other.weight[1]")
    with pytest.raises(WidthConflictError) as info:
        ds.union(a, b, "add at node 'add_1'")
    msg = str(info.value)
    assert "add at node 'add_1'" in msg and "fc.weight[0]" in msg and "(size 8)" in msg
    assert "other.weight[1]" in msg and "(size 16)" in msg


def test_width_conflict_products() -> None:
    ds = DimSystem()
    d, h, e = ds.new(12, "d"), ds.new(4, "heads"), ds.new(4, "head_dim")
    with pytest.raises(WidthConflictError, match=r"size 12, not the product 16"):
        ds.prod(d, [h, e], "view at node 'view'")
    with pytest.raises(WidthConflictError, match="not the sum of its parts"):
        ds.concat(d, [h, e], "cat at node 'cat'")


@pytest.fixture(scope="module")
def mlp_plan() -> graphscale.Plan:
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    return graphscale.analyze(model, (_x(),))


@pytest.mark.parametrize("bad", [1.5, 0, -2, True, False, "2", None])
def test_bad_multiplier(mlp_plan: graphscale.Plan, bad: object) -> None:
    with pytest.raises(MultiplierError) as info:
        mlp_plan.multipliers(bad)  # type: ignore[arg-type]
    assert "integer >= 1" in str(info.value) and repr(bad) in str(info.value)
    with pytest.raises(MultiplierError):
        mlp_plan.multipliers({"0.weight[0]": bad})  # type: ignore[dict-item]
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(MultiplierError):
        graphscale.widen(model, (_x(),), bad)  # type: ignore[arg-type]


def test_integral_float_multiplier_accepted(mlp_plan: graphscale.Plan) -> None:
    assert mlp_plan.multipliers(2.0) == {"0.weight[0]": 2, "2.weight[0]": 2}  # type: ignore[arg-type]


def test_unknown_class(mlp_plan: graphscale.Plan) -> None:
    with pytest.raises(MultiplierError) as info:
        mlp_plan.multipliers({"nope": 2})
    msg = str(info.value)
    assert "'nope'" in msg and "0.weight[0]" in msg and "2.weight[0]" in msg


def test_fixed_class_cannot_be_widened(mlp_plan: graphscale.Plan) -> None:
    with pytest.raises(MultiplierError, match="fixed"):
        mlp_plan.multipliers({"4.weight[0]": 2})  # the output axis


def test_softmax_over_hidden_units() -> None:
    with pytest.raises(UnsupportedOpError) as info:
        graphscale.analyze(Around(lambda h: F.softmax(h, dim=-1)), (_x(),))
    msg = str(info.value)
    assert "node 'softmax'" in msg and "softmax" in msg and "fc_in.weight[0]" in msg
    assert "not replication-invariant" in msg and "Fix:" in msg


def test_softmax_over_fixed_axis_is_fine() -> None:
    """The same softmax over the batch axis (fixed) does not refuse, and widening is exact."""
    model = Around(lambda h: F.softmax(h, dim=0)).double()
    x = _x().double()
    wide = graphscale.widen(model, (x,), 2)
    assert (wide(x) - model(x)).abs().max().item() <= 1e-12


def test_errors_share_a_base() -> None:
    for cls in (UnsupportedOpError, TraceError, WidthConflictError, MultiplierError):
        assert issubclass(cls, GraphscaleError)
