"""The plan a user reads: class names (and renaming), the scaling table, JSON export, outputs policy."""

from __future__ import annotations

import json

import pytest
import sympy
import torch

import graphscale
from graphscale import zoo


def test_classes_can_be_renamed_and_widened_by_the_new_names() -> None:
    model, inputs = zoo.mlp(widths=(50, 100, 200))
    plan = graphscale.analyze(model, inputs, names={"0.weight[0]": "h1", "2.bias[0]": "h2"})
    assert [c.name for c in plan.width_classes] == ["h1", "h2", "4.weight[0]"]
    wide = graphscale.widen(model, inputs, {"h1": 10, "h2": 5, "4.weight[0]": 4}, plan=plan)
    assert [wide.get_submodule(n).out_features for n in ("0", "2", "4")] == [500, 500, 800]
    with pytest.raises(graphscale.MultiplierError, match="no class 'nope'"):
        graphscale.analyze(model, inputs, names={"nope": "x"})


def test_scaling_table_follows_the_mup_laws_for_an_mlp() -> None:
    model, inputs = zoo.mlp(widths=(8, 8), d_in=4, d_out=3)
    plan = graphscale.analyze(model, inputs)
    k1, k2 = (plan.symbols[c.name] for c in plan.width_classes)
    hidden, readout, first = plan.rules["2.weight"], plan.rules["4.weight"], plan.rules["0.weight"]
    assert (first.role, hidden.role, readout.role) == ("input", "hidden", "output")
    assert sympy.simplify(hidden.adam_lr - 1 / k1) == 0 and sympy.simplify(hidden.sgd_lr - k2 / k1) == 0
    assert sympy.simplify(readout.adam_lr - 1 / k2) == 0 and sympy.simplify(readout.sgd_lr - 1 / k2) == 0
    assert sympy.simplify(first.adam_eps - 1 / k1) == 0 and sympy.simplify(first.sgd_lr - k1) == 0
    assert sympy.simplify(hidden.init_std - k1 ** sympy.Rational(-1, 2)) == 0


def test_plan_to_dict_is_json_and_lists_every_tensor() -> None:
    model, inputs = zoo.gpt()
    plan = graphscale.analyze(model, inputs)
    data = json.loads(json.dumps(plan.to_dict()))
    tensors = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert set(data["rules"]) == tensors
    assert data["rules"]["transformer.wte.weight"]["aliases"] == ["lm_head.weight"]
    assert any(c["role"] == "width" and c["symbol"] == "k1" for c in data["classes"])
    assert "scaling rules" in str(plan)


def test_outputs_width_lets_a_backbone_output_grow() -> None:
    class Backbone(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 8), torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    model, x = Backbone().double(), torch.randn(2, 3, dtype=torch.float64)
    assert len(graphscale.analyze(model, (x,)).width_classes) == 1  # the output axis stays fixed
    wide = graphscale.widen(model, (x,), 2, outputs="width")
    assert torch.allclose(wide(x), model(x).repeat_interleave(2, dim=-1), atol=1e-12, rtol=0)


def test_widen_refuses_a_plan_made_from_another_model() -> None:
    a, inputs = zoo.mlp(seed=1)
    b, _ = zoo.mlp(seed=2)
    plan = graphscale.analyze(a, inputs)
    graphscale.widen(a, inputs, 2, plan=plan)  # the plan's own model: fine
    with pytest.raises(graphscale.GraphscaleError, match="different model"):
        graphscale.widen(b, inputs, 2, plan=plan)
