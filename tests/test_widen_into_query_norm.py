"""widen_into on attention whose query is normalized after its projection (a q/k-norm, per head or over the
whole projection) or whose scale does not follow head_dim (a constant from the config). With heads fixed,
head_dim grows k times and the widened q.k needs a further factor on the query (docs/math.md §8): a q-norm
erases a factor put into W_q, so it goes into the norm's gain; a constant scale needs k**-1, not k**-0.5.
A normalization without a gain cannot carry the factor: refused, naming the node and advising
heads='grow' (head_dim kept: no factor needed), which then works. The filled model also trains like the
small one under mup_optimizer (the fold into the gain is a change of its copy scale, which the laws read).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphscale
from graphscale.errors import WidthConflictError
from graphscale.record import WideningRecord
from graphscale.train._common import RecordError
from tests.helpers import rel_error, trains_alike


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, gain: bool, shifted: bool = False) -> None:
        super().__init__()
        self.shifted = shifted  # Gemma 3's gain 1 + w, w drawn near 0
        self.weight = torch.nn.Parameter((0 if shifted else 1) + 0.3 * torch.randn(dim)) if gain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.weight is None:
            return x
        return x * (1.0 + self.weight) if self.shifted else self.weight * x  # as Hugging Face writes each


class QNormAttention(torch.nn.Module):
    """One attention block with q/k-norm; ``scale`` None is 1/sqrt(head_dim) from the model's own sizes."""

    def __init__(self, width: int, heads: int = 2, per_head: bool = True, gain: bool = True,
                 scale: float | None = None, qk_norm: bool = True, partial: bool = False,
                 shifted: bool = False) -> None:
        super().__init__()
        torch.manual_seed(width)
        self.heads, self.head_dim, self.per_head, self.partial = heads, width // heads, per_head, partial
        self.emb = torch.nn.Linear(3, width)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(width, width, bias=False) for _ in range(4))
        n = self.head_dim if per_head else width
        self.q_norm, self.k_norm = (RMSNorm(n, gain, shifted), RMSNorm(n, gain, shifted)) if qk_norm \
            else (None, None)
        self.out = torch.nn.Linear(width, 2)
        self.scaling = scale if scale is not None else self.head_dim ** -0.5
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, _ = h.shape
        shape = (b, t, self.heads, self.head_dim)
        if self.q_norm is None:
            q, k = self.q(h).view(shape), self.k(h).view(shape)
        elif self.per_head:
            q, k = self.q_norm(self.q(h).view(shape)), self.k_norm(self.k(h).view(shape))
        else:
            q, k = self.q_norm(self.q(h)).view(shape), self.k_norm(self.k(h)).view(shape)
        if self.partial:  # a transform of part of the query joined to the rest, as a partial rotary does
            q = torch.cat([-q[:, :, :1], q[:, :, 1:]], dim=2)
        v = self.v(h).view(shape)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=self.scaling)
        return self.out(self.o(a.transpose(1, 2).reshape(b, t, -1) + h))


def _trains_alike(small: torch.nn.Module, large: torch.nn.Module, ids: bool = False,
                  weight_decay: float = 0.1) -> float:
    def draw(gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, 11, (2, 5), generator=gen) if ids else \
            torch.randn(2, 5, 3, dtype=torch.float64, generator=gen)

    return trains_alike(small, large, draw, weight_decay=weight_decay)


CASES = [  # (model options, convention expected, tracer)
    (dict(per_head=True), "standard", "fx"),
    (dict(per_head=True), "standard", "export"),
    (dict(per_head=False), "standard", "fx"),  # OLMo2's norm over the whole projection
    (dict(per_head=True, partial=True), "standard", "export"),  # the walk passes a cat
    (dict(per_head=True, scale=0.3), "fixed", "fx"),  # a scale from the config: k**-1
    (dict(per_head=True, scale=0.3), "fixed", "export"),
    (dict(per_head=True, scale=0.3, qk_norm=False), "fixed", "fx"),  # no norm: k**-1 into W_q
    (dict(per_head=True, shifted=True), "standard", "fx"),  # Gemma 3: the gain 1 + w takes a shift
    (dict(per_head=True, shifted=True), "standard", "export"),
]


@pytest.mark.parametrize(("options", "convention", "tracer"), CASES,
                         ids=[f"{c[1]}-{'head' if c[0]['per_head'] else 'whole'}-{c[2]}"
                              + ("-no-norm" if c[0].get("qk_norm") is False else "")
                              + ("-partial" if c[0].get("partial") else "")
                              + ("-shifted" if c[0].get("shifted") else "") for c in CASES])
def test_query_factor_lands_in_the_norm_gain_and_trains_alike(options: dict, convention: str,
                                                              tracer: str) -> None:
    small, large = QNormAttention(8, **options), QNormAttention(24, **options)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    record = graphscale.widen_into(small, large, (x,), tracer=tracer)  # type: ignore[arg-type]
    assert any(f"attention={convention!r}" in n for n in record.notes)
    power = {"standard": -0.5, "fixed": -1.0}[convention]
    if options.get("qk_norm", True):  # the factor is in the gain's copy scale, not in W_q's
        assert record["q_norm.weight"].copy_scale == pytest.approx(3 ** power, rel=1e-12)
        # 1 + w' = f (1 + w): w' = f w + (f - 1)
        shift = 3 ** power - 1 if options.get("shifted") else 0.0
        assert record["q_norm.weight"].shift == pytest.approx(shift, rel=1e-12, abs=0)
        assert record["q.weight"].copy_scale == record["k.weight"].copy_scale  # 1/m_in only
        assert record["k_norm.weight"].copy_scale == 1
    else:
        ratio = record["q.weight"].copy_scale / record["k.weight"].copy_scale
        assert ratio == pytest.approx(3 ** power, rel=1e-12)
    with torch.no_grad():
        assert rel_error(large(x), small(x)) <= 1e-12
    # a shifted gain takes no weight decay (mup_optimizer refuses it; Trainer leaves norms out anyway)
    assert _trains_alike(small, large, weight_decay=0.0 if options.get("shifted") else 0.1) <= 1e-9


def test_query_norm_without_gain_is_refused_naming_the_node_and_heads_grow_works() -> None:
    small, large = QNormAttention(8, gain=False), QNormAttention(16, gain=False)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    before = [t.clone() for t in large.state_dict().values()]
    with pytest.raises(WidthConflictError, match=r"query is normalized at node 'mul'.*heads='grow'"):
        graphscale.widen_into(small, large, (x,))
    assert all(torch.equal(a, b) for a, b in zip(before, large.state_dict().values()))  # restored
    grown = QNormAttention(16, heads=4, gain=False)  # heads grow, head_dim kept: no factor to carry
    graphscale.widen_into(small, grown, (x,), heads="grow")
    with torch.no_grad():
        assert rel_error(grown(x), small(x)) <= 1e-12


class ForwardConstant(torch.nn.Module):
    """A constant created in forward: torch.export lifts it as ``lifted_tensor_0``, not a tensor of the
    model, so the larger model (which creates its own) has none to fill."""

    def __init__(self, width: int) -> None:
        super().__init__()
        torch.manual_seed(width)
        self.a, self.b = torch.nn.Linear(3, width), torch.nn.Linear(width, 2)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(torch.where(h > 0, h, torch.tensor(0.5, dtype=h.dtype) * h))


def test_constant_created_in_forward_is_not_expected_in_the_larger_model() -> None:
    small, large = ForwardConstant(4), ForwardConstant(8)
    x = torch.randn(5, 3, dtype=torch.float64)
    record = graphscale.widen_into(small, large, (x,), tracer="export")
    assert not any(n.startswith("lifted_tensor") for n in record.params)
    with torch.no_grad():
        assert rel_error(large(x), small(x)) <= 1e-12



class TiedWrittenNorm(torch.nn.Module):
    """Embedding tied to the readout, the final norm written out with its gain as ``weight * x`` (no
    LayerNorm op): the readout's 1/k (a tied weight cannot carry it) moves into that gain."""

    def __init__(self, width: int, vocab: int = 11, shifted: bool = False, scaled: bool = False) -> None:
        super().__init__()
        torch.manual_seed(width)
        self.shifted = shifted  # Gemma's gain 1 + w
        self.scale = width ** -0.5 if scaled else None  # T5's tied readout input times d_model**-0.5
        self.emb = torch.nn.Embedding(vocab, width)
        self.fc = torch.nn.Linear(width, width)
        self.norm_weight = torch.nn.Parameter(1 + 0.3 * torch.randn(width))
        self.double()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + torch.tanh(self.fc(h))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        gain = 1 + self.norm_weight if self.shifted else self.norm_weight
        h = F.dropout(gain * h, 0.1, False)  # as in eval mode: an identity the walk passes
        return F.linear(h * self.scale if self.scale is not None else h, self.emb.weight)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_tied_readout_factor_moves_into_a_written_out_norm_gain(tracer: str) -> None:
    small, large = TiedWrittenNorm(8), TiedWrittenNorm(16)
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    record = graphscale.widen_into(small, large, (ids,), tracer=tracer)  # type: ignore[arg-type]
    assert any("readout='graphscale'" in n for n in record.notes)
    assert record["norm_weight"].copy_scale == pytest.approx(0.5, rel=1e-12)  # the readout's 1/k
    with torch.no_grad():
        assert rel_error(large(ids), small(ids)) <= 1e-12
    assert _trains_alike(small, large, ids=True) <= 1e-9


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_constant_of_the_larger_model_is_undone_in_a_written_out_gain(tracer: str) -> None:
    # T5: the tied readout's input times d_model**-0.5 from each model's own width; the gain before it
    # (weight * x, then dropout) takes (w/2w)**-0.5 = sqrt(2) for the constant and 1/2 for the readout
    small, large = TiedWrittenNorm(8, scaled=True), TiedWrittenNorm(16, scaled=True)
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    record = graphscale.widen_into(small, large, (ids,), tracer=tracer)  # type: ignore[arg-type]
    assert record["norm_weight"].copy_scale == pytest.approx(0.5 * 2 ** 0.5, rel=1e-12)
    with torch.no_grad():
        assert rel_error(large(ids), small(ids)) <= 1e-12
    assert _trains_alike(small, large, ids=True) <= 1e-9


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_tied_readout_factor_moves_into_a_shifted_gain_with_a_shift(tracer: str) -> None:
    # Gemma's gain 1 + w: 1 + w' = f (1 + w) needs w' = f w + (f - 1), a copy scale f and a shift f - 1
    small, large = TiedWrittenNorm(8, shifted=True), TiedWrittenNorm(16, shifted=True)
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    record = graphscale.widen_into(small, large, (ids,), tracer=tracer)  # type: ignore[arg-type]
    assert record["norm_weight"].copy_scale == pytest.approx(0.5, rel=1e-12)
    assert record["norm_weight"].shift == pytest.approx(-0.5, rel=1e-12)
    assert WideningRecord.from_json(record.to_json()) == record  # the shift is saved with the record
    with torch.no_grad():
        assert torch.allclose(large.norm_weight, 0.5 * small.norm_weight.repeat_interleave(2) - 0.5,
                              rtol=0, atol=1e-15)
        assert rel_error(large(ids), small(ids)) <= 1e-12
    with pytest.raises(RecordError, match=r"norm_weight is a gain written as s \+ w.*weight_decay=0"):
        graphscale.mup_optimizer(large, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    # with the gain out of weight decay (as Hugging Face's Trainer leaves norm weights) it trains alike
    hp = dict(lr=1e-2, eps=1e-12, weight_decay=0.1)
    rest = [p for n, p in small.named_parameters() if n != "norm_weight"]
    s_opt = torch.optim.AdamW([{"params": rest}, {"params": [small.norm_weight], "weight_decay": 0.0}], **hp)
    l_rest = [p for n, p in large.named_parameters() if n != "norm_weight"]
    l_opt = graphscale.mup_optimizer(large, torch.optim.AdamW, params=[
        {"params": l_rest}, {"params": [large.norm_weight], "weight_decay": 0.0}], **hp)
    for i in range(5):
        xb = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(i))
        for model, opt in ((small, s_opt), (large, l_opt)):
            opt.zero_grad()
            model(xb).square().mean().backward()
            opt.step()
        with torch.no_grad():
            assert rel_error(large(xb), small(xb)) <= 1e-9


class MupScaledQNorm(QNormAttention):
    """The same block with μP's attention scale 1/head_dim, from the model's own sizes."""

    def __init__(self, width: int, **options: object) -> None:
        super().__init__(width, **options)  # type: ignore[arg-type]
        self.scaling = 1 / self.head_dim


def _zero_key(model: QNormAttention) -> QNormAttention:
    with torch.no_grad():
        model.k.weight.zero_()  # every logit 0: attention is uniform whatever its scale
    return model


def test_blocked_query_is_not_accepted_on_weights_that_cannot_tell_attention_scales_apart() -> None:
    # No gain carries the query's factor, so only 'mup' (nothing folded) can be tried. With a zero key it
    # computes the same function as the larger model's 1/sqrt(head_dim), yet trains differently once the
    # key moves: the probe on random weights must reject it.
    small, large = _zero_key(QNormAttention(8, gain=False)), QNormAttention(16, gain=False)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    before = [t.clone() for t in large.state_dict().values()]
    with pytest.raises(WidthConflictError, match=r"held on the small model's weights only because.*"
                                                  r"on random weights its error is"):
        graphscale.widen_into(small, large, (x,))
    assert all(torch.equal(a, b) for a, b in zip(before, large.state_dict().values()))


def test_blocked_query_is_accepted_where_the_larger_model_scales_by_one_over_head_dim() -> None:
    small, large = _zero_key(MupScaledQNorm(8, gain=False)), MupScaledQNorm(16, gain=False)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    record = graphscale.widen_into(small, large, (x,))
    assert any("attention=" not in n and "readout='graphscale'" in n for n in record.notes)
    with torch.no_grad():
        assert rel_error(large(x), small(x)) <= 1e-12
    assert _trains_alike(small, large) <= 1e-9  # the key moves off zero: the scales must truly agree
