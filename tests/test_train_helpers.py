"""The hand-built widening of ``tests/helpers.py`` is exact, and its check can fail: the other train
tests rely on it."""

from __future__ import annotations

import math

import torch

from tests.helpers import hand_widen, make_mlp, single_thread

__all__ = ["single_thread"]  # the autouse fixture takes effect by being imported here


def test_hand_widen_is_exact_and_record_matches() -> None:
    narrow = make_mlp(3, [4, 5], 2, layernorm=True, compensated=True)
    wide = hand_widen(narrow, [2, 3])
    x = torch.randn(7, 3, dtype=torch.float64)
    assert torch.allclose(wide(x), narrow(x), rtol=0, atol=1e-13)
    assert (wide(x) - narrow(x)).abs().max() < 1e-13
    names = {n for n, _ in wide.named_parameters()}
    assert names == set(wide.graphscale.params)
    for n, p in wide.named_parameters():
        assert tuple(p.shape) == wide.graphscale.params[n].wide_shape
    # the compensated layer really carries c != 1/m_in, so the general law is exercised
    s = wide.graphscale.params["3.weight"]
    assert s.fan_in_mult == 2 and not math.isclose(s.copy_scale, 0.5)


def test_hand_widen_breaks_without_rescale() -> None:
    """The check above can fail: copying without the 1/m_in rescale changes the function."""
    narrow = make_mlp(3, [4], 2)
    wide = hand_widen(narrow, [2])
    with torch.no_grad():
        wide[2].weight.mul_(2.0)  # undo c = 1/2 on the readout
    x = torch.randn(7, 3, dtype=torch.float64)
    assert (wide(x) - narrow(x)).abs().max() > 1e-3
