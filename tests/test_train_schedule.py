"""Learning-rate schedules keep μP's per-group ratios (issue 17, item 9).

Each equivalence test trains a narrow MLP with a plain torch optimizer and scheduler, and its zero-noise x2
widening with ``mup_optimizer`` + ``mup_scheduler`` built from the *same* arguments, in float64 on the same
batches, and requires their outputs to agree at every step. The controls run the plain torch scheduler on
the wide μP optimizer and must fail the same tolerance: they are the three ways the issue reports.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.optim import lr_scheduler as S

import graphscale
from graphscale import zoo
from graphscale.train import (
    SchedulerError,
    mup_optimizer,
    mup_scheduler,
    transfer_optimizer_state,
    transfer_scheduler_state,
)

TOL = 1e-9
STEPS = 120
HP = {"lr": 1e-2, "weight_decay": 0.1}


def _narrow() -> tuple[torch.nn.Module, torch.Tensor]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, (x,) = zoo.mlp(widths=(8, 16), d_in=4, d_out=3, seed=1)
    finally:
        torch.set_default_dtype(before)
    return model.train(), x


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(6, 4, generator=g, dtype=torch.float64),
             torch.randn(6, 3, generator=g, dtype=torch.float64)) for _ in range(n)]


def _train(model, opt, sched, batches, probe) -> list[torch.Tensor]:
    outs = []
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            outs.append(model(probe).clone())
    return outs


def _max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((u - v).abs().max() / v.abs().max()).item() for u, v in zip(a, b))


def _pair(scheduler_cls, kwargs, *, plain_wide: bool) -> float:
    """Max relative output difference over STEPS steps between narrow and wide training."""
    narrow, probe = _narrow()
    wide = graphscale.widen(narrow, (probe,), multiplier=2).train()
    batches = _batches(STEPS)
    n_opt = torch.optim.AdamW(narrow.parameters(), **HP)
    w_opt = mup_optimizer(wide, torch.optim.AdamW, **HP)
    assert len({g["graphscale"]["lr"] for g in w_opt.param_groups}) > 1  # the ratios are at stake
    n_sched = scheduler_cls(n_opt, **kwargs)
    w_sched = scheduler_cls(w_opt, **kwargs) if plain_wide else mup_scheduler(w_opt, scheduler_cls, **kwargs)
    want = _train(narrow, n_opt, n_sched, batches, probe)
    return _max_rel(_train(wide, w_opt, w_sched, batches, probe), want)


def _warmup_then_cosine(opt: torch.optim.Optimizer) -> S.SequentialLR:
    """Composed schedulers: built by one factory, so that they share the optimizer they are given."""
    return S.SequentialLR(opt, [S.LinearLR(opt, 0.1, total_iters=20),
                                S.CosineAnnealingLR(opt, STEPS - 20, eta_min=2e-3)], milestones=[20])


CASES = {
    "one_cycle_float_max_lr": (S.OneCycleLR, {"max_lr": 0.05, "total_steps": STEPS}),
    "cosine_eta_min": (S.CosineAnnealingLR, {"T_max": STEPS // 2, "eta_min": 5e-3}),
    "sequential_warmup_cosine": (_warmup_then_cosine, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mup_scheduler_keeps_dynamic_equivalence(case: str) -> None:
    cls, kwargs = CASES[case]
    assert _pair(cls, kwargs, plain_wide=False) <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_plain_scheduler_breaks_it(case: str) -> None:
    """Control: the same harness with the plain torch scheduler on the wide μP optimizer fails."""
    cls, kwargs = CASES[case]
    assert _pair(cls, kwargs, plain_wide=True) > 1e3 * TOL


def _carried(plain_wide: bool, saved: bool = False) -> float:
    """Narrow trains half the schedule, is widened mid-run with its optimizer and scheduler state, and both
    continue; returns the max relative difference over the second half."""
    narrow, probe = _narrow()
    batches = _batches(STEPS)
    kwargs = {"T_max": STEPS, "eta_min": 2e-3}
    n_opt = torch.optim.AdamW(narrow.parameters(), **HP)
    n_sched = S.CosineAnnealingLR(n_opt, **kwargs)
    _train(narrow, n_opt, n_sched, batches[: STEPS // 2], probe)
    wide = graphscale.widen(narrow, (probe,), multiplier=2).train()
    w_opt = mup_optimizer(wide, torch.optim.AdamW, **HP)
    transfer_optimizer_state(narrow, n_opt, wide, w_opt)
    if plain_wide:
        w_sched = S.CosineAnnealingLR(w_opt, **kwargs)
        w_sched.load_state_dict(n_sched.state_dict())
    else:
        w_sched = mup_scheduler(w_opt, S.CosineAnnealingLR, **kwargs)
        if saved:  # what a checkpoint holds: the scheduler's and the optimizer's state dicts
            transfer_scheduler_state(copy.deepcopy(n_sched.state_dict()), w_sched,
                                     narrow_param_groups=copy.deepcopy(n_opt.state_dict()["param_groups"]))
        else:
            transfer_scheduler_state(n_sched, w_sched)
    rest = batches[STEPS // 2:]
    return _max_rel(_train(wide, w_opt, w_sched, rest, probe), _train(narrow, n_opt, n_sched, rest, probe))


@pytest.mark.parametrize("saved", [False, True], ids=["live", "saved"])
def test_carried_scheduler_state_keeps_dynamic_equivalence(saved: bool) -> None:
    assert _carried(plain_wide=False, saved=saved) <= TOL


def test_plain_load_state_dict_breaks_it() -> None:
    """Control: ``wide_sched.load_state_dict(narrow_sched.state_dict())`` with plain torch schedulers."""
    assert _carried(plain_wide=True) > 1e3 * TOL


def test_saved_state_resumes_in_a_new_scheduler() -> None:
    """A wide run checkpointed mid-schedule (optimizer + mup_scheduler state) resumes exactly."""
    narrow, probe = _narrow()
    wide = graphscale.widen(narrow, (probe,), multiplier=2).train()
    batches = _batches(40)
    kwargs = {"max_lr": 0.05, "total_steps": 40}
    opt = mup_optimizer(wide, torch.optim.AdamW, **HP)
    sched = mup_scheduler(opt, S.OneCycleLR, **kwargs)
    _train(wide, opt, sched, batches[:20], probe)
    saved = {k: v.detach().clone() for k, v in wide.state_dict().items()}
    opt_state, sched_state = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    want = _train(wide, opt, sched, batches[20:], probe)
    wide.load_state_dict(saved)
    opt2 = mup_optimizer(wide, torch.optim.AdamW, **HP)
    sched2 = mup_scheduler(opt2, S.OneCycleLR, **kwargs)  # built first, as a training script does
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    got = _train(wide, opt2, sched2, batches[20:], probe)
    assert _max_rel(got, want) <= TOL


def test_scaled_arguments_land_per_group() -> None:
    narrow, probe = _narrow()
    wide = graphscale.widen(narrow, (probe,), multiplier=2)
    opt = mup_optimizer(wide, torch.optim.SGD, lr=0.1, momentum=0.9)
    factors = [g["graphscale"]["lr"] for g in opt.param_groups]
    mup_scheduler(opt, S.CyclicLR, base_lr=0.01, max_lr=0.1, step_size_up=5)
    assert [g["max_lr"] if "max_lr" in g else None for g in opt.param_groups] == [None] * len(factors)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01 * f for f in factors], rel=1e-15)
    opt = mup_optimizer(wide, torch.optim.SGD, lr=0.1)
    plateau = mup_scheduler(opt, S.ReduceLROnPlateau, factor=0.5, patience=0, min_lr=0.08)
    for _ in range(3):
        plateau.step(1.0)  # no improvement: reduce, down to min_lr (absolute in narrow units)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.08 * f for f in factors], rel=1e-15)


def test_refusals() -> None:
    narrow, probe = _narrow()
    plain = torch.optim.AdamW(narrow.parameters(), lr=1e-3)
    with pytest.raises(SchedulerError, match="no μP learning-rate factor"):
        mup_scheduler(plain, S.StepLR, step_size=1)
    wide = graphscale.widen(narrow, (probe,), multiplier=2)
    opt = mup_optimizer(wide, torch.optim.AdamW, lr=1e-3)
    sched = mup_scheduler(opt, S.CosineAnnealingLR, T_max=10)
    with pytest.raises(SchedulerError, match="not a mup_scheduler state"):
        sched.load_state_dict(S.CosineAnnealingLR(plain, T_max=10).state_dict())

    class DecaySchedule(S.LambdaLR):  # changes weight decay: a law graphscale does not know
        def step(self, *a, **k):
            super().step(*a, **k)
            for g in self.optimizer.param_groups:
                g["weight_decay"] = 0.5

    with pytest.raises(SchedulerError, match="weight_decay"):
        mup_scheduler(opt, DecaySchedule, lr_lambda=lambda t: 1.0)  # its first step is in its constructor
    two = torch.optim.AdamW([{"params": [narrow.get_parameter("0.weight")]},
                             {"params": [narrow.get_parameter("0.bias")]}], lr=1e-3)
    with pytest.raises(SchedulerError, match="group_map"):
        transfer_scheduler_state(S.CosineAnnealingLR(two, T_max=10), sched)
