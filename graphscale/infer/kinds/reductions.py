"""Reductions and ops along one axis: invariant (mean, max), compensated (sum) or refused."""

from __future__ import annotations

from graphscale.infer.call import Call
from graphscale.infer.kinds._common import (
    _check_choice,
    _dims_arg,
)
from graphscale.infer.kinds.elementwise import kind_elementwise
from graphscale.infer.schema import Key, kind
from graphscale.infer.values import (
    Info,
    OutputMultiplier,
    Refusal,
    TensorInfo,
)

_REDUCE_MODES = ("sum", "mean", "variance", "forbid", "index")


@kind("reduce", check=_check_choice("mode", _REDUCE_MODES), input=Key("ref", default="input"),
      dim=Key("ref", default="dim"), keepdim=Key("ref", default="keepdim"),
      correction=Key("ref", default="correction"), unbiased=Key("ref", default="unbiased"),
      mode=Key("str", default="mean", doc=f"one of {_REDUCE_MODES}"))
def kind_reduce(ctx: Call) -> Info:
    """Reductions: a mean or max over a width axis is invariant, a sum is compensated, others refused."""
    if ctx.has("other") and isinstance(ctx.info("other"), TensorInfo):
        return kind_elementwise(ctx)  # torch.min(x, y), aten.max.other: elementwise, not a reduction
    info = ctx.tensor(ctx.spec("input"))
    nd = len(info.dims)
    dims = _dims_arg(ctx.value(ctx.spec("dim")), nd)
    if dims is None or dims == []:
        dims = list(range(nd))
    keepdim = bool(ctx.value(ctx.spec("keepdim"), False))
    mode = ctx.spec("mode")
    if mode == "variance":
        corr = ctx.value(ctx.spec("correction"), None)
        unbiased = ctx.value(ctx.spec("unbiased"), None)
        exact = corr == 0 or unbiased is False
        mode = "mean" if exact else "forbid"
    reduced = [info.dims[k] for k in dims]
    if mode == "sum":
        ctx.requests.multipliers.append(OutputMultiplier(ctx.node.name, tuple(reduced),
                                                         f"{ctx.rule.name} sums over these axes"))
    elif mode == "forbid":
        for d in reduced:
            ctx.requests.refusals.append(Refusal(ctx.node.name, d,
                                                 f"{ctx.rule.name} over it is not replication-invariant"))
    elif mode == "index":  # argmax etc.: the result indexes the axis, so it cannot grow
        for d in reduced:
            ctx.requests.refusals.append(Refusal(ctx.node.name, d, f"{ctx.rule.name} returns positions"))
    out_dims = []
    for k in range(nd):
        if k in dims:
            if keepdim:
                out_dims.append(ctx.ds.new(1, f"{ctx.node.name}[{k}]"))
        else:
            out_dims.append(info.dims[k])
    results = ctx.result if isinstance(ctx.result, tuple) else (ctx.result,)
    infos = tuple(TensorInfo(tuple(out_dims), tuple(r.shape)) for r in results)
    return infos if isinstance(ctx.result, tuple) else infos[0]


@kind("along", check=_check_choice("mode", ("forbid", "allow")), input=Key("ref", default="input"),
      dim=Key("ref", default="dim"), mode=Key("str", default="forbid", doc="forbid or allow"),
      why=Key("str", default="along it is not replication-invariant", doc="the refusal's reason"),
      none_is_all=Key("bool", default=False,
                      doc="dim None means every axis (torch.roll of the flattened tensor), not none"))
def kind_along(ctx: Call) -> Info:
    """An op along one axis, or several (``dim`` a list: torch.roll's dims), that keeps the shape
    (softmax, cumsum, roll): refused if such an axis is width."""
    info = ctx.tensor(ctx.spec("input"))
    d = ctx.value(ctx.spec("dim"))
    if ctx.spec("mode") == "forbid":
        everything = ctx.spec("none_is_all") and (d is None or (isinstance(d, list | tuple) and not d))
        along = range(len(info.dims)) if everything else _dims_arg(d, len(info.dims)) or []
        for k in along:
            ctx.requests.refusals.append(Refusal(ctx.node.name, info.dims[k],
                                                 f"{ctx.rule.name} {ctx.spec('why')}"))
    return TensorInfo(info.dims, tuple(ctx.result.shape))
