"""Losses computed inside ``forward`` (nanoGPT's ``F.cross_entropy(logits, targets)``, HF's ``labels=``).

A loss is an elementwise loss over per-sample axes, then a reduction. The reduction decides what a width
axis among the per-sample axes does: ``'none'`` keeps it, ``'mean'`` is a mean over it (invariant under
replication), ``'sum'`` and the non-batch axes of ``'batchmean'`` are a sum over it, which the widen stage
compensates with ``1/k`` exactly as for ``torch.sum``. Also ``broadcast_tensors``, through which
``torch.export`` lowers the broadcasting losses.

Example (nanoGPT's pattern: the logits' class axis is fixed, the hidden width is not)::

    >>> import graphscale, torch
    >>> class M(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Linear(3, 8), torch.nn.Linear(8, 5)
    ...     def forward(self, x, y):
    ...         return torch.nn.functional.cross_entropy(self.b(torch.relu(self.a(x))), y)
    >>> plan = graphscale.analyze(M(), (torch.randn(2, 3), torch.tensor([0, 4])))
    >>> [c.name for c in plan.width_classes]
    ['a.weight[0]']
"""

from __future__ import annotations

import torch

from graphscale.errors import UnsupportedOpError
from graphscale.infer.call import Call
from graphscale.infer.kinds._common import _broadcast, _check_choice
from graphscale.infer.schema import Key, kind
from graphscale.infer.values import Info, OutputMultiplier, TensorInfo

_AT_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}  # aten's Reduction enum
_REDUCTIONS = ("none", "mean", "sum", "batchmean")


def _loss_reduction(ctx: Call) -> str:
    """The reduction as a string ('none', 'mean', 'sum', 'batchmean'), legacy arguments resolved."""
    size_average = ctx.value(ctx.spec("size_average"), None)
    reduce = ctx.value(ctx.spec("reduce"), None)
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        return _reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    value = ctx.value(ctx.spec("reduction"), ctx.spec("default_reduction"))
    if isinstance(value, int) and not isinstance(value, bool):
        if value not in _AT_REDUCTIONS:
            raise UnsupportedOpError(f"{ctx.where()}: unknown reduction {value} of {ctx.rule.name}")
        return _AT_REDUCTIONS[value]
    if value not in _REDUCTIONS:
        raise UnsupportedOpError(f"{ctx.where()}: unknown reduction {value!r} of {ctx.rule.name}")
    return str(value)


@kind("loss", check=_check_choice("default_reduction", _REDUCTIONS),
      classes=Key("bool", default=False,
                  doc="the input's axis 1 (0 for a 1-D input) holds classes that the target indexes"),
      operands=Key("refs", default=["input", "target"],
                   doc="input, target, then per-class or per-element weights"),
      module_operands=Key("refs", doc="the operands of a called loss module (its weights as buffer:...)"),
      reduction=Key("ref", default="reduction", doc="the reduction: a string, aten's int, or attr:reduction"),
      size_average=Key("ref", default="size_average", doc="the legacy size_average argument"),
      reduce=Key("ref", default="reduce", doc="the legacy reduce argument"),
      default_reduction=Key("str", default="mean",
                            doc="the reduction when the call's signature cannot be read and none is passed"))
def kind_loss(ctx: Call) -> Info:
    """A loss function: an elementwise loss over per-sample axes, then a reduction over all of them.

    With ``classes = true`` (cross_entropy, nll_loss) the input's class axis (1, or 0 for a 1-D input)
    is fixed, class weights share it, and an index target has the input's axes without the class axis
    (a probability target has all of them). Otherwise every tensor operand broadcasts elementwise
    (mse_loss, binary_cross_entropy_with_logits, kl_div). A ``'sum'`` over width axes (and
    ``'batchmean'``'s non-batch axes) is requested as an output multiplier, as for ``torch.sum``.
    """
    refs = ctx.spec("module_operands") if ctx.module is not None else None
    refs = refs or ctx.spec("operands")
    infos = [ctx.info(r) for r in refs]
    tensors = [i for i in infos if isinstance(i, TensorInfo)]
    x = infos[0]
    if not isinstance(x, TensorInfo):
        raise UnsupportedOpError(f"{ctx.where()}: the input of {ctx.rule.name} is not a tensor")
    ds, where = ctx.ds, f"{ctx.rule.name} at {ctx.where()}"
    if ctx.spec("classes"):
        c_axis = 1 if len(x.dims) >= 2 else 0
        ds.fix(x.dims[c_axis], f"the class axis of {ctx.rule.name}")
        sample = tuple(d for k, d in enumerate(x.dims) if k != c_axis)
        sample_shape = tuple(s for k, s in enumerate(x.shape) if k != c_axis)
        # operands: input, target, then per-class weights (by their place in the rule's list, so a (C,)
        # weight of a (C, C) input is never taken for a target)
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


@kind("broadcast_tensors", tensors=Key("ref", default="tensors", doc="the tensors to broadcast"))
def kind_broadcast_tensors(ctx: Call) -> Info:
    """``torch.broadcast_tensors`` (export lowers ``mse_loss`` through it): each output has the
    broadcast shape, its axes shared with the operands' as in any elementwise op."""
    infos = [i for i in ctx.info(ctx.spec("tensors")) or () if isinstance(i, TensorInfo)]
    results = tuple(ctx.result)
    dims = _broadcast(ctx, tuple(results[0].shape), infos)
    return tuple(TensorInfo(dims, tuple(r.shape)) for r in results)
