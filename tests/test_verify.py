"""graphscale.verify: the user-facing property check. It passes exact widenings, and a wrong rule makes it
fail with the node and Hypothesis's shrunk example (so the check can fail)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import graphscale
from graphscale import zoo


class SoftmaxOverHidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.softmax(self.fc(x), dim=-1))


def test_verify_passes_an_exact_widening_and_reports_per_node() -> None:
    model, inputs = zoo.resnet_cnn(channels=4)
    report = graphscale.verify(model, inputs, max_examples=6)
    assert report.ok and report.examples == 6
    assert report.nodes and all(e.relative <= 1e-5 for e in report.nodes.values())
    assert "OK" in str(report)


def test_verify_fails_with_the_node_and_a_shrunk_example_when_a_rule_is_wrong(tmp_path: Path) -> None:
    # A wrong user rule: softmax declared elementwise, so the softmax over hidden units is not refused.
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[[rule]]\nname = "softmax_as_elementwise"\nkind = "elementwise"\n'
                     'targets = ["torch.softmax", "torch._C._VariableFunctions.softmax"]\n')
    report = graphscale.verify(SoftmaxOverHidden(), (torch.randn(3, 4),), rules=str(wrong), max_examples=10,
                               dtypes=(torch.float64,))
    assert not report.ok
    assert report.failing_example is not None and report.failing_example["node"] in {"softmax", "out"}
    # shrunk: Hypothesis reduces the multipliers to the smallest failing one
    assert report.failing_example["multipliers"] == {"fc.weight[0]": 2}
    assert "FAILED" in str(report) and "shrunk failing example" in str(report)
