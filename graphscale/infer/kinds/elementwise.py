"""Elementwise ops and broadcasting: aligned axes are equal."""

from __future__ import annotations

import torch

from graphscale.infer.call import Call
from graphscale.infer.kinds._common import (
    _broadcast,
    _view_param,
)
from graphscale.infer.schema import Key, kind
from graphscale.infer.values import (
    Const,
    Info,
    SizeInfo,
    TensorInfo,
)


@kind("elementwise",
      view=Key("bool", default=False, doc="the op returns its input unchanged (a parameter stays one)"),
      warn=Key("str", doc="a note added to the plan when the op runs in training mode"),
      training=Key("ref", default="training|train", doc="the argument saying training mode"))
def kind_elementwise(ctx: Call) -> Info:
    """Elementwise ops and broadcasting: aligned axes are equal."""
    infos: list[TensorInfo] = []
    sizes: list[SizeInfo] = []
    for i in ctx.arg_infos():
        if isinstance(i, TensorInfo):
            infos.append(i)
        elif isinstance(i, SizeInfo):
            sizes.append(i)
    if ctx.spec("warn") and _training(ctx):
        ctx.requests.warnings.append(f"{ctx.where()}: {ctx.spec('warn')}")
    result = ctx.result
    if isinstance(result, tuple | list) and result and all(isinstance(r, torch.Tensor) for r in result):
        from graphscale.infer.kinds.routing import _count_positions  # torch.where(mask): positions

        return _count_positions(ctx)
    if not isinstance(result, torch.Tensor):
        if isinstance(result, int) and sizes:
            return SizeInfo(result, None)  # arithmetic on sizes: a derived int, not a size read
        return Const(result)
    dims = _broadcast(ctx, tuple(result.shape), infos)
    param = None
    if ctx.spec("view") and infos and infos[0].param is not None:
        param = _view_param(infos[0], dims)
    return TensorInfo(dims, tuple(result.shape), param)


def _training(ctx: Call) -> bool:
    if ctx.module is not None:
        return ctx.module.training
    return bool(ctx.value(ctx.spec("training"), None))
