"""Hugging Face Mamba-2 (8 groups) at state-space sizes that follow the hidden width (heads x head_dim =
2 x hidden): its shape relations once sent width inference into an endless recursion (two dimensions whose
first factorizations reached each other within one pass). It analyzes, and widens x2 exactly. Its SSM
width is inferred fixed (its conv channels concatenate the growing inner width with the fixed B and C
states, which cannot grow alike); the plan says so, naming the reason."""

from __future__ import annotations

import sys

import pytest
import torch

import graphscale
from graphscale import zoo

transformers = pytest.importorskip("transformers")


def _mamba2(hidden: int) -> torch.nn.Module:
    config = transformers.Mamba2Config(vocab_size=64, hidden_size=hidden, num_hidden_layers=2, num_heads=8,
                                       head_dim=hidden * 2 // 8, expand=2, state_size=16, n_groups=8,
                                       chunk_size=16, use_cache=False)
    with zoo._seeded(0) as gen:
        model = transformers.AutoModelForCausalLM.from_config(config)
        zoo._randomize_affine_(model, gen)
    return zoo.HFWrapper(model, causal=True).double().eval()


def test_mamba2_analyzes_in_bounded_depth_and_widens_exactly():
    small = _mamba2(32)
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(2000)  # the endless recursion hit any limit; a sound walk stays far below
    try:
        plan = graphscale.analyze(small, (ids,))
    finally:
        sys.setrecursionlimit(limit)
    fixed = {c.name: c.reason for c in plan.classification.fixed}
    assert any("conv1d" in n and "cannot grow alike" in r for n, r in fixed.items()), fixed
    wide = graphscale.widen(small, (ids,), multiplier=2, plan=plan)
    with torch.no_grad():
        want, got = small(ids), wide(ids)
    # the model's own code computes its gated norm in float32 (the census' float32 tolerance)
    assert ((got - want).abs().max() / (1 + want.abs().max())).item() <= 1e-6
