"""Helpers shared by the kinds: axis normalization, broadcasting, parameter views, shape requests."""

from __future__ import annotations

from typing import Any

from graphscale.infer.call import Call, Ref
from graphscale.infer.values import ShapeEntries, TensorInfo


def _check_choice(key: str, choices: tuple[str, ...]) -> Any:
    """A kind's ``check``: the rule's value for ``key`` must be one of ``choices``."""
    def check(spec: Any, targets: list[str]) -> list[tuple[str, str]]:
        value = spec.get(key)
        return [(key, f"{value!r} is not one of {list(choices)}")] if value not in choices else []
    return check


def _tensor(info: Any) -> TensorInfo | None:
    return info if isinstance(info, TensorInfo) else None


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _dims_arg(value: Any, ndim: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [_norm_dim(value, ndim)]
    return [_norm_dim(int(v), ndim) for v in value]


def _broadcast(ctx: Call, out_shape: tuple[int, ...], infos: list[TensorInfo]) -> tuple[int, ...]:
    """Right-aligned broadcasting: each output axis reuses the first operand axis of the same size."""
    dims: list[int] = []
    n = len(out_shape)
    for pos in range(n):
        size = out_shape[pos]
        chosen = None
        for info in infos:
            k = len(info.shape) - n + pos
            if k < 0 or info.shape[k] != size or (size == 1 and info.shape[k] == 1 and chosen is not None):
                continue
            if chosen is None:
                chosen = info.dims[k]
            elif size != 1:
                ctx.ds.union(chosen, info.dims[k], f"broadcasting at {ctx.where()}")
        dims.append(chosen if chosen is not None else ctx.ds.new(size, f"{ctx.node.name}[{pos}]"))
    return tuple(dims)


def _view_param(info: TensorInfo, out_dims: tuple[int, ...]) -> tuple[str, tuple[int | None, ...]] | None:
    """Carry "this is (a view of) parameter P" through ops that keep axes, mapping axes by dimension id."""
    if info.param is None:
        return None
    by_dim = dict(zip(info.dims, info.param[1]))
    mapped = tuple(by_dim.get(d) for d in out_dims)
    return (info.param[0], mapped) if any(m is not None for m in mapped) else None


def _shape_request(ctx: Call, ref: Ref, dims: tuple[int, ...], offset_ref: Ref | None = None,
                   align: str = "leading") -> None:
    loc = ctx.loc(ref)
    if loc is None or loc[0] == "attr":
        return  # not passed (a default): nothing written to rewrite
    values = ctx.value(ref)
    if values is None:
        return
    if isinstance(values, int):
        values = [values]
    values = list(values)
    start = 0
    if offset_ref is not None:
        start = _norm_dim(int(ctx.value(offset_ref)), len(dims) - len(values) + 1)
    elif align == "trailing":
        start = len(dims) - len(values)
    entries = tuple((k, dims[start + k]) for k in range(len(values)))
    if loc[0] == "varargs":
        i = int(loc[1])
        ctx.requests.shapes.append(ShapeEntries(ctx.node.name, ("pos", i), entries, varargs_from=i))
    else:
        ctx.requests.shapes.append(ShapeEntries(ctx.node.name, loc, entries))  # type: ignore[arg-type]
