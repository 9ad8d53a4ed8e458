"""Coordinate check: flat in width under μP with zero noise, not flat under naive copying."""

from __future__ import annotations

import json

import pytest
import torch

from graphscale.train import coord_check
from tests.helpers import hand_widen, make_mlp, single_thread

__all__ = ["single_thread"]


def _inputs(t: int) -> torch.Tensor:
    return torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(t))


@pytest.mark.parametrize("cls, hp", [(torch.optim.SGD, {"lr": 0.1}),
                                     (torch.optim.Adam, {"lr": 1e-2, "eps": 1e-3})])
def test_coord_check_is_flat_under_mup_and_not_under_naive_copying(tmp_path, cls, hp) -> None:
    res = coord_check(lambda: make_mlp(4, [8, 8], 3, layernorm=True, seed=0), [1, 2, 4],
                      _inputs, steps=3, optimizer_cls=cls, hparams=hp,
                      widen_fn=lambda m, k, _: hand_widen(m, [k, k]), out_dir=tmp_path, name="mlp")
    assert res.spread("mup") < 1e-9
    assert res.spread("naive") > 1e-2
    data = json.loads((tmp_path / "mlp.json").read_text())
    assert data["widths"] == [1, 2, 4] and set(data["rms"]) == {"mup", "naive"}
    assert len(data["rms"]["mup"]) == 7  # every call node of the traced MLP: 3 linear, 2 tanh, 2 layer_norm
    assert all(len(series) == 3 and len(series[0]) == 3 for series in data["rms"]["mup"].values())
    png = (tmp_path / "mlp.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_coord_check_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="modes"):
        coord_check(lambda: make_mlp(4, [8], 3), [1, 2], _inputs, modes=("sp",),
                    widen_fn=lambda m, k, _: hand_widen(m, [k]))


def test_compensated_node_scales_and_can_be_excluded() -> None:
    """With the compensation in the weight (c = k^-1/2/m_in), the pre-scale linear node is k^-1/2 times the
    narrow one; every other node, including the scaled output, stays flat."""
    res = coord_check(lambda: make_mlp(4, [8, 8], 3, compensated=True, seed=0), [1, 4], _inputs, steps=2,
                      widen_fn=lambda m, k, _: hand_widen(m, [k, k]), modes=("mup",))
    lin = res.rms["mup"]["linear"]
    assert all(abs(lin[1][t] / lin[0][t] - 0.5) < 1e-12 for t in range(2))
    assert res.spread("mup") > 0.1 and res.spread("mup", exclude=["linear"]) < 1e-9
