"""Hugging Face Mamba-2 (8 groups) at state-space sizes that follow the hidden width (heads x head_dim =
2 x hidden): its shape relations once sent width inference into an endless recursion (two dimensions whose
first factorizations reached each other within one pass). It analyzes, and widens x2 exactly. Its conv
channels concatenate the inner width x with the B and C states: x grows with the width, and the model
built at twice the hidden size keeps the state, so ``widen_into`` fills it with the parts grown
differently, and the tensors over ``x | B | C`` train block by block (docs/math.md §8)."""

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
    wide = graphscale.widen(small, (ids,), multiplier=2, plan=plan)
    with torch.no_grad():
        want, got = small(ids), wide(ids)
    # the model's own code computes its gated norm in float32 (the census' float32 tolerance)
    assert ((got - want).abs().max() / (1 + want.abs().max())).item() <= 1e-6


def test_mamba2_fills_the_larger_config_with_the_state_kept_and_trains_block_by_block():
    small, large = _mamba2(32), _mamba2(64)  # 2x hidden: the inner width doubles, the state size stays 16
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (1, 8), generator=gen)
    record = graphscale.widen_into(small, large, (ids,))
    conv = next(s for n, s in record.params.items() if n.endswith("layers.0.mixer.conv1d.weight"))
    assert conv.is_blockwise() and {b.total_mult for b in conv.blocks()} == {1.0, 2.0}  # x | B | C
    hp = {"lr": 0.01, "momentum": 0.9, "nesterov": True}
    no = torch.optim.SGD(small.parameters(), **hp)
    wo = graphscale.mup_optimizer(large, torch.optim.SGD, record=record, **hp)
    worst = 0.0
    for _ in range(5):
        batch = torch.randint(0, 64, (2, 8), generator=gen)
        target = torch.randint(0, 64, (2, 8), generator=gen)
        outs = []
        for model, opt in ((small, no), (large, wo)):
            opt.zero_grad()
            out = model(batch)
            outs.append(out.detach())
            torch.nn.functional.cross_entropy(out.flatten(0, 1), target.flatten()).backward()
            opt.step()
        worst = max(worst, ((outs[1] - outs[0]).abs().max() / (1 + outs[0].abs().max())).item())
    # the model's own float32 gated norm leaves ~1e-7; one factor for x | B | C is off by far more
    assert worst <= 1e-5, worst
