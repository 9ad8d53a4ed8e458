"""How widen_into finds the tensor that carries the query's further factor (docs/math.md §8), for queries
that are no projection's output: a learned latent query (attention pooling) carries the factor itself, as
a whole-tensor fold (a copy scale), so the widened model trains like the small one. A query the walk cannot
follow back to one tensor (here a product of two) is "blocked": only 'mup' (no factor) is tried, and it
must also hold on random weights. Before, such an attention was skipped as if its head_dim did not grow,
and a zero latent (uniform attention: every scale gives the same output) was accepted for a larger model
that scales by 1/sqrt(head_dim), which then trains differently.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphscale
from graphscale.errors import SliceFoldWarning, WidthConflictError
from tests.helpers import rel_error, trains_alike


class LatentQueryPool(torch.nn.Module):
    """Attention pooling with a learned query; ``product``: the query is ``latent * gate`` (two tensors)."""

    def __init__(self, width: int, heads: int = 2, zero: bool = False, product: bool = False,
                 mup_scale: bool = False) -> None:
        super().__init__()
        torch.manual_seed(width)
        self.heads, self.head_dim, self.product = heads, width // heads, product
        self.emb = torch.nn.Linear(3, width)
        self.latent = torch.nn.Parameter(torch.zeros(1, 1, width) if zero else torch.randn(1, 1, width))
        self.gate = torch.nn.Parameter(1 + torch.rand(1, 1, width)) if product else None
        self.k, self.v = torch.nn.Linear(width, width), torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, 2)
        self.scale = 1 / self.head_dim if mup_scale else None  # None: sdpa's 1/sqrt(head_dim)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, c = h.shape
        latent = self.latent * self.gate if self.gate is not None else self.latent
        q = latent.reshape(1, 1, self.heads, self.head_dim).transpose(1, 2).expand(b, -1, -1, -1)
        k = self.k(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out(a.transpose(1, 2).reshape(b, c))


def _trains_alike(small: torch.nn.Module, large: torch.nn.Module) -> float:
    return trains_alike(small, large, lambda gen: torch.randn(2, 5, 3, dtype=torch.float64, generator=gen))


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("zero", [False, True], ids=["random-latent", "zero-latent"])
def test_a_learned_latent_query_carries_the_factor_itself(tracer: str, zero: bool) -> None:
    small, large = LatentQueryPool(8, zero=zero), LatentQueryPool(16, zero=zero)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    record = graphscale.widen_into(small, large, (x,), tracer=tracer)  # type: ignore[arg-type]
    assert any("attention='standard'" in n for n in record.notes)
    assert record["latent"].copy_scale == pytest.approx(2 ** -0.5, rel=1e-12)
    with torch.no_grad():
        assert rel_error(large(x), small(x)) <= 1e-12
    assert _trains_alike(small, large) <= 1e-9  # a zero latent moves: the scale must be the right one


def test_a_query_the_walk_cannot_follow_is_not_accepted_on_uniform_attention() -> None:
    small, large = LatentQueryPool(8, zero=True, product=True), LatentQueryPool(16, zero=True, product=True)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    with pytest.raises(WidthConflictError, match=r"could not be followed back to a tensor of the model \(the "
                                                  r"walk stopped at mul\).*on random weights its error is"):
        graphscale.widen_into(small, large, (x,))


def test_a_query_the_walk_cannot_follow_is_accepted_where_the_larger_model_scales_by_one_over_head_dim(
) -> None:
    options = dict(zero=True, product=True, mup_scale=True)
    small, large = LatentQueryPool(8, **options), LatentQueryPool(16, **options)  # type: ignore[arg-type]
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    graphscale.widen_into(small, large, (x,))
    with torch.no_grad():
        assert rel_error(large(x), small(x)) <= 1e-12
    assert _trains_alike(small, large) <= 1e-9


class SlicedFusedAttention(torch.nn.Module):
    """A fused projection whose query is a slice: ``"last"`` takes ``qkv[..., :q_size]`` (Phi-3), ``"heads"``
    views it as ``heads + 2`` heads and takes ``[..., :-2, :]`` (Falcon's multi-query layout)."""

    def __init__(self, width: int, layout: str, heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(width)
        self.layout, self.heads, self.head_dim = layout, heads, width // heads
        kv = 2 * width if layout == "last" else 2 * self.head_dim
        self.emb = torch.nn.Linear(3, width)
        self.qkv = torch.nn.Linear(width, width + kv)
        self.o = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, 2)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, c = h.shape
        fused = self.qkv(h)
        if self.layout == "last":
            q, k, v = fused[..., :c], fused[..., c:2 * c], fused[..., 2 * c:]
            q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        else:
            fused = fused.view(b, t, self.heads + 2, self.head_dim)
            q, k, v = fused[..., :-2, :], fused[..., -2:-1, :], fused[..., -1:, :]
            q = q.transpose(1, 2)
            k, v = (z.transpose(1, 2).expand(b, self.heads, t, self.head_dim) for z in (k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(h + self.o(a.transpose(1, 2).reshape(b, t, c)))


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("layout", ["last", "heads"])
def test_a_sliced_query_folds_the_factor_into_its_rows_only(layout: str, tracer: str) -> None:
    # Before, the walk passed the slice and folded k**-0.5 into every row of the fused projection (the key
    # and value too): no convention was exact and widen_into refused Phi-3 and Falcon.
    small, large = SlicedFusedAttention(8, layout), SlicedFusedAttention(16, layout)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    with pytest.warns(SliceFoldWarning):
        record = graphscale.widen_into(small, large, (x,), tracer=tracer)  # type: ignore[arg-type]
    assert any("attention='standard'" in n for n in record.notes)
    assert [f[:3] for f in record["qkv.weight"].slice_folds] == [(0, 0, 16)]  # the wide query rows
    assert [f[:3] for f in record["qkv.bias"].slice_folds] == [(0, 0, 16)]
    with torch.no_grad():
        assert rel_error(large(x), small(x)) <= 1e-12


class DeadAttention(torch.nn.Module):
    """Two attentions, the first computed and never used (EncoderDecoder's encoder when the decoder has no
    cross-attention): its tensors are not part of the function."""

    def __init__(self, width: int) -> None:
        super().__init__()
        torch.manual_seed(width)
        self.dead, self.live = SlicedFusedAttention(width, "last"), SlicedFusedAttention(width, "last")
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.dead(x)
        return self.live(x)


def test_an_attention_the_output_does_not_depend_on_takes_no_fold() -> None:
    # Before, its query rows were listed with the live ones and widen_into failed with a KeyError on them
    small, large = DeadAttention(8), DeadAttention(16)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    before = {k: v.clone() for k, v in large.dead.state_dict().items()}
    with pytest.warns(SliceFoldWarning):
        record = graphscale.widen_into(small, large, (x,), tracer="export")
    assert not any(name.startswith("dead.") for name in record.params)
    assert all(torch.equal(v, before[k]) for k, v in large.dead.state_dict().items())  # its own, kept
    with torch.no_grad():
        assert rel_error(large(x), small(x)) <= 1e-12


class RotaryHalvesAttention(torch.nn.Module):
    """A query whose rotary splits head_dim into halves with ``chunk`` (GPT-OSS's ``_apply_rotary_emb``):
    the halves are parts of head_dim, not of the projection's rows."""

    def __init__(self, width: int, heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(width)
        self.heads, self.head_dim = heads, width // heads
        self.emb = torch.nn.Linear(3, width)
        self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))
        self.out = torch.nn.Linear(width, 2)
        self.double()

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        angle = torch.arange(x.shape[-2], dtype=x.dtype)[:, None] * 0.3
        cos, sin = angle.cos(), angle.sin()
        first, second = torch.chunk(x, 2, dim=-1)
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, c = h.shape
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(self.rotate(q), self.rotate(k), v)
        return self.out(a.transpose(1, 2).reshape(b, t, c))


class StepwiseAttention(torch.nn.Module):
    """Attention read one time step at a time (xLSTM's recurrent step: ``q[:, :, t]``, a ``select`` of the
    time axis), scaled by this model's own 1/sqrt(head_dim)."""

    def __init__(self, width: int, heads: int = 2, steps: int = 5) -> None:
        super().__init__()
        torch.manual_seed(width)
        self.heads, self.head_dim, self.steps = heads, width // heads, steps
        self.emb = torch.nn.Linear(3, width)
        self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))
        self.out = torch.nn.Linear(width, 2)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, c = h.shape
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        steps = []
        for i in range(self.steps):
            scores = (q[:, :, i].unsqueeze(2) @ k[:, :, : i + 1].transpose(-1, -2)) * self.head_dim ** -0.5
            steps.append(scores.softmax(-1) @ v[:, :, : i + 1])
        a = torch.cat(steps, dim=2)
        return self.out(a.transpose(1, 2).reshape(b, t, c))


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("model", [RotaryHalvesAttention, StepwiseAttention],
                         ids=["rotary-chunk", "time-step"])
def test_a_split_or_select_of_another_axis_is_no_cut_of_the_query_rows(model: type, tracer: str) -> None:
    # Before, the walk took the rotary's chunk of head_dim for a split of q's rows and folded k**-0.5 into
    # rows 0:4 of 16 only (GPT-OSS: 1.6e-4), and took the time step for a pick of a fused axis and tried
    # only 'mup' (xLSTM: 2.1e-2): no candidate was exact
    small, large = model(8), model(16)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    record = graphscale.widen_into(small, large, (x,), tracer=tracer)  # type: ignore[arg-type]
    assert any("attention='standard'" in n for n in record.notes)
    # the whole query carries k**-0.5 beyond the copy scale the key has
    ratio = record["q.weight"].copy_scale / record["k.weight"].copy_scale
    assert ratio == pytest.approx(2 ** -0.5, rel=1e-12)
    assert record["q.bias"].copy_scale == pytest.approx(2 ** -0.5, rel=1e-12)
    assert not record["q.weight"].slice_folds
    with torch.no_grad():
        assert rel_error(large(x), small(x)) <= 1e-12
    assert _trains_alike(small, large) <= 1e-9
