"""The μP laws in one table: every optimizer family is one entry, every law a function of ``(c, M)``.

Widening copies each parameter, ``P' = c * E(P)``, so its gradient is ``g' = E(g) / (c M)``
(docs/math.md §2). A hyperparameter or an optimizer-state entry then needs one factor, a function of
``(c, M)`` only, for the wide update to be ``c * E(ΔP)``: the narrow update, copied. Each law here is
written once, with ``*`` and ``/`` only, so the same callable gives a sympy expression when called on
symbols (what :func:`graphscale.analyze` and ``graphscale explain`` print) and a float when called on
numbers (what :func:`graphscale.mup_optimizer`, :func:`graphscale.transfer_optimizer_state` and
:func:`graphscale.clip_grad_norm_` apply).

A family lists only the hyperparameters whose factor is not 1 (momentum, betas, alpha, dampening,
nesterov, amsgrad, centered, lr_decay act on quantities that already carry the right scale), and every
state entry it keeps per parameter. A state key that is not in its family's entry is refused by the
state transfer, never guessed. Adding a family is one :func:`register_family` call (docs/architecture.md,
"Where to add what").

Example:
    >>> import sympy
    >>> c, M = sympy.symbols("c M", positive=True)
    >>> FAMILIES["adam"].hparams["eps"](c, M)
    1/(M*c)
    >>> FAMILIES["adam"].hparams["eps"](0.5, 4.0)
    0.5
    >>> family_of(torch.optim.AdamW)
    'adamw'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import sympy
import torch

from graphscale.errors import GraphscaleError
from graphscale.record import Role

#: A law: ``factor(c, M)``, evaluated on sympy expressions or on floats alike.
Law = Callable[[Any, Any], Any]


class OptimizerFamilyError(GraphscaleError, TypeError):
    """An optimizer class whose μP scaling graphscale does not know (pass ``family=`` to state it)."""


# ------------------------------------------------------------------------------------------ the laws
# Products are written c * c * M, not c**2 * M: the float evaluation then rounds exactly as before, and
# sympy folds c * c into c**2 anyway.


def gradient(c: Any, M: Any) -> Any:
    """``g' = E(g) * gradient(c, M)``: the wide gradient of a copied parameter (its norm weight too)."""
    return 1 / (c * M)


def gradient_squared(c: Any, M: Any) -> Any:
    """Second moments (``exp_avg_sq``, ``square_avg``, Adagrad's ``sum``): quadratic in the gradient."""
    return 1 / (c * M * c * M)


def unchanged(c: Any, M: Any) -> Any:
    """A quantity already in update units (RMSprop's normalised momentum buffer)."""
    return 1


def sgd_lr(c: Any, M: Any) -> Any:
    """An update proportional to the gradient: ``lr' g' = c E(lr g)`` needs ``lr' = lr c^2 M``."""
    return c * c * M


def normalised_lr(c: Any, M: Any) -> Any:
    """An update normalised entrywise (Adam, RMSprop, Adagrad) is width free: ``lr' = lr c``."""
    return c


def normalised_eps(c: Any, M: Any) -> Any:
    """``eps`` sits next to ``sqrt(v)``, which scales like the gradient: ``eps' = eps / (c M)``."""
    return 1 / (c * M)


def coupled_wd(c: Any, M: Any) -> Any:
    """L2 added to the gradient, ``g + wd P``: ``wd' c E(P) = E(wd P) / (c M)`` needs ``1 / (c^2 M)``."""
    return 1 / (c * c * M)


def decoupled_wd(c: Any, M: Any) -> Any:
    """``P <- P (1 - lr wd)`` with ``lr' = lr c``: ``lr' wd' = lr wd`` needs ``wd' = wd / c``."""
    return 1 / c


# ------------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class OptimizerFamily:
    """One optimizer family's μP laws (see the module doc).

    ``classes``: the optimizer classes it describes (subclasses too; the most specific registered class
    wins). ``hparams``: hyperparameter -> law of its factor. ``state``: per-parameter state entry -> law of
    its factor (``E(entry) * law``). ``state_init``: a state entry the optimizer's constructor fills with a
    hyperparameter (Adagrad's ``sum`` from ``initial_accumulator_value``), so it is re-filled with the
    group's scaled value. ``refine``: picks another family from the hyperparameters (``Adam`` with
    ``decoupled_weight_decay=True`` follows ``"adamw"``). ``describes``: the law in a sentence, for errors.
    ``elementwise``: the update of each element reads only that element's gradient, state and value (every
    family registered here); only such a family can step a tensor whose blocks need different factors
    (``ParamScaling.blocks``) block by block, so :func:`graphscale.mup_optimizer` refuses the others there.
    """

    name: str
    describes: str
    classes: tuple[type, ...] = ()
    hparams: Mapping[str, Law] = field(default_factory=dict)
    state: Mapping[str, Law] = field(default_factory=dict)
    state_init: Mapping[str, str] = field(default_factory=dict)
    refine: Callable[[Mapping[str, Any]], str] | None = None
    elementwise: bool = False

    def hparam_factors(self, c: Any, M: Any) -> dict[str, Any]:
        """Every hyperparameter factor at ``(c, M)``, in table order.

        Example:
            >>> FAMILIES["sgd"].hparam_factors(0.5, 4.0)
            {'lr': 1.0, 'weight_decay': 1.0}
        """
        return {hp: law(c, M) for hp, law in self.hparams.items()}

    def state_factor(self, key: str, c: Any, M: Any) -> Any:
        """The factor of state entry ``key`` at ``(c, M)``; :class:`KeyError` if the family has no law.

        Example:
            >>> FAMILIES["adam"].state_factor("exp_avg_sq", 0.5, 4.0)
            0.25
        """
        return self.state[key](c, M)


#: State entries that count steps: width free in every family, copied.
COUNTERS = frozenset({"step"})

#: The registry: family name -> entry. Extend with :func:`register_family`.
FAMILIES: dict[str, OptimizerFamily] = {}


def register_family(family: OptimizerFamily, *, replace: bool = False) -> OptimizerFamily:
    """Add ``family`` to :data:`FAMILIES` (``replace=True`` to redefine a name).

    Example:
        >>> lion = OptimizerFamily("lion-like", "sign of a momentum: lr' = lr c",
        ...                        hparams={"lr": normalised_lr}, state={"exp_avg": gradient},
        ...                        elementwise=True)
        >>> register_family(lion).name
        'lion-like'
        >>> del FAMILIES["lion-like"]
    """
    if family.name in FAMILIES and not replace:
        raise OptimizerFamilyError(f"optimizer family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


register_family(OptimizerFamily(
    "sgd", "update proportional to the gradient, L2 weight decay added to the gradient",
    classes=(torch.optim.SGD,),
    hparams={"lr": sgd_lr, "weight_decay": coupled_wd},
    state={"momentum_buffer": gradient},
    elementwise=True))
register_family(OptimizerFamily(
    "adam", "update normalised entrywise, L2 weight decay added to the gradient",
    classes=(torch.optim.Adam,),
    hparams={"lr": normalised_lr, "eps": normalised_eps, "weight_decay": coupled_wd},
    state={"exp_avg": gradient, "exp_avg_sq": gradient_squared, "max_exp_avg_sq": gradient_squared},
    refine=lambda hp: "adamw" if hp.get("decoupled_weight_decay", False) else "adam",
    elementwise=True))
register_family(OptimizerFamily(
    "adamw", "update normalised entrywise, decoupled weight decay p <- p(1 - lr*wd)",
    classes=(torch.optim.AdamW,),
    hparams={"lr": normalised_lr, "eps": normalised_eps, "weight_decay": decoupled_wd},
    state={"exp_avg": gradient, "exp_avg_sq": gradient_squared, "max_exp_avg_sq": gradient_squared},
    elementwise=True))

register_family(OptimizerFamily(
    "rmsprop", "update normalised by a running RMS of the gradient, L2 weight decay added to the gradient",
    classes=(torch.optim.RMSprop,),
    hparams={"lr": normalised_lr, "eps": normalised_eps, "weight_decay": coupled_wd},
    # the momentum buffer accumulates g / (sqrt(v) + eps), already in update units: copied unchanged
    state={"square_avg": gradient_squared, "grad_avg": gradient, "momentum_buffer": unchanged},
    elementwise=True))

register_family(OptimizerFamily(
    "adagrad", "update normalised by the root of the summed squared gradients, L2 weight decay added",
    classes=(torch.optim.Adagrad,),
    # initial_accumulator_value seeds `sum`, a sum of g^2: it scales like g^2. lr_decay divides lr by a
    # step count, which is width free.
    hparams={"lr": normalised_lr, "eps": normalised_eps, "weight_decay": coupled_wd,
             "initial_accumulator_value": gradient_squared},
    state={"sum": gradient_squared},
    state_init={"sum": "initial_accumulator_value"},
    elementwise=True))


def family_of(optimizer_cls: type, family: str | None = None,
              hparams: Mapping[str, Any] | None = None) -> str:
    """The registered family an optimizer class follows: ``family`` if given, else by subclass.

    Among the registered classes that ``optimizer_cls`` derives from, the most specific one decides (AdamW
    subclasses Adam in recent torch); its ``refine`` may redirect by hyperparameters. An unknown class is
    refused: a wrong guess would train silently with the wrong factors.

    Example:
        >>> family_of(torch.optim.Adam, hparams={"decoupled_weight_decay": True})
        'adamw'
        >>> family_of(torch.optim.Adadelta, family="adam")
        'adam'
    """
    if family is not None:
        if family not in FAMILIES:
            raise OptimizerFamilyError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
        return family
    if isinstance(optimizer_cls, type):
        mro = optimizer_cls.__mro__
        matches = [(mro.index(k), f) for f in FAMILIES.values() for k in f.classes if k in mro]
        if matches:
            best = min(matches, key=lambda m: m[0])[1]
            return best.refine(hparams or {}) if best.refine is not None else best.name
    name = getattr(optimizer_cls, "__name__", repr(optimizer_cls))
    known = "; ".join(f"{f.name!r} ({f.describes})" for f in FAMILIES.values())
    raise OptimizerFamilyError(
        f"graphscale does not know how {name} scales with width; pass family= if one of these is its law: "
        f"{known}. Otherwise register its laws with graphscale.laws.register_family (docs/math.md §2)"
    )


# ------------------------------------------------------------------------------------ roles and init


def weight_role(ndim: int, total: Any, fan_in: Any, is_buffer: bool = False) -> Role:
    """The μP role of a tensor from its width multiplicity ``M`` and fan-in multiplier ``m_in``.

    ``fixed`` (``M = 1``), ``vector`` (no contracted width, at most one dim, or a buffer), ``input`` (no
    contracted width), ``output`` (only contracted width: a readout) or ``hidden``. ``total`` and
    ``fan_in`` are sympy expressions (derive, for the plan) or numbers (noise and init, under one
    widening's multipliers, where a class at multiplier 1 can make a hidden weight a readout).

    Example:
        >>> k = sympy.Symbol("k", positive=True)
        >>> weight_role(2, k**2, k), weight_role(2, k, k), weight_role(1, 3, 1), weight_role(2, 2, 2)
        ('hidden', 'output', 'vector', 'output')
    """
    if isinstance(total, sympy.Basic) or isinstance(fan_in, sympy.Basic):
        total, fan_in = sympy.sympify(total), sympy.sympify(fan_in)
        readout = sympy.simplify(total / fan_in) == 1
    else:
        readout = total == fan_in
    if total == 1:
        return "fixed"
    if fan_in == 1:
        return "vector" if ndim <= 1 or is_buffer else "input"
    return "output" if readout else "hidden"


#: μP init std relative to the base is ``m_in ** -power``: hidden weights 1/2, readouts 1; every other role
#: (input, vector, fixed) keeps the base std, power 0. :func:`init_std` and
#: :func:`graphscale.train.mup_init_` both read it.
INIT_STD_POWER: Mapping[str, sympy.Rational] = {"hidden": sympy.Rational(1, 2), "output": sympy.Integer(1)}


def init_std(role: str, fan_in: Any) -> Any:
    """μP init std relative to the base: hidden ``m_in^(-1/2)``, readout ``m_in^(-1)``, others 1.

    Example:
        >>> init_std("hidden", sympy.Integer(4)), init_std("output", sympy.Integer(4))
        (1/2, 1/4)
    """
    power = INIT_STD_POWER.get(role)
    if power is None:
        return sympy.Integer(1)
    return sympy.simplify(sympy.sympify(fan_in) ** -power)


# --------------------------------------------------------------------------- what the plan shows


@dataclass(frozen=True)
class PlanLaw:
    """One exported law of the plan: its JSON key, its column in ``explain`` (or ``None``), and where
    the table holds it (``family=None``: the gradient law, which belongs to no family)."""

    key: str
    column: str | None
    family: str | None = None
    kind: Literal["hparams", "state"] = "hparams"
    name: str = ""

    def law(self) -> Law:
        if self.family is None:
            return gradient
        return getattr(FAMILIES[self.family], self.kind)[self.name]


#: What ``analyze``/``explain`` export per tensor, in order (between ``m_in`` and ``init_std``). The
#: families added later (RMSprop, Adagrad) are in the table but not here, so the JSON keeps its keys;
#: :meth:`graphscale.derive.ScalingRule.family_laws` gives any family's laws.
PLAN_LAWS: tuple[PlanLaw, ...] = (
    PlanLaw("grad", None),
    PlanLaw("sgd_lr", "SGD lr", "sgd", "hparams", "lr"),
    PlanLaw("adam_lr", "Adam lr", "adam", "hparams", "lr"),
    PlanLaw("adam_eps", "Adam eps", "adam", "hparams", "eps"),
    PlanLaw("wd_coupled", "wd (L2)", "adam", "hparams", "weight_decay"),
    PlanLaw("wd_decoupled", "wd (AdamW)", "adamw", "hparams", "weight_decay"),
    PlanLaw("exp_avg", None, "adam", "state", "exp_avg"),
    PlanLaw("exp_avg_sq", None, "adam", "state", "exp_avg_sq"),
)
