"""The table of optimizer laws: one entry per family, the plan's sympy and the optimizer's floats agree,
families are recognised by subclass, and state entries outside a family's entry are refused."""

from __future__ import annotations

import math

import pytest
import sympy
import torch

import graphscale
from graphscale import laws
from graphscale.record import AxisReplication, ParamScaling
from graphscale.train.optim import scaling_factors
from graphscale.train.state import widen_state_entry


def test_plan_sympy_and_optimizer_floats_come_from_the_same_entry() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5),
                                torch.nn.Tanh(), torch.nn.Linear(5, 2))
    plan = graphscale.analyze(model, (torch.randn(2, 3),))
    mults = {c.name: k for c, k in zip(plan.width_classes, (2, 3))}
    wide = graphscale.widen(model, (torch.randn(2, 3),), multiplier=mults)
    for name, rule in plan.rules.items():
        s = wide.graphscale.params[name]
        for fam in laws.FAMILIES:
            symbolic = rule.family_laws(fam)
            numeric = scaling_factors(s, fam)
            assert numeric.keys() == symbolic["hparams"].keys()
            for hp, expr in symbolic["hparams"].items():
                assert math.isclose(plan.substitute(expr, mults), numeric[hp], rel_tol=1e-12), (name, fam, hp)
            for key, expr in symbolic["state"].items():
                f = laws.FAMILIES[fam].state_factor(key, s.copy_scale, s.total_mult)
                assert math.isclose(plan.substitute(expr, mults), f, rel_tol=1e-12), (name, fam, key)
        # the laws that analyze/explain export equal the closed forms of docs/math.md §2, written here
        # independently of the table (reading the table on both sides could not fail)
        c, m = rule.copy_scale, rule.total
        expected = {"grad": 1 / (c * m), "sgd_lr": c**2 * m, "adam_lr": c, "adam_eps": 1 / (c * m),
                    "wd_coupled": 1 / (c**2 * m), "wd_decoupled": 1 / c, "exp_avg": 1 / (c * m),
                    "exp_avg_sq": 1 / (c * m) ** 2}
        exported = rule.laws()
        for key, closed_form in expected.items():
            assert sympy.simplify(exported[key] - closed_form) == 0, (name, key, exported[key])


def test_families_are_recognised_by_subclass_most_specific_first() -> None:
    class MyAdamW(torch.optim.AdamW):
        pass

    class MyRMSprop(torch.optim.RMSprop):
        pass

    assert laws.family_of(MyAdamW) == "adamw" and laws.family_of(MyRMSprop) == "rmsprop"
    assert laws.family_of(torch.optim.Adagrad) == "adagrad"
    assert laws.family_of(torch.optim.Adam, hparams={"decoupled_weight_decay": True}) == "adamw"
    with pytest.raises(laws.OptimizerFamilyError, match="Adafactor"):
        laws.family_of(torch.optim.Adafactor)
    with pytest.raises(laws.OptimizerFamilyError, match="already registered"):
        laws.register_family(laws.OptimizerFamily("sgd", "again"))


def test_adding_a_family_is_one_entry() -> None:
    class Signum(torch.optim.Optimizer):
        pass

    entry = laws.OptimizerFamily("signum-test", "sign of the gradient", classes=(Signum,),
                                 hparams={"lr": laws.normalised_lr}, state={"momentum_buffer": laws.gradient})
    laws.register_family(entry)
    try:
        assert laws.family_of(Signum) == "signum-test"
        s = ParamScaling("w", "w", (2, 2), (4, 4), (AxisReplication.atomic(2, 2),) * 2, 0.5, 4, 2, (1,))
        assert scaling_factors(s, "signum-test") == {"lr": 0.5}
    finally:
        del laws.FAMILIES["signum-test"]


def test_state_entries_outside_the_family_are_refused_naming_key_and_family() -> None:
    s = ParamScaling("w", "w", (2, 3), (4, 3), (AxisReplication.atomic(2, 2), None), 1.0, 2, 1)
    like = torch.zeros(4, 3)
    # Adafactor keeps factored second moments (row_var, col_var): no per-entry law, never guessed
    with pytest.raises(graphscale.GraphscaleError, match=r"'row_var'.*'adam'"):
        widen_state_entry("row_var", torch.ones(2), s, like, family="adam")
    # a known key whose tensor is not shaped like the parameter is refused too
    with pytest.raises(graphscale.GraphscaleError, match=r"'exp_avg_sq'.*shape"):
        widen_state_entry("exp_avg_sq", torch.ones(2), s, like, family="adam")
    # the step counter is copied as a new tensor; a family's laws apply per key
    step = torch.tensor(3.0)
    out = widen_state_entry("step", step, s, like, family="sgd")
    assert out == step and out is not step
    buf = torch.ones(2, 3)
    assert torch.equal(widen_state_entry("momentum_buffer", buf, s, like, family="rmsprop"), torch.ones(4, 3))
    sgd_buf = widen_state_entry("momentum_buffer", buf, s, like, family="sgd")
    assert torch.equal(sgd_buf, torch.full((4, 3), 0.5))


def test_adafactor_is_refused_even_under_a_forced_family() -> None:
    narrow = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    opt = torch.optim.Adafactor(narrow.parameters(), lr=1e-2)
    narrow(x).square().sum().backward()
    opt.step()
    wide = graphscale.widen(narrow, (x,), multiplier=2)
    # its eps is a pair: a scalar law is not applied to it
    with pytest.raises(laws.OptimizerFamilyError, match=r"eps=\(.*'adam'"):
        graphscale.mup_optimizer(wide, torch.optim.Adafactor, lr=1e-2, family="adam")
    wide_opt = graphscale.mup_optimizer(wide, torch.optim.Adafactor, lr=1e-2, family="sgd")
    with pytest.raises(graphscale.GraphscaleError, match=r"'(row_var|col_var|variance)'.*'sgd'"):
        graphscale.transfer_optimizer_state(narrow, opt, wide, wide_opt)


def test_weight_role_is_one_function_for_derive_and_noise() -> None:
    k1, k2 = sympy.symbols("k1 k2", positive=True)
    assert laws.weight_role(2, k1 * k2, k1) == "hidden"
    # under multipliers where the fan-out class stays 1, the same function calls it a readout
    assert laws.weight_role(2, 2 * 1, 2) == "output"
    from graphscale.train.noise import weight_kind
    ax = AxisReplication.atomic(2, 2)
    s = ParamScaling("w", "w", (2, 2), (2, 4), (None, ax), 0.5, 2, 2, (1,), role="hidden")
    assert weight_kind(s) == "output"
