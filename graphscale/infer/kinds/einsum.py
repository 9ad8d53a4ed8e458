"""``torch.einsum`` / ``aten.einsum``: the axis pattern is read from the call's equation.

Each equation letter is an axis; letters missing from the output are summed. A summed letter of a
parameter operand is that parameter's fan-in (its copy scale absorbs the growth); a summed letter with no
parameter (``q k^T``) gets an inserted multiplier, exactly as the pattern-based ``einsum`` kind does. A
letter repeated within one operand takes a diagonal, which is not replication-invariant: it is refused if
that axis is width.

Example:
    >>> equation_pattern("bij,bjk->bik", [3, 3])
    Pattern(operands=(('b', 'i', 'j'), ('b', 'j', 'k')), output=('b', 'i', 'k'))
    >>> equation_pattern("...i,oi", [3, 2]).output  # implicit output: the letters used once, sorted
    ('...', 'o')
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from graphscale.errors import UnsupportedOpError
from graphscale.infer.call import Call, Loc
from graphscale.infer.kinds.contraction import _einsum_core
from graphscale.infer.schema import Pattern, kind
from graphscale.infer.values import Info, Refusal, TensorInfo


def _axes(term: str) -> tuple[str, ...]:
    term = term.replace(" ", "")
    out: list[str] = []
    i = 0
    while i < len(term):
        if term.startswith("...", i):
            out.append("...")
            i += 3
        elif term[i].isalpha():
            out.append(term[i])
            i += 1
        else:
            raise ValueError(f"unexpected {term[i]!r} in einsum term {term!r}")
    return tuple(out)


def equation_pattern(equation: str, ranks: list[int]) -> Pattern:
    """The :class:`~graphscale.infer.schema.Pattern` of an einsum equation (ValueError if malformed)."""
    lhs, arrow, rhs = equation.partition("->")
    operands = tuple(_axes(t) for t in lhs.split(","))
    if len(operands) != len(ranks):
        raise ValueError(f"equation {equation!r} has {len(operands)} operands, the call {len(ranks)}")
    if arrow:
        output = _axes(rhs)
    else:  # implicit output: letters that appear once, in alphabetical order, after any ellipsis
        counts = Counter(a for op in operands for a in op if a != "...")
        ell = ("...",) if any("..." in op for op in operands) else ()
        output = ell + tuple(sorted(a for a, n in counts.items() if n == 1))
    return Pattern.parse(", ".join(" ".join(op) for op in operands) + " -> " + " ".join(output))


@kind("einsum_call")
def kind_einsum_call(ctx: Call) -> Info:
    """Relate the operands by the call's equation (see the module doc)."""
    if ctx.node.op == "call_function" and isinstance(ctx.node.target, torch._ops.OpOverload):
        equation, raws, locs = ctx.value("equation"), list(ctx.raw("tensors")), None
    else:
        args, raw_args = list(ctx.args), list(ctx.node.args)
        if ctx.kwargs or not args or not isinstance(args[0], str):
            raise UnsupportedOpError(f"{ctx.where()}: einsum in the sublist format is not supported; "
                                     "write the equation as a string")
        equation = args[0]
        if len(raw_args) == 2 and isinstance(raw_args[1], list | tuple):
            raws, locs = list(raw_args[1]), None  # einsum(eq, [a, b]): operands not addressable one by one
        else:
            raws = raw_args[1:]
            locs = [("pos", 1 + j) for j in range(len(raws))]
    infos = [ctx.info_of(r) for r in raws]
    ranks = [len(i.dims) if isinstance(i, TensorInfo) else 0 for i in infos]
    try:
        pattern = equation_pattern(equation, ranks)
    except ValueError as e:
        raise UnsupportedOpError(f"{ctx.where()}: cannot read einsum equation {equation!r}: {e}") from None
    operands: list[tuple[str, Any, Loc | None]] = [
        (f"operand {j}", info, locs[j] if locs is not None else None) for j, info in enumerate(infos)]
    out = _einsum_core(ctx, operands, pattern, ctx.result)
    for info, axes in zip(infos, pattern.operands):
        repeated = {a for a, n in Counter(axes).items() if n > 1 and a != "..."}
        if repeated and isinstance(info, TensorInfo) and "..." not in axes:
            for a in repeated:
                d = info.dims[axes.index(a)]
                ctx.requests.refusals.append(Refusal(
                    ctx.node.name, d, f"einsum {equation!r} takes a diagonal over {a!r}, which a widened "
                    "copy does not reproduce"))
    return out
