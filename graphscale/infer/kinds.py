"""The rule kinds: how each family of ops relates the dimensions of its inputs and outputs.

A rule in ``rules/*.toml`` picks one kind and gives it arguments; the kind is the only code that looks at
an op. Each kind is registered with :func:`~graphscale.infer.schema.kind`, which declares the rule keys
it accepts (checked when a rule file loads). Its handler takes a :class:`~graphscale.infer.call.Call`
(the op's arguments by name, the called module, the result) and returns the output's
:class:`~graphscale.infer.values.Info`, adding relations to the dimension system and requests (argument
rewrites, inserted multipliers, refusals) for the widen stage. Adding a kind is rare; adding an op to an
existing kind is a rule.

Example (the rule that covers ``nn.Linear`` in fx and ``aten.linear`` in export graphs)::

    [[rule]]
    name = "linear"
    kind = "einsum"
    targets = ["torch.nn.functional.linear", "aten.linear.default", "module:torch.nn.Linear"]
    operands = ["input", "weight", "bias"]
    module_operands = ["input", "param:weight", "param:bias"]
    pattern = "... i, o i, o -> ... o"
    weights = [1, 2]
    module_attrs = { in_features = "weight[1]", out_features = "weight[0]" }
"""

from __future__ import annotations

import math
from typing import Any

import torch

from graphscale.errors import UnsupportedOpError
from graphscale.infer.call import Call, Loc, Ref
from graphscale.infer.schema import Key, Pattern, kind
from graphscale.infer.values import (
    AttentionScale,
    Const,
    Info,
    Opaque,
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


# -- contractions -----------------------------------------------------------------------------------------


def _check_einsum(spec: Any, targets: list[str]) -> list[tuple[str, str]]:
    """Operand lists match the pattern; named letters are in it; each target has operands to read."""
    pattern: Pattern = spec["pattern"]
    problems = []
    for key in ("operands", "module_operands"):
        refs = spec.get(key)
        if refs is not None and len(refs) != len(pattern.operands):
            problems.append((key, f"lists {len(refs)} operands but pattern has {len(pattern.operands)}"))
    for key in ("index", "fixed", "forbid", "invariant"):
        for letter in spec.get(key, ()):
            if letter not in pattern.letters:
                problems.append((key, f"letter {letter!r} is not in the pattern"))
    for w in spec.get("weights", ()):
        if not 0 <= w < len(pattern.operands):
            problems.append(("weights", f"operand index {w} is outside the pattern's operands"))
    if any(not t.startswith("module:") for t in targets) and spec.get("operands") is None:
        problems.append(("operands", "is missing; the function targets need it"))
    if any(t.startswith("module:") for t in targets) and spec.get("operands") is None \
            and spec.get("module_operands") is None:
        problems.append(("module_operands", "is missing; the module targets need it"))
    return problems


def _einsum_core(ctx: Call, operands: list[tuple[str, Any, Loc | None]], pattern: Pattern,
                 out: torch.Tensor, natures: Any = None) -> TensorInfo:
    """Relate operands by an axis pattern; contracted letters become fan-in axes or output multipliers.

    ``operands`` are ``(label, info, where)`` per pattern operand (``where`` locates an activation, for a
    tied parameter's compensation); ``natures`` gives the letter lists ``index``/``fixed``/``forbid``/
    ``invariant`` and the operand positions that are ``weights``.
    """
    natures = natures if natures is not None else {}
    if len(pattern.operands) != len(operands):
        raise UnsupportedOpError(f"{ctx.where()}: pattern of {ctx.rule.name!r} has {len(pattern.operands)} "
                                 f"operands, the call has {len(operands)}")
    letters: dict[str, int] = {}
    ellipses: list[TensorInfo] = []
    present: list[tuple[int, str, TensorInfo, list[str], Loc | None]] = []
    for i, ((label, info, loc), pat) in enumerate(zip(operands, pattern.operands)):
        if info is None or isinstance(info, Const) and not isinstance(info.value, torch.Tensor):
            continue
        if not isinstance(info, TensorInfo):
            raise UnsupportedOpError(f"{ctx.where()}: operand {label} of {ctx.rule.name!r} is not a tensor")
        nd = len(info.dims)
        if "..." in pat:
            k = pat.index("...")
            before, after = list(pat[:k]), list(pat[k + 1:])
            n_ell = nd - len(before) - len(after)
            axes = before + [f"...{j}" for j in range(n_ell)] + after
            ell_dims = info.dims[len(before):len(before) + n_ell]
            ellipses.append(TensorInfo(ell_dims, info.shape[len(before):len(before) + n_ell]))
        else:
            axes = list(pat)
        if len(axes) != nd:
            raise UnsupportedOpError(f"{ctx.where()}: operand {label} has {nd} axes, rule {ctx.rule.name!r} "
                                     f"expects pattern {' '.join(pat)}")
        for letter, d in zip(axes, info.dims):
            if letter.startswith("..."):
                continue
            if letter in letters:
                ctx.ds.union(letters[letter], d, f"{ctx.rule.name} at {ctx.where()}")
            else:
                letters[letter] = d
        present.append((i, label, info, axes, loc))
    out_pat = list(pattern.output)
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
    index = natures.get("index") or ()
    for letter in index:
        if letter in letters:
            ctx.ds.fix(letters[letter], f"a lookup index axis ({ctx.rule.name})")
    for letter in natures.get("fixed") or ():
        if letter in letters:
            ctx.ds.fix(letters[letter], f"fixed by nature in {ctx.rule.name}")
    for letter in natures.get("forbid") or ():
        if letter in letters:
            ctx.requests.refusals.append(Refusal(ctx.node.name, letters[letter],
                                                 f"{ctx.rule.name} is not replication-invariant over it"))
    out_letters = set(out_pat)
    invariant = natures.get("invariant") or ()
    contracted = [x for x in letters if x not in out_letters and x not in index and x not in invariant]
    weights = natures.get("weights")
    param_ops = [p for p in present if p[2].param is not None and (weights is None or p[0] in weights)]
    activation = next((p for p in present if p not in param_ops), None)
    act_loc = activation[4] if activation is not None else None
    for _, _, info, axes, _ in param_ops:
        name, param_axes = info.param  # type: ignore[misc]
        fan_in = tuple(sorted({param_axes[j] for j, x in enumerate(axes)
                               if x in contracted and param_axes[j] is not None}))
        ctx.requests.uses.append(ParamUse(name, ctx.node.name, fan_in, act_loc))  # type: ignore[arg-type]
    absorbed = {x for _, _, _, axes, _ in param_ops for x in axes}
    free = tuple(letters[x] for x in contracted if x not in absorbed)
    if free:
        ctx.requests.multipliers.append(OutputMultiplier(
            ctx.node.name, free, f"{ctx.rule.name} sums over these axes with no parameter to absorb it"))
    return TensorInfo(out_dims, out_shape)


def _operands(ctx: Call, refs: tuple[Ref, ...]) -> list[tuple[str, Any, Loc | None]]:
    out = []
    for ref in refs:
        loc = ctx.loc(ref)
        out.append((str(ref), ctx.info(ref), loc if loc is not None and loc[0] in ("pos", "kw") else None))
    return out


@kind("einsum", check=_check_einsum,
      pattern=Key("pattern", required=True, doc="the axes of each operand and of the output"),
      operands=Key("refs", doc="the operands, in pattern order (function targets)"),
      module_operands=Key("refs", doc="the operands of a module target (param:weight...)"),
      weights=Key("ints", doc="operand positions that are weights (default: every parameter)"),
      index=Key("letters", default=(), doc="lookup index axes (fixed, not summed)"),
      fixed=Key("letters", default=(), doc="axes fixed by nature"),
      forbid=Key("letters", default=(), doc="axes the op is not replication-invariant over"),
      invariant=Key("letters", default=(), doc="contracted axes whose sum is a mean (not a fan-in)"))
def kind_einsum(ctx: Call) -> Info:
    """Contractions and per-channel ops described by an axis pattern (Linear, embedding, batch norm)."""
    refs = ctx.spec("module_operands") if ctx.module is not None else None
    refs = refs or ctx.spec("operands")
    out = ctx.result[0] if isinstance(ctx.result, tuple) else ctx.result
    info = _einsum_core(ctx, _operands(ctx, refs), ctx.spec("pattern"), out, ctx.rule.spec)
    if isinstance(ctx.result, tuple):  # e.g. native batch norm: (out, save_mean, save_invstd)
        return (info,) + tuple(TensorInfo(ctx.fresh(tuple(r.shape)), tuple(r.shape))
                               for r in ctx.result[1:])
    return info


@kind("matmul")
def kind_matmul(ctx: Call) -> Info:
    """``matmul``/``mm``/``bmm``/``@``: the pattern follows the operands' ranks."""
    a_ref, b_ref = Ref.parse("input"), Ref.parse("other|mat2|b")
    a, b = ctx.value(a_ref), ctx.value(b_ref)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise UnsupportedOpError(f"{ctx.where()}: matmul needs two tensors")
    if a.ndim == 0 or b.ndim == 0:
        raise UnsupportedOpError(f"{ctx.where()}: matmul of a 0-d tensor")
    pa = ["m", "k"] if a.ndim >= 2 else ["k"]
    pb = ["k", "n"] if b.ndim >= 2 else ["k"]
    out = (["m"] if a.ndim >= 2 else []) + (["n"] if b.ndim >= 2 else [])
    lead_a = "... " if a.ndim > 2 else ""
    lead_b = "... " if b.ndim > 2 else ""
    lead_o = "... " if max(a.ndim, b.ndim) > 2 else ""
    pattern = Pattern.parse(f"{lead_a}{' '.join(pa)}, {lead_b}{' '.join(pb)} -> {lead_o}{' '.join(out)}")
    return _einsum_core(ctx, _operands(ctx, (a_ref, b_ref)), pattern, ctx.result)


@kind("conv",
      operands=Key("refs", default=["input", "weight", "bias"], doc="input, weight, bias"),
      module_operands=Key("refs", default=["input", "param:weight", "param:bias"]),
      groups=Key("ref", default="groups"), module_groups=Key("ref", default="attr:groups"),
      transposed=Key("ref", doc="the argument saying the convolution is transposed (refused)"))
def kind_conv(ctx: Call) -> Info:
    """Convolutions (with groups): channels contract, kernel windows and spatial axes are fixed."""
    module = ctx.module is not None
    refs = ctx.spec("module_operands") if module else ctx.spec("operands")
    x = ctx.tensor(refs[0])
    w = ctx.tensor(refs[1])
    bias = ctx.info(refs[2]) if len(refs) > 2 else None
    groups_ref = ctx.spec("module_groups") if module else ctx.spec("groups")
    groups = int(ctx.value(groups_ref, 1) or 1)
    if ctx.spec("transposed") is not None and ctx.value(ctx.spec("transposed"), False):
        raise UnsupportedOpError(f"{ctx.where()}: transposed convolution is not supported yet")
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
        loc = ctx.loc(groups_ref)
        if loc is None or loc[0] == "varargs":
            raise UnsupportedOpError(f"{ctx.where()}: cannot locate the groups argument to rewrite it")
        ctx.requests.scalars.append(ScalarSize(ctx.node.name, loc, g))  # type: ignore[arg-type]
    for d in w.dims[2:]:
        ds.fix(d, "a convolution kernel window")
    if bias is not None and isinstance(bias, TensorInfo):
        ds.union(bias.dims[0], w.dims[0], where)
        if bias.param is not None:
            ctx.requests.uses.append(ParamUse(bias.param[0], ctx.node.name, ()))
    if w.param is not None:
        fan_in = tuple(ax for ax in (w.param[1][1],) if ax is not None)
        x_loc = ctx.loc(refs[0])
        ctx.requests.uses.append(ParamUse(w.param[0], ctx.node.name, fan_in,
                                          x_loc if x_loc is not None and x_loc[0] in ("pos", "kw")
                                          else None))  # type: ignore[arg-type]
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


@kind("elementwise",
      view=Key("bool", default=False, doc="the op returns its input unchanged (a parameter stays one)"),
      warn=Key("str", doc="a note added to the plan when the op runs in training mode"),
      training=Key("ref", default="training|train", doc="the argument saying training mode"))
def kind_elementwise(ctx: Call) -> Info:
    """Elementwise ops and broadcasting: aligned axes are equal."""
    infos: list[TensorInfo] = []
    sizes: list[SizeInfo] = []
    for i in ctx.arg_infos():
        if isinstance(i, TensorInfo):
            infos.append(i)
        elif isinstance(i, SizeInfo):
            sizes.append(i)
    if ctx.spec("warn") and _training(ctx):
        ctx.requests.warnings.append(f"{ctx.where()}: {ctx.spec('warn')}")
    result = ctx.result
    if not isinstance(result, torch.Tensor):
        if isinstance(result, int) and sizes:
            return SizeInfo(result, None)  # arithmetic on sizes: a derived int, not a size read
        return Const(result)
    dims = _broadcast(ctx, tuple(result.shape), infos)
    param = None
    if ctx.spec("view") and infos and infos[0].param is not None:
        param = _view_param(infos[0], dims)
    return TensorInfo(dims, tuple(result.shape), param)


def _training(ctx: Call) -> bool:
    if ctx.module is not None:
        return ctx.module.training
    return bool(ctx.value(ctx.spec("training"), None))


def _reshape_groups(ctx: Call, info: TensorInfo, out_shape: tuple[int, ...]) -> tuple[int, ...]:
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


@kind("reshape", input=Key("ref", default="input"),
      shape=Key("ref", doc="the size argument to rewrite (absent: the op takes no sizes)"),
      shape_offset=Key("ref", doc="the axis where the sizes start (unflatten's dim)"))
def kind_reshape(ctx: Call) -> Info:
    """Reshapes relate axes by products; literal sizes of width axes are rewritten."""
    info = ctx.tensor(ctx.spec("input"))
    out_shape = tuple(ctx.result.shape)
    dims = _reshape_groups(ctx, info, out_shape)
    if ctx.spec("shape") is not None:
        _shape_request(ctx, ctx.spec("shape"), dims, ctx.spec("shape_offset"))
    return TensorInfo(dims, out_shape, _view_param(info, dims))


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


@kind("permute", input=Key("ref", default="input"), dims=Key("ref", default="dims"))
def kind_permute(ctx: Call) -> Info:
    """Axes move; a parameter seen through a permute stays that parameter."""
    info = ctx.tensor(ctx.spec("input"))
    order = _dims_arg(ctx.value(ctx.spec("dims")), len(info.dims))
    if order is None or sorted(order) != list(range(len(info.dims))):
        raise UnsupportedOpError(f"{ctx.where()}: cannot read the permutation of {ctx.rule.name!r}")
    dims = tuple(info.dims[k] for k in order)
    return TensorInfo(dims, tuple(ctx.result.shape), _view_param(info, dims))


@kind("transpose", input=Key("ref", default="input"), dim0=Key("ref", default="dim0|axis0"),
      dim1=Key("ref", default="dim1|axis1"))
def kind_transpose(ctx: Call) -> Info:
    """Two axes swap (``t()`` and friends: the last two)."""
    info = ctx.tensor(ctx.spec("input"))
    nd = len(info.dims)
    if nd < 2:
        return info
    d0 = _norm_dim(int(ctx.value(ctx.spec("dim0"), -2 if nd > 2 else 0)), nd)
    d1 = _norm_dim(int(ctx.value(ctx.spec("dim1"), -1)), nd)
    dims = list(info.dims)
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return TensorInfo(tuple(dims), tuple(ctx.result.shape), _view_param(info, tuple(dims)))


@kind("expand", input=Key("ref", default="input"), shape=Key("ref", doc="the size argument to rewrite"))
def kind_expand(ctx: Call) -> Info:
    """Broadcasting to a shape: axes it creates are fixed."""
    info = ctx.tensor(ctx.spec("input"))
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
    if ctx.spec("shape") is not None:
        _shape_request(ctx, ctx.spec("shape"), tuple(dims))
    return TensorInfo(tuple(dims), out_shape)


@kind("repeat", input=Key("ref", default="input"), repeats=Key("ref", default="repeats"))
def kind_repeat(ctx: Call) -> Info:
    """``repeat`` tiles: a repeated axis is the concatenation of copies of the input axis."""
    info = ctx.tensor(ctx.spec("input"))
    reps = [int(r) for r in ctx.value(ctx.spec("repeats"))]
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

_REDUCE_MODES = ("sum", "mean", "variance", "forbid", "index")


def _check_mode(modes: tuple[str, ...]) -> Any:
    def check(spec: Any, targets: list[str]) -> list[tuple[str, str]]:
        mode = spec.get("mode")
        return [("mode", f"{mode!r} is not one of {list(modes)}")] if mode not in modes else []
    return check


@kind("reduce", check=_check_mode(_REDUCE_MODES), input=Key("ref", default="input"),
      dim=Key("ref", default="dim"), keepdim=Key("ref", default="keepdim"),
      correction=Key("ref", default="correction"), unbiased=Key("ref", default="unbiased"),
      mode=Key("str", default="mean", doc=f"one of {_REDUCE_MODES}"))
def kind_reduce(ctx: Call) -> Info:
    """Reductions: a mean or max over a width axis is invariant, a sum is compensated, others refused."""
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


@kind("along", check=_check_mode(("forbid", "allow")), input=Key("ref", default="input"),
      dim=Key("ref", default="dim"), mode=Key("str", default="forbid", doc="forbid or allow"),
      why=Key("str", default="along it is not replication-invariant", doc="the refusal's reason"))
def kind_along(ctx: Call) -> Info:
    """An op along one axis that keeps the shape (softmax, cumsum): refused if that axis is width."""
    info = ctx.tensor(ctx.spec("input"))
    d = ctx.value(ctx.spec("dim"))
    if d is not None and ctx.spec("mode") == "forbid":
        k = _norm_dim(int(d), len(info.dims))
        ctx.requests.refusals.append(Refusal(ctx.node.name, info.dims[k],
                                             f"{ctx.rule.name} {ctx.spec('why')}"))
    return TensorInfo(info.dims, tuple(ctx.result.shape))


# -- concatenation, splitting, indexing --------------------------------------------------------------------


@kind("cat", tensors=Key("ref", default="tensors"), dim=Key("ref", default="dim|axis"))
def kind_cat(ctx: Call) -> Info:
    """Concatenation: the joined axis is the concatenation of the parts' axes."""
    parts = [i for i in ctx.info(ctx.spec("tensors")) if isinstance(i, TensorInfo)]
    out_shape = tuple(ctx.result.shape)
    nd = len(out_shape)
    d = _norm_dim(int(ctx.value(ctx.spec("dim"), 0)), nd)
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


@kind("stack", tensors=Key("ref", default="tensors"), dim=Key("ref", default="dim"))
def kind_stack(ctx: Call) -> Info:
    """Stacking: equal axes, plus a new fixed axis."""
    parts = [i for i in ctx.info(ctx.spec("tensors")) if isinstance(i, TensorInfo)]
    out_shape = tuple(ctx.result.shape)
    d = _norm_dim(int(ctx.value(ctx.spec("dim"), 0)), len(out_shape))
    dims = list(parts[0].dims)
    for p in parts[1:]:
        for a, b in zip(dims, p.dims):
            ctx.ds.union(a, b, f"stack at {ctx.where()}")
    new = ctx.ds.new(out_shape[d], f"{ctx.node.name}[{d}]")
    ctx.ds.fix(new, "an axis created by stack")
    dims.insert(d, new)
    return TensorInfo(tuple(dims), out_shape)


@kind("split", input=Key("ref", default="input"), dim=Key("ref", default="dim"),
      sizes=Key("ref", doc="the split sizes argument to rewrite"),
      unbind=Key("bool", default=False, doc="the op removes the axis (unbind)"))
def kind_split(ctx: Call) -> Info:
    """split/chunk/unbind: the axis is the concatenation of the parts."""
    info = ctx.tensor(ctx.spec("input"))
    outs = list(ctx.result)
    nd = len(info.dims)
    if ctx.spec("unbind"):
        d = _norm_dim(int(ctx.value(ctx.spec("dim"), 0)), nd)
        ctx.ds.fix(info.dims[d], "an axis taken apart by unbind")
        rest = info.dims[:d] + info.dims[d + 1:]
        return tuple(TensorInfo(rest, tuple(o.shape)) for o in outs)
    d = _norm_dim(int(ctx.value(ctx.spec("dim"), 0)), nd)
    part_dims = [ctx.ds.new(o.shape[d], f"{ctx.node.name}[{i}][{d}]") for i, o in enumerate(outs)]
    ctx.ds.concat(info.dims[d], part_dims, f"split at {ctx.where()}")
    size_ref = ctx.spec("sizes")
    if size_ref is not None:
        loc = ctx.loc(size_ref)
        sizes = ctx.value(size_ref)
        if loc is not None and loc[0] in ("pos", "kw") and isinstance(sizes, int):
            for p in part_dims[1:-1]:  # equal chunks; the last may be shorter
                ctx.ds.union(part_dims[0], p, f"split at {ctx.where()}")
            if len(part_dims) > 1 and outs[-1].shape[d] == outs[0].shape[d]:
                ctx.ds.union(part_dims[0], part_dims[-1], f"split at {ctx.where()}")
            ctx.requests.scalars.append(ScalarSize(ctx.node.name, loc, part_dims[0]))  # type: ignore[arg-type]
        elif loc is not None and loc[0] in ("pos", "kw"):
            ctx.requests.shapes.append(ShapeEntries(ctx.node.name, loc,  # type: ignore[arg-type]
                                                    tuple((k, p) for k, p in enumerate(part_dims))))
    result = []
    for o, p in zip(outs, part_dims):
        dims = info.dims[:d] + (p,) + info.dims[d + 1:]
        result.append(TensorInfo(dims, tuple(o.shape)))
    return tuple(result)


def _slice_part(ctx: Call, dim: int, size: int, start: int | None, stop: int | None,
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


@kind("getitem")
def kind_getitem(ctx: Call) -> Info:
    """``x[...]`` on a tensor, or picking an item of a tuple (split outputs, sizes)."""
    container = ctx.info("input")
    index = ctx.value("index|b")
    if isinstance(container, tuple):
        return container[index] if not isinstance(index, slice) else tuple(container[index])
    if not isinstance(container, TensorInfo):
        if isinstance(ctx.result, torch.Tensor):  # a tensor out of something the walk cannot describe
            return Opaque(ctx.node.name, "a tensor taken out of a value graphscale cannot describe")
        return Const(ctx.result)
    return _tensor_index(ctx, container, index)


def _tensor_index(ctx: Call, info: TensorInfo, index: Any) -> Info:
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


@kind("slice")
def kind_slice(ctx: Call) -> Info:
    """``aten.slice.Tensor(x, dim, start, end, step)``."""
    info = ctx.tensor("input")
    nd = len(info.dims)
    d = _norm_dim(int(ctx.value("dim", 0)), nd)
    start, end, step = ctx.value("start"), ctx.value("end"), ctx.value("step", 1)
    out_shape = tuple(ctx.result.shape)
    got = _slice_part(ctx, info.dims[d], info.shape[d], start, end, step, out_shape[d])
    dims = list(info.dims)
    if got is not None:
        dims[d] = got[0]
        ctx.requests.slices.append(SliceBounds(ctx.node.name, ("pos", 2), None, got[1], got[0]))
    elif out_shape[d] != info.shape[d]:
        dims[d] = ctx.ds.new(out_shape[d], ctx.node.name)
    return TensorInfo(tuple(dims), out_shape, _view_param(info, tuple(dims)))


@kind("select", dim=Key("ref", default="dim"))
def kind_select(ctx: Call) -> Info:
    """One position of an axis: the axis is fixed and removed."""
    info = ctx.tensor("input")
    d = _norm_dim(int(ctx.value(ctx.spec("dim"))), len(info.dims))
    ctx.ds.fix(info.dims[d], "an axis indexed at one position")
    return TensorInfo(info.dims[:d] + info.dims[d + 1:], tuple(ctx.result.shape))


@kind("index_select")
def kind_index_select(ctx: Call) -> Info:
    """Positions of an axis picked by a tensor: the axis is fixed."""
    info = ctx.tensor("input")
    d = _norm_dim(int(ctx.value("dim")), len(info.dims))
    ctx.ds.fix(info.dims[d], "an axis indexed by a tensor")
    dims = list(info.dims)
    dims[d] = ctx.ds.new(ctx.result.shape[d], ctx.node.name)
    return TensorInfo(tuple(dims), tuple(ctx.result.shape))


@kind("index")
def kind_index(ctx: Call) -> Info:
    """``aten.index.Tensor(x, [i0, None, i2])``: advanced indexing with a list of index tensors."""
    info = ctx.tensor("input")
    indices = ctx.value("indices")
    items = [slice(None) if i is None else i for i in indices]
    return _tensor_index(ctx, info, tuple(items))


# -- shapes, attributes and creation ------------------------------------------------------------------------


@kind("size", dim=Key("ref", default="dim"))
def kind_size(ctx: Call) -> Info:
    """``x.size()``, ``x.size(d)``, ``aten.sym_size``: ints that measure a dimension."""
    info = ctx.tensor("input", " (reading its size)")
    d = ctx.value(ctx.spec("dim"))
    if isinstance(ctx.result, int) and d is not None:
        return SizeInfo(ctx.result, info.dims[_norm_dim(int(d), len(info.dims))])
    if isinstance(ctx.result, tuple | list | torch.Size):
        return tuple(SizeInfo(int(s), dm) for s, dm in zip(ctx.result, info.dims))
    return Const(ctx.result)


# attributes of a tensor that are plain constants (not tensors, not sizes)
_CONST_ATTRIBUTES = frozenset({
    "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_leaf", "is_sparse", "is_quantized",
    "is_meta", "is_mps", "is_xpu", "layout", "names", "is_nested", "itemsize", "nbytes", "is_cpu",
})


@kind("attribute", tolerates_opaque=False)
def kind_attribute(ctx: Call) -> Info:
    """``getattr(x, name)`` on a tensor: ``shape`` gives sizes; ``T``/``mT``/``H``/``mH`` are (conjugate)
    transposes and ``real``/``data`` the same axes, so a parameter read through them stays that
    parameter (a tied readout ``h @ emb.weight.T``); any other tensor-valued attribute is opaque."""
    info = ctx.info("input")
    name = ctx.value("name")
    result = ctx.result
    if not isinstance(info, TensorInfo):
        if isinstance(result, torch.Tensor):
            return Opaque(ctx.node.name, f"attribute {name!r} of a value graphscale cannot describe")
        return Const(result)
    nd = len(info.dims)
    if name == "shape":
        return tuple(SizeInfo(int(s), dm) for s, dm in zip(result, info.dims))
    if name in _CONST_ATTRIBUTES:
        return Const(result)
    order: list[int] | None = None
    if name == "T" or name == "H" and nd <= 2:
        order = list(range(nd))[::-1]
    elif name in ("mT", "mH") and nd >= 2:
        order = list(range(nd - 2)) + [nd - 1, nd - 2]
    elif name in ("real", "data"):
        order = list(range(nd))
    if order is not None and isinstance(result, torch.Tensor) and \
            tuple(result.shape) == tuple(info.shape[k] for k in order):
        dims = tuple(info.dims[k] for k in order)
        return TensorInfo(dims, tuple(result.shape), _view_param(info, dims))
    if isinstance(result, torch.Tensor) or isinstance(result, tuple | list):
        return Opaque(ctx.node.name, f"tensor attribute {name!r}, which graphscale does not describe")
    return Const(result)


@kind("creation", shape=Key("ref", doc="the size argument to rewrite"),
      fixed=Key("bool", default=False, doc="the created axes are fixed (positions)"))
def kind_creation(ctx: Call) -> Info:
    """A tensor made from sizes: fresh axes (related later through its uses)."""
    out = ctx.result
    shape = tuple(out.shape)
    dims = ctx.fresh(shape)
    if ctx.spec("fixed"):
        for d in dims:
            ctx.ds.fix(d, f"an axis created by {ctx.rule.name}")
    if ctx.spec("shape") is not None:
        _shape_request(ctx, ctx.spec("shape"), dims)
    return TensorInfo(dims, shape)


@kind("like", input=Key("ref", default="input"))
def kind_like(ctx: Call) -> Info:
    """The same axes as the input."""
    info = ctx.tensor(ctx.spec("input"))
    return TensorInfo(info.dims, tuple(ctx.result.shape))


# -- attention and normalization ---------------------------------------------------------------------------


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


@kind("layer_norm", shape=Key("ref", default="normalized_shape"),
      params=Key("refs", default=["weight", "bias"]),
      module_shape=Key("ref", default="attr:normalized_shape"),
      module_params=Key("refs", default=["param:weight", "param:bias"]))
def kind_layer_norm(ctx: Call) -> Info:
    """LayerNorm / RMSNorm: statistics over the trailing ``normalized_shape`` axes (mean-like: invariant)."""
    module = ctx.module is not None
    info = ctx.tensor("input")
    norm_shape = ctx.value(ctx.spec("module_shape") if module else ctx.spec("shape"))
    norm_shape = [norm_shape] if isinstance(norm_shape, int) else list(norm_shape)
    n = len(norm_shape)
    tail = info.dims[len(info.dims) - n:]
    for ref in ctx.spec("module_params") if module else ctx.spec("params"):
        p = ctx.info(ref)
        if isinstance(p, TensorInfo):
            for a, b in zip(p.dims, tail):
                ctx.ds.union(a, b, f"normalization at {ctx.where()}")
            if p.param is not None:
                ctx.requests.uses.append(ParamUse(p.param[0], ctx.node.name, ()))
    if not module:
        _shape_request(ctx, ctx.spec("shape"), info.dims, align="trailing")
    result = ctx.result[0] if isinstance(ctx.result, tuple) else ctx.result
    out = TensorInfo(info.dims, tuple(result.shape))
    if isinstance(ctx.result, tuple):
        return (out,) + tuple(TensorInfo(ctx.fresh(tuple(r.shape)), tuple(r.shape)) for r in ctx.result[1:])
    return out


@kind("group_norm", groups=Key("ref", default="num_groups"), params=Key("refs", default=["weight", "bias"]),
      module_groups=Key("ref", default="attr:num_groups"),
      module_params=Key("refs", default=["param:weight", "param:bias"]))
def kind_group_norm(ctx: Call) -> Info:
    """GroupNorm: channels are groups x channels-per-group; statistics within a group are means."""
    module = ctx.module is not None
    info = ctx.tensor("input")
    groups_ref = ctx.spec("module_groups") if module else ctx.spec("groups")
    groups = int(ctx.value(groups_ref))
    c = info.dims[1]
    if groups > 1:
        g = ctx.ds.new(groups, f"{ctx.node.name}.groups")
        per = ctx.ds.new(info.shape[1] // groups, f"{ctx.node.name}.channels_per_group")
        ctx.ds.prod(c, [g, per], f"group norm at {ctx.where()}")
        loc = ctx.loc(groups_ref)
        if loc is not None and loc[0] != "varargs":
            ctx.requests.scalars.append(ScalarSize(ctx.node.name, loc, g))  # type: ignore[arg-type]
    for ref in ctx.spec("module_params") if module else ctx.spec("params"):
        p = ctx.info(ref)
        if isinstance(p, TensorInfo):
            ctx.ds.union(p.dims[0], c, f"group norm at {ctx.where()}")
            if p.param is not None:
                ctx.requests.uses.append(ParamUse(p.param[0], ctx.node.name, ()))
    return TensorInfo(info.dims, tuple(ctx.result.shape))


@kind("pool", spatial=Key("int", default=2, doc="how many trailing axes are pooled"))
def kind_pool(ctx: Call) -> Info:
    """Pooling / resizing over the trailing ``spatial`` axes; the leading (batch, channel) axes pass."""
    info = ctx.tensor("input")
    spatial = int(ctx.spec("spatial"))
    out_shape = tuple(ctx.result[0].shape if isinstance(ctx.result, tuple) else ctx.result.shape)
    keep = info.dims[:len(info.dims) - spatial]
    new = ctx.fresh(out_shape[len(keep):], f"{ctx.node.name} pooled")
    for d in info.dims[len(keep):] + new:
        ctx.ds.fix(d, "a pooled spatial axis")
    out = TensorInfo(keep + new, out_shape)
    return (out, out) if isinstance(ctx.result, tuple) else out


@kind("fixed")
def kind_fixed(ctx: Call) -> Info:
    """Ops that only make sense on fixed axes (positions, masks): every axis they touch is fixed."""
    for i in ctx.arg_infos():
        if isinstance(i, TensorInfo):
            for d in i.dims:
                ctx.ds.fix(d, f"an axis used by {ctx.rule.name}")
    if isinstance(ctx.result, torch.Tensor):
        dims = ctx.fresh(tuple(ctx.result.shape))
        for d in dims:
            ctx.ds.fix(d, f"an axis produced by {ctx.rule.name}")
        return TensorInfo(dims, tuple(ctx.result.shape))
    return Const(ctx.result)


@kind("ignore", tolerates_opaque=True)
def kind_ignore(ctx: Call) -> Info:
    """Assertions and guards: no value, no relation."""
    return Const(None)


def __getattr__(name: str) -> Any:
    if name == "KIND_HANDLERS":  # the old table, for code that still reads it
        from graphscale.infer.schema import KINDS

        return {k: spec.handler for k, spec in KINDS.items()}
    raise AttributeError(name)
