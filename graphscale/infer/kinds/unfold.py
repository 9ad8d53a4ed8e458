"""Sliding-window extraction (``F.unfold``, ``aten.im2col``): every window of the spatial axes, flattened.

``unfold(x, kernel_size)`` maps ``(N, C, *spatial)`` to ``(N, C * K, L)``: ``K`` is the number of
positions in one window and ``L`` the number of windows. Output row ``c * K + k`` is channel ``c`` at
window position ``k``, so the output's first axis is the row-major product ``(C) x (K)`` with the channel
outermost, and replicating the channels commutes with the op (each copy of a channel brings its ``K``
rows along). ``K`` and ``L`` are fixed (they count window positions); the spatial axes are fixed too,
since windows mix neighbouring positions along them.

Example:
    >>> import graphscale, torch
    >>> class M(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(24, 2)
    ...     def forward(self, x):  # x: (batch, time, 4); windows of 3 time steps over the 8 channels
    ...         h = self.a(x).transpose(1, 2).unsqueeze(-1)  # (batch, 8, time, 1)
    ...         cols = torch.nn.functional.unfold(h, (3, 1), padding=(1, 0))  # (batch, 8 * 3, time)
    ...         return self.b(cols.transpose(1, 2))
    >>> [c.name for c in graphscale.analyze(M(), (torch.randn(2, 5, 4),)).width_classes]
    ['a.weight[0]']
"""

from __future__ import annotations

from graphscale.errors import UnsupportedOpError
from graphscale.infer.call import Call
from graphscale.infer.schema import Key, kind
from graphscale.infer.values import Info, TensorInfo


@kind("unfold", input=Key("ref", default="input"))
def kind_unfold(ctx: Call) -> Info:
    """Channel axis -> ``channels x window`` (window fixed); spatial axes and the window count fixed."""
    info = ctx.tensor(ctx.spec("input"))
    out_shape = tuple(ctx.result.shape)
    batched = len(out_shape) == 3
    channel = 1 if batched else 0
    if len(info.dims) != channel + 3 or len(out_shape) != channel + 2:  # (N,) C, H, W -> (N,) C*K, L
        raise UnsupportedOpError(f"{ctx.where()}: {ctx.rule.name} of a {len(info.dims)}-d input to a "
                                 f"{len(out_shape)}-d output; graphscale reads (N, C, H, W) -> (N, C*K, L)")
    where = f"{ctx.rule.name} at {ctx.where()}"
    for axis in range(channel + 1, len(info.dims)):
        ctx.ds.fix(info.dims[axis], f"a spatial axis that {ctx.rule.name} cuts into windows")
    c = info.shape[channel]
    window = out_shape[channel] // c if c else 0
    if c == 0 or window * c != out_shape[channel]:
        raise UnsupportedOpError(f"{ctx.where()}: {ctx.rule.name} gives {out_shape[channel]} rows from {c} "
                                 "channels, not a multiple")
    dims = list(info.dims[:channel])
    rows = ctx.ds.new(out_shape[channel], f"{ctx.node.name}[{channel}]")
    k = ctx.ds.new(window, f"{ctx.node.name}[{channel}] window")
    ctx.ds.fix(k, f"the window positions of {ctx.rule.name}")
    ctx.ds.prod(rows, [info.dims[channel], k], where)
    count = ctx.ds.new(out_shape[-1], f"{ctx.node.name}[{len(out_shape) - 1}]")
    ctx.ds.fix(count, f"the window count of {ctx.rule.name}")
    return TensorInfo((*dims, rows, count), out_shape)
