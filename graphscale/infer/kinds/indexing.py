"""Concatenation, splitting and indexing: axes related to their parts; slice bounds rewritten."""

from __future__ import annotations

import sys
from typing import Any

import torch

from graphscale.errors import UnsupportedOpError
from graphscale.infer.call import Call
from graphscale.infer.kinds._common import (
    _norm_dim,
    _view_param,
)
from graphscale.infer.schema import Key, kind
from graphscale.infer.values import (
    Const,
    Info,
    Opaque,
    ScalarSize,
    ShapeEntries,
    SliceBounds,
    TensorInfo,
)


@kind("cat", tensors=Key("ref", default="tensors"), dim=Key("ref", default="dim|axis"))
def kind_cat(ctx: Call) -> Info:
    """Concatenation: the joined axis is the concatenation of the parts' axes."""
    parts = [i for i in ctx.info(ctx.spec("tensors")) if isinstance(i, TensorInfo)]
    out_shape = tuple(ctx.result.shape)
    nd = len(out_shape)
    d = _norm_dim(int(ctx.value(ctx.spec("dim"), 0)), nd)
    parts = [p for p in parts if len(p.shape) == nd]  # torch.cat skips legacy empty 1-d tensors
    dims = list(parts[0].dims)
    for p in parts[1:]:
        for k in range(nd):
            if k != d:
                ctx.ds.union(dims[k], p.dims[k], f"cat at {ctx.where()}")
    joined = ctx.ds.new(out_shape[d], f"{ctx.node.name}[{d}]")
    ctx.ds.concat(joined, [p.dims[d] for p in parts if p.shape[d] > 0], f"cat at {ctx.where()}")
    dims[d] = joined
    return TensorInfo(tuple(dims), out_shape)


@kind("stack", tensors=Key("ref", default="tensors"), dim=Key("ref", default="dim"))
def kind_stack(ctx: Call) -> Info:
    """Stacking: equal axes, plus a new fixed axis."""
    parts = [i for i in ctx.info(ctx.spec("tensors")) if isinstance(i, TensorInfo)]
    out_shape = tuple(ctx.result.shape)
    d = _norm_dim(int(ctx.value(ctx.spec("dim"), 0)), len(out_shape))
    dims = list(parts[0].dims)
    for p in parts[1:]:
        for a, b in zip(dims, p.dims):
            ctx.ds.union(a, b, f"stack at {ctx.where()}")
    new = ctx.ds.new(out_shape[d], f"{ctx.node.name}[{d}]")
    ctx.ds.fix(new, "an axis created by stack")
    dims.insert(d, new)
    return TensorInfo(tuple(dims), out_shape)


@kind("split", input=Key("ref", default="input"), dim=Key("ref", default="dim"),
      sizes=Key("ref", doc="the split sizes argument to rewrite"),
      unbind=Key("bool", default=False, doc="the op removes the axis (unbind)"))
def kind_split(ctx: Call) -> Info:
    """split/chunk/unbind: the axis is the concatenation of the parts."""
    info = ctx.tensor(ctx.spec("input"))
    outs = list(ctx.result)
    nd = len(info.dims)
    if ctx.spec("unbind"):
        d = _norm_dim(int(ctx.value(ctx.spec("dim"), 0)), nd)
        ctx.ds.fix(info.dims[d], "an axis taken apart by unbind")
        rest = info.dims[:d] + info.dims[d + 1:]
        return tuple(TensorInfo(rest, tuple(o.shape)) for o in outs)
    d = _norm_dim(int(ctx.value(ctx.spec("dim"), 0)), nd)
    part_dims = [ctx.ds.new(o.shape[d], f"{ctx.node.name}[{i}][{d}]") for i, o in enumerate(outs)]
    ctx.ds.concat(info.dims[d], part_dims, f"split at {ctx.where()}")
    size_ref = ctx.spec("sizes")
    if size_ref is not None:
        loc = ctx.loc(size_ref)
        sizes = ctx.value(size_ref)
        if loc is not None and loc[0] in ("pos", "kw") and isinstance(sizes, int):
            for p in part_dims[1:-1]:  # equal chunks; the last may be shorter
                ctx.ds.union(part_dims[0], p, f"split at {ctx.where()}")
            if len(part_dims) > 1 and outs[-1].shape[d] == outs[0].shape[d]:
                ctx.ds.union(part_dims[0], part_dims[-1], f"split at {ctx.where()}")
            ctx.requests.scalars.append(ScalarSize(ctx.node.name, loc, part_dims[0]))  # type: ignore[arg-type]
        elif loc is not None and loc[0] in ("pos", "kw"):
            ctx.requests.shapes.append(ShapeEntries(ctx.node.name, loc,  # type: ignore[arg-type]
                                                    tuple((k, p) for k, p in enumerate(part_dims))))
    result = []
    for o, p in zip(outs, part_dims):
        dims = info.dims[:d] + (p,) + info.dims[d + 1:]
        # a part of a parameter is still that parameter, axis for axis (a packed q|k|v weight split
        # before its linears): the contraction then takes its fan-in from it, as from the whole tensor
        result.append(TensorInfo(dims, tuple(o.shape), info.param))
    return tuple(result)


#: a stop at least this large means "to the end" (torch.export writes ``x[1:]`` with end = sys.maxsize)
_UNBOUNDED = sys.maxsize // 2


def _slice_part(ctx: Call, dim: int, size: int, start: int | None, stop: int | None,
                step: int | None, out_size: int) -> tuple[int, int | None, int] | None:
    """Relate a slice to its axis; returns (part, before, span) or None for a full slice. The slice's
    bounds are rewritten to ``[wide(before), wide(before) + wide(span))``."""
    if step not in (None, 1):
        got = _stepped_part(ctx, dim, size, start, step, out_size)
        if got is None:
            ctx.ds.fix(dim, "an axis sliced with a step")
        return got
    lo = 0 if start is None else (start + size if start < 0 else min(start, size))
    hi = size if stop is None else (stop + size if stop < 0 else min(stop, size))
    lo, hi = max(lo, 0), max(hi, lo)
    if lo == 0 and hi == size:
        if start in (None, 0) and (stop is None or stop >= _UNBOUNDED):
            return None
        # the whole axis, but its bounds are written out (cat(...)[:, :n] with n the whole size, x[-n:]):
        # they must become the wide axis's, or the wide slice would keep the narrow size
        return dim, None, dim
    part = ctx.ds.new(out_size, f"{ctx.node.name} slice")
    pieces, before = [], None
    if lo > 0:
        before = ctx.ds.new(lo, f"{ctx.node.name} before")
        pieces.append(before)
    pieces.append(part)
    if hi < size:
        pieces.append(ctx.ds.new(size - hi, f"{ctx.node.name} after"))
    ctx.ds.concat(dim, pieces, f"slice at {ctx.where()}")
    return part, before, part


def _stepped_part(ctx: Call, dim: int, size: int, start: int | None, step: int,
                  out_size: int) -> tuple[int, int | None, int] | None:
    """``x[j::s]`` over a whole axis of ``n x s`` elements (``j < s``): the axis is the row-major product
    ``(n) x (s)`` and the slice takes position ``j`` of the inner factor (an interleaved pair's halves,
    ``x[..., ::2]`` / ``x[..., 1::2]``). Replicating the outer factor commutes with it; the stride ``s``
    is fixed. Other stepped slices: None (the caller fixes the axis)."""
    lo = 0 if start is None else (start + size if start < 0 else start)
    if step <= 1 or size % step or not 0 <= lo < step or out_size != size // step:
        return None
    outer = ctx.ds.new(out_size, f"{ctx.node.name} every {step}th")
    stride = ctx.ds.new(step, f"{ctx.node.name} stride")
    ctx.ds.fix(stride, "the stride of a stepped slice")
    ctx.ds.prod(dim, [outer, stride], f"stepped slice at {ctx.where()}")
    before = None
    if lo:
        before = ctx.ds.new(lo, f"{ctx.node.name} offset")
        ctx.ds.fix(before, "the offset of a stepped slice")
    return outer, before, dim


@kind("getitem")
def kind_getitem(ctx: Call) -> Info:
    """``x[...]`` on a tensor, or picking an item of a tuple (split outputs, sizes)."""
    container = ctx.info("input")
    index = ctx.value("index|b")
    if isinstance(container, tuple):
        return container[index] if not isinstance(index, slice) else tuple(container[index])
    if not isinstance(container, TensorInfo):
        if isinstance(ctx.result, torch.Tensor):  # a tensor out of something the walk cannot describe
            return Opaque(ctx.node.name, "a tensor taken out of a value graphscale cannot describe")
        return Const(ctx.result)
    return _tensor_index(ctx, container, index)


def _tensor_index(ctx: Call, info: TensorInfo, index: Any) -> Info:
    written = list(index) if isinstance(index, tuple) else [index]
    # (position in the index as written, item): Ellipsis and the implicit trailing ":" expand into full
    # slices with no position, so a rewritten slice bound lands where the user wrote it
    entries: list[tuple[int | None, Any]] = list(enumerate(written))
    n_real = sum(1 for it in written if it is not None and it is not Ellipsis)
    if Ellipsis in written:
        k = written.index(Ellipsis)
        entries = entries[:k] + [(None, slice(None))] * (len(info.dims) - n_real) + entries[k + 1:]
    entries += [(None, slice(None))] * (len(info.dims) - sum(1 for _, it in entries if it is not None))
    items = [it for _, it in entries]
    out_shape = tuple(ctx.result.shape)
    dims: list[int] = []
    axis = 0
    tensor_seen = False
    for (pos, it) in entries:
        if it is None:
            dims.append(ctx.ds.new(1, f"{ctx.node.name} new axis"))
        elif isinstance(it, slice):
            d, size = info.dims[axis], info.shape[axis]
            out_size = len(range(*it.indices(size)))
            got = _slice_part(ctx, d, size, it.start, it.stop, it.step, out_size)
            if got is None:
                dims.append(d if out_size == size else _stepped(ctx, out_size))
            else:
                dims.append(got[0])
                ctx.requests.slices.append(SliceBounds(ctx.node.name, None, pos, got[1], got[2]))
            axis += 1
        elif isinstance(it, int):
            ctx.ds.fix(info.dims[axis], "an axis indexed at one position")
            axis += 1
        elif isinstance(it, torch.Tensor):
            ctx.ds.fix(info.dims[axis], "an axis indexed by a tensor")
            if not tensor_seen:
                tensor_seen = True
                shape = torch.broadcast_shapes(*(t.shape for t in items if isinstance(t, torch.Tensor)))
                dims.extend(ctx.fresh(tuple(shape), f"{ctx.node.name} index"))
            axis += 1
        else:
            raise UnsupportedOpError(f"{ctx.where()}: indexing with {type(it).__name__} is not supported")
    if len(dims) != len(out_shape) or any(ctx.ds.size[d] != s for d, s in zip(dims, out_shape)):
        dims = list(ctx.fresh(out_shape))
        for d in dims:
            ctx.ds.fix(d, "an axis produced by advanced indexing")
        return TensorInfo(tuple(dims), out_shape)
    # rows of a parameter picked by tensors along fixed axes (an MoE's experts, w[expert_ids]), every
    # other axis kept whole: each entry is an entry of the parameter, so a contraction with it absorbs
    # its fan-in into the parameter as for the parameter itself
    whole = tensor_seen and all(isinstance(it, torch.Tensor) or it == slice(None) for it in items)
    return TensorInfo(tuple(dims), out_shape, _view_param(info, tuple(dims)) if whole else None)


@kind("slice")
def kind_slice(ctx: Call) -> Info:
    """``aten.slice.Tensor(x, dim, start, end, step)``."""
    info = ctx.tensor("input")
    nd = len(info.dims)
    d = _norm_dim(int(ctx.value("dim", 0)), nd)
    start, end, step = ctx.value("start"), ctx.value("end"), ctx.value("step", 1)
    out_shape = tuple(ctx.result.shape)
    got = _slice_part(ctx, info.dims[d], info.shape[d], start, end, step, out_shape[d])
    dims = list(info.dims)
    if got is not None:
        dims[d] = got[0]
        ctx.requests.slices.append(SliceBounds(ctx.node.name, ("pos", 2), None, got[1], got[2]))
    elif out_shape[d] != info.shape[d]:
        dims[d] = _stepped(ctx, out_shape[d])
    return TensorInfo(tuple(dims), out_shape, _view_param(info, tuple(dims)))


def _stepped(ctx: Call, size: int) -> int:
    """The axis a stepped slice (``x[0::2]``) makes: fixed like the axis it strides over, since its
    size is read off that axis's narrow size (a fresh unconstrained axis could be widened alone)."""
    d = ctx.ds.new(size, ctx.node.name)
    ctx.ds.fix(d, "an axis made by a slice with a step")
    return d


@kind("select", dim=Key("ref", default="dim"))
def kind_select(ctx: Call) -> Info:
    """One position of an axis: the axis is fixed and removed."""
    info = ctx.tensor("input")
    d = _norm_dim(int(ctx.value(ctx.spec("dim"))), len(info.dims))
    ctx.ds.fix(info.dims[d], "an axis indexed at one position")
    return TensorInfo(info.dims[:d] + info.dims[d + 1:], tuple(ctx.result.shape))


@kind("index_select")
def kind_index_select(ctx: Call) -> Info:
    """Positions of an axis picked by a tensor: the axis is fixed."""
    info = ctx.tensor("input")
    d = _norm_dim(int(ctx.value("dim")), len(info.dims))
    ctx.ds.fix(info.dims[d], "an axis indexed by a tensor")
    dims = list(info.dims)
    dims[d] = ctx.ds.new(ctx.result.shape[d], ctx.node.name)
    return TensorInfo(tuple(dims), tuple(ctx.result.shape))


@kind("index")
def kind_index(ctx: Call) -> Info:
    """``aten.index.Tensor(x, [i0, None, i2])``: advanced indexing with a list of index tensors."""
    info = ctx.tensor("input")
    indices = ctx.value("indices")
    items = [slice(None) if i is None else i for i in indices]
    return _tensor_index(ctx, info, tuple(items))


def _check_carry(spec: Any, targets: list[str]) -> list[tuple[str, str]]:
    if any(a < -1 for a in spec.get("axes", ())):
        return [("axes", "each entry is an input axis (>= 0) or -1 (a fixed axis of the output)")]
    return []


@kind("carry_axes", check=_check_carry,
      input=Key("ref", required=True, doc="the tensor whose axes the output carries"),
      axes=Key("ints", required=True, doc="per output axis: the input axis it equals, or -1 (fixed)"))
def kind_carry_axes(ctx: Call) -> Info:
    """An opaque lookup that carries some axes of one input unchanged (a table gathered by an index and
    rearranged): each output axis equals the input axis ``axes`` names, or is fixed (-1); the input's
    axes the output does not carry are fixed (they were indexed)."""
    info = ctx.tensor(ctx.spec("input"))
    out_shape = tuple(ctx.result.shape)
    axes = ctx.spec("axes")
    if len(axes) != len(out_shape) or any(a >= len(info.dims) for a in axes):
        raise UnsupportedOpError(f"{ctx.where()}: rule {ctx.rule.name!r} maps {len(axes)} output axes onto "
                                 f"an input of rank {len(info.dims)}, but the op returned shape "
                                 f"{list(out_shape)}; the rule's axes do not describe this call")
    dims: list[int] = []
    for k, a in enumerate(axes):
        if a >= 0 and info.shape[a] == out_shape[k]:
            dims.append(info.dims[a])
        elif a >= 0:
            raise UnsupportedOpError(f"{ctx.where()}: rule {ctx.rule.name!r} says output axis {k} is input "
                                     f"axis {a}, but their sizes differ ({out_shape[k]} vs {info.shape[a]})")
        else:
            d = ctx.ds.new(out_shape[k], f"{ctx.node.name}[{k}]")
            ctx.ds.fix(d, f"an axis made by {ctx.rule.name}")
            dims.append(d)
    for a, d in enumerate(info.dims):
        if a not in axes:
            ctx.ds.fix(d, f"an axis looked up by {ctx.rule.name}")
    return TensorInfo(tuple(dims), out_shape)
