"""Layout: reshapes (products of axes, rewritten literal sizes), permutes, transposes, expand, repeat."""

from __future__ import annotations

import math

from graphscale.errors import UnsupportedOpError
from graphscale.infer.call import Call
from graphscale.infer.kinds._common import (
    _dims_arg,
    _norm_dim,
    _shape_request,
    _view_param,
)
from graphscale.infer.schema import Key, kind
from graphscale.infer.values import (
    Info,
    TensorInfo,
)


def _reshape_groups(ctx: Call, info: TensorInfo, out_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Relate a reshape's input and output axes by grouping equal running products."""
    ds, where = ctx.ds, f"reshape at {ctx.where()}"
    ins = [(d, s) for d, s in zip(info.dims, info.shape) if s != 1]
    out_dims: list[int | None] = [None] * len(out_shape)
    outs = [(j, s) for j, s in enumerate(out_shape) if s != 1]
    i = j = 0
    while i < len(ins) or j < len(outs):
        gi, gj = [ins[i]] if i < len(ins) else [], [outs[j]] if j < len(outs) else []
        i, j = i + len(gi), j + len(gj)
        pi, pj = math.prod(s for _, s in gi), math.prod(s for _, s in gj)
        while pi != pj:
            if pi < pj and i < len(ins):
                gi.append(ins[i])
                i += 1
                pi *= ins[i - 1][1]
            elif pj < pi and j < len(outs):
                gj.append(outs[j])
                j += 1
                pj *= outs[j - 1][1]
            else:
                raise UnsupportedOpError(f"{ctx.where()}: cannot relate reshape {info.shape} -> {out_shape}")
        if len(gi) == 1 and len(gj) == 1:
            out_dims[gj[0][0]] = gi[0][0]
            continue
        new = [ds.new(s, f"{ctx.node.name}[{jj}]") for jj, s in gj]
        for (jj, _), d in zip(gj, new):
            out_dims[jj] = d
        if len(gi) == 1:
            ds.prod(gi[0][0], new, where)
        elif len(gj) == 1:
            ds.prod(new[0], [d for d, _ in gi], where)
        else:
            mid = ds.new(pi, f"{ctx.node.name} (merged)")
            ds.prod(mid, [d for d, _ in gi], where)
            ds.prod(mid, new, where)
    return tuple(d if d is not None else ds.new(1, f"{ctx.node.name}[{k}]") for k, d in enumerate(out_dims))


@kind("reshape", input=Key("ref", default="input"),
      shape=Key("ref", doc="the size argument to rewrite (absent: the op takes no sizes)"),
      shape_offset=Key("ref", doc="the axis where the sizes start (unflatten's dim)"))
def kind_reshape(ctx: Call) -> Info:
    """Reshapes relate axes by products; literal sizes of width axes are rewritten."""
    info = ctx.tensor(ctx.spec("input"))
    out_shape = tuple(ctx.result.shape)
    dims = _reshape_groups(ctx, info, out_shape)
    if ctx.spec("shape") is not None:
        _shape_request(ctx, ctx.spec("shape"), dims, ctx.spec("shape_offset"))
    return TensorInfo(dims, out_shape, _view_param(info, dims))


@kind("permute", input=Key("ref", default="input"), dims=Key("ref", default="dims"))
def kind_permute(ctx: Call) -> Info:
    """Axes move; a parameter seen through a permute stays that parameter."""
    info = ctx.tensor(ctx.spec("input"))
    order = _dims_arg(ctx.value(ctx.spec("dims")), len(info.dims))
    if order is None or sorted(order) != list(range(len(info.dims))):
        raise UnsupportedOpError(f"{ctx.where()}: cannot read the permutation of {ctx.rule.name!r}")
    dims = tuple(info.dims[k] for k in order)
    return TensorInfo(dims, tuple(ctx.result.shape), _view_param(info, dims))


@kind("transpose", input=Key("ref", default="input"), dim0=Key("ref", default="dim0|axis0"),
      dim1=Key("ref", default="dim1|axis1"))
def kind_transpose(ctx: Call) -> Info:
    """Two axes swap (``t()`` and friends: the last two)."""
    info = ctx.tensor(ctx.spec("input"))
    nd = len(info.dims)
    if nd < 2:
        return info
    d0 = _norm_dim(int(ctx.value(ctx.spec("dim0"), -2 if nd > 2 else 0)), nd)
    d1 = _norm_dim(int(ctx.value(ctx.spec("dim1"), -1)), nd)
    dims = list(info.dims)
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return TensorInfo(tuple(dims), tuple(ctx.result.shape), _view_param(info, tuple(dims)))


@kind("expand", input=Key("ref", default="input"), shape=Key("ref", doc="the size argument to rewrite"),
      like=Key("ref", default="other", doc="the tensor whose shape is copied (expand_as)"))
def kind_expand(ctx: Call) -> Info:
    """Broadcasting to a shape: axes it creates are fixed, or, for ``expand_as(other)``, are ``other``'s
    (a value constant along an axis stays the copy of itself when that axis is widened)."""
    info = ctx.tensor(ctx.spec("input"))
    like = ctx.info(ctx.spec("like")) if ctx.has(ctx.spec("like")) else None
    out_shape = tuple(ctx.result.shape)
    n, m = len(out_shape), len(info.shape)
    dims: list[int] = []
    for pos, size in enumerate(out_shape):
        k = m - n + pos
        if k >= 0 and info.shape[k] == size:
            dims.append(info.dims[k])
        elif isinstance(like, TensorInfo) and like.shape == out_shape:
            dims.append(like.dims[pos])
        else:
            d = ctx.ds.new(size, f"{ctx.node.name}[{pos}]")
            ctx.ds.fix(d, "an axis created by broadcasting (expand)")
            dims.append(d)
    if ctx.spec("shape") is not None:
        _shape_request(ctx, ctx.spec("shape"), tuple(dims))
    return TensorInfo(tuple(dims), out_shape)


@kind("repeat", input=Key("ref", default="input"), repeats=Key("ref", default="repeats"))
def kind_repeat(ctx: Call) -> Info:
    """``repeat`` tiles: a repeated axis is the concatenation of copies of the input axis."""
    info = ctx.tensor(ctx.spec("input"))
    reps = [int(r) for r in ctx.value(ctx.spec("repeats"))]
    out_shape = tuple(ctx.result.shape)
    lead = len(reps) - len(info.dims)
    dims: list[int] = []
    for pos, (r, size) in enumerate(zip(reps, out_shape)):
        k = pos - lead
        if k < 0 or info.shape[k] == 1 and r != 1:
            d = ctx.ds.new(size, f"{ctx.node.name}[{pos}]")
            ctx.ds.fix(d, "an axis created by repeat")
            dims.append(d)
        elif r == 1:
            dims.append(info.dims[k])
        else:
            d = ctx.ds.new(size, f"{ctx.node.name}[{pos}]")
            ctx.ds.concat(d, [info.dims[k]] * r, f"repeat at {ctx.where()}")
            dims.append(d)
    return TensorInfo(tuple(dims), out_shape)
