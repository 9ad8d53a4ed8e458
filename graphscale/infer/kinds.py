"""The rule kinds: how each family of ops relates the dimensions of its inputs and outputs.

A rule in ``rules/*.toml`` picks one kind and gives it arguments; the kind is the only code that looks at
an op. Each handler takes an :class:`~graphscale.infer.engine.OpContext` and returns the output's
:class:`~graphscale.infer.values.Info`, adding relations to the dimension system and requests (argument
rewrites, inserted multipliers, refusals) for the widen stage. Adding a kind is rare; adding an op to an
existing kind is a rule.

Example (the rule that covers ``nn.Linear`` in fx and ``aten.linear`` in export graphs)::

    [[rule]]
    name = "linear"
    kind = "einsum"
    targets = ["torch.nn.functional.linear", "aten.linear.default", "module:torch.nn.Linear"]
    operands = ["input@0", "weight@1", "bias@2"]
    module_operands = ["input@0", "param:weight", "param:bias"]
    pattern = "... i, o i, o -> ... o"
    weights = [1]
    module_attrs = { in_features = "i", out_features = "o" }
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from graphscale.errors import UnsupportedOpError
from graphscale.infer.engine import OpContext
from graphscale.infer.values import (
    AttentionScale,
    Const,
    Info,
    OutputMultiplier,
    ParamUse,
    Refusal,
    ScalarSize,
    ShapeEntries,
    SizeInfo,
    SliceBounds,
    TensorInfo,
)


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


def _broadcast(ctx: OpContext, out_shape: tuple[int, ...], infos: list[TensorInfo]) -> tuple[int, ...]:
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


# -- contractions -----------------------------------------------------------------------------------------


def _parse_pattern(pattern: str) -> tuple[list[list[str]], list[str]]:
    lhs, rhs = pattern.split("->")
    return [op.split() for op in lhs.split(",")], rhs.split()


def _einsum_core(ctx: OpContext, refs: list[str], pattern: str, out: torch.Tensor) -> TensorInfo:
    """Relate operands by an axis pattern; contracted letters become fan-in axes or output multipliers."""
    spec = ctx.rule.spec
    in_pats, out_pat = _parse_pattern(pattern)
    if len(in_pats) != len(refs):
        raise UnsupportedOpError(f"rule {ctx.rule.name!r}: pattern has {len(in_pats)} operands, "
                                 f"operands lists {len(refs)}")
    letters: dict[str, int] = {}
    ellipses: list[TensorInfo] = []
    present: list[tuple[int, str, TensorInfo, list[str]]] = []
    for i, (ref, pat) in enumerate(zip(refs, in_pats)):
        info = ctx.info(ref)
        if info is None or isinstance(info, Const):
            continue
        if not isinstance(info, TensorInfo):
            raise UnsupportedOpError(f"{ctx.where()}: operand {ref} of {ctx.rule.name!r} is not a tensor")
        nd = len(info.dims)
        if "..." in pat:
            k = pat.index("...")
            before, after = pat[:k], pat[k + 1:]
            n_ell = nd - len(before) - len(after)
            axes = before + [f"...{j}" for j in range(n_ell)] + after
            ell_dims = info.dims[len(before):len(before) + n_ell]
            ellipses.append(TensorInfo(ell_dims, info.shape[len(before):len(before) + n_ell]))
        else:
            axes = list(pat)
        if len(axes) != nd:
            raise UnsupportedOpError(f"{ctx.where()}: operand {ref} has {nd} axes, rule {ctx.rule.name!r} "
                                     f"expects pattern {' '.join(pat)}")
        for letter, d in zip(axes, info.dims):
            if letter.startswith("..."):
                continue
            if letter in letters:
                ctx.ds.union(letters[letter], d, f"{ctx.rule.name} at {ctx.where()}")
            else:
                letters[letter] = d
        present.append((i, ref, info, axes))
    # output
    out_shape = tuple(out.shape)
    if "..." in out_pat:
        k = out_pat.index("...")
        before, after = out_pat[:k], out_pat[k + 1:]
        n_ell = len(out_shape) - len(before) - len(after)
        ell = _broadcast(ctx, out_shape[len(before):len(before) + n_ell], ellipses)
        out_dims = tuple(letters.get(x) for x in before) + ell + tuple(letters.get(x) for x in after)
    else:
        out_dims = tuple(letters.get(x) for x in out_pat)
    out_dims = tuple(d if d is not None else ctx.ds.new(s, f"{ctx.node.name}[{i}]")
                     for i, (d, s) in enumerate(zip(out_dims, out_shape)))
    # natures of letters
    for letter in spec.get("index", []):
        if letter in letters:
            ctx.ds.fix(letters[letter], f"a lookup index axis ({ctx.rule.name})")
    for letter in spec.get("fixed", []):
        if letter in letters:
            ctx.ds.fix(letters[letter], f"fixed by nature in {ctx.rule.name}")
    for letter in spec.get("forbid", []):
        if letter in letters:
            ctx.requests.refusals.append(Refusal(ctx.node.name, letters[letter],
                                                 f"{ctx.rule.name} is not replication-invariant over it"))
    out_letters = {x for x in out_pat}
    contracted = [x for x in letters if x not in out_letters and x not in spec.get("index", [])
                  and x not in spec.get("invariant", [])]
    weights = spec.get("weights")
    param_ops = [p for p in present if p[2].param is not None and (weights is None or p[0] in weights)]
    activation = next((p for p in present if p not in param_ops), None)
    act_loc = ctx.locate(activation[1]) if activation is not None and "@" in activation[1] else None
    for _, _, info, axes in param_ops:
        name, param_axes = info.param  # type: ignore[misc]
        fan_in = tuple(sorted({param_axes[j] for j, x in enumerate(axes)
                               if x in contracted and param_axes[j] is not None}))
        ctx.requests.uses.append(ParamUse(name, ctx.node.name, fan_in, act_loc))
    absorbed = {x for _, _, _, axes in param_ops for x in axes}
    free = tuple(letters[x] for x in contracted if x not in absorbed)
    if free:
        ctx.requests.multipliers.append(OutputMultiplier(
            ctx.node.name, free, f"{ctx.rule.name} sums over these axes with no parameter to absorb it"))
    return TensorInfo(out_dims, out_shape)


def kind_einsum(ctx: OpContext) -> Info:
    refs = ctx.rule.get("module_operands") if ctx.module is not None else None
    refs = refs or ctx.rule.get("operands")
    out = ctx.result[0] if isinstance(ctx.result, tuple) else ctx.result
    info = _einsum_core(ctx, refs, ctx.rule.get("pattern"), out)
    if isinstance(ctx.result, tuple):  # e.g. native batch norm: (out, save_mean, save_invstd)
        return (info,) + tuple(TensorInfo(ctx.fresh(tuple(r.shape)), tuple(r.shape))
                               for r in ctx.result[1:])
    return info


def kind_matmul(ctx: OpContext) -> Info:
    a, b = ctx.value("input@0"), ctx.value("other@1")
    if a.ndim == 0 or b.ndim == 0:
        raise UnsupportedOpError(f"{ctx.where()}: matmul of a 0-d tensor")
    pa = ["m", "k"] if a.ndim >= 2 else ["k"]
    pb = ["k", "n"] if b.ndim >= 2 else ["k"]
    out = (["m"] if a.ndim >= 2 else []) + (["n"] if b.ndim >= 2 else [])
    lead_a = "... " if a.ndim > 2 else ""
    lead_b = "... " if b.ndim > 2 else ""
    lead_o = "... " if max(a.ndim, b.ndim) > 2 else ""
    pattern = f"{lead_a}{' '.join(pa)}, {lead_b}{' '.join(pb)} -> {lead_o}{' '.join(out)}"
    return _einsum_core(ctx, ["input@0", "other@1"], pattern, ctx.result)


def kind_conv(ctx: OpContext) -> Info:
    spec = ctx.rule.spec
    refs = spec.get("module_operands") if ctx.module is not None else spec.get("operands")
    x, w = ctx.info(refs[0]), ctx.info(refs[1])
    bias = ctx.info(refs[2]) if len(refs) > 2 else None
    groups = int(ctx.value(spec.get("module_groups" if ctx.module is not None else "groups", "groups@6"), 1)
                 or 1)
    if spec.get("transposed") and ctx.value(spec["transposed"], False):
        raise UnsupportedOpError(f"{ctx.where()}: transposed convolution is not supported yet")
    assert isinstance(x, TensorInfo) and isinstance(w, TensorInfo)
    batched = len(x.dims) == len(w.dims)
    c_axis = 1 if batched else 0
    ds, where = ctx.ds, f"convolution at {ctx.where()}"
    if groups == 1:
        ds.union(x.dims[c_axis], w.dims[1], where)
        out_c = w.dims[0]
    else:
        g = ds.new(groups, f"{ctx.node.name}.groups")
        ds.prod(x.dims[c_axis], [g, w.dims[1]], where)
        per = ds.new(w.shape[0] // groups, f"{ctx.node.name}.out_per_group")
        ds.prod(w.dims[0], [g, per], where)
        out_c = w.dims[0]
        loc = ctx.locate(spec.get("groups", "groups@6")) if ctx.module is None else ("attr", "groups")
        if loc is not None:
            ctx.requests.scalars.append(ScalarSize(ctx.node.name, loc, g))
    for d in w.dims[2:]:
        ds.fix(d, "a convolution kernel window")
    if bias is not None and isinstance(bias, TensorInfo):
        ds.union(bias.dims[0], w.dims[0], where)
        if bias.param is not None:
            ctx.requests.uses.append(ParamUse(bias.param[0], ctx.node.name, ()))
    if w.param is not None:
        fan_in = tuple(ax for ax in (w.param[1][1],) if ax is not None)
        ctx.requests.uses.append(ParamUse(w.param[0], ctx.node.name, fan_in, ctx.locate(refs[0])))
    else:
        ctx.requests.multipliers.append(OutputMultiplier(ctx.node.name, (w.dims[1],),
                                                         "convolution with a computed weight"))
    shape = tuple(ctx.result.shape)
    spatial = ctx.fresh(shape[c_axis + 1:], f"{ctx.node.name} spatial")
    for d in spatial:
        ds.fix(d, "a spatial axis of a convolution output")
    lead = (x.dims[0],) if batched else ()
    return TensorInfo(lead + (out_c,) + spatial, shape)


# -- elementwise and layout ------------------------------------------------------------------------------


def kind_elementwise(ctx: OpContext) -> Info:
    infos: list[TensorInfo] = []
    sizes: list[SizeInfo] = []
    for a in list(ctx.node.args) + list(ctx.node.kwargs.values()):
        i = ctx.walker.info_of(a)
        if isinstance(i, TensorInfo):
            infos.append(i)
        elif isinstance(i, SizeInfo):
            sizes.append(i)
    if ctx.rule.get("warn") and _training(ctx):
        ctx.requests.warnings.append(f"{ctx.where()}: {ctx.rule.get('warn')}")
    result = ctx.result
    if not isinstance(result, torch.Tensor):
        if isinstance(result, int) and sizes:
            return SizeInfo(result, None)  # arithmetic on sizes: a derived int, not a size read
        return Const(result)
    dims = _broadcast(ctx, tuple(result.shape), infos)
    param = None
    if ctx.rule.get("view") and infos and infos[0].param is not None:
        param = _view_param(infos[0], dims)
    return TensorInfo(dims, tuple(result.shape), param)


def _training(ctx: OpContext) -> bool:
    if ctx.module is not None:
        return ctx.module.training
    t = ctx.value(ctx.rule.get("training", "training@2"), None)
    return bool(t)


def _reshape_groups(ctx: OpContext, info: TensorInfo, out_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Relate a reshape's input and output axes by grouping equal running products."""
    ds, where = ctx.ds, f"reshape at {ctx.where()}"
    ins = [(d, s) for d, s in zip(info.dims, info.shape) if s != 1]
    out_dims: list[int | None] = [None] * len(out_shape)
    outs = [(j, s) for j, s in enumerate(out_shape) if s != 1]
    i = j = 0
    while i < len(ins) or j < len(outs):
        gi, gj = [ins[i]] if i < len(ins) else [], [outs[j]] if j < len(outs) else []
        i, j = i + len(gi), j + len(gj)
        pi, pj = math.prod(s for _, s in gi), math.prod(s for _, s in gj)
        while pi != pj:
            if pi < pj and i < len(ins):
                gi.append(ins[i])
                i += 1
                pi *= ins[i - 1][1]
            elif pj < pi and j < len(outs):
                gj.append(outs[j])
                j += 1
                pj *= outs[j - 1][1]
            else:
                raise UnsupportedOpError(f"{ctx.where()}: cannot relate reshape {info.shape} -> {out_shape}")
        if len(gi) == 1 and len(gj) == 1:
            out_dims[gj[0][0]] = gi[0][0]
            continue
        new = [ds.new(s, f"{ctx.node.name}[{jj}]") for jj, s in gj]
        for (jj, _), d in zip(gj, new):
            out_dims[jj] = d
        if len(gi) == 1:
            ds.prod(gi[0][0], new, where)
        elif len(gj) == 1:
            ds.prod(new[0], [d for d, _ in gi], where)
        else:
            mid = ds.new(pi, f"{ctx.node.name} (merged)")
            ds.prod(mid, [d for d, _ in gi], where)
            ds.prod(mid, new, where)
    return tuple(d if d is not None else ds.new(1, f"{ctx.node.name}[{k}]") for k, d in enumerate(out_dims))


def kind_reshape(ctx: OpContext) -> Info:
    info = ctx.info(ctx.rule.get("input", "input@0"))
    assert isinstance(info, TensorInfo)
    out_shape = tuple(ctx.result.shape)
    dims = _reshape_groups(ctx, info, out_shape)
    shape_ref = ctx.rule.get("shape")
    if shape_ref is not None:
        _shape_request(ctx, shape_ref, dims, ctx.rule.get("shape_offset"))
    return TensorInfo(dims, out_shape, _view_param(info, dims))


def _shape_request(ctx: OpContext, ref: str, dims: tuple[int, ...], offset_ref: str | None = None,
                   align: str = "leading") -> None:
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
    if ref.startswith("varargs@"):
        i = int(ref.split("@")[1])
        rest = ctx.node.args[i:]
        if len(rest) == 1 and isinstance(rest[0], list | tuple):
            ctx.requests.shapes.append(ShapeEntries(ctx.node.name, ("pos", i), entries))
        else:
            ctx.requests.shapes.append(ShapeEntries(ctx.node.name, ("pos", i), entries, varargs_from=i))
        return
    loc = ctx.locate(ref)
    if loc is not None:
        ctx.requests.shapes.append(ShapeEntries(ctx.node.name, loc, entries))


def kind_permute(ctx: OpContext) -> Info:
    info = ctx.info(ctx.rule.get("input", "input@0"))
    assert isinstance(info, TensorInfo)
    order = _dims_arg(ctx.value(ctx.rule.get("dims", "varargs@1")), len(info.dims))
    dims = tuple(info.dims[k] for k in order)  # type: ignore[union-attr]
    return TensorInfo(dims, tuple(ctx.result.shape), _view_param(info, dims))


def kind_transpose(ctx: OpContext) -> Info:
    info = ctx.info(ctx.rule.get("input", "input@0"))
    assert isinstance(info, TensorInfo)
    nd = len(info.dims)
    if nd < 2:
        return info
    d0 = _norm_dim(int(ctx.value(ctx.rule.get("dim0", "dim0@1"), -2 if nd > 2 else 0)), nd)
    d1 = _norm_dim(int(ctx.value(ctx.rule.get("dim1", "dim1@2"), -1)), nd)
    dims = list(info.dims)
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return TensorInfo(tuple(dims), tuple(ctx.result.shape), _view_param(info, tuple(dims)))


def kind_expand(ctx: OpContext) -> Info:
    info = ctx.info(ctx.rule.get("input", "input@0"))
    assert isinstance(info, TensorInfo)
    out_shape = tuple(ctx.result.shape)
    n, m = len(out_shape), len(info.shape)
    dims: list[int] = []
    for pos, size in enumerate(out_shape):
        k = m - n + pos
        if k >= 0 and info.shape[k] == size:
            dims.append(info.dims[k])
        else:
            d = ctx.ds.new(size, f"{ctx.node.name}[{pos}]")
            ctx.ds.fix(d, "an axis created by broadcasting (expand)")
            dims.append(d)
    if ctx.rule.get("shape"):
        _shape_request(ctx, ctx.rule.get("shape"), tuple(dims))
    return TensorInfo(tuple(dims), out_shape)


def kind_repeat(ctx: OpContext) -> Info:
    """``repeat`` tiles: a repeated axis is the concatenation of copies of the input axis."""
    info = ctx.info(ctx.rule.get("input", "input@0"))
    assert isinstance(info, TensorInfo)
    reps = [int(r) for r in ctx.value(ctx.rule.get("repeats", "varargs@1"))]
    out_shape = tuple(ctx.result.shape)
    lead = len(reps) - len(info.dims)
    dims: list[int] = []
    for pos, (r, size) in enumerate(zip(reps, out_shape)):
        k = pos - lead
        if k < 0 or info.shape[k] == 1 and r != 1:
            d = ctx.ds.new(size, f"{ctx.node.name}[{pos}]")
            ctx.ds.fix(d, "an axis created by repeat")
            dims.append(d)
        elif r == 1:
            dims.append(info.dims[k])
        else:
            d = ctx.ds.new(size, f"{ctx.node.name}[{pos}]")
            ctx.ds.concat(d, [info.dims[k]] * r, f"repeat at {ctx.where()}")
            dims.append(d)
    return TensorInfo(tuple(dims), out_shape)


# -- reductions ---------------------------------------------------------------------------------------------


def kind_reduce(ctx: OpContext) -> Info:
    spec = ctx.rule.spec
    info = ctx.info(spec.get("input", "input@0"))
    assert isinstance(info, TensorInfo)
    nd = len(info.dims)
    dims = _dims_arg(ctx.value(spec.get("dim", "dim@1")), nd)
    if dims is None or dims == []:
        dims = list(range(nd))
    keepdim = bool(ctx.value(spec.get("keepdim", "keepdim@2"), False))
    mode = spec.get("mode", "mean")
    if mode == "variance":
        corr = ctx.value(spec.get("correction", "correction@99"), None)
        unbiased = ctx.value(spec.get("unbiased", "unbiased@99"), None)
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


def kind_along(ctx: OpContext) -> Info:
    """An op along one axis that keeps the shape (softmax, cumsum): refused if that axis is width."""
    info = ctx.info(ctx.rule.get("input", "input@0"))
    assert isinstance(info, TensorInfo)
    d = ctx.value(ctx.rule.get("dim", "dim@1"))
    if d is not None and ctx.rule.get("mode", "forbid") == "forbid":
        k = _norm_dim(int(d), len(info.dims))
        ctx.requests.refusals.append(Refusal(ctx.node.name, info.dims[k],
                                             f"{ctx.rule.name} along it is not replication-invariant"))
    return TensorInfo(info.dims, tuple(ctx.result.shape))


# -- concatenation, splitting, indexing --------------------------------------------------------------------


def kind_cat(ctx: OpContext) -> Info:
    parts = [i for i in ctx.info(ctx.rule.get("tensors", "tensors@0")) if isinstance(i, TensorInfo)]
    out_shape = tuple(ctx.result.shape)
    nd = len(out_shape)
    d = _norm_dim(int(ctx.value(ctx.rule.get("dim", "dim@1"), 0)), nd)
    parts = [p for p in parts if len(p.shape) == nd]  # torch.cat skips legacy empty 1-d tensors
    dims = list(parts[0].dims)
    for p in parts[1:]:
        for k in range(nd):
            if k != d:
                ctx.ds.union(dims[k], p.dims[k], f"cat at {ctx.where()}")
    joined = ctx.ds.new(out_shape[d], f"{ctx.node.name}[{d}]")
    ctx.ds.concat(joined, [p.dims[d] for p in parts if p.shape[d] > 0], f"cat at {ctx.where()}")
    dims[d] = joined
    return TensorInfo(tuple(dims), out_shape)


def kind_stack(ctx: OpContext) -> Info:
    parts = [i for i in ctx.info(ctx.rule.get("tensors", "tensors@0")) if isinstance(i, TensorInfo)]
    out_shape = tuple(ctx.result.shape)
    d = _norm_dim(int(ctx.value(ctx.rule.get("dim", "dim@1"), 0)), len(out_shape))
    dims = list(parts[0].dims)
    for p in parts[1:]:
        for a, b in zip(dims, p.dims):
            ctx.ds.union(a, b, f"stack at {ctx.where()}")
    new = ctx.ds.new(out_shape[d], f"{ctx.node.name}[{d}]")
    ctx.ds.fix(new, "an axis created by stack")
    dims.insert(d, new)
    return TensorInfo(tuple(dims), out_shape)


def kind_split(ctx: OpContext) -> Info:
    spec = ctx.rule.spec
    info = ctx.info(spec.get("input", "input@0"))
    assert isinstance(info, TensorInfo)
    outs = list(ctx.result)
    nd = len(info.dims)
    if spec.get("unbind"):
        d = _norm_dim(int(ctx.value(spec.get("dim", "dim@1"), 0)), nd)
        ctx.ds.fix(info.dims[d], "an axis taken apart by unbind")
        rest = info.dims[:d] + info.dims[d + 1:]
        return tuple(TensorInfo(rest, tuple(o.shape)) for o in outs)
    d = _norm_dim(int(ctx.value(spec.get("dim", "dim@2"), 0)), nd)
    part_dims = [ctx.ds.new(o.shape[d], f"{ctx.node.name}[{i}][{d}]") for i, o in enumerate(outs)]
    ctx.ds.concat(info.dims[d], part_dims, f"split at {ctx.where()}")
    size_ref = spec.get("sizes")
    if size_ref is not None:
        loc = ctx.locate(size_ref)
        sizes = ctx.value(size_ref)
        if loc is not None and isinstance(sizes, int):
            for p in part_dims[1:-1]:  # equal chunks; the last may be shorter
                ctx.ds.union(part_dims[0], p, f"split at {ctx.where()}")
            if len(part_dims) > 1 and outs[-1].shape[d] == outs[0].shape[d]:
                ctx.ds.union(part_dims[0], part_dims[-1], f"split at {ctx.where()}")
            ctx.requests.scalars.append(ScalarSize(ctx.node.name, loc, part_dims[0]))
        elif loc is not None:
            ctx.requests.shapes.append(ShapeEntries(ctx.node.name, loc,
                                                    tuple((k, p) for k, p in enumerate(part_dims))))
    result = []
    for o, p in zip(outs, part_dims):
        dims = info.dims[:d] + (p,) + info.dims[d + 1:]
        result.append(TensorInfo(dims, tuple(o.shape)))
    return tuple(result)


def _slice_part(ctx: OpContext, dim: int, size: int, start: int | None, stop: int | None,
                step: int | None, out_size: int) -> tuple[int, int | None] | None:
    """Relate a contiguous slice to its axis; returns (part, before) or None for a full slice."""
    if step not in (None, 1):
        ctx.ds.fix(dim, "an axis sliced with a step")
        return None
    lo = 0 if start is None else (start + size if start < 0 else min(start, size))
    hi = size if stop is None else (stop + size if stop < 0 else min(stop, size))
    lo, hi = max(lo, 0), max(hi, lo)
    if lo == 0 and hi == size:
        return None
    part = ctx.ds.new(out_size, f"{ctx.node.name} slice")
    pieces, before = [], None
    if lo > 0:
        before = ctx.ds.new(lo, f"{ctx.node.name} before")
        pieces.append(before)
    pieces.append(part)
    if hi < size:
        pieces.append(ctx.ds.new(size - hi, f"{ctx.node.name} after"))
    ctx.ds.concat(dim, pieces, f"slice at {ctx.where()}")
    return part, before


def kind_getitem(ctx: OpContext) -> Info:
    container = ctx.info("input@0")
    index = ctx.value("index@1")
    if isinstance(container, tuple):
        return container[index] if not isinstance(index, slice) else tuple(container[index])
    if isinstance(container, Const):
        return Const(ctx.result)
    if not isinstance(container, TensorInfo):
        return Const(ctx.result)
    return _tensor_index(ctx, container, index)


def _tensor_index(ctx: OpContext, info: TensorInfo, index: Any) -> Info:
    written = list(index) if isinstance(index, tuple) else [index]
    # (position in the index as written, item): Ellipsis and the implicit trailing ":" expand into full
    # slices with no position, so a rewritten slice bound lands where the user wrote it
    entries: list[tuple[int | None, Any]] = list(enumerate(written))
    n_real = sum(1 for it in written if it is not None and it is not Ellipsis)
    if Ellipsis in written:
        k = written.index(Ellipsis)
        entries = entries[:k] + [(None, slice(None))] * (len(info.dims) - n_real) + entries[k + 1:]
    entries += [(None, slice(None))] * (len(info.dims) - sum(1 for _, it in entries if it is not None))
    items = [it for _, it in entries]
    out_shape = tuple(ctx.result.shape)
    dims: list[int] = []
    axis = 0
    tensor_seen = False
    for (pos, it) in entries:
        if it is None:
            dims.append(ctx.ds.new(1, f"{ctx.node.name} new axis"))
        elif isinstance(it, slice):
            d, size = info.dims[axis], info.shape[axis]
            out_size = len(range(*it.indices(size)))
            got = _slice_part(ctx, d, size, it.start, it.stop, it.step, out_size)
            if got is None:
                dims.append(d if out_size == size else ctx.ds.new(out_size, ctx.node.name))
            else:
                dims.append(got[0])
                ctx.requests.slices.append(SliceBounds(ctx.node.name, None, pos, got[1], got[0]))
            axis += 1
        elif isinstance(it, int):
            ctx.ds.fix(info.dims[axis], "an axis indexed at one position")
            axis += 1
        elif isinstance(it, torch.Tensor):
            ctx.ds.fix(info.dims[axis], "an axis indexed by a tensor")
            if not tensor_seen:
                tensor_seen = True
                shape = torch.broadcast_shapes(*(t.shape for t in items if isinstance(t, torch.Tensor)))
                dims.extend(ctx.fresh(tuple(shape), f"{ctx.node.name} index"))
            axis += 1
        else:
            raise UnsupportedOpError(f"{ctx.where()}: indexing with {type(it).__name__} is not supported")
    if len(dims) != len(out_shape) or any(ctx.ds.size[d] != s for d, s in zip(dims, out_shape)):
        dims = list(ctx.fresh(out_shape))
        for d in dims:
            ctx.ds.fix(d, "an axis produced by advanced indexing")
    return TensorInfo(tuple(dims), out_shape)


def kind_slice(ctx: OpContext) -> Info:
    """``aten.slice.Tensor(x, dim, start, end, step)``."""
    info = ctx.info("input@0")
    assert isinstance(info, TensorInfo)
    nd = len(info.dims)
    d = _norm_dim(int(ctx.value("dim@1", 0)), nd)
    start, end, step = ctx.value("start@2"), ctx.value("end@3"), ctx.value("step@4", 1)
    out_shape = tuple(ctx.result.shape)
    got = _slice_part(ctx, info.dims[d], info.shape[d], start, end, step, out_shape[d])
    dims = list(info.dims)
    if got is not None:
        dims[d] = got[0]
        ctx.requests.slices.append(SliceBounds(ctx.node.name, ("pos", 2), None, got[1], got[0]))
    elif out_shape[d] != info.shape[d]:
        dims[d] = ctx.ds.new(out_shape[d], ctx.node.name)
    return TensorInfo(tuple(dims), out_shape, _view_param(info, tuple(dims)))


def kind_select(ctx: OpContext) -> Info:
    info = ctx.info("input@0")
    assert isinstance(info, TensorInfo)
    d = _norm_dim(int(ctx.value(ctx.rule.get("dim", "dim@1"))), len(info.dims))
    ctx.ds.fix(info.dims[d], "an axis indexed at one position")
    return TensorInfo(info.dims[:d] + info.dims[d + 1:], tuple(ctx.result.shape))


def kind_index_select(ctx: OpContext) -> Info:
    info = ctx.info("input@0")
    assert isinstance(info, TensorInfo)
    d = _norm_dim(int(ctx.value("dim@1")), len(info.dims))
    ctx.ds.fix(info.dims[d], "an axis indexed by a tensor")
    dims = list(info.dims)
    dims[d] = ctx.ds.new(ctx.result.shape[d], ctx.node.name)
    return TensorInfo(tuple(dims), tuple(ctx.result.shape))


def kind_index(ctx: OpContext) -> Info:
    """``aten.index.Tensor(x, [i0, None, i2])``: advanced indexing with a list of index tensors."""
    info = ctx.info("input@0")
    assert isinstance(info, TensorInfo)
    indices = ctx.value("indices@1")
    items = [slice(None) if i is None else i for i in indices]
    return _tensor_index(ctx, info, tuple(items))


# -- shapes and creation ------------------------------------------------------------------------------------


def kind_size(ctx: OpContext) -> Info:
    """``x.size()``, ``x.size(d)``, ``x.shape``, ``aten.sym_size``: ints that measure a dimension."""
    info = ctx.info("input@0")
    attr = ctx.rule.get("attribute")
    if attr is not None and ctx.value("name@1") != attr:
        return Const(ctx.result)  # getattr(x, "dtype") and the like
    if not isinstance(info, TensorInfo):
        return Const(ctx.result)
    d = ctx.value(ctx.rule.get("dim", "dim@1")) if attr is None else None
    if isinstance(ctx.result, int) and d is not None:
        return SizeInfo(ctx.result, info.dims[_norm_dim(int(d), len(info.dims))])
    if isinstance(ctx.result, tuple | list | torch.Size):
        return tuple(SizeInfo(int(s), dm) for s, dm in zip(ctx.result, info.dims))
    return Const(ctx.result)


def kind_creation(ctx: OpContext) -> Info:
    out = ctx.result
    shape = tuple(out.shape)
    dims = ctx.fresh(shape)
    if ctx.rule.get("fixed"):
        for d in dims:
            ctx.ds.fix(d, f"an axis created by {ctx.rule.name}")
    ref = ctx.rule.get("shape")
    if ref is not None:
        _shape_request(ctx, ref, dims)
    return TensorInfo(dims, shape)


def kind_like(ctx: OpContext) -> Info:
    info = ctx.info(ctx.rule.get("input", "input@0"))
    assert isinstance(info, TensorInfo)
    return TensorInfo(info.dims, tuple(ctx.result.shape))


# -- attention and normalization ---------------------------------------------------------------------------


def kind_sdpa(ctx: OpContext) -> Info:
    """``scaled_dot_product_attention``: q.k contracts head_dim (an activation contraction: the scale
    absorbs its growth), the attention weights contract the key sequence (fixed)."""
    q, k, v = (ctx.info(r) for r in ("query@0", "key@1", "value@2"))
    assert isinstance(q, TensorInfo) and isinstance(k, TensorInfo) and isinstance(v, TensorInfo)
    ds, where = ctx.ds, f"attention at {ctx.where()}"
    ds.union(q.dims[-1], k.dims[-1], where)
    ds.union(k.dims[-2], v.dims[-2], where)
    gqa = bool(ctx.value("enable_gqa@7", False)) and len(q.dims) >= 3 and q.shape[-3] != k.shape[-3]
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
    mask = ctx.info("attn_mask@3")
    if isinstance(mask, TensorInfo):
        _broadcast(ctx, out_shape[:-1] + (k.shape[-2],),
                   [mask, TensorInfo(lead + (q.dims[-2], k.dims[-2]), out_shape[:-1] + (k.shape[-2],))])
    ctx.requests.scales.append(AttentionScale(ctx.node.name, q.dims[-1], q.shape[-1]))
    return TensorInfo(lead + (q.dims[-2], v.dims[-1]), out_shape)


def kind_layer_norm(ctx: OpContext) -> Info:
    """LayerNorm / RMSNorm: statistics over the trailing ``normalized_shape`` axes (mean-like: invariant)."""
    spec = ctx.rule.spec
    module = ctx.module is not None
    info = ctx.info("input@0")
    assert isinstance(info, TensorInfo)
    norm_shape = ctx.value(spec["module_shape"] if module else spec.get("shape", "normalized_shape@1"))
    norm_shape = [norm_shape] if isinstance(norm_shape, int) else list(norm_shape)
    n = len(norm_shape)
    tail = info.dims[len(info.dims) - n:]
    for ref in spec.get("module_params" if module else "params", []):
        p = ctx.info(ref)
        if isinstance(p, TensorInfo):
            for a, b in zip(p.dims, tail):
                ctx.ds.union(a, b, f"normalization at {ctx.where()}")
            if p.param is not None:
                ctx.requests.uses.append(ParamUse(p.param[0], ctx.node.name, ()))
    if not module:
        _shape_request(ctx, spec.get("shape", "normalized_shape@1"), info.dims, align="trailing")
    result = ctx.result[0] if isinstance(ctx.result, tuple) else ctx.result
    out = TensorInfo(info.dims, tuple(result.shape))
    if isinstance(ctx.result, tuple):
        return (out,) + tuple(TensorInfo(ctx.fresh(tuple(r.shape)), tuple(r.shape)) for r in ctx.result[1:])
    return out


def kind_group_norm(ctx: OpContext) -> Info:
    spec = ctx.rule.spec
    module = ctx.module is not None
    info = ctx.info("input@0")
    assert isinstance(info, TensorInfo)
    groups = int(ctx.value(spec["module_groups"] if module else spec.get("groups", "num_groups@1")))
    c = info.dims[1]
    if groups > 1:
        g = ctx.ds.new(groups, f"{ctx.node.name}.groups")
        per = ctx.ds.new(info.shape[1] // groups, f"{ctx.node.name}.channels_per_group")
        ctx.ds.prod(c, [g, per], f"group norm at {ctx.where()}")
        loc = ("attr", "num_groups") if module else ctx.locate(spec.get("groups", "num_groups@1"))
        if loc is not None:
            ctx.requests.scalars.append(ScalarSize(ctx.node.name, loc, g))
    for ref in spec.get("module_params" if module else "params", []):
        p = ctx.info(ref)
        if isinstance(p, TensorInfo):
            ctx.ds.union(p.dims[0], c, f"group norm at {ctx.where()}")
            if p.param is not None:
                ctx.requests.uses.append(ParamUse(p.param[0], ctx.node.name, ()))
    return TensorInfo(info.dims, tuple(ctx.result.shape))


def kind_pool(ctx: OpContext) -> Info:
    """Pooling / resizing over the trailing ``spatial`` axes; the leading (batch, channel) axes pass."""
    info = ctx.info("input@0")
    assert isinstance(info, TensorInfo)
    spatial = int(ctx.rule.get("spatial", 2))
    out_shape = tuple(ctx.result[0].shape if isinstance(ctx.result, tuple) else ctx.result.shape)
    keep = info.dims[:len(info.dims) - spatial]
    new = ctx.fresh(out_shape[len(keep):], f"{ctx.node.name} pooled")
    for d in info.dims[len(keep):] + new:
        ctx.ds.fix(d, "a pooled spatial axis")
    out = TensorInfo(keep + new, out_shape)
    return (out, out) if isinstance(ctx.result, tuple) else out


def kind_fixed(ctx: OpContext) -> Info:
    """Ops that only make sense on fixed axes (positions, masks): every axis they touch is fixed."""
    for a in list(ctx.node.args) + list(ctx.node.kwargs.values()):
        i = ctx.walker.info_of(a)
        if isinstance(i, TensorInfo):
            for d in i.dims:
                ctx.ds.fix(d, f"an axis used by {ctx.rule.name}")
    if isinstance(ctx.result, torch.Tensor):
        dims = ctx.fresh(tuple(ctx.result.shape))
        for d in dims:
            ctx.ds.fix(d, f"an axis produced by {ctx.rule.name}")
        return TensorInfo(dims, tuple(ctx.result.shape))
    return Const(ctx.result)


def kind_ignore(ctx: OpContext) -> Info:
    return Const(None)


KIND_HANDLERS: dict[str, Callable[[OpContext], Info]] = {
    "einsum": kind_einsum, "matmul": kind_matmul, "conv": kind_conv, "elementwise": kind_elementwise,
    "reshape": kind_reshape, "permute": kind_permute, "transpose": kind_transpose, "expand": kind_expand,
    "repeat": kind_repeat, "reduce": kind_reduce, "along": kind_along, "cat": kind_cat,
    "stack": kind_stack, "split": kind_split, "getitem": kind_getitem, "slice": kind_slice,
    "select": kind_select, "index_select": kind_index_select, "index": kind_index, "size": kind_size,
    "creation": kind_creation, "like": kind_like, "sdpa": kind_sdpa, "layer_norm": kind_layer_norm,
    "group_norm": kind_group_norm, "pool": kind_pool, "fixed": kind_fixed, "ignore": kind_ignore,
}


# -- losses (mup-ecosystem) -------------------------------------------------------------------------------
# Kept apart from the kinds above so that it merges cleanly: one handler and one registry entry.

_AT_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}  # aten's Reduction enum


def _loss_reduction(ctx: OpContext) -> str:
    """The reduction as a string ('none', 'mean', 'sum', 'batchmean'), legacy arguments resolved."""
    spec = ctx.rule.spec
    size_average = ctx.value(spec["size_average"], None) if "size_average" in spec else None
    reduce = ctx.value(spec["reduce"], None) if "reduce" in spec else None
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        return _reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    value = ctx.value(spec.get("reduction", "reduction@99"), spec.get("default_reduction", "mean"))
    if isinstance(value, int) and not isinstance(value, bool):
        if value not in _AT_REDUCTIONS:
            raise UnsupportedOpError(f"{ctx.where()}: unknown reduction {value} of {ctx.rule.name}")
        return _AT_REDUCTIONS[value]
    if value not in ("none", "mean", "sum", "batchmean"):
        raise UnsupportedOpError(f"{ctx.where()}: unknown reduction {value!r} of {ctx.rule.name}")
    return str(value)


def kind_loss(ctx: OpContext) -> Info:
    """A loss function: an elementwise loss over per-sample axes, then a reduction over all of them.

    With ``classes = true`` (cross_entropy, nll_loss) the input's class axis (1, or 0 for a 1-D input)
    is fixed, class weights share it, and an index target has the input's axes without the class axis
    (a probability target has all of them). Otherwise every tensor operand broadcasts elementwise
    (mse_loss, binary_cross_entropy_with_logits, kl_div). The reduction decides what a width axis among
    the per-sample axes does: ``'none'`` keeps it, ``'mean'`` is a mean over it (invariant under
    replication), ``'sum'`` and the non-batch axes of ``'batchmean'`` are a sum over it, which the widen
    stage compensates with ``1/k`` exactly as for ``torch.sum``.
    """
    spec = ctx.rule.spec
    refs = spec.get("module_operands") if ctx.module is not None else None
    refs = refs or spec.get("operands", ["input@0", "target@1"])
    infos = [ctx.info(r) for r in refs]
    tensors = [i for i in infos if isinstance(i, TensorInfo)]
    x = infos[0]
    if not isinstance(x, TensorInfo):
        raise UnsupportedOpError(f"{ctx.where()}: the input of {ctx.rule.name} is not a tensor")
    ds, where = ctx.ds, f"{ctx.rule.name} at {ctx.where()}"
    if spec.get("classes"):
        c_axis = 1 if len(x.dims) >= 2 else 0
        ds.fix(x.dims[c_axis], f"the class axis of {ctx.rule.name}")
        sample = tuple(d for k, d in enumerate(x.dims) if k != c_axis)
        sample_shape = tuple(s for k, s in enumerate(x.shape) if k != c_axis)
        # operands: input, target, then per-class weights (by position, so a (C,) weight of a (C, C)
        # input is never taken for a target)
        for pos, info in enumerate(infos[1:], start=1):
            if not isinstance(info, TensorInfo):
                continue
            if pos == 1 and info.shape == x.shape:  # class probabilities
                for a, b in zip(info.dims, x.dims):
                    ds.union(a, b, where)
            elif pos == 1 and info.shape == sample_shape:  # class indices
                for a, b in zip(info.dims, sample):
                    ds.union(a, b, where)
                for d in info.dims:
                    ds.fix(d, f"a target index axis of {ctx.rule.name}")
            elif pos > 1 and len(info.shape) == 1 and info.shape[0] == x.shape[c_axis]:  # class weights
                ds.union(info.dims[0], x.dims[c_axis], where)
            else:
                raise UnsupportedOpError(f"{ctx.where()}: {ctx.rule.name} operand {refs[pos]} of shape "
                                         f"{info.shape} does not match the input's {x.shape}")
    else:
        sample_shape = tuple(torch.broadcast_shapes(*(i.shape for i in tensors)))
        sample = _broadcast(ctx, sample_shape, tensors)
    reduction = _loss_reduction(ctx)
    results = ctx.result if isinstance(ctx.result, tuple) else (ctx.result,)
    out = results[0]
    if reduction == "none":
        if tuple(out.shape) != sample_shape:
            raise UnsupportedOpError(f"{ctx.where()}: {ctx.rule.name} with reduction='none' returned "
                                     f"shape {tuple(out.shape)}, expected {sample_shape}")
        info = TensorInfo(sample, sample_shape)
    else:
        summed = sample if reduction == "sum" else sample[1:] if reduction == "batchmean" else ()
        if summed:
            ctx.requests.multipliers.append(OutputMultiplier(
                ctx.node.name, tuple(summed), f"{ctx.rule.name} with reduction={reduction!r} sums over "
                "these axes"))
        info = TensorInfo((), tuple(out.shape))
        if out.dim() != 0:
            raise UnsupportedOpError(f"{ctx.where()}: {ctx.rule.name} with reduction={reduction!r} "
                                     f"returned shape {tuple(out.shape)}, expected a scalar")
    if len(results) == 1:
        return info if not isinstance(ctx.result, tuple) else (info,)
    return (info,) + tuple(TensorInfo(ctx.fresh(tuple(r.shape)), tuple(r.shape)) for r in results[1:])


def kind_broadcast_tensors(ctx: OpContext) -> Info:
    """``torch.broadcast_tensors`` (export lowers ``mse_loss`` through it): each output has the
    broadcast shape, its axes shared with the operands' as in any elementwise op."""
    infos = [i for i in ctx.info(ctx.rule.get("tensors", "tensors@0")) if isinstance(i, TensorInfo)]
    results = tuple(ctx.result)
    dims = _broadcast(ctx, tuple(results[0].shape), infos)
    return tuple(TensorInfo(dims, tuple(r.shape)) for r in results)


KIND_HANDLERS["loss"] = kind_loss
KIND_HANDLERS["broadcast_tensors"] = kind_broadcast_tensors
