"""Hypothesis strategies for random architectures that can be built at two widths.

Each family has a frozen ``*Arch`` dataclass (drawn by a strategy) and a builder
``build(arch, scale) -> (model, example_inputs)``. ``scale`` multiplies every hidden width (an ``int``), or,
for the MLP, each hidden layer separately (a tuple with one multiplier per hidden layer). The same ``arch``
built at ``scale=1`` and ``scale=2`` is the same architecture at width n and 2n: fixed sizes (input and
output features, image size, vocabulary, positions, batch, sequence) never change, and the example inputs
depend only on ``arch.seed``, never on the scale. Weights are random (seeded) and every bias, norm gain and
BatchNorm running statistic is non-trivial, so equivalence checks exercise every tensor.

Transformers have two head policies: ``heads="fixed"`` scales head_dim (the number of heads stays), and
``heads="grow"`` scales the number of heads (head_dim stays); the residual width and MLP hidden width scale
either way. Everything is small (widths <= 64, sequence <= 8, batch <= 3) and fx-traceable with a tracer
that proxies buffers (what ``graphscale.capture`` uses).

Example:
    >>> arch = MLPArch(d_in=3, d_out=2, hidden=(4, 6), acts=("relu", "tanh"), norms=(False, True),
    ...                bias=True, batch=2, seed=0)
    >>> narrow, (x,) = build(arch, 1)
    >>> wide, (x2,) = build(arch, 2)
    >>> tuple(wide[0].weight.shape), torch.equal(x, x2)
    ((8, 3), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from graphscale.zoo import BasicBlock

Example = tuple[nn.Module, tuple[Any, ...]]
Scale = int | Sequence[int]

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def _randomize(model: nn.Module, gen: torch.Generator, std: float = 0.2) -> None:
    """Random values for every parameter and buffer (biases and norm gains away from 0 and 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:  # norm gains
                p.copy_(1.0 + std * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(1, p[0].numel())))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                assert m.num_batches_tracked is not None
                m.num_batches_tracked.fill_(3)


def _seeded_build(seed: int, make: Any) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    _randomize(model, torch.Generator().manual_seed(seed + 1))
    return model


def _input_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + 7919)


# ---------------------------------------------------------------------------------------------------------
# MLP


@dataclass(frozen=True)
class MLPArch:
    """``Linear -> [LayerNorm] -> act`` per hidden layer, then a Linear readout."""

    d_in: int
    d_out: int
    hidden: tuple[int, ...]
    acts: tuple[str, ...]
    norms: tuple[bool, ...]
    bias: bool
    batch: int
    seed: int

def build_mlp(arch: MLPArch, scale: Scale = 1) -> Example:
    scales = [scale] * len(arch.hidden) if isinstance(scale, int) else list(scale)
    if len(scales) != len(arch.hidden):
        raise ValueError(f"{len(arch.hidden)} hidden layers but {len(scales)} multipliers")

    def make() -> nn.Module:
        layers: list[nn.Module] = []
        fan_in = arch.d_in
        for h, act, norm, k in zip(arch.hidden, arch.acts, arch.norms, scales):
            layers.append(nn.Linear(fan_in, h * k, bias=arch.bias))
            if norm:
                layers.append(nn.LayerNorm(h * k, bias=arch.bias))
            layers.append(ACTIVATIONS[act]())
            fan_in = h * k
        layers.append(nn.Linear(fan_in, arch.d_out, bias=arch.bias))
        return nn.Sequential(*layers)

    model = _seeded_build(arch.seed, make)
    x = torch.randn(arch.batch, arch.d_in, generator=_input_gen(arch.seed))
    return model.eval(), (x,)


@st.composite
def mlp_archs(draw: Any, max_width: int = 64) -> MLPArch:
    depth = draw(st.integers(1, 4))
    return MLPArch(
        d_in=draw(st.integers(1, 8)),
        d_out=draw(st.integers(1, 6)),
        hidden=tuple(draw(st.integers(2, max_width)) for _ in range(depth)),
        acts=tuple(draw(st.sampled_from(sorted(ACTIVATIONS))) for _ in range(depth)),
        norms=tuple(draw(st.booleans()) for _ in range(depth)),
        bias=draw(st.booleans()),
        batch=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**20)),
    )


# ---------------------------------------------------------------------------------------------------------
# CNN


@dataclass(frozen=True)
class BlockSpec:
    """A residual block. ``out_channels=None`` keeps the channels (identity shortcut); otherwise a 1x1
    conv+BN projection shortcut with ``stride``. ``grouped`` makes the second conv ``groups=2``."""

    out_channels: int | None
    stride: int
    grouped: bool


@dataclass(frozen=True)
class CNNArch:
    in_channels: int
    stem: int
    blocks: tuple[BlockSpec, ...]
    num_classes: int
    head_bias: bool
    batch: int
    seed: int


class CNN(nn.Module):
    def __init__(self, arch: CNNArch, k: int) -> None:
        super().__init__()
        c = arch.stem * k
        self.stem = nn.Sequential(nn.Conv2d(arch.in_channels, c, 3, padding=1, bias=True),
                                  nn.BatchNorm2d(c), nn.ReLU())
        blocks = []
        for b in arch.blocks:
            c_out = c if b.out_channels is None else b.out_channels * k
            blocks.append(BasicBlock(c, c_out, b.stride, groups=2 if b.grouped else 1))
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c, arch.num_classes, bias=arch.head_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.blocks(self.stem(x)))))


def build_cnn(arch: CNNArch, scale: Scale = 1) -> Example:
    if not isinstance(scale, int):
        raise TypeError("the CNN builder takes one multiplier for all channel widths")
    model = _seeded_build(arch.seed, lambda: CNN(arch, scale))
    x = torch.randn(arch.batch, arch.in_channels, 8, 8, generator=_input_gen(arch.seed)) + 0.3
    return model.eval(), (x,)


@st.composite
def cnn_archs(draw: Any, max_channels: int = 16) -> CNNArch:
    """Stem, 1-3 residual blocks (one with a projection shortcut, strided half the time), pool, head.

    Channel counts are even; a block's second conv may be ``groups=2`` when it has at least 4 channels
    (with 2 channels it would be depthwise, see test_infer_property.test_depthwise_conv_infers).
    """
    even = st.integers(1, max_channels // 2).map(lambda n: 2 * n)
    n_blocks = draw(st.integers(1, 3))
    proj_at = draw(st.integers(0, n_blocks - 1))
    stem = draw(even)
    c = stem
    blocks = []
    for i in range(n_blocks):
        out = draw(even) if i == proj_at else None
        stride = draw(st.sampled_from([1, 2])) if i == proj_at else 1
        c = c if out is None else out
        blocks.append(BlockSpec(out, stride, c >= 4 and draw(st.booleans())))
    return CNNArch(
        in_channels=draw(st.integers(1, 3)),
        stem=stem,
        blocks=tuple(blocks),
        num_classes=draw(st.integers(2, 5)),
        head_bias=draw(st.booleans()),
        batch=draw(st.integers(2, 3)),  # >= 2 so train-mode BatchNorm has a batch variance
        seed=draw(st.integers(0, 2**20)),
    )


def cnn_n_classes(arch: CNNArch) -> int:
    """Width classes of a CNN: the stem's residual stream, each block's inner channels, and a new residual
    stream after each block with a projection shortcut."""
    n, c = 1, arch.stem
    for b in arch.blocks:
        n += 1
        c_out = c if b.out_channels is None else b.out_channels
        if b.stride != 1 or c_out != c:
            n += 1
        c = c_out
    return n


# ---------------------------------------------------------------------------------------------------------
# Transformer


@dataclass(frozen=True)
class TransformerArch:
    """A small pre-norm decoder. ``n_embd=None`` makes the residual width ``n_head * head_dim`` (nanoGPT)."""

    vocab: int
    block_size: int
    n_layer: int
    n_head: int
    head_dim: int
    n_embd: int | None
    mlp_hidden: int
    fused_qkv: bool
    attention: Literal["manual", "sdpa"]
    mup_scale: bool
    tied: bool
    bias: bool
    batch: int
    seq: int
    seed: int

    def sizes(self, k: int, heads: Literal["fixed", "grow"]) -> tuple[int, int, int, int]:
        """(n_head, head_dim, n_embd, mlp_hidden) at multiplier ``k`` under a head policy."""
        n_head = self.n_head * k if heads == "grow" else self.n_head
        head_dim = self.head_dim if heads == "grow" else self.head_dim * k
        n_embd = n_head * head_dim if self.n_embd is None else self.n_embd * k
        return n_head, head_dim, n_embd, self.mlp_hidden * k


class Attention(nn.Module):
    def __init__(self, arch: TransformerArch, n_head: int, head_dim: int, n_embd: int) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.d_attn = n_head, head_dim, n_head * head_dim
        self.fused, self.attention, self.mup = arch.fused_qkv, arch.attention, arch.mup_scale
        if self.fused:
            self.c_attn = nn.Linear(n_embd, 3 * self.d_attn, bias=arch.bias)
        else:
            self.q = nn.Linear(n_embd, self.d_attn, bias=arch.bias)
            self.k = nn.Linear(n_embd, self.d_attn, bias=arch.bias)
            self.v = nn.Linear(n_embd, self.d_attn, bias=arch.bias)
        self.proj = nn.Linear(self.d_attn, n_embd, bias=arch.bias)
        if arch.attention == "manual":
            bs = arch.block_size
            self.register_buffer("mask", torch.tril(torch.ones(bs, bs)).view(1, 1, bs, bs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.size(0), x.size(1)
        if self.fused:
            q, k, v = self.c_attn(x).split(self.d_attn, dim=2)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               scale=1.0 / self.head_dim if self.mup else None)
        else:
            scale = 1.0 / self.head_dim if self.mup else 1.0 / math.sqrt(self.head_dim)
            att = (q @ k.transpose(-2, -1)) * scale
            att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, self.d_attn)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, arch: TransformerArch, n_head: int, head_dim: int, n_embd: int, hidden: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=arch.bias)
        self.attn = Attention(arch, n_head, head_dim, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd, bias=arch.bias)
        self.fc = nn.Linear(n_embd, hidden, bias=arch.bias)
        self.gelu = nn.GELU()
        self.fc_out = nn.Linear(hidden, n_embd, bias=arch.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.fc_out(self.gelu(self.fc(self.ln_2(x))))


class Transformer(nn.Module):
    def __init__(self, arch: TransformerArch, k: int, heads: Literal["fixed", "grow"]) -> None:
        super().__init__()
        n_head, head_dim, n_embd, hidden = arch.sizes(k, heads)
        self.wte = nn.Embedding(arch.vocab, n_embd)
        self.wpe = nn.Embedding(arch.block_size, n_embd)
        self.blocks = nn.ModuleList([Block(arch, n_head, head_dim, n_embd, hidden)
                                     for _ in range(arch.n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=arch.bias)
        self.head = nn.Linear(n_embd, arch.vocab, bias=False)
        if arch.tied:
            self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build_transformer(arch: TransformerArch, scale: Scale = 1,
                      heads: Literal["fixed", "grow"] = "fixed") -> Example:
    if not isinstance(scale, int):
        raise TypeError("the transformer builder takes one multiplier for all widths")
    model = _seeded_build(arch.seed, lambda: Transformer(arch, scale, heads))
    idx = torch.randint(0, arch.vocab, (arch.batch, arch.seq), generator=_input_gen(arch.seed))
    return model.eval(), (idx,)


@st.composite
def transformer_archs(draw: Any, heads: Literal["fixed", "grow"] = "fixed") -> TransformerArch:
    # With heads="grow" the head count is what grows; a single head (size 1) is never a width class.
    n_head = draw(st.integers(2 if heads == "grow" else 1, 4))
    block_size = draw(st.integers(2, 8))
    return TransformerArch(
        vocab=draw(st.integers(3, 20)),
        block_size=block_size,
        n_layer=draw(st.integers(1, 2)),
        n_head=n_head,
        head_dim=draw(st.integers(2, 8)),
        n_embd=draw(st.one_of(st.none(), st.integers(2, 32))),
        mlp_hidden=draw(st.integers(2, 32)),
        fused_qkv=draw(st.booleans()),
        attention=draw(st.sampled_from(["manual", "sdpa"])),
        mup_scale=draw(st.booleans()),
        tied=draw(st.booleans()),
        bias=draw(st.booleans()),
        batch=draw(st.integers(1, 3)),
        seq=draw(st.integers(1, block_size)),
        seed=draw(st.integers(0, 2**20)),
    )


# ---------------------------------------------------------------------------------------------------------
# Routed weights: parameters that reach their contraction through chunk/split/transpose/reshape

ROUTES = ("plain", "chunk", "split", "transpose", "reshape")


@dataclass(frozen=True)
class RoutedArch:
    """An MLP whose hidden layers hold their weights in another layout than the contraction reads them:
    ``chunk`` a packed (2h, fan_in) weight halved into a gated pair (``a * sigmoid(b)``, as a packed
    q|k|v or gate|up), ``split`` the same with ``torch.split``, ``transpose`` a (fan_in, h) weight used as
    ``x @ W``, ``reshape`` a (h, 1, fan_in) weight reshaped to (h, fan_in). The readout is a plain
    Linear."""

    d_in: int
    d_out: int
    hidden: tuple[int, ...]
    routes: tuple[str, ...]
    batch: int
    seed: int


class RoutedNet(nn.Module):
    def __init__(self, arch: RoutedArch, k: int) -> None:
        super().__init__()
        self.routes = arch.routes
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        fan_in = arch.d_in
        for h, route in zip(arch.hidden, arch.routes):
            h *= k
            shape = {"plain": (h, fan_in), "chunk": (2 * h, fan_in), "split": (2 * h, fan_in),
                     "transpose": (fan_in, h), "reshape": (h, 1, fan_in)}[route]
            self.weights.append(nn.Parameter(torch.empty(shape)))
            self.biases.append(nn.Parameter(torch.empty(2 * h if route in ("chunk", "split") else h)))
            fan_in = h
        self.readout = nn.Linear(fan_in, arch.d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for route, w, b in zip(self.routes, self.weights, self.biases):
            if route == "plain":
                x = torch.tanh(F.linear(x, w, b))
            elif route == "reshape":
                x = torch.tanh(F.linear(x, w.reshape(w.shape[0], w.shape[-1]), b))
            elif route == "transpose":
                x = torch.tanh(x @ w + b)
            else:
                if route == "split":
                    (wa, wb), (ba, bb) = torch.split(w, w.shape[0] // 2), torch.split(b, b.shape[0] // 2)
                else:
                    (wa, wb), (ba, bb) = w.chunk(2), b.chunk(2)
                x = torch.tanh(F.linear(x, wa, ba)) * torch.sigmoid(F.linear(x, wb, bb))
        return self.readout(x)


def build_routed(arch: RoutedArch, scale: int = 1) -> Example:
    model = _seeded_build(arch.seed, lambda: RoutedNet(arch, scale))
    x = torch.randn(arch.batch, arch.d_in, generator=_input_gen(arch.seed))
    return model.eval(), (x,)


@st.composite
def routed_archs(draw: Any, max_width: int = 12) -> RoutedArch:
    depth = draw(st.integers(1, 2))
    return RoutedArch(
        d_in=draw(st.integers(1, 6)),
        d_out=draw(st.integers(1, 4)),
        hidden=tuple(draw(st.integers(2, max_width)) for _ in range(depth)),
        routes=tuple(draw(st.sampled_from(ROUTES)) for _ in range(depth)),
        batch=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**20)),
    )


# ---------------------------------------------------------------------------------------------------------
# Dispatch


Arch = MLPArch | CNNArch | TransformerArch


def build(arch: Arch, scale: Scale = 1, heads: Literal["fixed", "grow"] = "fixed") -> Example:
    """Build ``arch`` with every hidden width multiplied by ``scale`` (see module doc)."""
    if isinstance(arch, MLPArch):
        return build_mlp(arch, scale)
    if isinstance(arch, CNNArch):
        return build_cnn(arch, scale)
    return build_transformer(arch, scale, heads)


def archs(heads: Literal["fixed", "grow"] = "fixed") -> st.SearchStrategy[Arch]:
    """Any family."""
    return st.one_of(mlp_archs(), cnn_archs(), transformer_archs(heads))


def n_width_classes(arch: Arch, heads: Literal["fixed", "grow"] = "fixed") -> int:
    """How many independent width classes ``arch`` has.

    MLP: one per hidden layer. CNN: see :func:`cnn_n_classes`. Transformer: the residual stream plus, per
    layer, the MLP hidden width and the attention's growing factor. With ``heads="fixed"`` that is head_dim,
    and separate q/k/v projections have two independent head_dims (q and k share one through ``q @ k^T``,
    v has its own); a fused qkv split into equal parts ties all three. With ``heads="grow"`` it is the head
    count, which q, k and v share.
    """
    if isinstance(arch, MLPArch):
        return len(arch.hidden)
    if isinstance(arch, CNNArch):
        return cnn_n_classes(arch)
    per_layer = 2 + (1 if heads == "fixed" and not arch.fused_qkv else 0)
    return 1 + per_layer * arch.n_layer


class _BufferProxyTracer(fx.Tracer):
    proxy_buffer_attributes = True


def check_traceable(model: nn.Module) -> fx.GraphModule:
    """Trace with buffers as proxies (as graphscale.capture does); raises if the model is not traceable."""
    return fx.GraphModule(model, _BufferProxyTracer().trace(model))
