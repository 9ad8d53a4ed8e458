"""μP initialisation relative to a base: std laws per weight class, with hand-built records."""

from __future__ import annotations

import math

import torch

from graphscale.train.init import mup_init_
from tests.helpers import hand_widen, make_mlp, single_thread

__all__ = ["single_thread"]

K = 4


def _fresh(seed: int = 5):
    """A base MLP (16 wide), a model built from scratch 4x wider, and the record relating them."""
    base = make_mlp(64, [16, 16], 32, seed=seed)
    wide = make_mlp(64, [16 * K, 16 * K], 32, seed=seed + 1)
    record = hand_widen(base, [K, K]).graphscale  # same shapes, so it describes wide relative to base
    return base, wide, record


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().pow(2).mean().sqrt())


def test_explicit_std_follows_mup_laws() -> None:
    base, wide, record = _fresh()
    biases = {n: p.detach().clone() for n, p in wide.named_parameters() if n.endswith("bias")}
    mup_init_(wide, base=base, record=record, std=0.5, generator=torch.Generator().manual_seed(0))
    assert abs(_rms(wide[0].weight) / 0.5 - 1) < 0.1  # input (4096 entries): unchanged
    assert abs(_rms(wide[2].weight) / (0.5 / math.sqrt(K)) - 1) < 0.1  # hidden: m_in^-1/2
    assert abs(_rms(wide[4].weight) / (0.5 / K) - 1) < 0.1  # readout (2048 entries): 1/m_in
    for n, b in biases.items():
        assert torch.equal(b, wide.get_parameter(n)), n


def test_base_module_gives_base_std() -> None:
    base, wide, record = _fresh()
    mup_init_(wide, base=base, record=record)
    assert math.isclose(_rms(wide[0].weight), _rms(base[0].weight), rel_tol=1e-9)
    assert math.isclose(_rms(wide[2].weight), _rms(base[2].weight) / math.sqrt(K), rel_tol=1e-9)
    assert math.isclose(_rms(wide[4].weight), _rms(base[4].weight) / K, rel_tol=1e-9)
    # torch's default init is fan-in scaled, so the hidden layer barely moved while the readout shrank
    assert _rms(wide[4].weight) < 0.6 * _rms(make_mlp(64, [16 * K, 16 * K], 32, seed=6)[4].weight)


def test_without_base_module_assumes_fan_in_default_and_zero_readout() -> None:
    _, wide, record = _fresh()
    before = {n: p.detach().clone() for n, p in wide.named_parameters()}
    mup_init_(wide, record=record)
    assert torch.equal(before["0.weight"], wide[0].weight) and torch.equal(before["2.weight"], wide[2].weight)
    assert torch.allclose(wide[4].weight, before["4.weight"] / math.sqrt(K))
    mup_init_(wide, record=record, readout_zero=True)
    assert float(wide[4].weight.detach().abs().max()) == 0.0 and torch.equal(before["4.bias"], wide[4].bias)
