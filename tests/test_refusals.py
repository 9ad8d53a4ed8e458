"""Every op that README.md's "Limits" lists as not replication-invariant over a width axis is refused with
:class:`~graphscale.errors.UnsupportedOpError` naming the node (softmax, logsumexp, cumsum, argmax,
unbiased variance), or, for a single-position index, keeps that axis fixed. Each op is its own case, so a
rule that quietly turns one of them into an invariant reduction (``torch.var`` as a mean) fails here.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphscale
from graphscale.errors import MultiplierError, UnsupportedOpError


class Around(nn.Module):
    """``Linear(3, 8) -> op -> Linear(k, 2)``: the op acts over the hidden (width) axis of ``fc_in``."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor], width_out: int = 8) -> None:
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(3, 8), nn.Linear(width_out, 2)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.op(self.fc_in(x)))


def _x() -> torch.Tensor:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# (case id, op over the hidden axis, width of what reaches fc_out, a regex for the node name, tracer)
REFUSED: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], int, str, str]] = [
    ("softmax", lambda h: F.softmax(h, dim=-1), 8, r"softmax", "fx"),
    ("torch.softmax", lambda h: torch.softmax(h, -1), 8, r"softmax", "fx"),
    ("method softmax", lambda h: h.softmax(dim=1), 8, r"softmax", "fx"),
    ("log_softmax", lambda h: F.log_softmax(h, dim=-1), 8, r"log_softmax", "fx"),
    ("softmax export", lambda h: F.softmax(h, dim=-1), 8, r"softmax", "export"),
    ("logsumexp", lambda h: h - torch.logsumexp(h, dim=-1, keepdim=True), 8, r"logsumexp", "fx"),
    ("method logsumexp", lambda h: h - h.logsumexp(-1, keepdim=True), 8, r"logsumexp", "fx"),
    ("cumsum", lambda h: torch.cumsum(h, dim=-1), 8, r"cumsum", "fx"),
    ("method cumsum", lambda h: h.cumsum(1), 8, r"cumsum", "fx"),
    ("argmax", lambda h: h + torch.argmax(h, dim=-1, keepdim=True).to(h.dtype), 8, r"argmax", "fx"),
    ("method argmax", lambda h: h + h.argmax(-1, keepdim=True).to(h.dtype), 8, r"argmax", "fx"),
    ("var (unbiased by default)", lambda h: h * torch.var(h, dim=-1, keepdim=True), 8, r"var", "fx"),
    ("var unbiased=True", lambda h: h * torch.var(h, -1, unbiased=True, keepdim=True), 8, r"var", "fx"),
    ("var correction=1", lambda h: h * torch.var(h, -1, correction=1, keepdim=True), 8, r"var", "fx"),
    ("method var", lambda h: h * h.var(-1, keepdim=True), 8, r"var", "fx"),
    ("std (unbiased by default)", lambda h: h / torch.std(h, dim=-1, keepdim=True), 8, r"std", "fx"),
    ("method std", lambda h: h / h.std(-1, keepdim=True), 8, r"std", "fx"),
    ("var export", lambda h: h * torch.var(h, dim=-1, keepdim=True), 8, r"var", "export"),
]


@pytest.mark.parametrize("case, op, width_out, node, tracer", REFUSED, ids=[c[0] for c in REFUSED])
def test_non_invariant_op_over_width_is_refused(case: str, op: Callable[[torch.Tensor], torch.Tensor],
                                                width_out: int, node: str, tracer: str) -> None:
    model = Around(op, width_out).double()
    with pytest.raises(UnsupportedOpError) as info:
        graphscale.analyze(model, (_x(),), tracer=tracer)  # type: ignore[arg-type]
    msg = str(info.value)
    assert re.search(rf"node '\w*{node}\w*'", msg), msg  # names the node
    assert "not replication-invariant" in msg and "fc_in.weight[0]" in msg, msg  # why, and which class
    with pytest.raises(UnsupportedOpError):  # widen analyzes too: it cannot go around the refusal
        graphscale.widen(model, (_x(),), 2, tracer=tracer)  # type: ignore[arg-type]


# The invariant counterparts are accepted and widen exactly: the refusals above are about the width axis
# and the bias correction, not about the op names.
ACCEPTED: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [
    ("var unbiased=False", lambda h: h * torch.var(h, -1, unbiased=False, keepdim=True)),
    ("var correction=0", lambda h: h * torch.var(h, -1, correction=0, keepdim=True)),
    ("std correction=0", lambda h: h / torch.std(h, -1, correction=0, keepdim=True)),
    ("softmax over the batch axis", lambda h: F.softmax(h, dim=0)),
    ("cumsum over the batch axis", lambda h: torch.cumsum(h, dim=0)),
    ("mean", lambda h: h - h.mean(-1, keepdim=True)),
    ("amax", lambda h: h - h.amax(-1, keepdim=True)),
]


@pytest.mark.parametrize("case, op", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_invariant_counterpart_widens_exactly(case: str, op: Callable[[torch.Tensor], torch.Tensor]) -> None:
    model, x = Around(op).double(), _x()
    plan = graphscale.analyze(model, (x,))
    assert [c.name for c in plan.width_classes] == ["fc_in.weight[0]"]
    wide = graphscale.widen(model, (x,), 3, plan=plan)
    assert wide.get_submodule("fc_in").out_features == 24
    assert (wide(x) - model(x)).abs().max().item() <= 1e-12


SINGLE_POSITION: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [
    ("h[:, 0]", lambda h: h + h[:, 0].unsqueeze(-1)),
    ("h[..., -1]", lambda h: h * h[..., -1].unsqueeze(-1)),
    ("select", lambda h: h + h.select(1, 2).unsqueeze(-1)),
]


@pytest.mark.parametrize("case, op", SINGLE_POSITION, ids=[c[0] for c in SINGLE_POSITION])
def test_single_position_index_keeps_the_axis_fixed(case: str, op: Callable[[torch.Tensor], torch.Tensor]
                                                     ) -> None:
    """Picking one hidden unit makes the hidden axis fixed (documented in README "Limits"): the model has
    no width class left, and asking to widen that axis is an error that says it is fixed."""
    model, x = Around(op).double(), _x()
    plan = graphscale.analyze(model, (x,))
    assert plan.width_classes == []
    fixed = plan.classification.lookup("fc_in.weight[0]")
    assert fixed.role == "fixed" and "position" in (fixed.reason or "")
    with pytest.raises(MultiplierError, match="fixed"):
        plan.multipliers({"fc_in.weight[0]": 2})
    wide = graphscale.widen(model, (x,), 2, plan=plan)  # nothing grows, so nothing changes
    assert wide.get_submodule("fc_in").out_features == 8
    assert torch.equal(wide(x), model(x))
