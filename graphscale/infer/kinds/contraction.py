"""Contractions: axis patterns (Linear, embedding, batch norm), matmul, convolution."""

from __future__ import annotations

from typing import Any

import torch

from graphscale.errors import UnsupportedOpError
from graphscale.infer.call import Call, Loc, Ref
from graphscale.infer.kinds._common import (
    _broadcast,
)
from graphscale.infer.schema import Key, Pattern, kind
from graphscale.infer.values import (
    Const,
    Info,
    OutputMultiplier,
    ParamUse,
    Refusal,
    ScalarSize,
    TensorInfo,
)


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
    ``invariant``, the operand positions that are ``weights``, and ``scale_operand``: the operand (a
    :class:`Ref`) that carries an inserted ``1/k`` instead of the output, where the op adds another term.
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
    # a contracted axis shared by several weights (two parameters multiplied, a table contracted with a
    # lookup buffer: timm MaxViT's relative-position bias) is summed once: only one of them may carry the
    # compensating 1/k, else the sum shrinks by 1/k per extra weight. The last in operand order takes it
    # (x @ W's weight; a @ b's b), the others keep their copies equal along it.
    owner = {x: i for i, (_, _, _, axes, _) in enumerate(param_ops) for x in axes if x in contracted}
    for i, (_, _, info, axes, _) in enumerate(param_ops):
        name, param_axes = info.param  # type: ignore[misc]
        fan_in = tuple(sorted({param_axes[j] for j, x in enumerate(axes)
                               if x in contracted and owner[x] == i and param_axes[j] is not None}))
        ctx.requests.uses.append(ParamUse(name, ctx.node.name, fan_in, act_loc))  # type: ignore[arg-type]
    absorbed = {x for _, _, _, axes, _ in param_ops for x in axes}
    free = tuple(letters[x] for x in contracted if x not in absorbed)
    if free:
        scale_at = natures.get("scale_operand")
        loc = ctx.loc(scale_at) if scale_at is not None else None
        if scale_at is not None and (loc is None or loc[0] not in ("pos", "kw")):
            raise UnsupportedOpError(f"{ctx.where()}: {ctx.rule.name!r} sums over a width axis with no "
                                     f"parameter, and its operand {str(scale_at)!r} cannot be located to "
                                     "carry the compensating 1/k")
        ctx.requests.multipliers.append(OutputMultiplier(
            ctx.node.name, free, f"{ctx.rule.name} sums over these axes with no parameter to absorb it",
            loc))  # type: ignore[arg-type]
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


@kind("batch_norm", check=_check_einsum,
      pattern=Key("pattern", required=True, doc="the axes of each operand and of the output"),
      operands=Key("refs", doc="the operands, in pattern order (function targets)"),
      module_operands=Key("refs", doc="the operands of a module target (param:weight...)"),
      training=Key("ref", default="training", doc="the flag that makes it use batch statistics"),
      running_mean=Key("ref", default="running_mean",
                       doc="the running statistics; without them it uses batch statistics"))
def kind_batch_norm(ctx: Call) -> Info:
    """Batch norm: per-channel like ``einsum`` with the pattern. With batch statistics (training, or no
    running statistics) it also normalizes over every axis but the channels (axis 1); the mean and variance
    over a widened axis are not those of the narrow one (a weight standardized over its fan-in, whose
    copies are rescaled: NFNet's ScaledStdConv2d), so such an axis is refused."""
    out = kind_einsum(ctx)
    training = ctx.value(ctx.spec("training"), False)
    no_stats = ctx.has(ctx.spec("running_mean")) and ctx.value(ctx.spec("running_mean")) is None
    if training is True or no_stats:
        info = ctx.tensor("input")
        for k, d in enumerate(info.dims):
            if k != 1:
                ctx.requests.refusals.append(Refusal(
                    ctx.node.name, d, f"{ctx.rule.name} with batch statistics normalizes over it (axis {k}), "
                    "and the mean and variance over a widened axis differ from the narrow ones"))
    return out
