"""Concatenated axes whose parts are heads x head_dim with different layouts (graphscale/infer/classes.py).

A fused k|v projection (JetMoE's kv_proj) whose k part goes through a rotary half split (head_dim =
first half | second half, one class) and whose v part does not: both parts have one growing factor
(head_dim), so they grow alike. Before, the halves were counted as two growing factors, the parts looked
different, and every atom of the axis was fixed: head_dim never grew (the census oracle's miss on jetmoe).
"""

from __future__ import annotations

import torch

import graphscale


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class _FusedKVRotary(torch.nn.Module):
    def __init__(self, hidden: int = 16, heads: int = 2, head_dim: int = 8) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.emb = torch.nn.Linear(4, hidden)
        self.q_proj = torch.nn.Linear(hidden, heads * head_dim, bias=False)
        self.kv_proj = torch.nn.Linear(hidden, 2 * heads * head_dim, bias=False)
        self.o_proj = torch.nn.Linear(heads * head_dim, hidden, bias=False)
        self.out = torch.nn.Linear(hidden, 3)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).double() / head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.emb(x)
        freqs = torch.arange(t, dtype=torch.float64)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        k, v = self.kv_proj(h).chunk(2, dim=-1)
        q = self.q_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        att = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, dim=-1) @ v
        return self.out(self.o_proj(att.transpose(1, 2).reshape(b, t, -1)) + h)


def test_fused_kv_with_rotary_k_grows_head_dim_in_both_parts() -> None:
    torch.manual_seed(0)
    model = _FusedKVRotary().double().eval()
    x = (torch.randn(1, 5, 4, dtype=torch.float64),)
    plan = graphscale.analyze(model, x)
    assert not any("cannot grow alike" in c.reason for c in plan.classification.fixed), \
        [(c.name, c.reason) for c in plan.classification.fixed]
    wide = graphscale.widen(model, x, 2, plan=plan)
    # as the model built at head_dim 16 has them: k|v 2 x 2 x 16, the rotary frequencies 8
    assert tuple(wide.get_parameter("kv_proj.weight").shape) == (64, 32)
    assert tuple(wide.get_buffer("inv_freq").shape) == (8,)
    with torch.no_grad():
        out, want = wide(*x), model(*x)
    assert ((out - want).abs().max() / want.abs().max()).item() <= 1e-10
