"""Small μP models built with Microsoft's ``mup`` package, shaped like the three architectures of the
μpscaling paper's reference code (an MLP with a ``MuReadout``, a ResNet with a ``MuReadout`` head, a
nanoGPT-style GPT-2 with a ``MuSharedReadout`` tied to the token embedding, attention scaled by
``8/head_dim``, ``assert t <= block_size`` and the loss computed in ``forward``). Written for the tests;
each builder returns a float64 model with base shapes set (``mup.set_base_shapes``) against a base of
width ``base`` (and a delta model one unit wider, as ``mup`` recommends).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from mup import MuReadout, MuSharedReadout, set_base_shapes


class MLP(nn.Module):
    def __init__(self, d_in: int, widths: tuple[int, ...], d_out: int, output_mult: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = d_in
        for w in widths:
            layers += [nn.Linear(prev, w), nn.ReLU()]
            prev = w
        layers.append(MuReadout(prev, d_out, output_mult=output_mult))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, channels: int, num_classes: int = 3) -> None:
        super().__init__()
        c = channels
        self.conv1 = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.layer1 = Block(c, c, 1)
        self.layer2 = Block(c, 2 * c, 2)
        self.linear = MuReadout(2 * c, num_classes, readout_zero_init=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class LayerNorm(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd
        self.attn_scale = 8.0 / (n_embd // n_head)  # μP: a constant over head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.attn_scale)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class GPTBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1, self.attn = LayerNorm(n_embd), Attention(n_embd, n_head)
        self.ln_2 = LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, n_embd: int, vocab: int = 11, block_size: int = 8, n_layer: int = 1, n_head: int = 2
                 ) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([GPTBlock(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = LayerNorm(n_embd)
        self.lm_head = MuSharedReadout(self.wte.weight, bias=False)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer) if name.endswith("2.weight") else 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple:
        b, t = idx.size()
        assert t <= self.block_size, f"sequence of length {t} exceeds block size {self.block_size}"
        x = self.wte(idx) + self.wpe(torch.arange(0, t, dtype=torch.long, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


def _with_base(make, width: int, base: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = make(width).double()
    set_base_shapes(model, make(base).double(), delta=make(base + 1).double())
    return model


def mlp(width: int, base: int = 4, seed: int = 0) -> nn.Module:
    return _with_base(lambda w: MLP(5, (w, 2 * w), 3, output_mult=2.0), width, base, seed)


def resnet(width: int, base: int = 2, seed: int = 0) -> nn.Module:
    return _with_base(lambda w: ResNet(w), width, base, seed).eval()


def gpt(width: int, base: int = 4, seed: int = 0) -> nn.Module:
    return _with_base(lambda w: GPT(w), width, base, seed)
