"""Normalizations: statistics over width axes are means (invariant); affine parameters follow."""

from __future__ import annotations

from graphscale.infer.call import Call
from graphscale.infer.kinds._common import (
    _shape_request,
)
from graphscale.infer.schema import Key, kind
from graphscale.infer.values import (
    Info,
    ParamUse,
    ScalarSize,
    TensorInfo,
)


@kind("layer_norm", shape=Key("ref", default="normalized_shape"),
      params=Key("refs", default=["weight", "bias"]),
      module_shape=Key("ref", default="attr:normalized_shape"),
      module_params=Key("refs", default=["param:weight", "param:bias"]))
def kind_layer_norm(ctx: Call) -> Info:
    """LayerNorm / RMSNorm: statistics over the trailing ``normalized_shape`` axes (mean-like: invariant)."""
    module = ctx.module is not None
    info = ctx.tensor("input")
    norm_shape = ctx.value(ctx.spec("module_shape") if module else ctx.spec("shape"))
    norm_shape = [norm_shape] if isinstance(norm_shape, int) else list(norm_shape)
    n = len(norm_shape)
    tail = info.dims[len(info.dims) - n:]
    for ref in ctx.spec("module_params") if module else ctx.spec("params"):
        p = ctx.info(ref)
        if isinstance(p, TensorInfo):
            for a, b in zip(p.dims, tail):
                ctx.ds.union(a, b, f"normalization at {ctx.where()}")
            if p.param is not None:
                ctx.requests.uses.append(ParamUse(p.param[0], ctx.node.name, ()))
    if not module:
        _shape_request(ctx, ctx.spec("shape"), info.dims, align="trailing")
    result = ctx.result[0] if isinstance(ctx.result, tuple) else ctx.result
    out = TensorInfo(info.dims, tuple(result.shape))
    if isinstance(ctx.result, tuple):
        return (out,) + tuple(TensorInfo(ctx.fresh(tuple(r.shape)), tuple(r.shape)) for r in ctx.result[1:])
    return out


@kind("group_norm", groups=Key("ref", default="num_groups"), params=Key("refs", default=["weight", "bias"]),
      module_groups=Key("ref", default="attr:num_groups"),
      module_params=Key("refs", default=["param:weight", "param:bias"]))
def kind_group_norm(ctx: Call) -> Info:
    """GroupNorm: channels are groups x channels-per-group; statistics within a group are means."""
    module = ctx.module is not None
    info = ctx.tensor("input")
    groups_ref = ctx.spec("module_groups") if module else ctx.spec("groups")
    groups = int(ctx.value(groups_ref))
    c = info.dims[1]
    if groups > 1:
        g = ctx.ds.new(groups, f"{ctx.node.name}.groups")
        per = ctx.ds.new(info.shape[1] // groups, f"{ctx.node.name}.channels_per_group")
        ctx.ds.prod(c, [g, per], f"group norm at {ctx.where()}")
        loc = ctx.loc(groups_ref)
        if loc is not None and loc[0] != "varargs":
            ctx.requests.scalars.append(ScalarSize(ctx.node.name, loc, g))  # type: ignore[arg-type]
    for ref in ctx.spec("module_params") if module else ctx.spec("params"):
        p = ctx.info(ref)
        if isinstance(p, TensorInfo):
            ctx.ds.union(p.dims[0], c, f"group norm at {ctx.where()}")
            if p.param is not None:
                ctx.requests.uses.append(ParamUse(p.param[0], ctx.node.name, ()))
    return TensorInfo(info.dims, tuple(ctx.result.shape))
