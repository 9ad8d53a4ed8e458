"""A backbone whose output is its hidden state (BertModel, ViTModel): with the default outputs="fixed"
the residual stream stays narrow, so analyze warns, naming the model's class and the option."""

from __future__ import annotations

import warnings

import pytest
import torch

import graphscale


class Backbone(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        return x + self.down(torch.relu(self.up(x)))  # the hidden state is the output


def test_pinned_residual_stream_warns_naming_class_and_option() -> None:
    torch.manual_seed(0)
    model, idx = Backbone(), torch.randint(0, 10, (2, 4))
    with pytest.warns(UserWarning, match="Backbone.*embed.weight\\[1\\].*outputs='width'"):
        plan = graphscale.analyze(model, (idx,))
    assert any("outputs='width'" in n for n in plan.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the option given: nothing to warn about
        plan = graphscale.analyze(model, (idx,), outputs="width")
    assert "embed.weight[1]" in [c.name for c in plan.width_classes]
