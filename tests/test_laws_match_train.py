"""The symbolic laws that ``analyze``/``explain`` show (``plan.rules[name].laws()``) are the factors the
library actually applies.

At random multipliers of a model with two width classes and every role (input, hidden, output, vector, a
tied embedding/readout), each law is evaluated and checked against public outputs only:

* ``copy_scale``, ``M``: the widened weights (sum of |w'| = c M sum of |w|) and their sizes;
* ``grad``: autograd's gradients of the wide model against the narrow one's;
* ``sgd_lr``, ``adam_lr``, ``adam_eps``, ``wd_coupled``, ``wd_decoupled``: the hyperparameters of the param
  groups that :func:`graphscale.mup_optimizer` builds for SGD, Adam and AdamW;
* ``exp_avg``, ``exp_avg_sq`` (and SGD's momentum buffer, which follows ``grad``): the state tensors that
  :func:`graphscale.transfer_optimizer_state` writes;
* the gradient norm and the clipping coefficient of :func:`graphscale.clip_grad_norm_` against torch's
  clipping of the narrow model.

Sums compare a wide tensor with its narrow source without relying on how copies are laid out: copying
every entry M times and scaling by f multiplies the sum of absolute values by exactly ``M * f``.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from torch import nn

import graphscale

LR, EPS, WD = 0.05, 1e-3, 0.1


class TiedNet(nn.Module):
    """Embedding(10, d) -> Linear(d, h) -> tanh -> Linear(h, d) -> LayerNorm(d) -> head(d, 5) and a tied
    readout against the embedding (summed over the 5 first logits): classes d and h."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.fc2(torch.tanh(self.fc1(self.emb(ids)))))
        return self.head(h) + (h @ self.emb.weight.t())[..., :5]


def _model() -> tuple[nn.Module, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    model = TiedNet().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return model, torch.randint(0, 10, (3, 4), generator=gen)


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, torch.Tensor, graphscale.Plan]:
    model, ids = _model()
    plan = graphscale.analyze(model, (ids,))
    assert sorted(c.name for c in plan.width_classes) == ["emb.weight[1]", "fc1.weight[0]"]
    roles = {r.role for r in plan.rules.values()}
    assert {"input", "hidden", "output", "vector"} <= roles, roles
    return model, ids, plan


def _draws() -> list[dict[str, int]]:
    rng = random.Random(22)
    draws = [{"emb.weight[1]": rng.randint(2, 4), "fc1.weight[0]": rng.randint(1, 4)} for _ in range(3)]
    draws.append({"emb.weight[1]": 1, "fc1.weight[0]": 3})
    return draws


DRAWS = _draws()


def _laws(plan: graphscale.Plan, mults: dict[str, int]) -> dict[str, dict[str, float]]:
    return {name: {law: plan.substitute(expr, mults) for law, expr in rule.laws().items()}
            for name, rule in plan.rules.items()}


def _l1(t: torch.Tensor) -> float:
    return t.detach().abs().sum().item()


def _loss(out: torch.Tensor) -> torch.Tensor:
    target = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    return (out * target).sum() + (out**2).mean()


def _wide_and_grads(model: nn.Module, ids: torch.Tensor, plan: graphscale.Plan, mults: dict[str, int]
                    ) -> tuple[nn.Module, nn.Module]:
    wide = graphscale.widen(model, (ids,), mults, plan=plan)  # new tensors: the model is not touched
    narrow = copy.deepcopy(model)  # trained and stepped below, so a copy
    for m in (narrow, wide):
        m.zero_grad()
        _loss(m(ids)).backward()
    return narrow, wide


def _close(got: float, want: float, what: str) -> None:
    assert got == pytest.approx(want, rel=1e-9, abs=1e-300), f"{what}: applied {got}, law says {want}"


@pytest.mark.parametrize("mults", DRAWS, ids=[str(tuple(d.values())) for d in DRAWS])
def test_weights_and_gradients_follow_the_laws(setup, mults: dict[str, int]) -> None:
    model, ids, plan = setup
    laws = _laws(plan, mults)
    narrow, wide = _wide_and_grads(model, ids, plan, mults)
    n_params, w_params = dict(narrow.named_parameters()), dict(wide.named_parameters())
    for name, law in laws.items():
        p, q = n_params[name], w_params[name]
        _close(q.numel() / p.numel(), law["M"], f"{name} size")
        _close(_l1(q), law["M"] * law["copy_scale"] * _l1(p), f"{name} copy scale")
        _close(_l1(q.grad), law["M"] * law["grad"] * _l1(p.grad), f"{name} gradient")
        assert law["exp_avg"] == law["grad"] and law["exp_avg_sq"] == pytest.approx(law["grad"] ** 2)


FAMILIES = [(torch.optim.SGD, {"lr": LR, "weight_decay": WD, "momentum": 0.9}, "sgd_lr", None,
             "wd_coupled"),
            (torch.optim.Adam, {"lr": LR, "eps": EPS, "weight_decay": WD}, "adam_lr", "adam_eps",
             "wd_coupled"),
            (torch.optim.AdamW, {"lr": LR, "eps": EPS, "weight_decay": WD}, "adam_lr", "adam_eps",
             "wd_decoupled")]


@pytest.mark.parametrize("mults", DRAWS, ids=[str(tuple(d.values())) for d in DRAWS])
@pytest.mark.parametrize("cls, hp, lr_law, eps_law, wd_law", FAMILIES, ids=["sgd", "adam", "adamw"])
def test_optimizer_groups_and_transferred_state_follow_the_laws(setup, mults, cls, hp, lr_law, eps_law,
                                                                wd_law) -> None:
    model, ids, plan = setup
    laws = _laws(plan, mults)
    narrow, wide = _wide_and_grads(model, ids, plan, mults)
    n_opt = cls(narrow.parameters(), **hp)
    n_opt.step()  # state: momentum_buffer, or exp_avg and exp_avg_sq
    w_opt = graphscale.mup_optimizer(wide, cls, **hp)
    graphscale.transfer_optimizer_state(narrow, n_opt, wide, w_opt)
    group_of = {id(p): g for g in w_opt.param_groups for p in g["params"]}
    n_params = dict(narrow.named_parameters())
    for name, q in wide.named_parameters():
        law, g, p = laws[name], group_of[id(q)], n_params[name]
        _close(g["lr"], hp["lr"] * law[lr_law], f"{cls.__name__} lr of {name}")
        _close(g["weight_decay"], hp["weight_decay"] * law[wd_law], f"{cls.__name__} weight_decay of {name}")
        if eps_law is not None:
            _close(g["eps"], hp["eps"] * law[eps_law], f"{cls.__name__} eps of {name}")
        n_state, w_state = n_opt.state[p], w_opt.state[q]
        keys = {"momentum_buffer": "exp_avg"} if cls is torch.optim.SGD else \
            {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
        for key, law_name in keys.items():
            _close(_l1(w_state[key]), law["M"] * law[law_name] * _l1(n_state[key]), f"{name} state {key}")


@pytest.mark.parametrize("mults", DRAWS, ids=[str(tuple(d.values())) for d in DRAWS])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clipping_uses_the_base_norm(setup, mults: dict[str, int], norm_type: float) -> None:
    """The wide model clipped by graphscale reports the narrow model's norm and applies its coefficient,
    so the clipped wide gradients still follow the ``grad`` law."""
    model, ids, plan = setup
    laws = _laws(plan, mults)
    narrow, wide = _wide_and_grads(model, ids, plan, mults)
    n_norm = torch.nn.utils.clip_grad_norm_(narrow.parameters(), 0.1, norm_type=norm_type)
    w_norm = graphscale.clip_grad_norm_(wide, 0.1, norm_type=norm_type)
    assert n_norm.item() > 0.1  # so the clipping really scales
    _close(w_norm.item(), n_norm.item(), f"norm of order {norm_type}")
    n_params = dict(narrow.named_parameters())
    for name, q in wide.named_parameters():
        law, p = laws[name], n_params[name]
        _close(_l1(q.grad), law["M"] * law["grad"] * _l1(p.grad), f"{name} clipped gradient")
