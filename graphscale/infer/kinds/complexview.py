"""Complex views (``view_as_complex``, ``view_as_real``): a trailing (real, imaginary) pair of axis 2.

``view_as_complex`` reads the last axis of size 2 as one complex number, ``view_as_real`` splits each
complex number into that pair again. The pair axis is fixed (it is not a width: copying it would mix real
and imaginary parts); the other axes pass through, so complex rotary embeddings (Llama 4:
``view_as_complex(x.reshape(..., d/2, 2)) * polar(1, freqs)``) widen like interleaved ones.

Example:
    >>> import graphscale, torch
    >>> class M(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
    ...         self.register_buffer("freqs", torch.linspace(0.1, 1.0, 4))
    ...     def forward(self, x):
    ...         z = torch.view_as_complex(self.a(x).reshape(3, 4, 2))
    ...         rot = torch.polar(torch.ones_like(self.freqs), self.freqs)
    ...         return self.b(torch.view_as_real(z * rot).flatten(1))
    >>> [c.reason for c in graphscale.analyze(M(), (torch.randn(3, 4),), tracer="export").width_classes]
    ['2 fixed x 4 growing']
"""

from __future__ import annotations

from graphscale.errors import UnsupportedOpError
from graphscale.infer.call import Call
from graphscale.infer.kinds._common import _check_choice
from graphscale.infer.schema import Key, kind
from graphscale.infer.values import Info, TensorInfo


@kind("complex_view", check=_check_choice("to", ("complex", "real")), input=Key("ref", default="input"),
      to=Key("str", required=True, doc="'complex' (drops the trailing pair axis) or 'real' (adds it)"))
def kind_complex_view(ctx: Call) -> Info:
    """The trailing (real, imaginary) axis of size 2 is fixed; the other axes pass through."""
    info = ctx.tensor(ctx.spec("input"))
    out_shape = tuple(ctx.result.shape)
    if ctx.spec("to") == "complex":
        if not info.shape or info.shape[-1] != 2:
            raise UnsupportedOpError(f"{ctx.where()}: view_as_complex needs a last axis of size 2, got "
                                     f"{list(info.shape)}")
        ctx.ds.fix(info.dims[-1], "the (real, imaginary) pair of a complex view")
        return TensorInfo(info.dims[:-1], out_shape)
    pair = ctx.ds.new(2, f"{ctx.node.name} (real, imaginary)")
    ctx.ds.fix(pair, "the (real, imaginary) pair of a complex view")
    return TensorInfo(info.dims + (pair,), out_shape)
