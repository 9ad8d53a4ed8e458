"""Interleaving repeats (``repeat_interleave`` with an int count): each element repeated ``r`` times in place.

``repeat_interleave(x, r, dim)`` makes output element ``i * r + j`` equal to input element ``i``: the output
axis is the row-major product ``(input axis) x (r)``, with the copy index innermost. That is a different
layout from ``repeat`` / ``cat`` (copies outermost: a concatenation). The copy axis is fixed (``r`` is a
count, not a width): interleaved rotary frequencies (``repeat_interleave(freqs, 2, -1)``) keep pairing
neighbours, and repeated key/value heads keep ``r`` queries per kv head while the kv heads (the input
axis) may grow. Replicating the input axis commutes with the op: ``[a, b, a, b]`` interleaved twice is
``[a, a, b, b, a, a, b, b]``, the replication of ``[a, a, b, b]``. With ``dim=None`` the input is
flattened first. With a tensor of per-entry counts (MoE token routing) the layout depends on the values:
the repeated axis and the result's axis are fixed.

Example:
    >>> import graphscale, torch
    >>> class M(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(16, 2)
    ...     def forward(self, x):
    ...         return self.b(torch.repeat_interleave(self.a(x), 2, dim=-1))
    >>> plan = graphscale.analyze(M(), (torch.randn(3, 4),))
    >>> [c.name for c in plan.width_classes]
    ['a.weight[0]']
"""

from __future__ import annotations

import math

from graphscale.infer.call import Call
from graphscale.infer.kinds._common import _norm_dim
from graphscale.infer.schema import Key, kind
from graphscale.infer.values import Info, ScalarSize, TensorInfo


@kind("repeat_interleave", input=Key("ref", default="input"), repeats=Key("ref", default="repeats"),
      dim=Key("ref", default="dim"), output_size=Key("ref", default="output_size"))
def kind_repeat_interleave(ctx: Call) -> Info:
    """The repeated axis is ``input axis x r`` (copy index innermost, fixed); other axes pass through."""
    info = ctx.tensor(ctx.spec("input"))
    reps = ctx.value(ctx.spec("repeats"))
    out_shape = tuple(ctx.result.shape)
    if isinstance(reps, bool) or not isinstance(reps, int):
        return _per_entry_counts(ctx, info, out_shape)
    where = f"repeat_interleave at {ctx.where()}"
    dim = ctx.value(ctx.spec("dim"))
    if dim is None:  # flattened first: one output axis, the row-major merge of every input axis
        src = ctx.ds.new(math.prod(info.shape), f"{ctx.node.name} (flattened input)")
        ctx.ds.prod(src, [d for d, s in zip(info.dims, info.shape) if s != 1], where)
        dims, axis = [ctx.ds.new(out_shape[0], f"{ctx.node.name}[0]")], 0
    else:
        axis = _norm_dim(int(dim), len(info.dims))
        src = info.dims[axis]
        dims = list(info.dims)
        dims[axis] = ctx.ds.new(out_shape[axis], f"{ctx.node.name}[{axis}]")
    copies = ctx.ds.new(reps, f"{ctx.node.name}[{axis}] copies")
    ctx.ds.fix(copies, "the repeat count of repeat_interleave")
    ctx.ds.prod(dims[axis], [src, copies], where)
    loc = ctx.loc(ctx.spec("output_size"))
    if loc is not None and loc[0] != "attr" and ctx.value(ctx.spec("output_size")) is not None:
        ctx.requests.scalars.append(ScalarSize(ctx.node.name, loc, dims[axis]))  # type: ignore[arg-type]
    return TensorInfo(tuple(dims), out_shape)


def _per_entry_counts(ctx: Call, info: TensorInfo, out_shape: tuple[int, ...]) -> Info:
    """Per-entry counts: the repeated axis (every axis without ``dim``) and the result's axis stay fixed."""
    dim = ctx.value(ctx.spec("dim"))
    axes = range(len(info.dims)) if dim is None else [_norm_dim(int(dim), len(info.dims))]
    for a in axes:
        ctx.ds.fix(info.dims[a], f"an axis repeated entry by entry by {ctx.rule.name} at {ctx.where()}")
    if dim is None:
        dims = ctx.fresh(out_shape)
        for x in dims:
            ctx.ds.fix(x, f"an axis made by {ctx.rule.name} with per-entry counts")
        return TensorInfo(dims, out_shape)
    d = _norm_dim(int(dim), len(info.dims))
    dims = list(info.dims)
    dims[d] = ctx.ds.new(out_shape[d], f"{ctx.node.name}[{d}]")
    ctx.ds.fix(dims[d], f"an axis made by {ctx.rule.name} with per-entry counts")
    return TensorInfo(tuple(dims), out_shape)
