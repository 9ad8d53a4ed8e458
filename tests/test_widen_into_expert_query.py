"""widen_into where the query comes from a mixture of experts over a stacked weight, as JetMoE's mixture of
attention heads computes it: each expert's tokens go through ``F.linear(x_e, weight[e])`` with ``weight``
of shape ``(experts, out, in)``, and the outputs are scattered back with ``zeros.index_add(0, rows, ...)``.
The engine sees ``weight[e]`` as data, so widen inserts ``1/k`` after each expert's linear (a sum over the
grown input axis); every read of ``weight`` is such a linear, so widen_into folds that ``1/k`` into it
whole, and the query's ``k**-0.5`` too, found by walking back through the scatter to the stacked tensor
(docs/math.md §8). Before, the walk stopped at the ``zeros``, only 'mup' was tried, the inserted ``1/k``
had no tensor to live in, and widen_into refused JetMoE (1.9e-3).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphscale
from tests.helpers import rel_error, trains_alike


class ExpertQuery(torch.nn.Module):
    def __init__(self, width: int, heads: int = 2, experts: int = 2) -> None:
        super().__init__()
        torch.manual_seed(width)
        self.heads, self.experts = heads, experts
        self.emb = torch.nn.Linear(3, width)
        self.wq = torch.nn.Parameter(torch.randn(experts, width, width) / width ** 0.5)
        self.k, self.v = torch.nn.Linear(width, width), torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, 2)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, c = h.shape
        flat = h.reshape(b * t, c)
        tokens = torch.arange(b * t)
        parts = [F.linear(flat[e::self.experts], self.wq[e]) for e in range(self.experts)]
        rows = torch.cat([tokens[e::self.experts] for e in range(self.experts)])
        q = flat.new_zeros(flat.shape).index_add(0, rows, torch.cat(parts))
        q = q.view(b, t, self.heads, -1).transpose(1, 2)
        k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        return self.out(h + a.transpose(1, 2).reshape(b, t, c))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_query_from_experts_over_a_stacked_weight_folds_into_it_whole(tracer: str) -> None:
    small, large = ExpertQuery(8), ExpertQuery(16)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    record = graphscale.widen_into(small, large, (x,), tracer=tracer)  # type: ignore[arg-type]
    assert any("attention='standard'" in n for n in record.notes)
    # the linear's 1/2 over the grown input axis and the query's 2**-0.5, both whole-tensor folds
    assert record["wq"].copy_scale == pytest.approx(2 ** -1.5, rel=1e-12)
    assert not record["wq"].slice_folds
    with torch.no_grad():
        assert rel_error(large(x), small(x)) <= 1e-12
    assert trains_alike(small, large, lambda gen: torch.randn(2, 5, 3, dtype=torch.float64, generator=gen)) \
        <= 1e-9
