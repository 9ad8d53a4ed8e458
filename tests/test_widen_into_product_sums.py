"""widen_into where a plain sum over a grown axis reads a product with a tensor of the model: DiffLlama's
``lambda = exp(sum(lambda_q1 * lambda_k1))`` over head_dim (docs/math.md §8). widen inserts ``1/k`` after
the sum; the larger model's code applies no scale to a sum, so the whole ``1/k`` goes into ``lambda_q1``,
a whole-tensor fold (a copy scale), and the widened model trains like the small one. Before, such a sum
was taken for an attention whose query the walk could not follow: it blocked every attention of the model
to the 'mup' convention, and widen_into refused DiffLlama (error 2.7e-3).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphscale
from tests.helpers import rel_error, trains_alike


class DifferentialAttention(torch.nn.Module):
    """Two attention maps of one query, mixed by ``lambda = exp(sum(lq * lk))`` over head_dim; ``gain``:
    the sum reads ``x * lq`` with ``x`` an activation instead (the fold goes into ``lq`` all the same)."""

    def __init__(self, width: int, heads: int = 2, gain: bool = False) -> None:
        super().__init__()
        torch.manual_seed(width)
        self.heads, self.head_dim, self.gain = heads, width // heads, gain
        self.emb = torch.nn.Linear(3, width)
        self.q, self.k, self.v1, self.v2 = (torch.nn.Linear(width, width) for _ in range(4))
        self.lq = torch.nn.Parameter(torch.randn(self.head_dim) * 0.5)
        self.lk = None if gain else torch.nn.Parameter(torch.randn(self.head_dim) * 0.5)
        self.out = torch.nn.Linear(width, 2)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, c = h.shape
        q, k, v1, v2 = (p(h).view(b, t, self.heads, -1).transpose(1, 2)
                        for p in (self.q, self.k, self.v1, self.v2))
        if self.gain:
            summary = torch.tanh(h.view(b, t, self.heads, -1).mean((1, 2)))  # (b, head_dim)
            lam = torch.exp(torch.sum(summary * self.lq, dim=-1))[:, None, None, None]
        else:
            lam = torch.exp(torch.sum(self.lq * self.lk, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v1) - lam * F.scaled_dot_product_attention(q, k, v2)
        return self.out(h + a.transpose(1, 2).reshape(b, t, c))


def _trains_alike(small: torch.nn.Module, large: torch.nn.Module) -> float:
    return trains_alike(small, large, lambda gen: torch.randn(2, 5, 3, dtype=torch.float64, generator=gen))


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("gain", [False, True], ids=["two-tensors", "activation-times-tensor"])
def test_a_sum_of_a_product_with_a_tensor_folds_one_over_k_into_it(tracer: str, gain: bool) -> None:
    small, large = DifferentialAttention(8, gain=gain), DifferentialAttention(16, gain=gain)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    record = graphscale.widen_into(small, large, (x,), tracer=tracer)  # type: ignore[arg-type]
    assert any("attention='standard'" in n for n in record.notes)  # the real attention is not blocked
    assert record["lq"].copy_scale == pytest.approx(0.5, rel=1e-12)  # head_dim grown 2x: the whole 1/2
    if not gain:
        assert record["lk"].copy_scale == pytest.approx(1.0, rel=1e-12)
    with torch.no_grad():
        assert rel_error(large(x), small(x)) <= 1e-12
    assert _trains_alike(small, large) <= 1e-9


class SharedLambda(DifferentialAttention):
    """``lq`` read twice (by the sum and by the output): no fold into it can be exact; ``lk`` carries it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lq.mean()  # a mean of copies: no factor


def test_a_tensor_read_elsewhere_too_is_not_the_carrier() -> None:
    small, large = SharedLambda(8), SharedLambda(16)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    record = graphscale.widen_into(small, large, (x,))
    assert record["lq"].copy_scale == pytest.approx(1.0, rel=1e-12)
    assert record["lk"].copy_scale == pytest.approx(0.5, rel=1e-12)
    with torch.no_grad():
        assert rel_error(large(x), small(x)) <= 1e-12
