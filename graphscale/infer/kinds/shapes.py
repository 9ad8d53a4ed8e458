"""Sizes, tensor attributes, created tensors, fixed-only ops and ignored ops."""

from __future__ import annotations

import torch

from graphscale.infer.call import Call
from graphscale.infer.kinds._common import (
    _norm_dim,
    _shape_request,
    _view_param,
)
from graphscale.infer.schema import Key, kind
from graphscale.infer.values import (
    Const,
    Info,
    Opaque,
    SizeInfo,
    TensorInfo,
)


@kind("size", dim=Key("ref", default="dim"))
def kind_size(ctx: Call) -> Info:
    """``x.size()``, ``x.size(d)``, ``aten.sym_size``: ints that measure a dimension."""
    info = ctx.tensor("input", " (reading its size)")
    d = ctx.value(ctx.spec("dim"))
    if isinstance(ctx.result, int) and d is not None:
        return SizeInfo(ctx.result, info.dims[_norm_dim(int(d), len(info.dims))])
    if isinstance(ctx.result, tuple | list | torch.Size):
        return tuple(SizeInfo(int(s), dm) for s, dm in zip(ctx.result, info.dims))
    return Const(ctx.result)


# attributes of a tensor that are plain constants (not tensors, not sizes)
_CONST_ATTRIBUTES = frozenset({
    "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_leaf", "is_sparse", "is_quantized",
    "is_meta", "is_mps", "is_xpu", "layout", "names", "is_nested", "itemsize", "nbytes", "is_cpu",
})


@kind("attribute", tolerates_opaque=True)
def kind_attribute(ctx: Call) -> Info:
    """``getattr(x, name)`` on a tensor: ``shape`` gives sizes; ``T``/``mT``/``H``/``mH`` are (conjugate)
    transposes and ``real``/``data`` the same axes, so a parameter read through them stays that
    parameter (a tied readout ``h @ emb.weight.T``); any other tensor-valued attribute is opaque."""
    info = ctx.info("input")
    name = ctx.value("name")
    result = ctx.result
    if isinstance(info, Opaque):
        if name in _CONST_ATTRIBUTES:  # x.dtype of an opaque tensor is still just a dtype
            return Const(result)
        ctx.tensor("input", f" (reading its {name!r})")  # a size use or a view of it: refused, naming both
    obj = ctx.value("input")
    if isinstance(info, tuple) and isinstance(obj, tuple) and len(info) == len(obj):
        # a named field of an op's tuple result (topk(...).indices, max(x, 1).values): that item
        for item_info, item in zip(info, obj):
            if item is result:
                return item_info
    if not isinstance(info, TensorInfo):
        if isinstance(result, torch.Tensor):
            return Opaque(ctx.node.name, f"attribute {name!r} of a value graphscale cannot describe")
        return Const(result)
    nd = len(info.dims)
    if name == "shape":
        return tuple(SizeInfo(int(s), dm) for s, dm in zip(result, info.dims))
    if name in _CONST_ATTRIBUTES:
        return Const(result)
    order: list[int] | None = None
    if name == "T" or name == "H" and nd <= 2:
        order = list(range(nd))[::-1]
    elif name in ("mT", "mH") and nd >= 2:
        order = list(range(nd - 2)) + [nd - 1, nd - 2]
    elif name in ("real", "data"):
        order = list(range(nd))
    if order is not None and isinstance(result, torch.Tensor) and \
            tuple(result.shape) == tuple(info.shape[k] for k in order):
        dims = tuple(info.dims[k] for k in order)
        return TensorInfo(dims, tuple(result.shape), _view_param(info, dims))
    if isinstance(result, torch.Tensor) or isinstance(result, tuple | list):
        return Opaque(ctx.node.name, f"tensor attribute {name!r}, which graphscale does not describe")
    return Const(result)


@kind("creation", shape=Key("ref", doc="the size argument to rewrite"),
      fixed=Key("bool", default=False, doc="the created axes are fixed (positions)"))
def kind_creation(ctx: Call) -> Info:
    """A tensor made from sizes: fresh axes (related later through its uses)."""
    out = ctx.result
    shape = tuple(out.shape)
    dims = ctx.fresh(shape)
    if ctx.spec("fixed"):
        for d in dims:
            ctx.ds.fix(d, f"an axis created by {ctx.rule.name}")
    if ctx.spec("shape") is not None:
        _shape_request(ctx, ctx.spec("shape"), dims)
    return TensorInfo(dims, shape)


@kind("like", input=Key("ref", default="input"))
def kind_like(ctx: Call) -> Info:
    """The same axes as the input."""
    info = ctx.tensor(ctx.spec("input"))
    return TensorInfo(info.dims, tuple(ctx.result.shape))


@kind("fixed")
def kind_fixed(ctx: Call) -> Info:
    """Ops that only make sense on fixed axes (positions, masks): every axis they touch is fixed."""
    for i in ctx.arg_infos():
        if isinstance(i, TensorInfo):
            for d in i.dims:
                ctx.ds.fix(d, f"an axis used by {ctx.rule.name}")
    if isinstance(ctx.result, torch.Tensor):
        dims = ctx.fresh(tuple(ctx.result.shape))
        for d in dims:
            ctx.ds.fix(d, f"an axis produced by {ctx.rule.name}")
        return TensorInfo(dims, tuple(ctx.result.shape))
    return Const(ctx.result)


@kind("ignore", tolerates_opaque=True)
def kind_ignore(ctx: Call) -> Info:
    """Assertions and guards: no value, no relation."""
    return Const(None)
