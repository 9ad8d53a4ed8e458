"""Unit tests of the routing kinds (graphscale/infer/kinds/routing.py): a tiny graph per kind, and the
relations, fixed axes and sizes it yields; then two tiny mixture-of-experts blocks (dense dispatch with a
scatter, sparse dispatch with gathered expert weights and index_add_) widened exactly."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphscale
from graphscale.infer.engine import Walk
from graphscale.infer.rulebook import RuleBook
from graphscale.infer.values import TensorInfo
from tests.helpers import Fn, same_dim, walk_fn

BOOK = RuleBook.load()


def walk(fn: Callable[..., torch.Tensor], x: torch.Tensor, tracer: str = "fx", **modules: nn.Module) -> Walk:
    return walk_fn(fn, x, tracer=tracer, **modules)


def node(w: Walk, target: str) -> TensorInfo:
    """The info of the one node whose name starts with ``target`` (fx names nodes after the op)."""
    (name,) = [n for n in w.info if n == target or n.rsplit("_", 1)[0] == target]
    i = w.info[name]
    return i if isinstance(i, TensorInfo) else i[0]


same = same_dim


def fixed(w: Walk, d: int) -> bool:
    return any(w.ds.find(f) == w.ds.find(d) for f in w.ds.fixed)


X = torch.randn(5, 8)  # 5 tokens, hidden 8


def test_topk_fixes_the_ranked_axis_only() -> None:
    w = walk(lambda m, x: torch.topk(m.router(m.inp(x)), 2, dim=-1).values, X,
             inp=nn.Linear(8, 6), router=nn.Linear(6, 4))
    experts, hidden = w.tensor_dims["router.weight"]
    out = node(w, "topk")
    assert fixed(w, experts) and not fixed(w, hidden)  # the experts, not the hidden width routed
    assert same(w, out.dims[0], w.input_dims[0]) and out.shape == (5, 2) and fixed(w, out.dims[1])


def test_sort_keeps_the_sorted_axis() -> None:
    w = walk(lambda m, x: torch.sort(m.router(x), dim=-1).values, X, router=nn.Linear(8, 4))
    out = node(w, "sort")
    assert same(w, out.dims[1], w.tensor_dims["router.weight"][0]) and fixed(w, out.dims[1])


def test_one_hot_adds_a_fixed_class_axis() -> None:
    w = walk(lambda m, x: F.one_hot(m.router(x).argmax(-1), 4).to(x.dtype) @ m.up.weight.t(), X,
             router=nn.Linear(8, 4), up=nn.Linear(4, 6))
    code = node(w, "one_hot")
    assert code.shape == (5, 4) and same(w, code.dims[0], w.input_dims[0]) and fixed(w, code.dims[1])
    assert fixed(w, w.tensor_dims["up.weight"][1])  # the codes' classes feed up's fan-in: fixed too


def test_gather_result_has_the_index_axes() -> None:
    def fn(m: Fn, x: torch.Tensor) -> torch.Tensor:
        h = m.proj(x)  # (5, 6)
        idx = torch.topk(m.router(x), 2, dim=-1).indices  # (5, 2)
        return torch.gather(h, 1, idx)

    w = walk(fn, X, proj=nn.Linear(8, 6), router=nn.Linear(8, 4))
    out, idx = node(w, "gather"), node(w, "topk")
    assert out.dims == idx.dims and out.shape == (5, 2)
    assert fixed(w, w.tensor_dims["proj.weight"][0])  # gathered from: positions point into it
    assert same(w, out.dims[0], w.input_dims[0])


def test_gather_with_a_shorter_index_fixes_the_partly_read_axis() -> None:
    w = walk(lambda m, x: torch.gather(m.proj(x), 0, torch.zeros(2, 3, dtype=torch.long)), X,
             proj=nn.Linear(8, 6))
    assert fixed(w, w.tensor_dims["proj.weight"][0])  # only 3 of its 6 columns are read


def test_scatter_writes_into_a_fixed_axis_and_keeps_the_rest() -> None:
    def fn(m: Fn, x: torch.Tensor) -> torch.Tensor:
        top = torch.topk(m.router(x), 2, dim=-1)
        gates = torch.zeros(5, 4, dtype=x.dtype).scatter(1, top.indices, top.values)
        return gates @ m.mix.weight  # (5, 4) @ (4, 8)

    w = walk(fn, X, router=nn.Linear(8, 4), mix=nn.Linear(8, 4))
    out = node(w, "scatter")
    assert fixed(w, out.dims[1]) and same(w, out.dims[1], w.tensor_dims["mix.weight"][0])
    assert fixed(w, node(w, "topk").dims[1])  # the source's scattered axis
    assert not fixed(w, w.tensor_dims["mix.weight"][1])


def test_index_add_relates_the_source_to_the_target_off_the_indexed_axis() -> None:
    def fn(m: Fn, x: torch.Tensor) -> torch.Tensor:
        rows = m.proj(x)  # (5, 6): one row per (token, choice)
        idx = torch.tensor([0, 0, 1, 2, 2])
        return torch.zeros(3, 6, dtype=x.dtype).index_add(0, idx, rows)

    w = walk(fn, X, proj=nn.Linear(8, 6))
    out = node(w, "index_add")
    assert same(w, out.dims[1], w.tensor_dims["proj.weight"][0]) and not fixed(w, out.dims[1])
    assert fixed(w, out.dims[0]) and fixed(w, w.input_dims[0])  # target rows and the source's rows


@pytest.mark.parametrize("op", [
    lambda m, x: torch.bincount(torch.arange(6) % 3, weights=m.proj(x)[0]),  # weights summed per bin
    lambda m, x: torch.histc(m.proj(x), bins=4),
    lambda m, x: torch.nonzero(m.proj(x) > 0),
])
def test_counts_fix_every_input_axis(op: Callable[..., torch.Tensor]) -> None:
    w = walk(op, X, proj=nn.Linear(8, 6))
    assert fixed(w, w.tensor_dims["proj.weight"][0])  # k copies of its entries would count k times


def test_repeat_interleave_makes_a_product_with_the_copies_inside() -> None:
    w = walk(lambda m, x: m.proj(x).repeat_interleave(3, dim=-1), X, proj=nn.Linear(8, 6))
    out = node(w, "repeat_interleave")
    res = w.ds.resolve()
    assert out.shape == (5, 18)
    tree = res.tree(out.dims[1])
    assert tree[0] == "prod" and [res.ds.size[a] for a in res.atoms(out.dims[1])] == [6, 3], tree
    assert not fixed(w, w.tensor_dims["proj.weight"][0])


def test_repeat_interleave_by_a_tensor_fixes_the_axis() -> None:
    w = walk(lambda m, x: m.proj(x).repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 2]), dim=-1), X,
             proj=nn.Linear(8, 6))
    assert fixed(w, w.tensor_dims["proj.weight"][0])


# -- tiny MoE blocks, widened -------------------------------------------------------------------------


class DenseMoE(nn.Module):
    """Every expert on every token, mixed by top-k gates scattered into a (tokens, experts) matrix."""

    def __init__(self, d: int = 8, h: int = 12, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k = k
        self.inp = nn.Linear(3, d)
        self.router = nn.Linear(d, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, h, d) / d ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, d, h) / h ** 0.5)
        self.out = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        probs = self.router(x).softmax(-1)
        top = torch.topk(probs, self.k, dim=-1)
        gates = torch.zeros_like(probs).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
        hid = F.silu(torch.einsum("td,ehd->teh", x, self.up))
        y = torch.einsum("teh,edh,te->td", hid, self.down, gates)
        return self.out(x + y)


class SparseMoE(DenseMoE):
    """Each token's k experts: weights gathered per choice, a batched matmul, summed back by index_add_."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        t = x.shape[0]
        top = torch.topk(self.router(x).softmax(-1), self.k, dim=-1)
        ids = top.indices.reshape(-1)
        tok = torch.arange(t).repeat_interleave(self.k)
        rows = x.repeat_interleave(self.k, dim=0)
        hid = F.silu(torch.bmm(self.up[ids], rows.unsqueeze(-1)).squeeze(-1))
        y = torch.bmm(self.down[ids], hid.unsqueeze(-1)).squeeze(-1) * top.values.reshape(-1, 1)
        acc = torch.zeros_like(x).index_add_(0, tok, y)
        return self.out(x + acc)


@pytest.mark.parametrize("cls", [DenseMoE, SparseMoE])
def test_tiny_moe_widens_exactly_with_experts_and_top_k_fixed(cls: type[DenseMoE]) -> None:
    torch.manual_seed(0)
    model = cls().double().eval()
    x = torch.randn(6, 3, dtype=torch.float64)
    plan = graphscale.analyze(model, (x,))
    width = {c.name for c in plan.width_classes}
    assert width == {"up[2]", "up[1]"}  # the residual stream; each expert's hidden width
    assert plan.classification.lookup("up[0]").role == "fixed"  # the experts
    assert plan.classification.lookup("router.weight[0]").role == "fixed"
    wide = graphscale.widen(model, (x,), {c.name: 2 for c in plan.width_classes}, plan=plan)
    assert wide.up.shape == (4, 24, 16) and wide.router.weight.shape == (4, 16)
    with torch.no_grad():
        want, got = model(x), wide(x)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


class WhereMoE(nn.Module):
    """Tokens located per expert with the one-argument ``torch.where(mask)`` (data-dependent sizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.router, self.out = nn.Linear(3, 8), nn.Linear(8, 4), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        tok, _ = torch.where(self.router(h) > 0)
        return self.out(torch.zeros_like(h).index_add(0, tok, h[tok]))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_where_of_a_mask_locates_along_fixed_axes_and_widens_exactly(tracer: str) -> None:
    torch.manual_seed(0)
    model = WhereMoE().double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    plan = graphscale.analyze(model, (x,), tracer=tracer)
    assert [c.name for c in plan.width_classes] == ["inp.weight[0]"]
    assert plan.classification.lookup("router.weight[0]").role == "fixed"
    wide = graphscale.widen(model, (x,), 2, plan=plan)
    with torch.no_grad():
        want, got = model(x), wide(x)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


class MaskedWrite(nn.Module):
    """``h[mask] = row`` (a masked write into the token embeddings, as Gemma 3's), a write at
    tensor positions of the sequence axis (``h[:, pos] = ...``, the index between kept axes), and an
    accumulating ``index_put`` with a value broadcast along the width."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.feat, self.out = nn.Linear(3, 8), nn.Linear(5, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)  # (B, S, W)
        mask = x[..., 0] > 0  # (B, S)
        h = h.index_put((mask,), self.feat(f[:1]))  # one row written at every masked position
        pos = torch.tensor([0, 2])
        h[:, pos] = self.feat(f[:2])  # indices (None, pos): the written rows sit between kept axes
        rows = (torch.arange(2)[:, None], pos[None, :])
        h = torch.index_put(h, rows, self.feat(f[:1]).sum(-1, keepdim=True), accumulate=True)  # broadcast, +=
        return self.out(h)


def test_index_put_fixes_the_positions_and_widens_exactly() -> None:
    """The written axes of x and the values' position axes are fixed; the width axis of the values
    matches x's, except where the values broadcast along it; the model widens exactly (export: aten
    index_put_, with a mask, two position tensors, and accumulate)."""
    torch.manual_seed(0)
    model = MaskedWrite().double().eval()
    x, f = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    x[0, 1, 0], x[1, 2, 0] = 1.0, 1.0  # at least one masked position
    plan = graphscale.analyze(model, (x, f), tracer="export")
    assert sorted(c.name for c in plan.width_classes) == ["inp.weight[0]"]
    assert plan.classification.lookup("feat.weight[0]").role != "fixed"  # the values' width: h's
    wide = graphscale.widen(model, (x, f), 2, plan=plan)
    with torch.no_grad():
        want, got = model(x, f), wide(x, f)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
