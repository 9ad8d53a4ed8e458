"""Routing (mixtures of experts): selections, one-hot codes, gathers, scatters and counts over fixed axes.

A router picks, per token, positions along one axis (the experts) and sends values there. Positions are
values, not shapes: they stay valid only while the axis they point into keeps its size, so every axis that
is ranked, indexed or scattered into is fixed, and every axis whose entries are counted or summed at
indexed positions is fixed too (k copies of it would count k times). The other axes keep their
relations, so a token's hidden vector (the residual stream) and each expert's hidden width still grow.
Why this keeps the function exact is in docs/math.md ("Routing").
"""

from __future__ import annotations

import torch

from graphscale.infer.call import Call
from graphscale.infer.kinds._common import _norm_dim
from graphscale.infer.schema import Key, kind
from graphscale.infer.values import Info, TensorInfo


def _results(ctx: Call) -> tuple[torch.Tensor, ...]:
    r = ctx.result
    return tuple(r) if isinstance(r, tuple | list) else (r,)


def _pack(ctx: Call, infos: list[TensorInfo]) -> Info:
    return tuple(infos) if isinstance(ctx.result, tuple | list) else infos[0]


@kind("rank", input=Key("ref", default="input"), dim=Key("ref", default="dim"),
      why=Key("str", default="ranked (its positions are the result)", doc="why the axis is fixed"))
def kind_rank(ctx: Call) -> Info:
    """topk / sort / argsort / kthvalue along one axis: that axis is fixed (the result holds positions
    in it, or the k largest of its entries); the output's axis there is a new fixed axis (k) or, when the
    whole axis is kept (sort), the same one. Other axes pass through."""
    info = ctx.tensor(ctx.spec("input"))
    nd = len(info.dims)
    d = _norm_dim(int(ctx.value(ctx.spec("dim"), -1)), nd) if nd else 0
    shape = tuple(_results(ctx)[0].shape)  # values and indices have the same axes
    if not nd:
        return _pack(ctx, [TensorInfo((), shape) for _ in _results(ctx)])
    ctx.ds.fix(info.dims[d], f"an axis {ctx.spec('why')} by {ctx.rule.name}")
    dims = list(info.dims)
    if len(shape) == nd:
        if shape[d] != info.shape[d]:
            dims[d] = ctx.ds.new(shape[d], f"{ctx.node.name}[{d}]")
            ctx.ds.fix(dims[d], f"the k of {ctx.rule.name}")
    else:  # kthvalue without keepdim: the axis is removed
        del dims[d]
    return _pack(ctx, [TensorInfo(tuple(dims), shape) for _ in _results(ctx)])


@kind("one_hot", input=Key("ref", default="input"))
def kind_one_hot(ctx: Call) -> Info:
    """``one_hot(i, num_classes)``: the index's axes, plus a new fixed trailing axis of classes."""
    info = ctx.tensor(ctx.spec("input"))
    shape = tuple(ctx.result.shape)
    classes = ctx.ds.new(shape[-1], f"{ctx.node.name} classes")
    ctx.ds.fix(classes, "the classes of one_hot")
    return TensorInfo(info.dims + (classes,), shape)


def _fix_indexed(ctx: Call, dims: tuple[int, ...], d: int, what: str) -> None:
    ctx.ds.fix(dims[d], f"an axis {what} by a tensor of positions ({ctx.rule.name})")


def _match(ctx: Call, a: TensorInfo, b: TensorInfo, skip: int, why: str) -> None:
    """Same-position axes of two same-rank tensors (all but ``skip``): related where the sizes agree;
    where one is shorter only its leading part takes part, which cannot grow, so both are fixed."""
    for k in range(min(len(a.dims), len(b.dims))):
        if k == skip:
            continue
        if a.shape[k] == b.shape[k]:
            ctx.ds.union(a.dims[k], b.dims[k], f"{ctx.rule.name} at {ctx.where()}")
        else:
            ctx.ds.fix(a.dims[k], f"{why} ({ctx.rule.name} reads only a leading part)")
            ctx.ds.fix(b.dims[k], f"{why} ({ctx.rule.name} reads only a leading part)")


@kind("gather_along", input=Key("ref", default="input"), dim=Key("ref", default="dim"),
      index=Key("ref", default="index"))
def kind_gather_along(ctx: Call) -> Info:
    """``gather(x, dim, index)``: out[..i..] = x[..index[..i..]..] along ``dim``, so ``x``'s axis ``dim``
    is fixed; the result has the index's axes, which match ``x``'s elsewhere (position by position)."""
    info = ctx.tensor(ctx.spec("input"))
    index = ctx.tensor(ctx.spec("index"))
    nd = len(info.dims)
    d = _norm_dim(int(ctx.value(ctx.spec("dim"))), nd) if nd else 0
    if nd:
        _fix_indexed(ctx, info.dims, d, "gathered from")
    _match(ctx, info, index, d, "an axis gathered partly")
    return TensorInfo(index.dims, tuple(ctx.result.shape))


@kind("scatter_along", input=Key("ref", default="input"), dim=Key("ref", default="dim"),
      index=Key("ref", default="index"), src=Key("ref", default="src|source|value"),
      vector_index=Key("bool", default=False,
                       doc="index is one position per slice along dim (index_add/index_copy), not a "
                           "tensor of the input's rank (scatter)"))
def kind_scatter_along(ctx: Call) -> Info:
    """scatter / scatter_add / scatter_reduce / index_add / index_copy / index_fill: entries of ``src``
    are written (or added) into ``input`` at positions along ``dim``. The result has ``input``'s axes;
    ``input``'s axis ``dim`` is fixed (it is indexed), and so is the source's axis ``dim`` (its entries
    are sent to positions: k copies of it would be added k times). Other axes match position by position."""
    info = ctx.tensor(ctx.spec("input"))
    nd = len(info.dims)
    d = _norm_dim(int(ctx.value(ctx.spec("dim"))), nd) if nd else 0
    index = ctx.info(ctx.spec("index"))
    src = ctx.info(ctx.spec("src"))
    if nd:
        _fix_indexed(ctx, info.dims, d, "scattered into")
    if isinstance(index, TensorInfo) and index.dims:
        if ctx.spec("vector_index"):  # one position per slice: its axis enumerates the source's slices
            ctx.ds.fix(index.dims[0], f"an axis of the positions given to {ctx.rule.name}")
        elif len(index.dims) == nd:
            ctx.ds.fix(index.dims[d], f"an axis of the positions given to {ctx.rule.name}")
            _match(ctx, info, index, d, "an axis scattered partly")
    if isinstance(src, TensorInfo) and len(src.dims) == nd:
        ctx.ds.fix(src.dims[d], f"an axis whose entries {ctx.rule.name} sends to positions")
        if ctx.spec("vector_index"):
            _match(ctx, info, src, d, "an axis scattered partly")
        elif isinstance(index, TensorInfo):
            _match(ctx, index, src, d, "an axis scattered partly")
    return TensorInfo(info.dims, tuple(ctx.result.shape))


@kind("count", input=Key("ref", default="input"))
def kind_count(ctx: Call) -> Info:
    """Counts and positions (nonzero, bincount, histc, unique, single-argument where): the result's size
    depends on how many entries there are, so every axis of the input is fixed, and the result's axes
    are new fixed ones."""
    ctx.tensor(ctx.spec("input"))  # must be a tensor graphscale can describe
    return _count_positions(ctx)


def _count_positions(ctx: Call) -> Info:
    """The relations of :func:`kind_count`, for any op whose results count or locate entries of its
    tensor arguments (also the one-argument ``torch.where(mask)``, which the elementwise rule covers)."""
    for arg in ctx.arg_infos():  # the input, and bincount's weights (summed per bin)
        for x in arg.dims if isinstance(arg, TensorInfo) else ():
            ctx.ds.fix(x, f"an axis whose entries {ctx.rule.name} counts or locates")
    infos = []
    for r in _results(ctx):
        dims = ctx.fresh(tuple(r.shape))
        for x in dims:
            ctx.ds.fix(x, f"an axis made by {ctx.rule.name} (a count or positions)")
        infos.append(TensorInfo(dims, tuple(r.shape)))
    return _pack(ctx, infos)


@kind("put_at", input=Key("ref", default="input"), indices=Key("ref", default="indices"),
      values=Key("ref", default="values"))
def kind_put_at(ctx: Call) -> Info:
    """``index_put(x, indices, values)`` (``x[i0, :, mask] = values``; with ``accumulate``, ``+=``):
    ``values`` is written at the positions the index tensors give. The result has ``x``'s axes. Each axis
    of ``x`` an index reaches is fixed (a boolean mask reaches as many axes as it has), and so is every
    axis of the index tensors (positions). ``values`` broadcasts, from the right, to ``x[indices]``:
    the index axes there are fixed (entries sent to positions; ``k`` copies would land on one), and each
    axis of ``x`` kept whole matches the ``values`` axis it meets, unless that one broadcasts (size 1)."""
    info = ctx.tensor(ctx.spec("input"))
    indices = ctx.value(ctx.spec("indices"))
    index_infos = ctx.info(ctx.spec("indices"))
    nd = len(info.dims)
    kept: list[int] = []  # the axes of x no index reaches
    first: int | None = None  # how many kept axes come before the first index
    last_gap = False  # whether a kept axis lies between two indices (their axes then go first)
    n_index = 0  # how many axes the indices make in x[indices] (broadcast; a mask makes one)
    axis = 0
    for it in indices:
        if it is None:
            kept.append(axis)
            axis += 1
            continue
        mask = it.dtype in (torch.bool, torch.uint8)
        span = it.dim() if mask else 1
        if first is None:
            first = len(kept)
        elif len(kept) > first:
            last_gap = True
        n_index = max(n_index, 1 if mask else it.dim())
        for k in range(axis, axis + span):
            ctx.ds.fix(info.dims[k], f"an axis indexed by a tensor of positions ({ctx.rule.name})")
        axis += span
    kept += list(range(axis, nd))
    for idx in index_infos if isinstance(index_infos, tuple) else ():
        for x in idx.dims if isinstance(idx, TensorInfo) else ():
            ctx.ds.fix(x, f"an axis of the positions given to {ctx.rule.name}")
    split = 0 if first is None or last_gap else first
    arranged: list[int | None] = [*kept[:split], *[None] * n_index, *kept[split:]]
    values = ctx.info(ctx.spec("values"))
    if isinstance(values, TensorInfo):
        offset = len(arranged) - len(values.dims)
        for j, vd in enumerate(values.dims):
            slot = arranged[offset + j] if offset + j >= 0 else None
            if slot is None:
                ctx.ds.fix(vd, f"an axis whose entries {ctx.rule.name} sends to positions")
            elif values.shape[j] == info.shape[slot]:
                ctx.ds.union(vd, info.dims[slot], f"{ctx.rule.name} at {ctx.where()}")
            elif values.shape[j] != 1:
                ctx.ds.fix(vd, f"an axis {ctx.rule.name} broadcasts")
    return TensorInfo(info.dims, tuple(ctx.result.shape))
