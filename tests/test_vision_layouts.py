"""Vision layouts, each as a tiny hand-written module (torchvision and timm are not installed here):
channel shuffle, heads split into groups of different sizes, a head axis whose factor is a concatenation
(q|k|v of different per-head sizes), an axis split two incompatible ways, library functions matched
lazily by name (stochastic depth, a relative-position-bias lookup), stepped slices, and a model that
caches tensors during forward, traced twice."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.fx
from torch import nn

import graphscale
from graphscale.infer.rulebook import RuleBook

# ---------------------------------------------------------------------------------------------------------
# Two library functions, spelled as torchvision spells them (module and qualname), defined here so that
# the tests need no torchvision: the rule book matches them by name, without importing anything.


def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision.ops.stochastic_depth's eval-mode behaviour: the identity."""
    if not training or p == 0.0:
        return input
    keep = torch.empty([input.shape[0]] + [1] * (input.ndim - 1)).bernoulli_(1 - p)
    return input * keep / (1 - p)


def _get_relative_position_bias(relative_position_bias_table: torch.Tensor,
                                relative_position_index: torch.Tensor,
                                window_size: list[int]) -> torch.Tensor:
    """A (1, heads, N, N) bias gathered from a ((2W-1)^2, heads) table by a fixed index."""
    n = window_size[0] * window_size[1]
    bias = relative_position_bias_table[relative_position_index].view(n, n, -1)
    return bias.permute(2, 0, 1).contiguous().unsqueeze(0)


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
_get_relative_position_bias.__module__ = "torchvision.models.swin_transformer"
torch.fx.wrap("stochastic_depth")  # kept as one call by fx, as torchvision does
torch.fx.wrap("_get_relative_position_bias")


def _exact(model: nn.Module, inputs: tuple, tracer: str = "fx", mult: int = 2, **kw) -> nn.Module:
    model = model.double().eval()
    wide = graphscale.widen(model, inputs, mult, tracer=tracer, **kw)
    with torch.no_grad():
        err = (wide(*inputs) - model(*inputs)).abs().max().item()
    assert err <= 1e-12, err
    return wide


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------


class ChannelShuffle(nn.Module):
    """ShuffleNet's unit: two branches concatenated, channels shuffled (view -> transpose -> flatten),
    then halved by chunk for the next unit."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, c, 1), nn.Conv2d(3, c, 1)
        self.c1, self.c2 = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.head = nn.Linear(2 * c, 5)

    @staticmethod
    def shuffle(h: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = h.size()
        return h.view(b, 2, c // 2, hh, ww).transpose(1, 2).contiguous().view(b, c, hh, ww)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.shuffle(torch.cat([self.a(x), self.b(x)], 1))
        x1, x2 = h.chunk(2, dim=1)
        h = self.shuffle(torch.cat([self.c1(x1), self.c2(torch.relu(x2))], 1))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_channel_shuffle_widens_exactly(tracer: str) -> None:
    torch.manual_seed(0)
    wide = _exact(ChannelShuffle(), (_x(2, 3, 4, 4),), tracer)
    # every branch's channels grow: a and b (before the shuffle) and c1, c2 (after it)
    for name in ("a.weight", "b.weight", "c1.weight", "c2.weight"):
        assert wide.state_dict()[name].shape[0] == 16, name


class GroupedHeads(nn.Module):
    """Heads split into groups of 2, 3 and 3 (CoaT's convolutional position encoding): the channel axis
    is both heads x head_dim and a concatenation of whole-head groups."""

    def __init__(self, heads: int = 8, hd: int = 4) -> None:
        super().__init__()
        self.heads, self.hd = heads, hd
        self.v = nn.Linear(6, heads * hd)
        self.sizes = [2 * hd, 3 * hd, 3 * hd]
        self.convs = nn.ModuleList(nn.Conv1d(s, s, 3, padding=1, groups=s) for s in self.sizes)
        self.out = nn.Linear(heads * hd, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, 6)
        b, n, _ = x.shape
        v = self.v(x).reshape(b, n, self.heads, self.hd).permute(0, 2, 3, 1)  # b, heads, hd, n
        img = v.reshape(b, self.heads * self.hd, n)
        parts = torch.split(img, self.sizes, dim=1)
        conv = torch.cat([c(parts[i]) for i, c in enumerate(self.convs)], dim=1)
        y = (conv.reshape(b, self.heads, self.hd, n) * v).permute(0, 3, 1, 2).reshape(b, n, -1)
        return self.out(y)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_heads_split_into_groups_widens_exactly(tracer: str) -> None:
    torch.manual_seed(0)
    wide = _exact(GroupedHeads(), (_x(2, 5, 6),), tracer)
    assert wide.state_dict()["v.weight"].shape == (64, 6)  # 8 heads x head_dim 4 -> 8


class FusedUnequalHeads(nn.Module):
    """LeViT's attention: one projection viewed as (heads, q | k | v) with v wider than q and k, so a
    head axis's inner factor is a concatenation of two classes."""

    def __init__(self, heads: int = 2, kd: int = 4, dv: int = 8) -> None:
        super().__init__()
        self.heads, self.kd, self.dv = heads, kd, dv
        self.qkv = nn.Linear(6, heads * (2 * kd + dv))
        self.proj = nn.Linear(heads * dv, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).split([self.kd, self.kd, self.dv], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1) * 0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.heads * self.dv))


@pytest.mark.parametrize("heads", ["fixed", "grow"])
def test_heads_policy_keeps_a_concatenated_factor_together(heads: str) -> None:
    torch.manual_seed(0)
    model = FusedUnequalHeads().double()
    plan = graphscale.analyze(model, (_x(2, 5, 6),), heads=heads)
    wide = _exact(model, (_x(2, 5, 6),), plan=plan)
    rows = wide.state_dict()["qkv.weight"].shape[0]
    # fixed: 2 heads x (4|4|8) per head -> 2 x (8|8|16); grow: 4 heads x (4|4|8)
    assert rows == 64


class TwoWindowings(nn.Module):
    """An axis of 6 cut into 2 x 3 and into 3 x 2 (MaxViT's window and grid partitions): no common
    refinement, so the factors stay fixed, and the hidden width still grows."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 6, 4)
        h = torch.tanh(self.a(x))
        b = h.shape[0]
        w1 = h.view(b, 2, 3, 8).sum(1)  # windows
        w2 = h.view(b, 3, 2, 8).sum(1)  # grid
        return self.b(w1.mean(1) + w2.mean(1))


def test_an_axis_split_two_incompatible_ways_stays_fixed() -> None:
    torch.manual_seed(0)
    wide = _exact(TwoWindowings(), (_x(2, 6, 4),))
    assert wide.state_dict()["a.weight"].shape == (16, 4)


# ---------------------------------------------------------------------------------------------------------


def test_optional_targets_of_an_unimported_library_resolve_lazily() -> None:
    before = "torchvision" in sys.modules
    book = RuleBook.load()
    assert ("torchvision" in sys.modules) == before  # loading the rules imports nothing
    assert book.lookup_function(stochastic_depth).name == "stochastic_depth"
    assert book.lookup_function(_get_relative_position_bias).name == "relative_position_bias"

    def stochastic_depth_elsewhere(x: torch.Tensor) -> torch.Tensor:  # same name, other module
        return x

    stochastic_depth_elsewhere.__qualname__ = "stochastic_depth"
    assert book.lookup_function(stochastic_depth_elsewhere) is None


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = h + stochastic_depth(torch.relu(self.b(h)), 0.2, "row", self.training)
        return self.c(h)


def test_stochastic_depth_is_the_identity_in_eval() -> None:
    torch.manual_seed(0)
    model = Residual().double().train()  # the rule warns when the call runs in training mode
    plan = graphscale.analyze(model, (_x(2, 4),))
    assert any("stochastic depth" in w for w in plan.requests.warnings)
    _exact(model, (_x(2, 4),))


class WindowAttention(nn.Module):
    """Scores of a 2 x 2 window plus a bias looked up per head in a table (torchvision's Swin)."""

    def __init__(self, heads: int = 2, hd: int = 4) -> None:
        super().__init__()
        self.heads, self.hd = heads, hd
        self.qkv, self.proj = nn.Linear(6, 3 * heads * hd), nn.Linear(heads * hd, 6)
        self.relative_position_bias_table = nn.Parameter(torch.randn(9, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(2), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + 1
        self.register_buffer("relative_position_index", (rel[..., 0] * 3 + rel[..., 1]).flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 4 tokens, 6)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        attn = q @ k.transpose(-2, -1) * 0.5
        attn = attn + _get_relative_position_bias(self.relative_position_bias_table,
                                                  self.relative_position_index, [2, 2])
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("heads", ["fixed", "grow"])
def test_relative_position_bias_lookup_carries_the_heads_axis(heads: str) -> None:
    torch.manual_seed(0)
    model = WindowAttention().double()
    plan = graphscale.analyze(model, (_x(2, 4, 6),), heads=heads)
    wide = _exact(model, (_x(2, 4, 6),), plan=plan)
    # the table's head axis grows exactly when heads do; its rows (looked up) never grow
    assert tuple(wide.state_dict()["relative_position_bias_table"].shape) == (9, 4 if heads == "grow" else 2)


class BiasedQKV(nn.Module):
    """BEiT / EVA-02 attention: the q | k | v bias concatenated from q_bias, a zero buffer and v_bias,
    and the fused projection reshaped to (3, heads, head_dim)."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))
        self.register_buffer("k_bias", torch.zeros(d), persistent=False)
        self.proj, self.fc = nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = torch.nn.functional.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * 0.5).softmax(-1)
        return self.fc(x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_concatenated_qkv_bias_reshaped_to_heads_widens_exactly(tracer: str) -> None:
    torch.manual_seed(0)
    wide = _exact(BiasedQKV(), (_x(2, 5, 16),), tracer)
    assert wide.state_dict()["q_bias"].shape == (32,)


def test_relations_that_keep_changing_are_refused_in_bounded_work() -> None:
    """A rule that splits a dimension anew on every pass must end in an error naming that dimension."""
    import time

    from graphscale.errors import WidthConflictError
    from graphscale.infer.dims import DimSystem

    class Restless(DimSystem):
        def _refine_once(self) -> bool:
            super()._refine_once()
            d = self.ds_target
            self.prod(d, [self.new(2, "half"), self.new(self.size[d] // 2, "rest")], "node 'spin' (x.py:1)")
            self._changed = [d]
            return True

    ds = Restless()
    ds.ds_target = ds.new(8, "reshape_7[1]")
    start = time.perf_counter()
    with pytest.raises(WidthConflictError, match=r"did not settle.*reshape_7\[1\].*node 'spin'"):
        ds.resolve()
    assert time.perf_counter() - start < 10


class FourierPositions(nn.Module):
    """XCiT's positional encoding: sin of the even and cos of the odd Fourier features (stepped slices
    ``0::2`` / ``1::2`` of a fixed axis), projected to the hidden width."""

    def __init__(self, hidden: int = 8, dim: int = 16) -> None:
        super().__init__()
        self.hidden = hidden
        self.token, self.proj, self.fc = nn.Linear(3, dim), nn.Conv2d(2 * hidden, dim, 1), nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, H, W, 3)
        b, h, w, _ = x.shape
        ones = torch.ones((b, h, w), dtype=x.dtype)
        dim_t = torch.arange(self.hidden, dtype=x.dtype)
        dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden)
        feats = []
        for embed in (ones.cumsum(1), ones.cumsum(2)):
            pos = embed[:, :, :, None] / dim_t
            feats.append(torch.stack([pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()], dim=4).flatten(3))
        pos = torch.cat(feats, dim=3).permute(0, 3, 1, 2)
        return self.fc(torch.relu(self.token(x) + self.proj(pos).permute(0, 2, 3, 1)))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_stepped_slices_keep_their_axes_fixed(tracer: str) -> None:
    torch.manual_seed(0)
    model = FourierPositions().double()
    plan = graphscale.analyze(model, (_x(2, 4, 4, 3),), tracer=tracer)
    assert [c.name for c in plan.width_classes] == ["token.weight[0]"]  # not the sliced features
    wide = _exact(model, (_x(2, 4, 4, 3),), plan=plan)
    assert tuple(wide.state_dict()["proj.weight"].shape) == (32, 16, 1, 1)


class GhostUnit(nn.Module):
    """GhostNet's module in a residual block: primary features, cheap depthwise features of them,
    concatenated and sliced back to ``out`` channels with a literal bound (here the whole axis, or all
    but the last channel), then added to the input."""

    def __init__(self, c: int = 8, sliced: int = 8) -> None:
        super().__init__()
        self.sliced = sliced
        self.stem = nn.Conv2d(3, sliced, 1)
        self.primary = nn.Conv2d(sliced, c // 2, 1)
        self.cheap = nn.Conv2d(c // 2, c // 2, 3, padding=1, groups=c // 2)
        self.head = nn.Linear(sliced, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        x1 = self.primary(h)
        out = torch.cat([x1, self.cheap(x1)], dim=1)[:, :self.sliced]
        return self.head((h + out).mean((2, 3)))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_concat_sliced_back_by_a_literal_bound_widens_exactly(tracer: str) -> None:
    torch.manual_seed(0)
    wide = _exact(GhostUnit(), (_x(2, 3, 4, 4),), tracer)
    assert wide.state_dict()["stem.weight"].shape[0] == 16


class ShuffleSplitUnevenly(nn.Module):
    """A shuffled channel axis (4 x 2) split into 3 | 5: the first part ends inside a block of 2, so no
    replication of the channels keeps both layouts; those channels stay fixed, the rest still grows."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.c1, self.c2 = nn.Conv2d(3, 6, 1), nn.Conv2d(5, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ChannelShuffle.shuffle(torch.cat([self.a(x), self.b(x)], 1))
        x1, x2 = h.split([3, 5], dim=1)
        return self.head(torch.relu(self.c1(x1) + self.c2(x2)).mean((2, 3)))


def test_a_layout_no_widening_keeps_is_fixed_not_refused() -> None:
    torch.manual_seed(0)
    model = ShuffleSplitUnevenly().double()
    plan = graphscale.analyze(model, (_x(2, 3, 4, 4),))
    assert [c.name for c in plan.width_classes] == ["c1.weight[0]"]
    assert "no widening keeps consistent" in plan.classification.lookup("a.weight[0]").reason
    _exact(model, (_x(2, 3, 4, 4),), plan=plan)


class CachedBiases(nn.Module):
    """Attention biases gathered from a table and cached per device in eval mode (LeViT)."""

    def __init__(self, d: int = 8, heads: int = 2, n: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.attention_biases = nn.Parameter(torch.randn(heads, 7))
        self.register_buffer("idx", torch.randint(0, 7, (n, n), generator=torch.Generator().manual_seed(0)),
                             persistent=False)
        self.cache: dict[str, torch.Tensor] = {}

    def biases(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.attention_biases[:, self.idx]
        if str(device) not in self.cache:
            self.cache[str(device)] = self.attention_biases[:, self.idx]
        return self.cache[str(device)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * 0.5 + self.biases(x.device)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_forward_cache_neither_blocks_nor_is_poisoned_by_tracing(tracer: str) -> None:
    torch.manual_seed(0)
    model = CachedBiases().double().eval()
    x = _x(2, 4, 8)
    want = model(x)  # with autograd on: the cache now holds a tensor with history (not deep-copyable)
    cached = model.cache["cpu"]
    assert cached.grad_fn is not None
    plan = graphscale.analyze(model, (x,), tracer=tracer)  # analyze, then widen: each traces
    wide = graphscale.widen(model, (x,), 2, tracer=tracer)
    with torch.no_grad():
        assert (wide(x) - want).abs().max().item() <= 1e-12
    assert plan.width_classes
    assert model.cache == {"cpu": cached}  # the user's cache is the same tensor, not a proxy or a copy
    assert not any(isinstance(v, torch.fx.Proxy) for v in vars(model).values())


def test_in_place_dropout_is_covered_in_export_graphs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1, inplace=True), nn.Linear(8, 2))
    plan = graphscale.analyze(model.double().eval(), (_x(3, 4),), tracer="export")
    assert "aten.dropout_.default" in {str(n.target) for n in plan.captured.gm.graph.nodes}
    _exact(model, (_x(3, 4),), plan=plan)


def test_concatenated_parts_that_cannot_grow_alike_are_fixed_together() -> None:
    """All but the last channel of cat(primary, cheap) is kept: the channel cut off is a size-1 part
    (fixed), so the parts of the stem's channel axis cannot share a multiplier; widening keeps that axis
    (exact) instead of refusing at widen time."""
    torch.manual_seed(0)
    model = GhostUnit(8, 7).double()
    plan = graphscale.analyze(model, (_x(2, 3, 4, 4),))
    assert "cannot grow alike" in plan.classification.lookup("stem.weight[0]").reason
    _exact(model, (_x(2, 3, 4, 4),), plan=plan)


class ShiftedWindows(nn.Module):
    """Swin's shifted windows: tokens laid out (B, H, W, C) rolled along height and width; ``dims``:
    what to roll along (the channels, or None: the flattened tensor, are not replication-invariant)."""

    def __init__(self, dims: tuple[int, ...] | int | None = (1, 2)) -> None:
        super().__init__()
        self.dims = dims
        self.embed, self.mlp, self.head = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.dims is None:
            h = torch.roll(h, 3)
        elif isinstance(self.dims, int):
            h = h.roll(1, self.dims)
        else:
            h = torch.roll(h, shifts=(-1, -1), dims=self.dims)
        h = h + self.mlp(torch.relu(h))
        h = torch.roll(h, shifts=(1, 1), dims=(1, 2)) if self.dims == (1, 2) else h
        return self.head(h.mean((1, 2)))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_roll_over_spatial_axes_widens_exactly(tracer: str) -> None:
    torch.manual_seed(0)
    model = ShiftedWindows()
    wide = _exact(model, (_x(2, 4, 4, 3),), tracer)
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("dims", [-1, None])
def test_roll_over_a_width_axis_is_refused(tracer: str, dims: int | None) -> None:
    torch.manual_seed(0)
    with pytest.raises(graphscale.GraphscaleError, match="not replication-invariant.*roll"):
        graphscale.widen(ShiftedWindows(dims).double().eval(), (_x(2, 4, 4, 3),), 2, tracer=tracer)


class WeightStandardized(nn.Module):
    """NFNet's ScaledStdConv2d: each filter standardized over its fan-in by a batch norm with batch
    statistics (no running statistics), after a plain conv + BatchNorm2d (running statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.nn.functional.batch_norm(self.b.weight.reshape(1, 4, -1), None, None, training=True,
                                           momentum=0.0, eps=1e-6).reshape_as(self.b.weight)
        h = torch.relu(self.bn(self.a(x)))
        return torch.nn.functional.conv2d(h, w, self.b.bias, padding=1).mean((2, 3))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_batch_statistics_over_a_width_axis_are_refused(tracer: str) -> None:
    """Widening the standardized filters' fan-in changes their mean and variance (the copies are rescaled):
    the output would grow ~2x. A clear refusal naming the node, never a wrong model."""
    torch.manual_seed(0)
    model = WeightStandardized().double().eval()
    with torch.no_grad():
        for p in model.bn.parameters():
            p.normal_()
    with pytest.raises(graphscale.GraphscaleError, match="batch_norm.*batch statistics"):
        graphscale.widen(model, (_x(2, 3, 6, 6),), 2, tracer=tracer)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_batch_norm_with_running_statistics_still_widens_exactly(tracer: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
        model[1].running_mean.normal_()
    _exact(model, (_x(2, 3, 6, 6),), tracer)


class LookupTableBias(nn.Module):
    """timm MaxViT's 'bias_tf' relative-position bias: a (heads, 2S-1, 2S-1) table contracted by einsum
    with one-hot lookup buffers along each of its two relative axes, added to attention logits."""

    def __init__(self, heads: int = 2, size: int = 3) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(heads, 2 * size - 1, 2 * size - 1))
        idx = torch.arange(size)
        lookup = nn.functional.one_hot(idx[:, None] - idx[None, :] + size - 1, 2 * size - 1).float()
        self.register_buffer("h_lookup", lookup)
        self.register_buffer("w_lookup", lookup.clone())
        self.qk, self.head, self.heads = nn.Linear(4, 8), nn.Linear(8, 3), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        t = torch.einsum("nhw,ixh->nixw", self.table, self.h_lookup)
        bias = torch.einsum("nixw,jyw->nijxy", t, self.w_lookup).reshape(self.heads, n, n)
        q = self.qk(x).view(b, n, self.heads, -1).transpose(1, 2)
        a = (q @ q.transpose(-1, -2) + bias).softmax(-1)
        return self.head((a @ q).transpose(1, 2).reshape(b, n, -1)).mean(1)


class WeightProduct(nn.Module):
    """Two parameters contracted with each other (a factored weight a @ b)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ torch.einsum("ij,jk->ik", self.a, self.b)


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("case", ["lookup", "product"])
def test_an_axis_contracted_between_two_weights_is_compensated_once(tracer: str, case: str) -> None:
    """Both weights carry the contracted axis; only one may carry the 1/k (both did: the table's bias came
    out halved, the product a quarter), in widening and in training."""
    torch.manual_seed(0)
    model, x = (LookupTableBias(), _x(2, 9, 4)) if case == "lookup" else (WeightProduct(), _x(2, 4))
    wide = _exact(model, (x,), tracer)
    narrow = copy.deepcopy(model)
    n_opt = torch.optim.SGD(narrow.parameters(), lr=0.05)
    w_opt = graphscale.mup_optimizer(wide, torch.optim.SGD, lr=0.05)
    for _ in range(3):
        for m, opt in ((narrow, n_opt), (wide, w_opt)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), torch.tensor([0, 1])).backward()
            opt.step()
    with torch.no_grad():
        assert (wide(x) - narrow(x)).abs().max().item() <= 1e-12
