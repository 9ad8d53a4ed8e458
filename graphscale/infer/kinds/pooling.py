"""Pooling and resizing over spatial axes (fixed by nature)."""

from __future__ import annotations

from graphscale.infer.call import Call
from graphscale.infer.schema import Key, kind
from graphscale.infer.values import (
    Info,
    TensorInfo,
)


@kind("pool", spatial=Key("int", default=2, doc="how many trailing axes are pooled"))
def kind_pool(ctx: Call) -> Info:
    """Pooling / resizing over the trailing ``spatial`` axes; the leading (batch, channel) axes pass."""
    info = ctx.tensor("input")
    spatial = int(ctx.spec("spatial"))
    out_shape = tuple(ctx.result[0].shape if isinstance(ctx.result, tuple) else ctx.result.shape)
    keep = info.dims[:len(info.dims) - spatial]
    new = ctx.fresh(out_shape[len(keep):], f"{ctx.node.name} pooled")
    for d in info.dims[len(keep):] + new:
        ctx.ds.fix(d, "a pooled spatial axis")
    out = TensorInfo(keep + new, out_shape)
    return (out, out) if isinstance(ctx.result, tuple) else out
