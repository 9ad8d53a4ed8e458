"""widen_into overwrites the larger model's buffers with the widened ones. A buffer registered with
``persistent=False`` is not in ``state_dict()``: the class computes it again from its config when the model
is rebuilt. Where the filled value differs from the one the class computes, the filled model is exact but a
saved and reloaded one is not, so widen_into says so (a warning and a note naming the buffer)."""

from __future__ import annotations

import warnings

import pytest
import torch

from graphscale import widen_into
from graphscale.errors import UnsavedBufferWarning


class Gated(torch.nn.Module):
    def __init__(self, d: int, pattern: str) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(3, d), torch.nn.Linear(d, 2)
        gate = torch.ones(d) if pattern == "ones" else torch.arange(1, d + 1, dtype=torch.float32) / d
        self.register_buffer("gate", gate, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)) * self.gate)


def _fill(pattern: str) -> tuple[torch.nn.Module, torch.nn.Module, list[str], object]:
    torch.manual_seed(0)
    small, large = Gated(4, pattern).double(), Gated(8, pattern).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = widen_into(small, large, (x,))
    with torch.no_grad():
        assert (large(x) - small(x)).abs().max() < 1e-12  # the filled model itself is exact
    return small, large, [str(w.message) for w in caught], record


def test_a_filled_non_persistent_buffer_that_differs_is_named():
    small, large, caught, record = _fill("ramp")
    said = [m for m in caught if "gate" in m and "persistent=False" in m]
    assert said, caught
    assert any("gate" in n and "persistent=False" in n for n in record.notes), record.notes
    # the reason the warning exists: a model rebuilt from its config with the saved state differs
    rebuilt = Gated(8, "ramp").double()
    rebuilt.load_state_dict(large.state_dict())
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        assert (rebuilt(x) - small(x)).abs().max() > 1e-3


def test_a_filled_non_persistent_buffer_equal_to_the_classs_own_is_not_flagged():
    _, _, caught, record = _fill("ones")
    assert not [m for m in caught if "persistent=False" in m], caught
    assert not [n for n in record.notes if "persistent=False" in n], record.notes


def test_the_warning_points_at_the_callers_line():
    torch.manual_seed(0)
    small, large = Gated(4, "ramp").double(), Gated(8, "ramp").double()
    with pytest.warns(UnsavedBufferWarning, match="gate") as caught:
        widen_into(small, large, (torch.randn(5, 3, dtype=torch.float64),))
    assert any(w.filename == __file__ for w in caught if "gate" in str(w.message))
