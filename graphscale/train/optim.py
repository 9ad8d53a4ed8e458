"""μP optimizers for widened models: param groups in, param groups out, any optimizer class.

A widened parameter is ``P' = c * E(P)`` and its gradient is ``g' = E(g) / (c M)`` (docs/math.md §2). For
the wide model's update to be ``c * E(ΔP)`` -- the narrow update, copied -- each hyperparameter that meets
the gradient or the parameter on a non-homogeneous path needs one factor, relative to the width it was
tuned at. The factors are read from the one table of optimizer laws, :data:`graphscale.laws.FAMILIES`
(the same entries ``graphscale explain`` prints); for the built-in families:

============================  ===================  =========================================
family                        hyperparameter       factor
============================  ===================  =========================================
SGD (incl. momentum/nesterov) ``lr``               ``c**2 * M``
SGD, Adam (coupled L2)        ``weight_decay``     ``1 / (c**2 * M)``
Adam, AdamW                   ``lr``               ``c``
Adam, AdamW                   ``eps``              ``1 / (c * M)``
AdamW (decoupled)             ``weight_decay``     ``1 / c``
============================  ===================  =========================================

Momentum, dampening, betas, nesterov and amsgrad need no factor: they act linearly on quantities that
already carry the right scale. The functions here split every param group into sub-groups of parameters
that share the same factors and hand them to the optimizer class unchanged, in the style of
microsoft/mup's ``optim.py`` -- but, unlike its ``MuAdam``, they also scale ``eps`` and scale weight decay
by the law of its coupling, which is what keeps a zero-noise widened model *exactly* equivalent in training.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from graphscale import laws
from graphscale.record import ParamScaling
from graphscale.train._common import (
    OptimizerFamilyError,
    RecordError,
    RecordLike,
    resolve_record,
    scalings_for,
)

#: A family name: a key of :data:`graphscale.laws.FAMILIES` (an open registry).
Family = str

#: Key under which every param group built here records the factors it applied, so that code which sets
#: ``group["lr"]`` itself (a hand-written schedule) can keep the μP ratio: ``group["lr"] = lr_t * f["lr"]``.
FACTORS_KEY = "graphscale"
#: Key under which every param group built here records its family (the state transfer reads it).
FAMILY_KEY = "graphscale_family"


def __getattr__(name: str) -> Any:
    # FAMILIES used to be a fixed tuple here; the registry now lives in graphscale.laws.
    if name == "FAMILIES":
        return tuple(laws.FAMILIES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def optimizer_family(
    optimizer_cls: type, family: str | None = None, hparams: Mapping[str, Any] | None = None
) -> Family:
    """Which μP law an optimizer class follows: a family name of :data:`graphscale.laws.FAMILIES`.

    Subclasses of the registered classes are recognised, the most specific one deciding
    (``torch.optim.SGD``, ``Adam``, ``AdamW``; ``Adam(decoupled_weight_decay=True)`` is AdamW). Any other
    class is refused, because a wrong guess would train silently with the wrong factors; name its law
    with ``family=``.

    Example:
        >>> optimizer_family(torch.optim.AdamW)
        'adamw'
        >>> optimizer_family(torch.optim.Adadelta, family="adam")
        'adam'
    """
    return laws.family_of(optimizer_cls, family, hparams)


def scaling_factors(scaling: ParamScaling, family: Family) -> dict[str, float]:
    """The multiplicative factor on each hyperparameter for one parameter (the family's table entry).

    Example:
        >>> from graphscale.record import AxisReplication
        >>> s = ParamScaling("w", "w", (4, 4), (8, 8), (AxisReplication.atomic(4, 2),) * 2,
        ...                  copy_scale=0.5, total_mult=4, fan_in_mult=2, role="hidden")
        >>> scaling_factors(s, "adam")
        {'lr': 0.5, 'eps': 0.5, 'weight_decay': 1.0}
    """
    if family not in laws.FAMILIES:
        raise OptimizerFamilyError(f"family must be one of {tuple(laws.FAMILIES)}, got {family!r}")
    fam = laws.FAMILIES[family]
    c, m = float(scaling.copy_scale), float(scaling.total_mult)
    return {hp: float(f) for hp, f in fam.hparam_factors(c, m).items()}


def constructor_defaults(optimizer_cls: type) -> dict[str, Any]:
    """The keyword defaults of ``optimizer_cls.__init__`` (e.g. AdamW's ``weight_decay=0.01``).

    They matter: a hyperparameter the user leaves at its default (Adam's ``eps=1e-8``) still needs its
    factor, so it is read here and written explicitly into every group.
    """
    try:
        sig = inspect.signature(optimizer_cls.__init__)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return {}
    return {
        k: p.default for k, p in sig.parameters.items()
        if p.default is not inspect.Parameter.empty and k not in ("self", "params")
    }


def mup_param_groups(
    groups: Iterable[Mapping[str, Any]],
    scalings: Mapping[int, ParamScaling],
    *,
    defaults: Mapping[str, Any],
    family: Family | None = None,
    optimizer_cls: type | None = None,
) -> list[dict[str, Any]]:
    """Split param groups into sub-groups of equal μP factors and scale their hyperparameters.

    ``scalings`` maps ``id(param)`` to its :class:`ParamScaling`; ``defaults`` are the values a group
    without its own ``lr``/``eps``/``weight_decay`` falls back to (the optimizer's constructor defaults
    updated with the user's keywords). Every returned group carries its scaled ``lr`` (and ``eps``,
    ``weight_decay`` where the family has them) explicitly, plus ``group["graphscale"]``: the factors used,
    and ``group["graphscale_family"]``: the family. The order of parameters within each sub-group follows
    the input order. A family whose constructor fills a state entry from a hyperparameter (Adagrad's
    ``initial_accumulator_value``) needs :func:`fill_initial_state_` on the built optimizer;
    :func:`mup_optimizer` does it.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> from graphscale.record import AxisReplication
        >>> s = {id(p): ParamScaling(n, n, tuple(p.shape), tuple(p.shape), (None,) * p.ndim, 1.0, 1, 1)
        ...      for n, p in lin.named_parameters()}
        >>> [g["lr"] for g in mup_param_groups([{"params": list(lin.parameters())}], s,
        ...                                     defaults={"lr": 0.1}, family="sgd")]
        [0.1]
    """
    out: list[dict[str, Any]] = []
    for group in groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        fam = family
        if fam is None:
            if optimizer_cls is None:
                raise OptimizerFamilyError("mup_param_groups needs family= or optimizer_cls=")
            # Adam's decoupled flag can be set per group, so the law is decided per group.
            fam = optimizer_family(optimizer_cls, None, {**defaults, **settings})
        subgroups: dict[tuple[tuple[str, float], ...], dict[str, Any]] = {}
        for p in group["params"]:
            scaling = scalings[id(p)]
            if scaling.shift and settings.get("weight_decay", defaults.get("weight_decay")):
                # w' = c E(w) + shift: decay pulls w' toward 0, the narrow model's w toward 0, and those
                # differ by the shift (docs/math.md §8)
                raise RecordError(
                    f"{scaling.name} is a gain written as s + w whose wide value carries a shift "
                    f"({scaling.shift:.6g}, from a factor folded into s + w), so weight decay would pull it "
                    "toward a different point than the narrow model's; give it weight_decay=0 (a param "
                    "group, as Hugging Face's Trainer does for norm weights), or use graphscale.widen, which "
                    "keeps the factor in the graph")
            factors = scaling_factors(scaling, fam)
            key = tuple(sorted(factors.items()))
            sub = subgroups.get(key)
            if sub is None:
                sub = dict(settings)
                applied = {}
                for hp, f in factors.items():
                    value = settings.get(hp, defaults.get(hp))
                    if value is None:
                        if hp == "lr":
                            raise OptimizerFamilyError("the optimizer needs lr= (it has no default)")
                        continue  # e.g. a family='adam' class without eps: nothing to scale
                    if isinstance(value, bool) or not isinstance(value, int | float):
                        # e.g. Adafactor's eps=(eps1, eps2): a scalar law cannot be guessed onto it
                        raise OptimizerFamilyError(
                            f"hyperparameter {hp}={value!r} is not a number, but the {fam!r} law scales it "
                            "by a scalar factor; this optimizer needs its own family "
                            "(graphscale.laws.register_family)")
                    sub[hp] = value * f
                    applied[hp] = f
                sub[FACTORS_KEY] = applied
                sub[FAMILY_KEY] = fam
                sub["params"] = []
                subgroups[key] = sub
            sub["params"].append(p)
        out.extend(subgroups.values())
    return out


def mup_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    params: Iterable[torch.Tensor] | Iterable[Mapping[str, Any]] | None = None,
    record: RecordLike | None = None,
    base: nn.Module | Mapping[str, int] | None = None,
    example_inputs: Any = None,
    family: str | None = None,
    **hparams: Any,
) -> torch.optim.Optimizer:
    """Build ``optimizer_cls`` over ``model`` with μP factors relative to the source (or base) width.

    Hyperparameters (``lr``, ``eps``, ``weight_decay``, ...) are the ones tuned for the narrow model; each
    parameter's group gets them times the factors of :func:`scaling_factors`, from the record:
    ``model.graphscale`` by default, ``record=`` if given (a record, or the path
    :func:`graphscale.save_record` wrote, for a model of the same architecture that holds the wide
    weights; matched by parameter name and shape), or -- for a model built at full width from
    scratch -- ``graphscale.relative_record(model, example_inputs, base)`` with ``base`` a smaller instance
    of the same architecture (or a dict of width-class multipliers). ``params`` restricts or groups the
    parameters (a list of tensors or of torch-style group dicts, each split further); by default all of
    ``model.parameters()`` (tied parameters once). ``family`` names the law (a key of
    :data:`graphscale.laws.FAMILIES`) of an optimizer class that is not a subclass of a registered one.

    With zero noise, training the wide model with this optimizer reproduces the narrow model trained with
    ``optimizer_cls(narrow.parameters(), **hparams)`` to rounding error, step after step.

    A tensor whose blocks need different factors (``ParamScaling.blocks``: a fold on a fused projection's
    query rows, a concatenation whose parts grow differently) is stepped block by block: its param group
    entries are one leaf tensor per block (``optimizer.graphscale_blocks`` lists them). Their gradients are
    views of the parameter's from the moment backward writes it (so clipping the parameter's gradient, or
    ``GradScaler`` unscaling the groups', acts on both); a step hook copies the parameter's values into
    them and another copies the result back; ``zero_grad`` clears the parameter's gradient too. That is
    exact for optimizers that update every element from its own gradient, state and value, as every
    family in the table of laws does (``OptimizerFamily.elementwise``); a family not registered as one is
    refused for such a tensor. ``step(closure)`` is refused for such an optimizer.

    Example:
        >>> wide = graphscale.widen(model, (x,), multiplier=4)          # doctest: +SKIP
        >>> opt = mup_optimizer(wide, torch.optim.AdamW, lr=3e-3, weight_decay=0.1)  # doctest: +SKIP
    """
    record = resolve_record(model, record, base=base, example_inputs=example_inputs)
    fam = optimizer_family(optimizer_cls, family, hparams) if family is not None else None
    # refuses an unknown class before doing any work
    law = laws.FAMILIES[fam if fam is not None else optimizer_family(optimizer_cls, None, hparams)]

    names = {id(p): n for n, p in model.named_parameters()}
    if params is None:
        groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    else:
        items = list(params)
        if items and isinstance(items[0], Mapping):
            groups = [{**g, "params": _as_list(g["params"])} for g in items]  # type: ignore[index]
        else:
            groups = [{"params": items}]
    used = [p for g in groups for p in g["params"]]
    foreign = [f"tensor of shape {tuple(p.shape)}" for p in used if id(p) not in names]
    if foreign:
        raise RecordError(f"params= holds tensors that are not parameters of the model: {', '.join(foreign)}")
    by_name = scalings_for(((names[id(p)], p) for p in used), record)
    scalings = {id(p): by_name[names[id(p)]] for p in used}
    blocks = _shadow_blocks(groups, scalings, names)
    if blocks and not law.elementwise:
        cut = sorted({names[id(p)] for p, _, _ in blocks})
        raise OptimizerFamilyError(
            f"{', '.join(cut)} need(s) blocks trained with different factors ({cut[0]}: "
            f"{_describe(by_name[cut[0]])}), which mup_optimizer does by stepping each block as a tensor of "
            "its own: exact only for an optimizer whose update of each element reads that element's "
            f"gradient, state and value, and family {law.name!r} is not registered as one. If "
            f"{getattr(optimizer_cls, '__name__', 'the optimizer')} is, register its family with "
            "OptimizerFamily(..., elementwise=True); otherwise widen without blocks: heads='grow' where a "
            "fused q|k|v projection carries the query's fold, one multiplier for every class where the "
            "parts of a concatenation grow differently")

    defaults = {**constructor_defaults(optimizer_cls), **hparams}
    new_groups = mup_param_groups(groups, scalings, defaults=defaults, family=fam,
                                  optimizer_cls=optimizer_cls)
    if not blocks:
        return fill_initial_state_(optimizer_cls(new_groups, **hparams))
    opt = _blockwise_class(optimizer_cls)(new_groups, **hparams)
    opt.graphscale_blocks = blocks
    opt.register_step_pre_hook(_copy_into_blocks)
    opt.register_step_post_hook(_copy_out_of_blocks)
    # the blocks' gradients are views of the parameter's, made as soon as backward writes it: what acts on
    # the param groups' gradients before step (GradScaler's unscale_) acts on the parameter's, and what
    # acts on the parameter's (clip_grad_norm_) on the blocks'
    ref = weakref.ref(opt)
    handles = [p.register_post_accumulate_grad_hook(functools.partial(_view_block_grads, ref))
               for p in {id(p): p for p, _, _ in blocks}.values()]
    weakref.finalize(opt, _remove_hooks, handles)
    return fill_initial_state_(opt)


#: One block of a tensor whose blocks need different factors: the parameter, the block's index in it, and
#: the leaf tensor the optimizer steps in its place (docs/math.md §8).
ShadowBlock = tuple[torch.Tensor, tuple[slice, ...], torch.Tensor]


def _shadow_blocks(groups: list[dict[str, Any]], scalings: dict[int, ParamScaling],
                   names: Mapping[int, str]) -> list[ShadowBlock]:
    """Replace, in ``groups`` (in place), every parameter whose blocks differ in ``(c, M)`` by one leaf
    tensor per block, and give each the block's scaling in ``scalings``: the optimizer then steps each
    block with its own factors. The optimizers whose laws are in the table update each element from its
    own gradient and state, so stepping a block on its own is exactly stepping it inside the tensor."""
    out: list[ShadowBlock] = []
    for group in groups:
        params = []
        for p in group["params"]:
            s = scalings[id(p)]
            if not s.is_blockwise():
                params.append(p)
                continue
            if type(p) is not torch.nn.Parameter and type(p) is not torch.Tensor:
                raise RecordError(
                    f"{names[id(p)]} needs its blocks trained with different factors ({_describe(s)}), which "
                    f"mup_optimizer does by stepping each block as a tensor of its own; a {type(p).__name__} "
                    "parameter (FSDP2's DTensor) cannot be cut so. Train it unsharded, or widen with one "
                    "multiplier for every class (graphscale.widen), which gives one factor per tensor")
            for b in s.blocks():
                shadow = p.detach()[b.index].clone().requires_grad_(True)
                scalings[id(shadow)] = replace(s, copy_scale=b.copy_scale, total_mult=b.total_mult,
                                               fan_in_mult=b.fan_in_mult, slice_folds=())
                out.append((p, b.index, shadow))
                params.append(shadow)
        group["params"] = params
    return out


def _describe(s: ParamScaling) -> str:
    return ", ".join(f"{_box(b.index)}: c={b.copy_scale:.4g}, M={b.total_mult:g}" for b in s.blocks())


def _box(index: tuple[slice, ...]) -> str:
    return "[" + ", ".join(f"{i.start}:{i.stop}" for i in index) + "]"


def _view_block_grads(ref: weakref.ref, p: torch.Tensor) -> None:
    """After backward accumulates ``p``'s gradient: its blocks' gradients become views of it."""
    optimizer = ref()
    if optimizer is not None:
        for q, index, shadow in optimizer.graphscale_blocks:
            if q is p:
                shadow.grad = None if p.grad is None else p.grad[index]


def _remove_hooks(handles: list[Any]) -> None:
    for h in handles:
        h.remove()


def _copy_into_blocks(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Step pre-hook: each block's leaf tensor takes its parameter's current values, and its gradient is
    a view of the parameter's (again: a gradient set by hand is picked up too)."""
    closure = args[1] if len(args) > 1 else kwargs.get("closure")  # torch passes (optimizer, *args)
    if closure is not None:
        raise RecordError("this optimizer steps some parameters block by block (mup_optimizer), so it cannot "
                          "call a closure inside step(): call loss.backward() yourself, then step()")
    with torch.no_grad():
        for p, index, shadow in optimizer.graphscale_blocks:
            shadow.copy_(p[index])
            shadow.grad = None if p.grad is None else p.grad[index]


def _copy_out_of_blocks(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Step post-hook: each block's stepped values go back into its parameter."""
    with torch.no_grad():
        for p, index, shadow in optimizer.graphscale_blocks:
            p[index].copy_(shadow)


_BLOCKWISE: dict[type, type] = {}


def _blockwise_class(optimizer_cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``optimizer_cls`` whose ``zero_grad`` also clears the gradients of the parameters it steps block
    by block (their blocks' leaf tensors are what its param groups hold). Still an ``optimizer_cls``."""
    cls = _BLOCKWISE.get(optimizer_cls)
    if cls is None:
        def zero_grad(self: Any, set_to_none: bool = True) -> None:
            optimizer_cls.zero_grad(self, set_to_none)
            for p in {id(p): p for p, _, _ in self.graphscale_blocks}.values():
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad = p.grad.detach()
                    p.grad.zero_()

        cls = type(optimizer_cls.__name__, (optimizer_cls,), {
            "zero_grad": zero_grad, "__module__": __name__,
            "__doc__": f"{optimizer_cls.__name__} stepping some parameters block by block (mup_optimizer)."})
        _BLOCKWISE[optimizer_cls] = cls
    return cls


def fill_initial_state_(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Re-fill state entries that the constructor initialised from a hyperparameter, per group.

    Adagrad's constructor fills ``sum`` with its ``initial_accumulator_value`` argument, not with the
    group's; the table's ``state_init`` names such entries, and each is set to its group's (scaled) value,
    so the wide state starts at ``E(initial state) * law``. Groups not built by :func:`mup_param_groups`
    are left alone. Returns ``optimizer``.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
        >>> fill_initial_state_(opt) is opt
        True
    """
    for group in optimizer.param_groups:
        fam = laws.FAMILIES.get(group.get(FAMILY_KEY, ""))
        if fam is None or not fam.state_init:
            continue
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, hp in fam.state_init.items():
                value = state.get(key)
                if isinstance(value, torch.Tensor) and hp in group:
                    with torch.no_grad():
                        value.fill_(group[hp])
    return optimizer


def _as_list(params: Any) -> list[torch.Tensor]:
    return [params] if isinstance(params, torch.Tensor) else list(params)
