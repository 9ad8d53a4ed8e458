"""Optimizer-state transfer: widen mid-training and continue exactly; never touch the narrow optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from graphscale.train import mup_optimizer, transfer_optimizer_state
from graphscale.train._common import RecordError
from tests.helpers import (
    EXAMPLES,
    TOL,
    architectures,
    batches,
    hand_widen,
    make_data,
    make_mlp,
    optimizer_configs,
    rewiden_into,
    rounding_sensitivity,
    single_thread,
    train_pair,
)

__all__ = ["single_thread"]


def _train(model, opt, data, steps: int, seed: int) -> None:
    x, y = data
    for xb, yb in batches(x, y, steps, seed=seed):
        opt.zero_grad()
        F.mse_loss(model(xb), yb).backward()
        opt.step()


def _snapshot(opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(opt.state_dict())


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, dict):
            if not isinstance(vb, dict) or not _same_state(va, vb):
                return False
        elif isinstance(va, torch.Tensor):
            if not (isinstance(vb, torch.Tensor) and torch.equal(va, vb)):
                return False
        elif va != vb:
            return False
    return True


@settings(max_examples=max(1, EXAMPLES * 2 // 3), deadline=None)
@given(cfg=optimizer_configs(), arch=architectures(), k=st.sampled_from([2, 3]), prestep=st.booleans())
def test_widen_mid_training_with_state_transfer_stays_equivalent(cfg, arch, k, prestep) -> None:
    cls, hp = cfg
    data = make_data(arch["d_in"], arch["d_out"], arch["seed"])

    def build():
        return make_mlp(arch["d_in"], arch["hidden"], arch["d_out"], layernorm=arch["layernorm"],
                        compensated=arch["compensated"], seed=arch["seed"])

    assume(rounding_sensitivity(build, cls, hp, data, 120) < 1e-11)  # a proxy for the 20 + 100 steps
    narrow = build()
    narrow_opt = cls(narrow.parameters(), **hp)
    _train(narrow, narrow_opt, data, 20, seed=7)
    before = _snapshot(narrow_opt)

    wide = hand_widen(narrow, [k] * len(arch["hidden"]))
    wide_opt = mup_optimizer(wide, cls, **hp)
    if prestep:  # the wide optimizer already has (wrong) state: transfer must overwrite it
        _train(wide, wide_opt, data, 3, seed=8)
        rewiden_into(narrow, wide)
    transfer_optimizer_state(narrow, narrow_opt, wide, wide_opt)

    assert _same_state(before, narrow_opt.state_dict()), "the narrow optimizer was mutated"
    for p in wide.parameters():
        src = narrow.get_parameter(wide.graphscale.params[_name(wide, p)].source)
        for key, v in wide_opt.state[p].items():
            if isinstance(v, torch.Tensor):
                assert v is not narrow_opt.state[src][key]  # new tensors, step counters included
    worst, _ = train_pair(narrow, wide, narrow_opt, wide_opt, data, 100)
    assert worst <= TOL, f"{cls.__name__} {hp}: worst {worst:.3g}"


def _name(module, p) -> str:
    return next(n for n, q in module.named_parameters() if q is p)


@pytest.mark.parametrize("cls, hp", [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    (torch.optim.Adam, dict(lr=5e-3, eps=1e-3)),
])
def test_control_without_state_transfer_diverges(cls, hp) -> None:
    """A fresh wide optimizer (no transferred state) does not continue the narrow run: the test above
    can fail."""
    data = make_data(3, 2, 3)
    narrow = make_mlp(3, [4, 4], 2, seed=3)
    narrow_opt = cls(narrow.parameters(), **hp)
    _train(narrow, narrow_opt, data, 20, seed=7)
    wide = hand_widen(narrow, [2, 2])
    worst, _ = train_pair(narrow, wide, narrow_opt, mup_optimizer(wide, cls, **hp), data, 100)
    assert worst > 1e-3


def test_state_is_scaled_by_its_law() -> None:
    narrow = make_mlp(3, [4], 2, seed=1)
    opt = torch.optim.Adam(narrow.parameters(), lr=1e-2, amsgrad=True)
    _train(narrow, opt, make_data(3, 2), 5, seed=0)
    wide = hand_widen(narrow, [3])
    wide_opt = mup_optimizer(wide, torch.optim.Adam, lr=1e-2, amsgrad=True)
    transfer_optimizer_state(narrow, opt, wide, wide_opt)
    s = wide.graphscale.params["2.weight"]  # readout: c = 1/3, M = 3, so cM = 1
    hid = wide.graphscale.params["0.weight"]  # input: c = 1, M = 3, so cM = 3
    for scaling, src in ((s, narrow[2].weight), (hid, narrow[0].weight)):
        w = wide.get_parameter(scaling.name)
        cm = scaling.copy_scale * scaling.total_mult
        assert torch.allclose(wide_opt.state[w]["exp_avg"], scaling.replicate(opt.state[src]["exp_avg"]) / cm)
        assert torch.allclose(wide_opt.state[w]["exp_avg_sq"],
                              scaling.replicate(opt.state[src]["exp_avg_sq"]) / cm**2)
        assert torch.allclose(wide_opt.state[w]["max_exp_avg_sq"],
                              scaling.replicate(opt.state[src]["max_exp_avg_sq"]) / cm**2)
        assert float(wide_opt.state[w]["step"]) == 5.0


def test_unstepped_source_clears_wide_state() -> None:
    narrow = make_mlp(3, [4], 2)
    wide = hand_widen(narrow, [2])
    wide_opt = mup_optimizer(wide, torch.optim.SGD, lr=0.1, momentum=0.9)
    _train(wide, wide_opt, make_data(3, 2), 2, seed=0)
    fresh = torch.optim.SGD(narrow.parameters(), lr=0.1, momentum=0.9)
    transfer_optimizer_state(narrow, fresh, wide, wide_opt)
    assert len(wide_opt.state) == 0 and len(fresh.state) == 0


def test_unknown_state_entry_is_refused() -> None:
    narrow = make_mlp(3, [4], 2)
    opt = torch.optim.Adagrad(narrow.parameters(), lr=0.1)  # its "sum" entry has no law graphscale knows
    _train(narrow, opt, make_data(3, 2), 1, seed=0)
    wide = hand_widen(narrow, [2])
    with pytest.raises(RecordError, match="'sum'"):
        wide_opt = mup_optimizer(wide, torch.optim.Adagrad, lr=0.1, family="sgd")
        transfer_optimizer_state(narrow, opt, wide, wide_opt)


def test_non_tensor_entry_under_a_law_is_refused() -> None:
    # A law scales a tensor entry by entry; a number in its place would otherwise be copied unscaled.
    narrow = make_mlp(3, [4], 2)
    opt = torch.optim.SGD(narrow.parameters(), lr=0.1, momentum=0.9)
    _train(narrow, opt, make_data(3, 2), 1, seed=0)
    opt.state[narrow[0].weight]["momentum_buffer"] = 0.5
    wide = hand_widen(narrow, [2])
    wide_opt = mup_optimizer(wide, torch.optim.SGD, lr=0.1, momentum=0.9)
    with pytest.raises(RecordError, match="'momentum_buffer'.*float"):
        transfer_optimizer_state(narrow, opt, wide, wide_opt)
