"""A product plus an added term (``baddbmm``: ``beta * input + alpha * batch1 @ batch2``).

The product's operands relate by an axis pattern, as for the ``einsum`` kind; the added tensor broadcasts
against the output (right-aligned, size-1 axes broadcast). Where the product sums over a width axis with
no parameter to absorb it (``q @ k^T`` with ALiBi added), the compensating ``1/k`` multiplies one factor
of the product (``scale_operand``), not the output, so the added term keeps its value.

Example:
    >>> import graphscale, torch
    >>> class M(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.q, self.k = torch.nn.Linear(4, 8), torch.nn.Linear(4, 8)
    ...     def forward(self, x, bias):  # x: (batch, time, 4); bias: (batch, 1, time)
    ...         return torch.baddbmm(bias, self.q(x), self.k(x).transpose(1, 2)).softmax(-1)
    >>> plan = graphscale.analyze(M(), (torch.randn(2, 3, 4), torch.randn(2, 1, 3)))
    >>> [type(e).__name__ for e in plan.edits if type(e).__name__ == "OutputMultiplier"]
    ['OutputMultiplier']
"""

from __future__ import annotations

from graphscale.errors import UnsupportedOpError
from graphscale.infer.call import Call
from graphscale.infer.kinds.contraction import _einsum_core, _operands
from graphscale.infer.schema import Key, kind
from graphscale.infer.values import Const, Info, TensorInfo


@kind("add_product",
      pattern=Key("pattern", required=True, doc="the axes of the product's operands and of the output"),
      operands=Key("refs", required=True, doc="the product's operands, in pattern order"),
      added=Key("ref", default="input", doc="the tensor added to the product (broadcast to the output)"),
      scale_operand=Key("ref", required=True,
                        doc="the product operand that carries an inserted 1/k (a sum with no parameter)"))
def kind_add_product(ctx: Call) -> Info:
    """The product relates its operands by the pattern; the added tensor broadcasts onto the output."""
    out = _einsum_core(ctx, _operands(ctx, ctx.spec("operands")), ctx.spec("pattern"), ctx.result,
                       {"scale_operand": ctx.spec("scale_operand")})
    added = ctx.info(ctx.spec("added"))
    if isinstance(added, TensorInfo):
        n, m = len(out.dims), len(added.dims)
        if m > n:
            raise UnsupportedOpError(f"{ctx.where()}: the added tensor has more axes ({m}) than the output "
                                     f"({n})")
        for k, (d, s) in enumerate(zip(added.dims, added.shape)):
            pos = n - m + k
            if s != 1 or out.shape[pos] == 1:
                ctx.ds.union(out.dims[pos], d, f"{ctx.rule.name} at {ctx.where()} (the added term)")
    elif added is not None and not isinstance(added, Const):
        raise UnsupportedOpError(f"{ctx.where()}: the added term of {ctx.rule.name!r} is not a tensor")
    return out
