"""widen_into measures the readout convention of a hand-written μP model (no mup package): a readout
whose output multiplier is a module attribute computed from the model's own width, ``base / width``.
The large model applies its own (k times smaller) multiplier to the readout's output, so the readout
weight is copied without 1/k and its bias times k, and the optimizer factors follow: the user's large
model trains exactly like the small one. Also: fx records an ``assert`` on a traced size.

PYTEST_DONT_REWRITE: the model's ``assert`` below must compile as plain Python does (pytest's rewriting
changes its bytecode, which is what graphscale recognises an assert by).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import graphscale


class HandWrittenMuP(torch.nn.Module):
    def __init__(self, width: int, base: int = 4) -> None:
        super().__init__()
        torch.manual_seed(width)
        self.fc = torch.nn.Linear(5, width).double()
        self.hidden = torch.nn.Linear(width, width).double()
        self.readout = torch.nn.Linear(width, 3).double()
        self.output_mult = base / width  # μP's 1/width readout multiplier, as a plain attribute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.hidden(torch.relu(self.fc(x))))
        return self.readout(h) * self.output_mult


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / (1 + b.abs().max())).item()


def test_hand_written_output_multiplier_is_read_as_the_models_own_convention() -> None:
    small, large = HandWrittenMuP(8), HandWrittenMuP(24)
    x = torch.randn(6, 5, dtype=torch.float64)
    record = graphscale.widen_into(small, large, (x,))
    assert any("readout='own-output'" in n for n in record.notes)
    assert record["readout.bias"].copy_scale == 3  # the bias is multiplied by the large model's 1/width too
    assert not any("attention" in n for n in record.notes)  # the model has none
    with torch.no_grad():
        assert _rel(large(x), small(x)) <= 1e-10
    hp = dict(lr=1e-2, eps=1e-4, weight_decay=0.1)
    s_opt = torch.optim.AdamW(small.parameters(), **hp)
    l_opt = graphscale.mup_optimizer(large, torch.optim.AdamW, **hp)
    worst = 0.0
    for i in range(30):
        xb = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        for model, opt in ((small, s_opt), (large, l_opt)):
            opt.zero_grad()
            F.mse_loss(model(xb), torch.sin(xb[:, :3])).backward()
            opt.step()
        with torch.no_grad():
            worst = max(worst, _rel(large(xb), small(xb)))
    assert worst <= 1e-9


class _Checked(torch.nn.Module):
    def __init__(self, branch: bool) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 8).double()
        self.out = torch.nn.Linear(8, 2).double()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.size(0)
        assert t <= 6, f"batch of {t} exceeds 6"  # GPT-2's block-size check, on a traced size
        if self.branch and x.sum() > 0:  # data-dependent control flow: fx must still refuse it
            x = -x
        return self.out(torch.relu(self.fc(x)))


def test_fx_records_an_assert_on_a_traced_size_and_still_refuses_control_flow() -> None:
    import pytest

    x = torch.randn(5, 4, dtype=torch.float64)
    model = _Checked(branch=False)
    wide = graphscale.widen(model, (x,), multiplier=2, tracer="fx")
    assert any(n.target is torch._assert for n in wide.graph.nodes)
    assert _rel(wide(x), model(x)) <= 1e-12
    with pytest.raises(AssertionError):  # the check is kept in the wide graph
        wide(torch.randn(7, 4, dtype=torch.float64))
    with pytest.raises(graphscale.errors.TraceError, match="control flow"):
        graphscale.analyze(_Checked(branch=True), (x,), tracer="fx")


class SharedAttention(torch.nn.Module):
    """One attention layer applied at every depth (ALBERT's parameter sharing), heads fixed, standard
    1/sqrt(head_dim) scaling from the model's own width."""

    def __init__(self, width: int, heads: int = 2, depth: int = 3) -> None:
        super().__init__()
        self.heads, self.depth = heads, depth
        self.embed = torch.nn.Linear(5, width)
        self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))
        self.out = torch.nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, t, d = h.shape
        for _ in range(self.depth):
            q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                       for p in (self.q, self.k, self.v))
            h = h + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.out(h)


def test_a_query_shared_by_several_attentions_is_folded_once() -> None:
    """Before: the query's k**-0.5 was folded once per attention that uses it (0.5 instead of 0.71 at
    x2), off by ~1e-2 here and still accepted at 2e-6 on ALBERT, whose tiny random attention is nearly
    uniform. Now: exact to float64 rounding, and the default tolerance is float64's."""
    torch.manual_seed(0)
    small, large = SharedAttention(8).double(), SharedAttention(16).double()
    with torch.no_grad():
        for p in small.parameters():
            p.mul_(4)  # attention far from uniform, so a wrong scale shows
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    record = graphscale.widen_into(small, large, (x,))
    assert _rel(large(x), small(x)) <= 1e-12
    assert sum("the query carries a further k**-0.5" in n for n in record.notes) == 1


class FusedQKV(torch.nn.Module):
    """timm's attention: one qkv projection reshaped to (B, N, 3, heads, head_dim), permuted and unbound."""

    def __init__(self, width: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed, self.qkv = torch.nn.Linear(5, width), torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, t, d = h.shape
        q, k, v = self.qkv(h).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.out(h + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))


def test_the_query_rows_of_a_fused_qkv_unbound_after_a_reshape_are_found() -> None:
    """Before: the fold went to rows 0:head_dim of the fused qkv (the unbound part's last axis), not to
    the query's 0:heads*head_dim, and widen_into missed by 3e-5 on timm's ViT and DeiT."""
    torch.manual_seed(0)
    small, large = FusedQKV(8).double(), FusedQKV(16).double()
    with torch.no_grad():
        for p in small.parameters():
            p.mul_(4)
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    for tracer in ("fx", "export"):
        record = graphscale.widen_into(small, large, (x,), tracer=tracer, attention="standard")
        assert _rel(large(x), small(x)) <= 1e-12, tracer
        assert any("rows 0:16 (the query part)" in n for n in record.notes), record.notes
