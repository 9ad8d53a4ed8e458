"""μP optimizer: factor table, group building, refusals, and dynamic equivalence in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from graphscale.record import AxisReplication, ParamScaling, WideningRecord
from graphscale.train import clip_grad_norm_, mup_optimizer
from graphscale.train._common import OptimizerFamilyError, RecordError
from tests.helpers import (
    EXAMPLES,
    TOL,
    architectures,
    batches,
    hand_widen,
    make_data,
    make_mlp,
    optimizer_configs,
    rounding_sensitivity,
    single_thread,
    train_pair,
)

__all__ = ["single_thread"]  # the autouse fixture takes effect by being imported here


def _narrow(arch: dict) -> nn.Module:
    return make_mlp(arch["d_in"], arch["hidden"], arch["d_out"], layernorm=arch["layernorm"],
                    compensated=arch["compensated"], seed=arch["seed"])


def _pair(arch: dict, mults_draw) -> tuple[nn.Module, nn.Module]:
    narrow = _narrow(arch)
    return narrow, hand_widen(narrow, mults_draw)


# ------------------------------------------------------------------------------------------ unit tests


def _wide_mlp(k: int = 2) -> nn.Module:
    return hand_widen(make_mlp(3, [4, 4], 2), [k, k])


def _has(group: dict, p: torch.Tensor) -> bool:
    return any(q is p for q in group["params"])


def _group_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    (g,) = [g for g in opt.param_groups if _has(g, p)]
    return g


def test_factor_table_matches_mup_for_each_role() -> None:
    k = 4
    wide = _wide_mlp(k)
    inp, hid, out, bias = wide[0].weight, wide[2].weight, wide[4].weight, wide[2].bias
    adam = mup_optimizer(wide, torch.optim.Adam, lr=1.0, eps=1.0, weight_decay=1.0)
    # input: lr unchanged, eps/k; hidden: lr/k; readout: lr/k, eps unchanged; width vector: lr, eps/k
    assert _group_of(adam, inp)["lr"] == 1.0 and _group_of(adam, inp)["eps"] == 1 / k
    assert math.isclose(_group_of(adam, hid)["lr"], 1 / k)
    assert math.isclose(_group_of(adam, hid)["eps"], 1 / k)
    assert math.isclose(_group_of(adam, out)["lr"], 1 / k) and math.isclose(_group_of(adam, out)["eps"], 1.0)
    assert _group_of(adam, bias)["lr"] == 1.0 and _group_of(adam, bias)["eps"] == 1 / k
    # coupled wd: wd m_in / m_out
    assert math.isclose(_group_of(adam, inp)["weight_decay"], 1 / k)
    assert math.isclose(_group_of(adam, out)["weight_decay"], k)
    sgd = mup_optimizer(wide, torch.optim.SGD, lr=1.0)
    assert math.isclose(_group_of(sgd, inp)["lr"], k) and math.isclose(_group_of(sgd, hid)["lr"], 1.0)
    assert math.isclose(_group_of(sgd, out)["lr"], 1 / k) and math.isclose(_group_of(sgd, bias)["lr"], k)
    adamw = mup_optimizer(wide, torch.optim.AdamW, lr=1.0, weight_decay=1.0)
    assert math.isclose(_group_of(adamw, hid)["weight_decay"], k)  # decoupled: wd m_in
    assert _group_of(adamw, inp)["weight_decay"] == 1.0


def test_groups_merge_equal_factors_and_cover_every_param_once() -> None:
    wide = _wide_mlp(2)
    opt = mup_optimizer(wide, torch.optim.Adam, lr=1e-3)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in wide.parameters())
    keys = [tuple(sorted(g["graphscale"].items())) for g in opt.param_groups]
    assert len(keys) == len(set(keys))  # one group per distinct factor set
    # input weight (c=1, M=2) and hidden biases (c=1, M=2) share factors and so share a group
    assert any(_has(g, wide[0].weight) and _has(g, wide[2].bias) for g in opt.param_groups)


def test_defaults_of_the_class_are_scaled_too() -> None:
    """AdamW's default weight_decay=0.01 and Adam's eps=1e-8 get their factors even when not passed."""
    wide = _wide_mlp(2)
    opt = mup_optimizer(wide, torch.optim.AdamW, lr=1e-3)
    g = _group_of(opt, wide[2].weight)
    assert math.isclose(g["weight_decay"], 0.02) and math.isclose(g["eps"], 1e-8 / 2)


def test_user_param_groups_are_split_and_keep_their_settings() -> None:
    wide = _wide_mlp(2)
    decay = [p for n, p in wide.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in wide.named_parameters() if n.endswith("bias")]
    opt = mup_optimizer(wide, torch.optim.AdamW, lr=1e-2,
                        params=[{"params": decay, "weight_decay": 0.1},
                                {"params": no_decay, "weight_decay": 0.0}])
    for g in opt.param_groups:
        if any(g["params"][0] is p for p in no_decay):
            assert g["weight_decay"] == 0.0
    assert math.isclose(_group_of(opt, wide[2].weight)["weight_decay"], 0.2)


def test_tied_parameters_appear_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(x))

    m = Tied()
    ax = AxisReplication.atomic(2, 2)
    s = ParamScaling("a.weight", "a.weight", (2, 2), (4, 4), (ax, ax), 0.5, 4, 2, (1,), role="hidden")
    opt = mup_optimizer(m, torch.optim.SGD, lr=0.1, record=WideningRecord({"a.weight": s}, {"h": 2}))
    assert sum(len(g["params"]) for g in opt.param_groups) == 1


def test_unknown_optimizer_is_refused_unless_family_given() -> None:
    wide = _wide_mlp(2)
    with pytest.raises(OptimizerFamilyError, match="Adadelta"):
        mup_optimizer(wide, torch.optim.Adadelta, lr=1e-3)
    opt = mup_optimizer(wide, torch.optim.Adadelta, lr=1e-3, family="adam")
    assert math.isclose(_group_of(opt, wide[2].weight)["lr"], 5e-4)
    with pytest.raises(OptimizerFamilyError):
        mup_optimizer(wide, torch.optim.SGD, lr=1e-3, family="lion")


def test_parameters_missing_from_the_record_are_named() -> None:
    wide = _wide_mlp(2)
    del wide.graphscale.params["2.bias"]
    del wide.graphscale.params["4.weight"]
    with pytest.raises(RecordError, match=r"2\.bias.*4\.weight|4\.weight.*2\.bias"):
        mup_optimizer(wide, torch.optim.SGD, lr=0.1)
    with pytest.raises(RecordError, match="no widening record"):
        mup_optimizer(make_mlp(3, [4], 2), torch.optim.SGD, lr=0.1)


# ---------------------------------------------------------------------------------- dynamic equivalence


@settings(max_examples=EXAMPLES, deadline=None)
@given(cfg=optimizer_configs(), arch=architectures(), data=st.data())
def test_mup_optimizer_keeps_wide_model_equivalent(cfg, arch, data) -> None:
    cls, hp = cfg
    mults = data.draw(st.lists(st.sampled_from([2, 3]), min_size=len(arch["hidden"]),
                               max_size=len(arch["hidden"])))
    data_ = make_data(arch["d_in"], arch["d_out"], arch["seed"])
    assume(rounding_sensitivity(lambda: _narrow(arch), cls, hp, data_, 200) < 1e-11)
    narrow, wide = _pair(arch, mults)
    worst, _ = train_pair(narrow, wide, cls(narrow.parameters(), **hp), mup_optimizer(wide, cls, **hp),
                          data_, 200)
    assert worst <= TOL, f"{cls.__name__} {hp} mults={mults}: worst {worst:.3g}"


@settings(max_examples=max(1, EXAMPLES * 2 // 3), deadline=None)
@given(cfg=optimizer_configs(), arch=architectures(), k=st.sampled_from([2, 3]),
       fraction=st.floats(0.1, 0.9))
def test_equivalence_with_base_equivalent_clipping(cfg, arch, k, fraction) -> None:
    cls, hp = cfg
    data = make_data(arch["d_in"], arch["d_out"], arch["seed"])
    # max_norm below the first step's gradient norm, so clipping is active at least from the start
    probe = _narrow(arch)
    xb, yb = next(batches(*data, 1))
    F.mse_loss(probe(xb), yb).backward()
    max_norm = fraction * float(torch.nn.utils.get_total_norm([p.grad for p in probe.parameters()]))
    assume(rounding_sensitivity(lambda: _narrow(arch), cls, hp, data, 200, clip=max_norm) < 1e-11)
    narrow, wide = _pair(arch, [k] * len(arch["hidden"]))
    worst, norms = train_pair(narrow, wide, cls(narrow.parameters(), **hp), mup_optimizer(wide, cls, **hp),
                              data, 200, clip=max_norm, wide_clip=clip_grad_norm_)
    assert worst <= TOL
    for n_norm, w_norm in norms:  # the wide model sees exactly the narrow model's norm
        assert abs(n_norm - w_norm) <= 1e-9 * (1 + n_norm)
    assert any(n > max_norm for n, _ in norms), "clipping never triggered: the test would prove nothing"


SMALL = dict(d_in=3, hidden=[4, 4], d_out=2, layernorm=False, compensated=False, seed=3)


@pytest.mark.parametrize("cls, hp", [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    (torch.optim.Adam, dict(lr=5e-3, eps=1e-3)),
    (torch.optim.AdamW, dict(lr=5e-3, eps=1e-3, weight_decay=0.1)),
])
def test_control_plain_optimizer_on_wide_model_diverges(cls, hp) -> None:
    """The same run with the plain optimizer on the wide model is far from the narrow one: the
    equivalence tests above can fail."""
    narrow, wide = _pair(SMALL, [2, 2])
    worst, _ = train_pair(narrow, wide, cls(narrow.parameters(), **hp), cls(wide.parameters(), **hp),
                          make_data(3, 2, 3), 200)
    assert worst > 1e-3


def test_control_torch_clip_on_wide_model_diverges() -> None:
    narrow, wide = _pair(SMALL, [2, 2])
    hp = dict(lr=0.05, momentum=0.9)
    worst, _ = train_pair(narrow, wide, torch.optim.SGD(narrow.parameters(), **hp),
                          mup_optimizer(wide, torch.optim.SGD, **hp), make_data(3, 2, 3), 200, clip=0.05,
                          wide_clip=lambda m, c: torch.nn.utils.clip_grad_norm_(m.parameters(), c))
    assert worst > 1e-3
