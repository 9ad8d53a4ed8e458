"""Scaled dot-product attention: q.k contracts head_dim, whose growth the scale absorbs."""

from __future__ import annotations

from graphscale.infer.call import Call
from graphscale.infer.kinds._common import (
    _broadcast,
)
from graphscale.infer.schema import kind
from graphscale.infer.values import (
    AttentionScale,
    Info,
    TensorInfo,
)


@kind("sdpa")
def kind_sdpa(ctx: Call) -> Info:
    """``scaled_dot_product_attention``: q.k contracts head_dim (an activation contraction: the scale
    absorbs its growth), the attention weights contract the key sequence (fixed)."""
    q, k, v = (ctx.tensor(r) for r in ("query", "key", "value"))
    ds, where = ctx.ds, f"attention at {ctx.where()}"
    ds.union(q.dims[-1], k.dims[-1], where)
    ds.union(k.dims[-2], v.dims[-2], where)
    gqa = bool(ctx.value("enable_gqa", False)) and len(q.dims) >= 3 and q.shape[-3] != k.shape[-3]
    lead_q = list(q.dims[:-2])
    if gqa:
        rep = ds.new(q.shape[-3] // k.shape[-3], f"{ctx.node.name}.n_rep")
        ds.fix(rep, "the query heads per key/value head (GQA)")
        ds.prod(q.dims[-3], [k.dims[-3], rep], where)
        kv_lead = TensorInfo(k.dims[:-3] + (q.dims[-3],), k.shape[:-3] + (q.shape[-3],))
    else:
        kv_lead = TensorInfo(k.dims[:-2], k.shape[:-2])
    out_shape = tuple(ctx.result.shape)
    lead = _broadcast(ctx, out_shape[:-2], [TensorInfo(tuple(lead_q), q.shape[:-2]), kv_lead,
                                            TensorInfo(v.dims[:-2], v.shape[:-2])] if not gqa else
                      [TensorInfo(tuple(lead_q), q.shape[:-2])])
    mask = ctx.info("attn_mask")
    if isinstance(mask, TensorInfo):
        _broadcast(ctx, out_shape[:-1] + (k.shape[-2],),
                   [mask, TensorInfo(lead + (q.dims[-2], k.dims[-2]), out_shape[:-1] + (k.shape[-2],))])
    ctx.requests.scales.append(AttentionScale(ctx.node.name, q.dims[-1], q.shape[-1]))
    return TensorInfo(lead + (q.dims[-2], v.dims[-1]), out_shape)
