"""Losses computed inside forward (rules/losses.toml): nanoGPT's ``forward(idx, targets) -> (logits, loss)``
analyzes, widens exactly and trains equivalently on its own returned loss; every covered loss function,
its module and its ATen form widens exactly under each reduction; a class axis stays fixed; a loss that
sums over a width axis is compensated by ``widen`` and refused by ``widen_into``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphscale
from graphscale import zoo

TOL = 1e-9


class LossGPT(zoo.GPT):
    """nanoGPT's signature: ``forward(idx, targets=None)`` returns ``(logits, loss)``."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple:  # type: ignore[override]
        logits = super().forward(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


def _loss_gpt(n_embd: int = 8) -> LossGPT:
    torch.manual_seed(0)
    return LossGPT(vocab=11, block_size=8, n_layer=1, n_head=2, n_embd=n_embd).double().eval()


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(i))
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / (1 + b.double().abs().max())).item()


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_nanogpt_returning_logits_and_loss_widens_exactly(tracer: str) -> None:
    model = _loss_gpt()
    inputs = _batch(0)
    wide = graphscale.widen(model, inputs, multiplier=3, tracer=tracer)
    with torch.no_grad():
        (logits, loss), (w_logits, w_loss) = model(*inputs), wide(*inputs)
    assert w_loss.dim() == 0 and _rel(w_loss, loss) <= 1e-12 and _rel(w_logits, logits) <= 1e-12


def test_nanogpt_trains_equivalently_on_its_own_returned_loss() -> None:
    """50 AdamW steps on ``model(idx, targets)[1]``, narrow and x2 wide with the μP optimizer."""
    narrow = _loss_gpt()
    wide = graphscale.widen(narrow, _batch(0), multiplier=2)
    hp = dict(lr=1e-2, eps=1e-3, weight_decay=0.1)
    n_opt = torch.optim.AdamW(narrow.parameters(), **hp)
    w_opt = graphscale.mup_optimizer(wide, torch.optim.AdamW, **hp)
    worst = 0.0
    for i in range(50):
        idx, targets = _batch(i)
        for model, opt in ((narrow, n_opt), (wide, w_opt)):
            opt.zero_grad()
            model(idx, targets)[1].backward()
            opt.step()
        with torch.no_grad():
            (logits, loss), (w_logits, w_loss) = narrow(idx, targets), wide(idx, targets)
            worst = max(worst, _rel(w_loss, loss), _rel(w_logits, logits))
    assert worst <= TOL


def test_nanogpt_fills_a_larger_instance_with_widen_into() -> None:
    small, large = _loss_gpt(8), _loss_gpt(16)
    inputs = _batch(0)
    graphscale.widen_into(small, large, inputs)
    with torch.no_grad():
        assert _rel(large(*inputs)[1], small(*inputs)[1]) <= 1e-12


class _Head(torch.nn.Module):
    """A width-8 hidden layer, a 3-class head, and a loss on the logits (functional, module or aten)."""

    def __init__(self, loss: str, reduction: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = torch.nn.Linear(5, 8).double()
        self.out = torch.nn.Linear(8, 3).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        self.loss, self.reduction = loss, reduction
        self.register_buffer("weight", torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
        self.modules_ = torch.nn.ModuleDict(dict(
            ce=torch.nn.CrossEntropyLoss(reduction=reduction), nll=torch.nn.NLLLoss(reduction=reduction),
            mse=torch.nn.MSELoss(reduction=reduction), bce=torch.nn.BCEWithLogitsLoss(reduction=reduction),
            kl=torch.nn.KLDivLoss(reduction=reduction, log_target=True)))

    def forward(self, x: torch.Tensor, y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        z = self.out(torch.tanh(self.fc(x)))
        r, name = self.reduction, self.loss
        if name == "cross_entropy":
            return F.cross_entropy(z, y, weight=self.weight, reduction=r, label_smoothing=0.1)
        if name == "cross_entropy_probs":
            return F.cross_entropy(z, p.softmax(-1), reduction=r)
        if name == "nll_loss":
            return F.nll_loss(F.log_softmax(z, -1), y, reduction=r)
        if name == "mse_loss":
            return F.mse_loss(z, p, reduction=r)
        if name == "bce_with_logits":
            return F.binary_cross_entropy_with_logits(z, p.sigmoid(), pos_weight=self.weight, reduction=r)
        if name == "kl_div":
            return F.kl_div(F.log_softmax(z, -1), F.log_softmax(p, -1), reduction=r, log_target=True)
        if name == "module_ce":
            return self.modules_["ce"](z, y)
        if name == "module_nll":
            return self.modules_["nll"](F.log_softmax(z, -1), y)
        if name == "module_mse":
            return self.modules_["mse"](z, p)
        if name == "module_bce":
            return self.modules_["bce"](z, p.sigmoid())
        return self.modules_["kl"](F.log_softmax(z, -1), F.log_softmax(p, -1))


LOSSES = ["cross_entropy", "cross_entropy_probs", "nll_loss", "mse_loss", "bce_with_logits", "kl_div",
          "module_ce", "module_nll", "module_mse", "module_bce", "module_kl"]


# Every loss under every reduction through fx; through export (ATen forms, reductions as ints) each loss
# under one reduction, cycling, to keep the run short.
CASES = [(loss, r, "fx") for loss in LOSSES for r in ("mean", "sum", "none")] + \
    [(loss, ("mean", "sum", "none")[i % 3], "export") for i, loss in enumerate(LOSSES)]


@pytest.mark.parametrize(("loss", "reduction", "tracer"), CASES)
def test_every_covered_loss_widens_exactly(loss: str, reduction: str, tracer: str) -> None:
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g),
              torch.randn(6, 3, generator=g, dtype=torch.float64))
    model = _Head(loss, reduction)
    plan = graphscale.analyze(model, inputs, tracer=tracer)
    assert [c.name for c in plan.width_classes] == ["fc.weight[0]"]  # classes stay fixed, hidden widens
    wide = graphscale.widen(model, inputs, multiplier=3, plan=plan)
    with torch.no_grad():
        want, got = model(*inputs), wide(*inputs)
    assert got.shape == want.shape and _rel(got, want) <= 1e-12


def test_kl_div_batchmean_widens_exactly() -> None:
    class KL(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 8).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return F.kl_div(torch.sigmoid(h).log(), torch.sigmoid(h * 0.5), reduction="batchmean")

    model, x = KL(), torch.randn(5, 4, dtype=torch.float64)
    # the hidden (width) axis is summed by 'batchmean': widen compensates it with 1/k
    wide = graphscale.widen(model, (x,), multiplier=4, outputs="width")
    assert _rel(wide(x), model(x)) <= 1e-12


class _HiddenLoss(torch.nn.Module):
    """A loss over a hidden (width) axis: a 'mean' is invariant under replication, a 'sum' is not."""

    def __init__(self, width: int, reduction: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(4, width).double()
        self.gate = torch.nn.Linear(4, width).double()
        self.reduction = reduction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(torch.tanh(self.fc(x)), self.gate(x), reduction=self.reduction)


def test_mse_mean_over_a_width_axis_is_invariant_and_trains_equivalently() -> None:
    narrow = _HiddenLoss(8, "mean")
    x = torch.randn(5, 4, dtype=torch.float64)
    plan = graphscale.analyze(narrow, (x,))
    assert len(plan.width_classes) == 1  # the hidden axis the loss averages over is a width class
    wide = graphscale.widen(narrow, (x,), multiplier=3, plan=plan)
    assert not any(n.meta.get("graphscale") == "inserted multiplier" for n in wide.graph.nodes)
    n_opt = torch.optim.Adam(narrow.parameters(), lr=1e-2, eps=1e-3)
    w_opt = graphscale.mup_optimizer(wide, torch.optim.Adam, lr=1e-2, eps=1e-3)
    worst = 0.0
    for i in range(50):
        xb = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        for model, opt in ((narrow, n_opt), (wide, w_opt)):
            opt.zero_grad()
            model(xb).backward()
            opt.step()
        with torch.no_grad():
            worst = max(worst, _rel(wide(xb), narrow(xb)))
    assert worst <= TOL


def test_mse_sum_over_a_width_axis_is_compensated_by_widen_and_refused_by_widen_into() -> None:
    small, large = _HiddenLoss(8, "sum"), _HiddenLoss(16, "sum")
    x = torch.randn(5, 4, dtype=torch.float64)
    wide = graphscale.widen(small, (x,), multiplier=2)
    assert _rel(wide(x), small(x)) <= 1e-12
    with pytest.raises(graphscale.errors.WidthConflictError, match="mse_loss"):
        graphscale.widen_into(small, large, (x,))


def test_hf_model_output_with_loss_widens_exactly() -> None:
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    class WithLabels(torch.nn.Module):
        def __init__(self, n_embd: int) -> None:
            super().__init__()
            torch.manual_seed(0)
            cfg = GPT2Config(vocab_size=11, n_positions=8, n_embd=n_embd, n_layer=1, n_head=2,
                             bos_token_id=0, eos_token_id=0)
            self.m = GPT2LMHeadModel(cfg).double().eval()

        def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> object:
            return self.m(input_ids=ids, labels=labels, use_cache=False)

    small = WithLabels(8)
    ids, _ = _batch(0)
    wide = graphscale.widen(small, (ids, ids), multiplier=2)
    want, got = small(ids, ids), wide(ids, ids)
    assert type(got) is type(want)
    assert _rel(got.loss, want.loss) <= 1e-12 and _rel(got.logits, want.logits) <= 1e-12


def test_a_loss_summing_over_the_only_width_axis_is_not_taken_for_attention() -> None:
    class VectorLoss(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc = torch.nn.Linear(4, width).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (4,) -> a (width,) hidden vector
            h = self.fc(x)
            return F.mse_loss(torch.tanh(h), 0.5 * h, reduction="sum")

    x = torch.randn(4, dtype=torch.float64)
    with pytest.raises(graphscale.errors.WidthConflictError) as e:
        graphscale.widen_into(VectorLoss(8), VectorLoss(16), (x,), outputs="width")
    assert "mse_loss" in str(e.value) and "attention" not in str(e.value)
