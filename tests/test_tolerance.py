"""The default exactness tolerance of a float64 model that reduces a widened axis in float32 (an RMSNorm
whose variance the class computes in float32, as Llama's and LFM's do): float32's rounding, under either
tracer. Before, an fx graph (no ``meta["val"]``) hid every dtype, so such a model kept 1e-10 and
widen_into refused a correct widening at ~1e-8 (LFM 3 in the census). A float64 model that computes
nothing in float32 keeps 1e-10.
"""

from __future__ import annotations

import pytest
import torch

import graphscale
from graphscale.tolerance import FLOAT32_INSIDE_TOLERANCE, TOLERANCE, exactness_tolerance, float32_reductions


class Float32Norm(torch.nn.Module):
    def __init__(self, width: int, cast: bool = True) -> None:
        super().__init__()
        torch.manual_seed(width)
        self.cast = cast
        self.a, self.b = torch.nn.Linear(3, width), torch.nn.Linear(width, 2)
        self.gain = torch.nn.Parameter(1 + 0.3 * torch.randn(width))
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        v = h.to(torch.float32) if self.cast else h
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.b(self.gain * v.to(h.dtype))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_float32_reduction_of_a_widened_axis_relaxes_the_tolerance_under_both_tracers(tracer: str) -> None:
    x = torch.randn(4, 3, dtype=torch.float64)
    plan = graphscale.analyze(Float32Norm(16), (x,), tracer=tracer)  # type: ignore[arg-type]
    assert float32_reductions(plan, plan.sizes(2))  # the mean over the widened axis, in float32
    assert exactness_tolerance(plan, plan.sizes(2)) == FLOAT32_INSIDE_TOLERANCE
    plain = graphscale.analyze(Float32Norm(16, cast=False), (x,), tracer=tracer)  # type: ignore[arg-type]
    assert exactness_tolerance(plain, plain.sizes(2)) == TOLERANCE[torch.float64]
    small, large = Float32Norm(16), Float32Norm(32)
    graphscale.widen_into(small, large, (x,), tracer=tracer)  # type: ignore[arg-type]
    with torch.no_grad():
        assert (large(x) - small(x)).abs().max() <= FLOAT32_INSIDE_TOLERANCE * (1 + small(x).abs().max())
