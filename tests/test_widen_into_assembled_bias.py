"""widen_into where the fused q|k|v projection's bias is assembled in forward, as timm's BEiT writes it:
``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))`` with ``k_bias`` a zero buffer, then
``reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``. The engine knows the projection's output
axis both as the three bias parts and as ``3 x heads x head_dim``; the query is part 0. With heads fixed,
head_dim grows and the larger model's 1/sqrt(head_dim) needs a further k**-0.5 on the query: on rows 0:D
of ``qkv.weight`` and on all of ``q_bias``. Before, the walk found no rows for the query and tried only
the 'mup' convention, which failed (a near-uniform attention could have let it pass, silently wrong).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphscale
from graphscale.errors import SliceFoldWarning
from tests.helpers import rel_error


class AssembledBiasAttention(torch.nn.Module):
    def __init__(self, width: int, heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(width)
        self.heads = heads
        self.emb = torch.nn.Linear(3, width)
        self.qkv = torch.nn.Linear(width, 3 * width, bias=False)
        self.q_bias = torch.nn.Parameter(torch.randn(width))
        self.register_buffer("k_bias", torch.zeros(width), persistent=False)
        self.v_bias = torch.nn.Parameter(torch.randn(width))
        self.proj = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, 2)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, n, c = h.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(h, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim) of this model's head_dim
        return self.out(h + self.proj(a.transpose(1, 2).reshape(b, n, c)))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_query_factor_reaches_the_bias_assembled_in_forward(tracer: str) -> None:
    small, large = AssembledBiasAttention(8), AssembledBiasAttention(16)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    with pytest.warns(SliceFoldWarning):  # rows 0:D of the fused weight carry the fold, as without bias
        record = graphscale.widen_into(small, large, (x,), tracer=tracer)  # type: ignore[arg-type]
    assert any("attention='standard'" in n for n in record.notes)
    # the whole of q_bias carries k**-0.5 (its copy scale); v_bias and the weight's copy scale do not
    assert record["q_bias"].copy_scale == pytest.approx(2 ** -0.5, rel=1e-12)
    assert record["v_bias"].copy_scale == 1
    assert [f[:4] for f in record["qkv.weight"].slice_folds] == [(0, 0, 16, pytest.approx(2 ** -0.5))]
    with torch.no_grad():
        assert rel_error(large(x), small(x)) <= 1e-12
        assert torch.equal(large.k_bias, torch.zeros(16, dtype=torch.float64))
