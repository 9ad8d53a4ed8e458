"""``graphscale.verify`` must fail on widenings that are known to be inexact, and its default tolerances
must be tight enough to see a small error.

Each inexact widening is made through public hooks only: a plan whose rule carries a wrong copy scale or
drops a tied weight's inserted multiplier (``verify(plan=...)``), a user rule file that forces a
non-invariant op through or turns a sum into a mean (``rules=``), and an optimizer class that discards the
μP per-group learning rates (``optimizer=``). A mutation check (``benchmarks/mutations.py``) confirms these
tests fail when ``verify`` compares the wide model with itself or its tolerances are loosened.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import Phase, settings
from torch import nn

import graphscale
from graphscale.verify import verify_training

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _no_shrinking() -> Any:
    """Stop at the first failing example: these tests ask whether verify fails, not what it shrinks to
    (tests/test_verify.py checks the shrinking). verify's settings leave ``phases`` to the profile."""
    previous = getattr(settings, "_current_profile", None) or "default"
    settings.register_profile("graphscale-no-shrink", parent=settings.get_profile(previous),
                              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    settings.load_profile("graphscale-no-shrink")
    yield
    settings.load_profile(previous)


def _mlp(dtype: torch.dtype = F64) -> tuple[nn.Module, tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.to(dtype), (torch.randn(3, 4, generator=gen, dtype=dtype),)


def _plan_with_copy_scale(model: nn.Module, inputs: Any, name: str, factor: Any) -> graphscale.Plan:
    """The model's plan with ``name``'s copy scale multiplied by ``factor`` (a deliberately wrong rule)."""
    plan = graphscale.analyze(model, inputs)
    rule = plan.rules[name]
    plan.rules[name] = dataclasses.replace(rule, copy_scale=rule.copy_scale * factor)
    return plan


def _rule_file(path: Path, name: str, kind: str, targets: list[str], extra: str = "") -> str:
    quoted = ", ".join(f'"{t}"' for t in targets)
    path.write_text(f'[[rule]]\nname = "{name}"\nkind = "{kind}"\n{extra}targets = [{quoted}]\n')
    return str(path)


# -- the control: an exact widening passes, so the failures below are the widening's, not verify's -----------


def test_exact_widening_passes_at_rounding_level() -> None:
    model, inputs = _mlp()
    report = graphscale.verify(model, inputs, max_examples=4, dtypes=(F64,))
    assert report.ok and report.examples == 4
    assert report.output_error < 1e-13


# -- known-inexact widenings ---------------------------------------------------------------------------------


def test_wrong_copy_scale_fails() -> None:
    """The readout weight copied without its 1/k (copy scale k times too large): the output doubles."""
    model, inputs = _mlp()
    k = graphscale.analyze(model, inputs).symbols["0.weight[0]"]
    plan = _plan_with_copy_scale(model, inputs, "2.weight", k)
    report = graphscale.verify(model, inputs, plan=plan, max_examples=6, dtypes=(F64,), choices=(2, 3))
    assert not report.ok
    assert report.failing_example is not None and report.failing_example["node"] == "_2"
    assert report.output_error > 0.1
    assert "_2" in (report.failure or "")


class SumOverHidden(nn.Module):
    """``out(h) + sum_j h_j``: the sum over the hidden (width) axis needs an inserted 1/k."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        return self.out(h) + h.sum(-1, keepdim=True)


def test_dropped_inserted_multiplier_after_a_sum_fails(tmp_path: Path) -> None:
    torch.manual_seed(0)  # the error's size depends on the weights: not on the tests run before this one
    model, inputs = SumOverHidden().double(), (torch.randn(3, 4, dtype=F64),)
    exact = graphscale.verify(model, inputs, max_examples=3, dtypes=(F64,), choices=(2,))
    assert exact.ok  # with the built-in rule the 1/k is inserted and the widening is exact
    # A user rule that calls the sum a mean: no 1/k is inserted, the sum grows k times.
    rules = _rule_file(tmp_path / "sum.toml", "sum_as_mean", "reduce", ["torch.sum", "method:sum"],
                       extra='mode = "mean"\n')
    report = graphscale.verify(model, inputs, rules=rules, max_examples=3, dtypes=(F64,), choices=(2,))
    # far above the exact widening's 1e-13 (how far depends on the example verify draws: 0.05..0.2)
    assert not report.ok and report.output_error > 1e-3
    assert report.failing_example is not None and report.failing_example["node"] in {"sum_1", "add"}


class TiedReadout(nn.Module):
    """Embedding -> Linear -> tanh -> logits against the embedding matrix (a tied readout)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(self.emb(ids))) @ self.emb.weight.t()


def test_dropped_inserted_multiplier_of_a_tied_readout_fails() -> None:
    model = TiedReadout().double()
    ids = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(0))
    plan = graphscale.analyze(model, (ids,))
    rule = plan.rules["emb.weight"]
    assert rule.use_multipliers, "the tied readout needs an inserted multiplier"
    assert graphscale.verify(model, (ids,), plan=plan, max_examples=3, dtypes=(F64,), choices=(2,)).ok
    plan.rules["emb.weight"] = dataclasses.replace(rule, use_multipliers={})
    report = graphscale.verify(model, (ids,), plan=plan, max_examples=3, dtypes=(F64,), choices=(2,))
    assert not report.ok and report.output_error > 0.1


class CumsumOverHidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cumsum(torch.tanh(self.fc(x)), dim=-1))


def test_non_invariant_op_forced_through_fails(tmp_path: Path) -> None:
    """cumsum over the hidden axis is refused; a user rule that calls it elementwise forces it through."""
    model, inputs = CumsumOverHidden().double(), (torch.randn(3, 4, dtype=F64),)
    with pytest.raises(graphscale.UnsupportedOpError):
        graphscale.analyze(model, inputs)
    rules = _rule_file(tmp_path / "cumsum.toml", "cumsum_as_elementwise", "elementwise",
                       ["torch.cumsum", "torch._C._VariableFunctions.cumsum"])
    report = graphscale.verify(model, inputs, rules=rules, max_examples=4, dtypes=(F64,), choices=(2, 3))
    assert not report.ok
    assert report.failing_example is not None and report.failing_example["node"] in {"cumsum", "out"}


# -- the tolerance: small errors must not hide behind it -----------------------------------------------------


def test_an_error_of_1e_6_fails_unless_the_tolerance_is_loosened() -> None:
    """A copy scale off by a relative 1e-6 gives an output error of a few 1e-7: the default float64
    tolerance reports it; only an explicitly loosened tolerance lets it pass."""
    model, inputs = _mlp()
    plan = _plan_with_copy_scale(model, inputs, "2.weight", 1 + 1e-6)
    strict = graphscale.verify(model, inputs, plan=plan, multiplier=2, max_examples=3, dtypes=(F64,))
    assert not strict.ok and 1e-7 < strict.output_error < 1e-5
    loose = graphscale.verify(model, inputs, plan=plan, multiplier=2, max_examples=3, dtypes=(F64,),
                              tolerance={F64: 1e-5})
    assert loose.ok and 1e-7 < loose.output_error < 1e-5  # the same error, seen and tolerated


@pytest.mark.parametrize("dtype, factor, low, high", [
    (torch.float64, 1 + 1e-8, 1e-9, 1e-8),   # default 1e-10; a loosening to 1e-7 would hide it
    (torch.float32, 1 + 1e-3, 1e-4, 1e-3),   # default 1e-5; a loosening to 1e-2 would hide it
])
def test_default_tolerance_sees_a_small_error(dtype: torch.dtype, factor: float, low: float,
                                              high: float) -> None:
    model, inputs = _mlp(dtype)
    plan = _plan_with_copy_scale(model, inputs, "2.weight", factor)
    report = graphscale.verify(model, inputs, plan=plan, multiplier=2, max_examples=3, dtypes=(dtype,))
    assert low < report.output_error < high  # the error really sits between the tight and a loose tolerance
    assert not report.ok, report


# -- training: the wide model is compared with the narrow one, step by step ----------------------------------


class GroupLrIgnored(torch.optim.SGD):
    """An SGD that overwrites every param group's lr with the constructor's: it discards μP's factors."""

    def __init__(self, params: Any, lr: float, **kw: Any) -> None:
        params = list(params)
        if params and isinstance(params[0], dict):
            params = [dict(g, lr=lr) for g in params]
        super().__init__(params, lr=lr, **kw)


def test_verify_training_tracks_an_exact_widening() -> None:
    model, inputs = _mlp()
    report = graphscale.verify(model, inputs, multiplier=2, max_examples=1, dtypes=(F64,), steps=3,
                               optimizer=torch.optim.SGD, hparams={"lr": 0.1})
    assert report.ok and len(report.training) == 3 and max(report.training) < 1e-12


def test_verify_training_fails_when_the_wide_model_trains_differently() -> None:
    """The same exact widening trained without the μP lr factors diverges from the narrow model after the
    first step; verify must say so (comparing the wide model with itself would see nothing)."""
    model, inputs = _mlp()
    divergence = verify_training(model, inputs, steps=3, optimizer=GroupLrIgnored, hparams={"lr": 0.1})
    assert len(divergence) == 3 and max(divergence) > 1e-3
    report = graphscale.verify(model, inputs, multiplier=2, max_examples=1, dtypes=(F64,), steps=3,
                               optimizer=GroupLrIgnored, hparams={"lr": 0.1})
    assert not report.ok and "training diverged" in (report.failure or "")
    assert max(report.training) > 1e-3
