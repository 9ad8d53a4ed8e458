"""widen_into where the larger model's code computes a constant from its own width at two places that read
one tensor: M2M-100 and PLBart scale the embedding shared by encoder and decoder by sqrt(d_model) in each.
The same factor c/c' goes into the shared weight once, and the tied readout undoes it in the final norm.
Before, two constants landing on one tensor were not tried, and widen_into refused both models.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphscale
from tests.helpers import rel_error


class SharedScaledEmbedding(torch.nn.Module):
    def __init__(self, width: int, vocab: int = 11) -> None:
        super().__init__()
        torch.manual_seed(width)
        self.scale = width ** 0.5
        self.second = self.scale  # the decoder's constant
        self.emb = torch.nn.Embedding(vocab, width)
        self.fc = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.double()

    def forward(self, ids: torch.Tensor, dec_ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(self.emb(ids) * self.scale)).mean(1, keepdim=True)  # the encoder
        g = self.emb(dec_ids) * self.second + h  # the decoder reads the same embedding
        return F.linear(self.norm(g), self.emb.weight)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_one_constant_read_through_two_ops_is_folded_once(tracer: str) -> None:
    small, large = SharedScaledEmbedding(8), SharedScaledEmbedding(16)
    gen = torch.Generator().manual_seed(0)
    ids, dec = torch.randint(0, 11, (2, 5), generator=gen), torch.randint(0, 11, (2, 4), generator=gen)
    record = graphscale.widen_into(small, large, (ids, dec), tracer=tracer)  # type: ignore[arg-type]
    assert record["emb.weight"].copy_scale == pytest.approx(2 ** -0.5, rel=1e-12)  # sqrt(8/16), once
    assert record["norm.weight"].copy_scale == pytest.approx(0.5 * 2 ** 0.5, rel=1e-12)  # 1/k undone f
    with torch.no_grad():
        assert rel_error(large(ids, dec), small(ids, dec)) <= 1e-12


def test_two_different_constants_on_one_tensor_are_still_refused() -> None:
    # the decoder's constant grows as d (8 -> 16), the encoder's as sqrt(d): no one factor in the weight
    small, large = SharedScaledEmbedding(8), SharedScaledEmbedding(16)
    small.second, large.second = 8.0, 16.0
    gen = torch.Generator().manual_seed(0)
    ids, dec = torch.randint(0, 11, (2, 5), generator=gen), torch.randint(0, 11, (2, 4), generator=gen)
    # "no weight carries here": the two were not folded at all (folding one would fail only later)
    with pytest.raises(graphscale.GraphscaleError, match="own sizes, which no weight carries here"):
        graphscale.widen_into(small, large, (ids, dec))


class UnsavedScale(torch.nn.Module):
    """Gemma's scaled embedding: ``embed_scale = sqrt(width)`` a buffer registered with
    ``persistent=False``, so no checkpoint carries it and every instance computes its own."""

    def __init__(self, width: int, vocab: int = 11) -> None:
        super().__init__()
        torch.manual_seed(width)
        self.emb = torch.nn.Embedding(vocab, width)
        self.register_buffer("embed_scale", torch.tensor(width ** 0.5), persistent=False)
        self.fc = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.double()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) * self.embed_scale.to(self.emb.weight.dtype)
        h = h + torch.tanh(self.fc(h))
        return F.linear(self.norm(h), self.emb.weight)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_buffer_no_checkpoint_carries_keeps_the_larger_models_value_and_survives_a_reload(
        tracer: str) -> None:
    # Before, widen_into filled embed_scale with the small model's value: exact in memory, but a model
    # saved and loaded again had its own sqrt(16) back and computed another function.
    small, large = UnsavedScale(8), UnsavedScale(16)
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    record = graphscale.widen_into(small, large, (ids,), tracer=tracer)  # type: ignore[arg-type]
    assert float(large.embed_scale) == 16 ** 0.5  # its own
    assert "embed_scale" not in record.params
    ratio = float(small.embed_scale / large.embed_scale)  # sqrt(8/16), as the buffers hold it
    assert record["emb.weight"].copy_scale == pytest.approx(ratio, rel=1e-12)
    reloaded = UnsavedScale(16)
    reloaded.load_state_dict(large.state_dict())  # embed_scale is not in it
    with torch.no_grad():
        assert rel_error(large(ids), small(ids)) <= 1e-12
        assert rel_error(reloaded(ids), small(ids)) <= 1e-12
