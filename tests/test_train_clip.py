"""Base-equivalent gradient clipping: the wide model sees (and clips by) the narrow model's norm."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from graphscale.train import clip_grad_norm_
from tests.helpers import hand_widen, make_mlp, single_thread

__all__ = ["single_thread"]


def _grads(k: list[int], norm_type: float, compensated: bool = True):
    narrow = make_mlp(3, [4, 5], 2, layernorm=True, compensated=compensated, seed=2)
    wide = hand_widen(narrow, k)
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for m in (narrow, wide):
        F.mse_loss(m(x), torch.ones(8, 2, dtype=torch.float64)).backward()
    return narrow, wide


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("mults", [[2, 3], [3, 3]])
def test_norm_and_clipped_grads_match_torch_on_narrow(norm_type: float, mults: list[int]) -> None:
    narrow, wide = _grads(mults, norm_type)
    raw_wide = torch.nn.utils.get_total_norm([p.grad for p in wide.parameters()], norm_type)
    n_norm = torch.nn.utils.clip_grad_norm_(narrow.parameters(), 0.01, norm_type=norm_type)
    w_norm = clip_grad_norm_(wide, 0.01, norm_type=norm_type)
    assert abs(float(w_norm) - float(n_norm)) <= 1e-12 * float(n_norm)
    # the raw wide norm is a different number: without the weighting the clip factor would differ
    assert abs(float(raw_wide) - float(n_norm)) > 1e-3 * float(n_norm)
    # each clipped wide grad is the copied clipped narrow grad: g' = E(g) / (c M)
    rec, src = wide.graphscale, dict(narrow.named_parameters())
    for name, p in wide.named_parameters():
        s = rec.params[name]
        want = s.replicate(src[s.source].grad) / (s.copy_scale * s.total_mult)
        assert torch.allclose(p.grad, want, rtol=1e-12, atol=1e-15), name


def test_no_clip_below_max_norm_and_nonfinite_error() -> None:
    _, wide = _grads([2, 2], 2.0)
    before = [p.grad.clone() for p in wide.parameters()]
    norm = clip_grad_norm_(wide, 1e6)
    assert float(norm) > 0
    assert all(torch.equal(b, p.grad) for b, p in zip(before, wide.parameters()))
    wide[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(wide, 1.0, error_if_nonfinite=True)


def test_no_grads_gives_zero() -> None:
    wide = hand_widen(make_mlp(3, [4], 2), [2])
    assert float(clip_grad_norm_(wide, 1.0)) == 0.0
