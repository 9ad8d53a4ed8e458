"""Folds that widen_into puts into weights, and training afterwards (docs/math.md §8).

A factor folded into a whole tensor is a change of its copy scale: the record carries it and the μP laws
stay exact. A factor folded onto part of a tensor (the query rows of a fused q|k|v projection with
heads="fixed") needs other factors for those rows than for the rest: mup_optimizer steps them as a block
of their own, and state transfer and clipping weigh them block by block; one factor per tensor diverges.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphscale
from graphscale import zoo
from graphscale.errors import SliceFoldWarning
from graphscale.record import ParamScaling, WideningRecord

TOL = 1e-9


class SeparateQ(nn.Module):
    """Standard 1/sqrt(head_dim) attention with its own q_proj (and bias), a readout."""

    def __init__(self, d: int, heads: int, vocab: int = 11) -> None:
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.out = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        return self.out(x + self.o_proj(y))


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())


def _worst(small: nn.Module, large: nn.Module, record: WideningRecord) -> float:
    """Largest relative difference between the narrow parameters and the wide ones collapsed (over c, per
    block where blocks carry different c)."""
    narrow = dict(small.named_parameters(remove_duplicate=False))
    worst = 0.0
    for name, p in large.named_parameters():
        s = record.params[name]
        want = narrow[s.source].detach()
        c = torch.full_like(p, s.copy_scale)
        for b in s.blocks():
            c[b.index] = b.copy_scale
        got = s.collapse(p.detach() / c)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst


def _train_pair(small, large, record, cls, hp, vocab, steps=4, clip=None, no=None):
    """Train both (the narrow one with ``no`` if given, its state then carried over) and compare."""
    wo = graphscale.mup_optimizer(large, cls, record=record, **hp)
    if no is None:
        no = cls(small.parameters(), **hp)
    else:
        graphscale.transfer_optimizer_state(small, no, large, wo, record=record)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (3, 6), generator=gen)
        norms = []
        for m, o in ((small, no), (large, wo)):
            o.zero_grad()
            _loss(m, ids).backward()
            if clip is not None:
                norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), clip) if m is small
                                   else graphscale.clip_grad_norm_(m, clip, record=record)))
            o.step()
        if norms:
            assert abs(norms[0] - norms[1]) <= TOL * norms[0], norms
    return _worst(small, large, record)


@pytest.mark.parametrize("cls,hp", [
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
])
def test_whole_tensor_query_fold_is_in_the_copy_scale_and_trains_exactly(cls, hp):
    torch.manual_seed(0)
    small, large = SeparateQ(8, 2).double(), SeparateQ(16, 2).double()  # heads fixed: head_dim grows 2x
    idx = torch.randint(0, 11, (3, 6))
    no = cls(small.parameters(), **hp)  # two narrow steps first: their state is carried over
    for _ in range(2):
        no.zero_grad()
        _loss(small, idx).backward()
        no.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SliceFoldWarning)  # a whole-tensor fold is no partial one
        record = graphscale.widen_into(small, large, (idx,), heads="fixed", attention="standard")
    assert record["q_proj.weight"].copy_scale == pytest.approx(0.5 * 2 ** -0.5, rel=1e-15)
    assert record["q_proj.bias"].copy_scale == pytest.approx(2 ** -0.5, rel=1e-15)
    assert not any(s.slice_folds for s in record.params.values())
    assert _train_pair(small, large, record, cls, hp, 11, clip=1e3, no=no) <= TOL


def _gpt_pair(heads: str):
    small, (idx,) = zoo.gpt(vocab=17, block_size=8, n_layer=1, n_head=2, n_embd=8)
    large = zoo.GPT(17, 8, 1, 4 if heads == "grow" else 2, 16, False, True, "manual")
    return small.double(), large.double(), idx


@pytest.mark.parametrize("cls,hp", [
    (torch.optim.AdamW, {"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
])
def test_fused_query_fold_is_marked_warned_and_trained_block_by_block(cls, hp, monkeypatch):
    small, large, idx = _gpt_pair("fixed")
    # the narrow model steps twice first: its optimizer state is carried into the blocks
    no = cls(small.parameters(), **hp)
    for _ in range(2):
        no.zero_grad()
        _loss(small, idx).backward()
        no.step()
    small0, large0, no0 = copy.deepcopy(small), copy.deepcopy(large), copy.deepcopy(no)
    with pytest.warns(SliceFoldWarning, match=r"c_attn.*mup_optimizer.*heads='grow'"):
        record = graphscale.widen_into(small, large, (idx,), heads="fixed", attention="standard")
    folded = {n for n, s in record.params.items() if s.slice_folds}
    assert folded == {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"}
    (axis, lo, hi, factor, why), = record["transformer.h.0.attn.c_attn.weight"].slice_folds
    assert (axis, lo, hi) == (0, 0, 16) and factor == pytest.approx(2 ** -0.5, rel=1e-15)
    # kept through JSON, in a version an older reader refuses instead of ignoring
    again = WideningRecord.from_json(record.to_json())
    assert again == record and '"version": 2' in record.to_json()
    with pytest.warns(SliceFoldWarning):
        graphscale.widen_into(small0, large0, (idx,), heads="fixed", attention="standard")
    # every step clips: the query rows' gradient norm is weighed with their own c
    assert _train_pair(small, large, again, cls, hp, 17, steps=6, clip=1.0, no=no) <= TOL
    # one factor per tensor (the first block's: the query rows') trains the other rows unlike the narrow
    # model: what an optimizer of the user's own would do
    monkeypatch.setattr(ParamScaling, "is_blockwise", lambda self: False)
    assert _train_pair(small0, large0, again, cls, hp, 17, steps=6, no=no0) > 1e-4


def test_fused_qkv_with_heads_grow_folds_nothing_and_trains_exactly():
    small, large, idx = _gpt_pair("grow")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SliceFoldWarning)
        record = graphscale.widen_into(small, large, (idx,), heads="grow", attention="standard")
    assert _train_pair(small, large, record, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, 17) <= TOL


def test_hf_gpt2_upscaled_with_heads_grow_trains_like_the_source(tmp_path):
    """The reported case: GPT-2's fused c_attn. heads="fixed" is refused (test_hf_upscale's fresh-process
    test); heads="grow" folds nothing into c_attn, and AdamW through the saved record tracks the source."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=32, n_positions=12, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    tf.GPT2LMHeadModel(config).double().save_pretrained(tmp_path / "narrow")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SliceFoldWarning)
        wide_dir = graphscale.hf.upscale(tmp_path / "narrow", 2, out=tmp_path / "wide", heads="grow")
    narrow = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "narrow", dtype=torch.float64)
    wide = tf.AutoModelForCausalLM.from_pretrained(wide_dir, dtype=torch.float64)
    record = graphscale.load_record(wide_dir)
    hp = {"lr": 3e-3, "weight_decay": 0.1}
    no = torch.optim.AdamW(narrow.parameters(), **hp)
    wo = graphscale.mup_optimizer(wide, torch.optim.AdamW, record=wide_dir, **hp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        ids = torch.randint(0, 32, (2, 12), generator=gen)
        for m, o in ((narrow, no), (wide, wo)):
            o.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
            o.step()
    assert _worst(narrow, wide, record) <= TOL
