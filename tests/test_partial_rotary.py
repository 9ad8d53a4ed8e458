"""Partial rotary attention (GPT-NeoX, Phi, StableLM, ...) with the default heads="fixed".

head_dim there is a concatenation: the rotary part (its size set by the frequency buffer ``inv_freq``) and
the pass-through part. With heads="fixed" the plan grows the heads of such an attention instead of its
head_dim (a size-1 rotary part cannot grow at all; growing rotary and pass together repeats the rotary
frequencies, which a model built at the wider head_dim computes otherwise). The default call widens
exactly (float64, relative <= 1e-10), and the plan says what it did. Before, a MultiplierError
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


def test_heads_grow_where_head_dim_concatenates_rotary_and_pass() -> None:
    """head_dim 16 = rotary 4 | pass 12: the heads grow (head_dim, its rotary slice and inv_freq keep
    their sizes, as a model built with twice the heads has them), and the plan says so."""
    model, inputs = _neox(hidden=32, heads=2, rotary_pct=0.25)
    plan = graphscale.analyze(model, inputs)
    assert plan.classification.heads_grown and not plan.classification.head_dim_grown
    assert any("its heads grow instead" in n and "rotary | pass" in n for n in plan.notes), plan.notes
    wide = graphscale.widen(model, inputs, 2, plan=plan)
    assert wide.get_buffer("model.gpt_neox.rotary_emb.inv_freq").shape == (2,)
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
