"""A concatenated axis whose parts grow by different multipliers (docs/math.md §8).

Mamba's ``x_proj`` computes ``dt | B | C`` in one matmul: ``dt_rank`` grows with the width, the state
size does not (the larger config keeps it). ``widen_into`` fills such a tensor exactly, and its rows
then need different μP factors: ``M`` is 4 for the copied ``dt`` rows and 2 for the kept ``B``/``C`` rows
(and where the concatenation is summed, ``c`` differs too). ``mup_optimizer`` steps each block as a
tensor of its own, state transfer and clipping go block by block; one factor per tensor diverges.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphscale
from graphscale.record import ParamScaling, WideningRecord
from graphscale.train import GaussianNoise

TOL = 1e-9
VOCAB = 11


class SelectiveMix(nn.Module):
    """``x_proj`` rows ``dt | B | C`` (dt_rank grows, state kept); ``mix`` sums over ``dt | B``."""

    def __init__(self, d: int, dt: int, state: int = 3) -> None:
        super().__init__()
        self.dt, self.state = dt, state
        self.emb = nn.Embedding(VOCAB, d)
        self.x_proj = nn.Linear(d, dt + 2 * state, bias=False)
        self.dt_proj = nn.Linear(dt, d)
        self.b_proj = nn.Linear(state, d)
        self.mix = nn.Linear(dt + state, d)
        self.out = nn.Linear(d, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        dt, b, c = torch.split(self.x_proj(x), [self.dt, self.state, self.state], dim=-1)
        h = self.dt_proj(dt) * torch.sigmoid(self.b_proj(b * c)) + self.mix(torch.cat([dt, b], dim=-1))
        return self.out(x + torch.tanh(h))


def _pair() -> tuple[nn.Module, nn.Module, torch.Tensor, WideningRecord]:
    torch.manual_seed(0)
    small, large = SelectiveMix(8, 2).double(), SelectiveMix(16, 4).double()
    idx = torch.randint(0, VOCAB, (3, 6))
    return small, large, idx, graphscale.widen_into(small, large, (idx,))


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())


def test_parts_growing_differently_fill_exactly_with_blocks_of_their_own():
    small, large, idx, record = _pair()
    with torch.no_grad():
        assert (large(idx) - small(idx)).abs().max() <= 1e-13
    rows = record["x_proj.weight"]
    assert [(b.index, b.copy_scale, b.total_mult) for b in rows.blocks()] == [
        ((slice(0, 4),), 0.5, 4.0), ((slice(4, 7),), 0.5, 2.0), ((slice(7, 10),), 0.5, 2.0)]
    # summed over dt | B: the copied dt columns carry 1/2, the kept B columns 1
    cols = record["mix.weight"]
    assert [(b.index, b.copy_scale, b.total_mult) for b in cols.blocks()] == [
        ((slice(0, 16), slice(0, 4)), 0.5, 4.0), ((slice(0, 16), slice(4, 7)), 1.0, 2.0)]
    assert torch.equal(large.mix.weight[:, 4:], small.mix.weight[:, 2:].repeat_interleave(2, 0))
    # the record says so in a version that older readers refuse instead of training with one factor
    assert '"version": 3' in record.to_json() and WideningRecord.from_json(record.to_json()) == record


@pytest.mark.parametrize("cls,hp", [
    (torch.optim.AdamW, {"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.01}),
])
def test_blocks_train_like_the_narrow_model_and_one_factor_per_tensor_does_not(cls, hp, monkeypatch):
    torch.manual_seed(0)
    small, large = SelectiveMix(8, 2).double(), SelectiveMix(16, 4).double()
    idx = torch.randint(0, VOCAB, (3, 6))
    no = cls(small.parameters(), **hp)
    for _ in range(2):  # a warm start: the narrow state is carried into the blocks
        no.zero_grad()
        _loss(small, idx).backward()
        no.step()
    record = graphscale.widen_into(small, large, (idx,))
    snapshot = copy.deepcopy((small, large, no))

    def run(small: nn.Module, large: nn.Module, no: torch.optim.Optimizer, exact: bool = True) -> float:
        wo = graphscale.mup_optimizer(large, cls, record=record, **hp)
        graphscale.transfer_optimizer_state(small, no, large, wo, record=record)
        gen, worst = torch.Generator().manual_seed(1), 0.0
        for _ in range(12):
            ids = torch.randint(0, VOCAB, (3, 6), generator=gen)
            norms = []
            for m, o in ((small, no), (large, wo)):
                o.zero_grad()
                _loss(m, ids).backward()
                norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5) if m is small
                                   else graphscale.clip_grad_norm_(m, 0.5, record=record)))
                o.step()
            # the blocks' norms weighed apart (the narrow norm, until one factor per tensor diverges)
            assert not exact or abs(norms[0] - norms[1]) <= TOL * norms[0], norms
            with torch.no_grad():
                worst = max(worst, float((large(ids) - small(ids)).abs().max() / small(ids).abs().max()))
        return worst

    assert run(small, large, no) <= TOL
    monkeypatch.setattr(ParamScaling, "is_blockwise", lambda self: False)  # one factor per tensor
    assert run(*snapshot, exact=False) > 1e-4


def test_zero_grad_clears_the_gradient_of_a_tensor_stepped_in_blocks():
    small, large, idx, record = _pair()
    wo = graphscale.mup_optimizer(large, torch.optim.SGD, record=record, lr=0.1)
    assert isinstance(wo, torch.optim.SGD) and {id(p) for p, _, _ in wo.graphscale_blocks} == {
        id(large.x_proj.weight), id(large.mix.weight)}
    _loss(large, idx).backward()
    wo.step()
    wo.zero_grad()
    assert large.x_proj.weight.grad is None and large.mix.weight.grad is None
    _loss(large, idx).backward()
    wo.zero_grad(set_to_none=False)
    assert not large.x_proj.weight.grad.any()
    with pytest.raises(graphscale.GraphscaleError, match="closure"):
        wo.step(lambda: _loss(large, idx))


class RowNormalizedSGD(torch.optim.Optimizer):
    """An update that reads a whole tensor (each row's gradient divided by the row's norm): stepping a
    block of rows on its own normalizes over other elements than stepping the tensor."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad.reshape(len(p.grad), -1) if p.dim() else p.grad.reshape(1, 1)
                    p.add_((g / (g.norm() + 1e-12)).reshape(p.shape), alpha=-group["lr"])


def test_a_family_not_registered_as_elementwise_is_refused_where_blocks_are_stepped_apart():
    """Blockwise stepping is exact only for elementwise updates: a registered family that does not say
    it is one is refused, naming the tensors, where a model has blocks, and accepted where it has none."""
    from graphscale import laws

    small, large, idx, record = _pair()
    family = laws.OptimizerFamily("row-normalized-test", "update normalised over the tensor: lr' = lr c",
                                  classes=(RowNormalizedSGD,), hparams={"lr": laws.normalised_lr})
    laws.register_family(family)
    try:
        with pytest.raises(graphscale.GraphscaleError, match=r"mix\.weight, x_proj\.weight need\(s\) blocks.*"
                                                          r"elementwise=True"):
            graphscale.mup_optimizer(large, RowNormalizedSGD, record=record, lr=0.1)
        plain = graphscale.widen(small, (idx,), multiplier=2)  # one multiplier: no blocks
        assert not getattr(graphscale.mup_optimizer(plain, RowNormalizedSGD, lr=0.1), "graphscale_blocks", [])
        laws.register_family(replace(family, elementwise=True), replace=True)  # the user's word for it
        assert graphscale.mup_optimizer(large, RowNormalizedSGD, record=record, lr=0.1).graphscale_blocks
    finally:
        del laws.FAMILIES["row-normalized-test"]


def test_noise_treats_each_block_as_a_tensor_of_its_own():
    """Gaussian noise perturbs hidden weights only: x_proj's copied dt rows are hidden (fan-out grows),
    its kept B | C rows a readout of the width, so they stay as copied."""
    small, large, idx, record = _pair()
    before = large.x_proj.weight.detach().clone()
    GaussianNoise(0.5).apply(large, record, torch.Generator().manual_seed(0))
    changed = (large.x_proj.weight.detach() != before).any(dim=1)
    assert changed[:4].all() and not changed[4:].any()


class SummedParts(nn.Module):
    """``z = x_proj(x)`` is ``dt | B``, and ``z @ z^T`` sums over the whole concatenation."""

    def __init__(self, d: int = 8, dt: int = 2, state: int = 3) -> None:
        super().__init__()
        self.dt, self.state = dt, state
        self.emb = nn.Embedding(VOCAB, d)
        self.x_proj = nn.Linear(d, dt + state, bias=False)
        self.dt_proj, self.b_proj, self.out = nn.Linear(dt, d), nn.Linear(state, d), nn.Linear(d, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        z = self.x_proj(x)
        dt, b = torch.split(z, [self.dt, self.state], dim=-1)
        return self.out(x + torch.softmax(z @ z.transpose(-1, -2), -1) @ (self.dt_proj(dt) + self.b_proj(b)))


def test_a_sum_over_parts_growing_differently_is_refused_naming_the_node():
    """One inserted 1/k cannot keep a sum whose parts grow by 2 and by 1 (it was off by 9e-2)."""
    torch.manual_seed(0)
    small, idx = SummedParts().double(), torch.randint(0, VOCAB, (2, 5))
    plan = graphscale.analyze(small, (idx,))
    mults = {c.name: 1 if c.name.startswith("b_proj") else 2 for c in plan.width_classes}
    assert set(mults.values()) == {1, 2}
    with pytest.raises(graphscale.MultiplierError, match=r"node 'matmul'.*different multipliers"):
        graphscale.widen(small, (idx,), multiplier=mults, plan=plan)
    # the same parts grown alike: exact
    wide = graphscale.widen(small, (idx,), multiplier=2, plan=plan)
    with torch.no_grad():
        assert (wide(idx) - small(idx)).abs().max() <= 1e-13


def test_blocks_see_what_grad_scaler_and_accumulation_do_to_the_gradient():
    """The blocks' gradients are views of the parameter's: GradScaler's unscale_ (which reads the param
    groups) and two accumulated backwards reach the blocks, and the pair stays equivalent."""
    torch.manual_seed(0)
    small, large = SelectiveMix(8, 2).double(), SelectiveMix(16, 4).double()
    idx = torch.randint(0, VOCAB, (3, 6))
    record = graphscale.widen_into(small, large, (idx,))
    hp = {"lr": 0.05, "momentum": 0.9}
    pairs = [(small, torch.optim.SGD(small.parameters(), **hp)),
             (large, graphscale.mup_optimizer(large, torch.optim.SGD, record=record, **hp))]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in pairs]
    gen, worst = torch.Generator().manual_seed(1), 0.0
    for _ in range(6):
        batches = [torch.randint(0, VOCAB, (3, 6), generator=gen) for _ in range(2)]
        for (model, opt), scaler in zip(pairs, scalers):
            opt.zero_grad()
            for ids in batches:  # two micro-batches accumulate into one step
                scaler.scale(_loss(model, ids)).backward()
            scaler.step(opt)
            scaler.update()
        with torch.no_grad():
            ids = batches[0]
            worst = max(worst, float((large(ids) - small(ids)).abs().max() / small(ids).abs().max()))
    assert worst <= TOL, worst


class PackedParts(nn.Module):
    """A packed projection whose parts (each its own width class) are split apart, each read by its own
    linear, and the first two concatenated again into one more linear (a summed axis of mixed parts)."""

    def __init__(self, d_in: int, d: int, parts: tuple[int, ...]) -> None:
        super().__init__()
        self.parts = parts
        self.fc_in = nn.Linear(d_in, d)
        self.packed = nn.Linear(d, sum(parts))
        self.heads = nn.ModuleList(nn.Linear(a, d) for a in parts)
        self.mix = nn.Linear(parts[0] + parts[1], d)
        self.readout = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc_in(x))
        pieces = [torch.tanh(p) for p in torch.split(self.packed(h), list(self.parts), dim=-1)]
        y = h + sum(head(p) for head, p in zip(self.heads, pieces)) + self.mix(torch.cat(pieces[:2], -1))
        return self.readout(torch.tanh(y))


@settings(max_examples=8, deadline=None, derandomize=True)
@given(parts=st.lists(st.integers(1, 4), min_size=2, max_size=3), data=st.data(),
       opt=st.sampled_from([0, 1]))
def test_random_packed_parts_at_random_multipliers_widen_and_train_exactly(parts, data, opt):
    """Every class at its own multiplier in {1, 2, 3}: the packed weight's rows and the mixer's columns
    are blocks of different (c, M); widen is exact and mup_optimizer trains it like the narrow model."""
    cls, hp = [(torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
               (torch.optim.AdamW, {"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.1})][opt]
    torch.manual_seed(len(parts))
    narrow = PackedParts(3, 4, tuple(parts)).double()
    x = torch.randn(6, 3, dtype=torch.float64)  # the batch of training: an export graph keeps its size
    plan = graphscale.analyze(narrow, (x,))
    mults = {c.name: data.draw(st.sampled_from([1, 2, 3]), label=c.name) for c in plan.width_classes}
    wide = graphscale.widen(narrow, (x,), multiplier=mults, plan=plan)
    with torch.no_grad():
        assert (wide(x) - narrow(x)).abs().max() <= 1e-12
    n_opt, w_opt = cls(narrow.parameters(), **hp), graphscale.mup_optimizer(wide, cls, **hp)
    gen, worst = torch.Generator().manual_seed(0), 0.0
    for _ in range(20):
        xb = torch.randn(6, 3, generator=gen, dtype=torch.float64)
        target = torch.randn(6, 2, generator=gen, dtype=torch.float64)
        for model, o in ((narrow, n_opt), (wide, w_opt)):
            o.zero_grad()
            F.mse_loss(model(xb), target).backward()
            o.step()
        with torch.no_grad():
            worst = max(worst, float((wide(xb) - narrow(xb)).abs().max() / narrow(xb).abs().max()))
    assert worst <= TOL, (parts, mults, worst)
