"""Padding (``F.pad``, ``aten.pad``, ``aten.constant_pad_nd``, the ``nn.*Pad*d`` modules).

``pad`` lists (before, after) amounts for the last axes, last axis first. An axis with no padding passes
through unchanged. A padded axis must be fixed: replicating a padded axis puts the padding between the
copies ([x, 0] copied is [x, 0, x, 0]), while padding the replicated axis puts it at the ends
([x, x, 0]), so the op is not replication-invariant over it and is refused if that axis is width.

Example:
    >>> import graphscale, torch
    >>> class M(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
    ...     def forward(self, x):  # x: (batch, time, 4); pad the time axis
    ...         return self.b(torch.nn.functional.pad(self.a(x).transpose(1, 2), (1, 2)).transpose(1, 2))
    >>> [c.name for c in graphscale.analyze(M(), (torch.randn(2, 5, 4),)).width_classes]
    ['a.weight[0]']
"""

from __future__ import annotations

from graphscale.errors import UnsupportedOpError
from graphscale.infer.call import Call
from graphscale.infer.schema import Key, kind
from graphscale.infer.values import Info, Refusal, TensorInfo


@kind("pad", input=Key("ref", default="input"), pad=Key("ref", default="pad"),
      module_pad=Key("ref", default="attr:padding"))
def kind_pad(ctx: Call) -> Info:
    """Padded axes get new fixed dimensions (refused if the input axis is width); others pass through."""
    info = ctx.tensor(ctx.spec("input"))
    pads = ctx.value(ctx.spec("module_pad") if ctx.module is not None else ctx.spec("pad"))
    pads = [pads] * 2 * len(info.dims) if isinstance(pads, int) else list(pads or ())
    nd = len(info.dims)
    if len(pads) % 2 or len(pads) // 2 > nd:
        raise UnsupportedOpError(f"{ctx.where()}: cannot read the padding {pads} of a {nd}-d tensor")
    out_shape = tuple(ctx.result.shape)
    dims = list(info.dims)
    for j in range(len(pads) // 2):
        axis = nd - 1 - j
        if int(pads[2 * j]) == 0 and int(pads[2 * j + 1]) == 0:
            continue
        ctx.requests.refusals.append(Refusal(
            ctx.node.name, info.dims[axis],
            f"{ctx.rule.name} pads it (by {pads[2 * j]}, {pads[2 * j + 1]}): a widened copy would carry the "
            "padding between copies instead of at the ends. Pad only fixed axes (time, space)"))
        new = ctx.ds.new(out_shape[axis], f"{ctx.node.name}[{axis}] padded")
        ctx.ds.fix(new, f"an axis padded by {ctx.rule.name}")
        dims[axis] = new
    return TensorInfo(tuple(dims), out_shape)
