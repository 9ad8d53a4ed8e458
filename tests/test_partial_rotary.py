"""Partial rotary attention (GPT-NeoX, Phi, StableLM, ...) with the default heads="fixed".

head_dim there is a concatenation: the rotary part (its size set by the frequency buffer ``inv_freq``) and
the pass-through part. With heads="fixed" the plan either grows head_dim whole (rotary part, slice bound and
``inv_freq`` repeated with it) or, where a part of head_dim cannot grow (a size-1 rotary part, whose axis
broadcasting cannot tell from a fixed one), grows the heads instead. Either way the default call widens
exactly (float64, relative <= 1e-10), and the plan says which it did. Before, both were a MultiplierError
("concatenates parts that would grow by different multipliers").
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import graphscale  # noqa: E402
from graphscale.zoo import HFWrapper  # noqa: E402


def _neox(hidden: int, heads: int, rotary_pct: float):
    config = transformers.GPTNeoXConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=heads,
        num_hidden_layers=1, rotary_pct=rotary_pct, max_position_embeddings=16, use_cache=False)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).double().eval()
    with torch.no_grad():  # default inits leave biases and norms at 0/1: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    return HFWrapper(model, causal=True).eval(), (ids,)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_rotary_part_grows_with_head_dim():
    """head_dim 16 = rotary 4 | pass 12: every part grows, inv_freq is repeated with the rotary part."""
    model, inputs = _neox(hidden=32, heads=2, rotary_pct=0.25)
    plan = graphscale.analyze(model, inputs)
    assert not plan.classification.heads_grown and plan.classification.head_dim_grown
    assert any("grow together" in n and "inv_freq" in n for n in plan.notes), plan.notes
    wide = graphscale.widen(model, inputs, 2, plan=plan)
    inv = wide.get_buffer("model.gpt_neox.rotary_emb.inv_freq")
    assert inv.shape == (4,)  # the rotary part doubled: 2 frequencies, each repeated
    with torch.no_grad():
        assert _rel(wide(*inputs), model(*inputs)) <= 1e-10


def test_heads_grow_where_head_dim_has_a_fixed_part():
    """head_dim 8 = rotary 2 | pass 6: the rotary part's frequency axis has size 1, so it stays fixed and
    head_dim cannot grow by one multiplier; the heads grow instead, and the plan says so."""
    model, inputs = _neox(hidden=32, heads=4, rotary_pct=0.25)
    plan = graphscale.analyze(model, inputs)
    assert plan.classification.heads_grown and not plan.classification.head_dim_grown
    assert any("its heads grow instead" in n for n in plan.notes), plan.notes
    assert any("heads grow" in c.reason for c in plan.width_classes)
    wide = graphscale.widen(model, inputs, 2, plan=plan)
    assert wide.get_parameter("model.gpt_neox.layers.0.attention.dense.weight").shape == (64, 64)
    with torch.no_grad():
        assert _rel(wide(*inputs), model(*inputs)) <= 1e-10
