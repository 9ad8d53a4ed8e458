"""Never silently wrong, never lose the user's model (issue 17, items 2-8, 15, 17, 18).

Each test reproduces a case that was silently wrong or changed the user's model, and asserts that it is
now exact or refused with a ``GraphscaleError``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import graphscale
from graphscale.errors import GraphscaleError, MultiplierError, TraceError, UnsupportedOpError

D = torch.float64


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _snapshot(model: nn.Module) -> dict[str, object]:
    """Everything the API must leave alone: tensor bits, flags, attribute types, hooks."""
    state = {f"t:{n}": (type(t), t.detach().clone(), t.requires_grad)
             for n, t in [*model.named_parameters(remove_duplicate=False),
                          *model.named_buffers(remove_duplicate=False)]}
    for path, m in model.named_modules():
        state[f"m:{path}"] = (m.training, {k: type(v) for k, v in m.__dict__.items()},
                              list(m._forward_hooks.items()), list(m._forward_pre_hooks.items()))
    return state


def _assert_same(before: dict[str, object], model: nn.Module) -> None:
    after = _snapshot(model)
    assert before.keys() == after.keys()
    for k, v in before.items():
        w = after[k]
        if k.startswith("t:"):
            assert v[0] is w[0] and v[2] == w[2], k
            assert torch.equal(v[1], w[1]) and v[1].dtype == w[1].dtype, f"{k} changed"
        else:
            assert v == w, f"{k} changed"


class _Head(nn.Module):
    """``Linear(3, 8) -> op -> Linear(8, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 8)
        self.b = nn.Linear(8, 2)


# -- 2. custom autograd.Function: backward kept, or refused ------------------------------------------------


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return -g


class StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return g


class WithFunction(_Head):
    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.fn.apply(self.a(x)))


@pytest.mark.parametrize("fn", [GradReverse, StraightThrough])
def test_autograd_function_without_rule_is_refused(fn: type) -> None:
    model = WithFunction(fn).double()
    with pytest.raises(UnsupportedOpError, match=fn.__name__) as info:
        graphscale.widen(model, (_x(4, 3),), 2)
    assert f"{fn.__module__}.{fn.__qualname__}.apply" in str(info.value)  # the rule target to add
    assert "test_model_safety.py" in str(info.value)  # the user's line, not graphscale's
    with pytest.raises(UnsupportedOpError, match="torch.export keeps only its forward"):
        graphscale.widen(model, (_x(4, 3),), 2, tracer="export")


@pytest.mark.parametrize("fn", [GradReverse, StraightThrough])
def test_autograd_function_with_rule_keeps_its_backward(fn: type, tmp_path: Path) -> None:
    rule = tmp_path / "fn.toml"
    rule.write_text(f'[[rule]]\nname = "{fn.__name__}"\nkind = "elementwise"\n'
                    f'targets = ["{fn.__module__}.{fn.__qualname__}.apply"]\n')
    model = WithFunction(fn).double()
    x = _x(4, 3).requires_grad_()
    wide = graphscale.widen(model, (x,), 2, rules=rule)
    assert torch.allclose(wide(x), model(x), atol=1e-12, rtol=0)
    grads = []
    for m in (model, wide):
        x.grad = None
        m(x).square().sum().backward()
        grads.append(x.grad.clone())
    # the input's gradient is the same function of x for both; an inlined forward flips or zeroes it
    assert grads[0].abs().max() > 1e-3
    assert torch.allclose(grads[1], grads[0], atol=1e-12, rtol=0)



class TanhOwnBackward(torch.autograd.Function):
    """tanh with its backward written out: exactly the forward's derivative."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class TanhStraightThrough(TanhOwnBackward):
    """tanh whose backward passes the gradient through: not the forward's derivative."""

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return g


def _derivative_rule(fn: type, tmp_path: Path) -> Path:
    rule = tmp_path / "fn.toml"
    rule.write_text(f'[[rule]]\nname = "{fn.__name__}"\nkind = "elementwise"\nbackward = "derivative"\n'
                    f'targets = ["{fn.__module__}.{fn.__qualname__}.apply"]\n')
    return rule


def test_a_function_declared_derivative_is_inlined_by_export_and_trains_alike(tmp_path: Path) -> None:
    """backward = "derivative": export may inline the forward, since autograd's derivative of it is the
    Function's own backward. Widening is exact, and the wide model's input gradient is the narrow one's."""
    model = WithFunction(TanhOwnBackward).double()
    x = _x(4, 3).requires_grad_()
    rules = _derivative_rule(TanhOwnBackward, tmp_path)
    wide = graphscale.widen(model, (x,), 2, tracer="export", rules=rules)
    assert torch.allclose(wide(x), model(x), atol=1e-12, rtol=0)
    grads = []
    for m in (model, wide):
        x.grad = None
        m(x).square().sum().backward()
        grads.append(x.grad.clone())
    assert grads[0].abs().max() > 1e-3 and torch.allclose(grads[1], grads[0], atol=1e-12, rtol=0)


def test_a_wrong_derivative_claim_is_refused_naming_the_rule(tmp_path: Path) -> None:
    """The claim is checked where capture meets the Function: a straight-through backward is not the
    derivative, and export would drop it, so the rule that says so is named."""
    model = WithFunction(TanhStraightThrough).double()
    with pytest.raises(UnsupportedOpError, match="TanhStraightThrough.*differs from the derivative"):
        graphscale.widen(model, (_x(4, 3),), 2, tracer="export",
                         rules=_derivative_rule(TanhStraightThrough, tmp_path))


def test_the_backward_key_takes_own_or_derivative(tmp_path: Path) -> None:
    from graphscale.errors import RuleError
    from graphscale.infer.rulebook import RuleBook

    rule = tmp_path / "bad.toml"
    rule.write_text('[[rule]]\nname = "x"\nkind = "elementwise"\nbackward = "exact"\n'
                    'targets = ["torch.tanh"]\n')
    with pytest.raises(RuleError, match="backward.*'own', 'derivative'"):
        RuleBook.load(rule)

# -- 3. in-place buffer updates in forward are kept --------------------------------------------------------


class EMA(_Head):
    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.register_buffer("ema", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.style == "method":
            self.ema.mul_(0.9).add_(0.1 * h.mean(0).detach())
        else:
            torch.add(self.ema * 0.9, h.mean(0).detach(), alpha=0.1, out=self.ema)
        return self.b(h + self.ema)


@pytest.mark.parametrize("style", ["method", "out"])
def test_in_place_buffer_update_is_kept(style: str) -> None:
    model, x = EMA(style).double(), _x(4, 3)
    wide = graphscale.widen(model, (x,), 3)
    for step in range(4):
        x = _x(4, 3, seed=step)
        assert torch.allclose(wide(x), model(x), atol=1e-12, rtol=0), step
        assert torch.allclose(wide.get_buffer("ema"), model.ema.repeat_interleave(3), atol=1e-14, rtol=0)
    assert model.ema.abs().max() > 1e-2  # the update ran


class ClampInPlace(_Head):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        y = self.b(h)
        h.clamp_(min=0)  # the result is unused: only the write into h matters
        return y + self.b(h)


def test_in_place_activation_write_is_kept() -> None:
    model, x = ClampInPlace().double(), _x(4, 3)
    wide = graphscale.widen(model, (x,), 2)
    assert torch.allclose(wide(x), model(x), atol=1e-12, rtol=0)


# -- 4. the source model is never changed -----------------------------------------------------------------


class CountsCalls(_Head):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1
        return self.b(self.a(x))


@pytest.mark.parametrize("call", ["analyze", "widen", "verify"])
def test_reassigned_buffer_leaves_the_model_alone(call: str) -> None:
    model, x = CountsCalls().double(), _x(4, 3)
    before = _snapshot(model)
    if call == "analyze":
        graphscale.analyze(model, (x,))
    elif call == "widen":
        wide = graphscale.widen(model, (x,), 2)
        model(x), wide(x)  # the reassignment is kept (torch.export records it as a copy)
        assert torch.equal(wide.get_buffer("calls"), model.calls)
        before = _snapshot(model)
    else:
        assert graphscale.verify(model, (x,), max_examples=2).ok
    _assert_same(before, model)
    assert isinstance(model.state_dict()["calls"], torch.Tensor)


def test_reassigned_buffer_is_refused_by_fx() -> None:
    model = CountsCalls().double()
    before = _snapshot(model)
    with pytest.raises(TraceError, match="reassigns 'calls'"):
        graphscale.analyze(model, (_x(4, 3),), tracer="fx")
    _assert_same(before, model)


class ScalesWeight(_Head):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.a.weight.mul_(0.5)
        return self.b(self.a(x))


class ScalesWeightData(_Head):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.a.weight.data.mul_(0.5)
        return self.b(self.a(x))


@pytest.mark.parametrize("cls", [ScalesWeight, ScalesWeightData])
def test_in_place_parameter_write_is_refused_and_model_untouched(cls: type) -> None:
    model, x = cls().double(), _x(4, 3)
    before = _snapshot(model)
    for call in (lambda: graphscale.analyze(model, (x,)), lambda: graphscale.widen(model, (x,), 2)):
        with pytest.raises(UnsupportedOpError, match="writes into parameter 'a.weight' in place"):
            call()
        _assert_same(before, model)


# -- 5. Embedding(max_norm) -------------------------------------------------------------------------------


class RenormEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(10, 8, max_norm=1.0)
        self.b = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.b(self.e(ids))


def test_embedding_max_norm_is_refused() -> None:
    model = RenormEmbedding().double()
    ids = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(0))
    before = _snapshot(model)
    with pytest.raises(GraphscaleError, match="max_norm"):
        graphscale.widen(model, (ids,), 2)
    large = RenormEmbedding().double()
    large.e, large.b = nn.Embedding(10, 16, max_norm=1.0).double(), nn.Linear(16, 2).double()
    with pytest.raises(GraphscaleError, match="max_norm"):
        graphscale.widen_into(model, large, (ids,))
    report = graphscale.verify(model, (ids,), max_examples=5)
    assert not report.ok and "max_norm" in report.failure
    _assert_same(before, model)  # the renorm writes into the weight: it must not reach the user's


# -- 6. tensors off the traced path ----------------------------------------------------------------------


class AuxHead(_Head):
    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(8, 5)  # used only by a training loss outside forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_untraced_parameters_are_named() -> None:
    small, x = AuxHead().double(), _x(4, 3)
    with pytest.warns(UserWarning, match=r"aux\.weight, aux\.bias"):
        wide = graphscale.widen(small, (x,), 2)
    assert any("aux.weight" in n for n in wide.graphscale.notes)
    large = AuxHead().double()
    large.a, large.b = nn.Linear(3, 16).double(), nn.Linear(16, 2).double()
    with pytest.warns(UserWarning, match=r"keep the larger model's own values: aux\.weight, aux\.bias"):
        graphscale.widen_into(small, large, (x,))


# -- 7. widen_into is transactional ----------------------------------------------------------------------


def test_widen_into_failure_leaves_large_unchanged() -> None:
    small = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    large = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    before = _snapshot(large)
    with pytest.raises(GraphscaleError, match="does not compute the same function"):
        graphscale.widen_into(small, large, (_x(5, 3),))
    _assert_same(before, large)
    assert not hasattr(large, "graphscale")


def test_widen_into_without_the_transactional_copy_fills_the_same_values() -> None:
    """``transactional=False`` (for a large model built only to be filled) skips the copy of ``large``,
    not any check: it fills bitwise what the default fills, and a mismatch is still refused."""
    small = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    filled = [nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double() for _ in range(2)]
    graphscale.widen_into(small, filled[0], (_x(5, 3),))
    graphscale.widen_into(small, filled[1], (_x(5, 3),), transactional=False)
    for a, b in zip(filled[0].parameters(), filled[1].parameters()):
        assert torch.equal(a, b)
    large = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    with pytest.raises(GraphscaleError, match="does not compute the same function"):
        graphscale.widen_into(small, large, (_x(5, 3),), transactional=False)
    assert not hasattr(large, "graphscale")


def test_an_exported_capture_shares_the_model_weights() -> None:
    """torch.export's graph calls its input-guard module; that module writes nothing, so the capture
    shares the model's weights (no copy of the model in memory), while a leaf module of unknown code still
    gets weights of its own."""
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    cap = graphscale.capture.capture(model, (_x(5, 3),), tracer="export")
    assert any(n.op == "call_module" for n in cap.gm.graph.nodes)  # the guards are there
    ours = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in cap.gm.parameters()} == ours

    class Opaque(nn.Linear):  # not torch.nn's code: it could write its weight
        pass

    leafy = nn.Sequential(Opaque(3, 8), nn.ReLU()).double()
    tracer = torch.fx.Tracer()
    tracer.is_leaf_module = lambda m, name: True  # type: ignore[method-assign]
    gm = torch.fx.GraphModule(leafy, tracer.trace(leafy))
    assert graphscale.capture.safety.writes_parameters_in_kernels(gm)


# -- 8. two multiplier keys for one class ----------------------------------------------------------------


def test_two_keys_for_one_class_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    with pytest.raises(MultiplierError, match=r"'0\.weight\[0\]' and '2\.weight\[1\]' both name"):
        graphscale.widen(model, (_x(4, 3),), {"0.weight[0]": 2, "2.weight[1]": 3})


# -- 15. a multiplier too large for memory ---------------------------------------------------------------


def test_huge_multiplier_is_refused_with_the_bytes() -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    small = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with pytest.raises(MultiplierError, match=r"needs [\d,]+ bytes .* only [\d,]+ bytes .* available"):
        graphscale.widen(model, (_x(4, 3),), 99999999999999999999)
    from graphscale.plan import Sizes
    from graphscale.widen import check_memory

    plan = graphscale.analyze(small, (_x(4, 3),))
    sizes = Sizes(plan, plan.multipliers(2))
    assert check_memory(plan, sizes) == (8 * 3 + 8 + 2 * 8 + 2) * 8  # float64 wide tensors
    with pytest.raises(MultiplierError, match="needs 400 bytes"):
        check_memory(plan, sizes, available=399)
    with pytest.raises(MultiplierError, match=r"needs [\d,]+ bytes \(about 10\^\d+ GiB\)"):
        graphscale.widen(model, (_x(4, 3),), 10**320)  # bytes past a float: refused, not an OverflowError


# -- 17. verify reports, never raises --------------------------------------------------------------------


def test_verify_reports_a_runtime_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    verify_module = sys.modules["graphscale.verify"]  # graphscale.verify is also the function
    real_widen = verify_module.widen

    def broken_widen(*args: object, **kwargs: object) -> torch.nn.Module:
        wide = real_widen(*args, **kwargs)
        for n in wide.graph.nodes:
            if n.op == "call_module":
                n.target = "missing"  # running the graph raises AttributeError
        return wide

    monkeypatch.setattr(verify_module, "widen", broken_widen)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    report = graphscale.verify(model, (_x(4, 3),), multiplier=2, max_examples=3, dtypes=(D,))
    assert not report.ok
    assert "widening or running failed" in report.failure


def test_verify_names_an_unexpected_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    verify_module = sys.modules["graphscale.verify"]

    def broken_compare(*args: object, **kwargs: object) -> dict:
        raise KeyError("node_x")  # a bug in the check itself, not a mismatch

    monkeypatch.setattr(verify_module, "compare_activations", broken_compare)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    report = graphscale.verify(model, (_x(4, 3),), multiplier=2, max_examples=3, dtypes=(D,))
    assert not report.ok
    assert report.failure == "KeyError: 'node_x'"


class ClampsInput(_Head):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.clamp_(min=0)
        return self.b(self.a(x))


def test_verify_with_in_place_ops_is_exact_and_deterministic() -> None:
    for cls in (ClampInPlace, ClampsInput):
        report = graphscale.verify(cls().double(), (_x(4, 3),), max_examples=5, dtypes=(D,))
        assert report.ok, report


# -- 18. parametrized modules ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "old_weight_norm"])
def test_parametrizations_are_refused_by_name(kind: str) -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    if kind == "old_weight_norm":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.nn.utils.weight_norm(model[2])
        match = "module '2' .*WeightNorm"
    else:
        getattr(torch.nn.utils.parametrizations, kind)(model[2])
        match = f"module '2' .*_{''.join(w.title() for w in kind.split('_'))}.* on 'weight'"
    before = _snapshot(model)
    with pytest.raises(UnsupportedOpError, match=match):
        graphscale.widen(model, (_x(4, 3),), 2)
    _assert_same(before, model)


# -- the widen_into attention note ------------------------------------------------------------------------


def test_widen_into_notes_query_scaling_only_with_attention() -> None:
    small = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    large = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    notes = graphscale.widen_into(small, large, (_x(5, 3),)).notes
    assert not any("query" in n for n in notes), notes


def test_plan_reads_weights_loaded_after_analyze() -> None:
    """widen(model, plan=plan) reads the model's current tensors, not the traced copy's."""
    model, x = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double(), _x(4, 3)
    plan = graphscale.analyze(model, (x,))
    with torch.no_grad():
        model[0].weight.mul_(2)
    wide = graphscale.widen(model, (x,), 2, plan=plan)
    assert torch.allclose(wide(x), model(x), atol=1e-12, rtol=0)
    with pytest.raises(GraphscaleError, match="different model"):
        graphscale.widen(copy.deepcopy(model), (x,), 2, plan=plan)
