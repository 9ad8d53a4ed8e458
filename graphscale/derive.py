"""Derive: every parameter's μP scaling rule, as sympy expressions in the width-class multipliers.

From its use in the graph each parameter gets ``M`` (the product of the multipliers of its width axes)
and ``m_in`` (the product over the axes its consuming op sums over); the copy scale is ``c = 1/m_in``.
Every other law follows from ``(c, M)`` exactly (docs/math.md §2) and is read from the one table of
:mod:`graphscale.laws`: gradient ``E(g)/(cM)``, SGD lr ``lr c^2 M``, Adam lr ``lr c``, Adam eps
``eps/(cM)``, coupled weight decay ``wd/(c^2 M)``, decoupled ``wd/c``, momentum/exp_avg ``E(buf)/(cM)``,
exp_avg_sq ``E(buf)/(cM)^2``; the role (input, hidden, output, vector, fixed) is
:func:`graphscale.laws.weight_role`. A parameter used both as a
lookup and as a contraction (a tied embedding/readout) takes the copy scale of its smallest fan-in, and
its other uses get an inserted multiplier.

Example:
    >>> k = sympy.Symbol("k1", positive=True)
    >>> r = ScalingRule.from_multipliers("fc.weight", (8, 4), total=k**2, fan_in=k, fan_in_axes=(1,))
    >>> r.adam_lr, r.sgd_lr
    (1/k1, 1)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from graphscale import laws
from graphscale.errors import UnsupportedOpError
from graphscale.infer.classes import Classes
from graphscale.infer.dims import Resolution
from graphscale.infer.engine import Walk
from graphscale.laws import Role


@dataclass
class ScalingRule:
    """The derived μP rule of one parameter or buffer, relative to the narrow (source) width."""

    name: str
    shape: tuple[int, ...]
    axis_multipliers: tuple[sympy.Expr, ...]
    total: sympy.Expr  # M
    fan_in: sympy.Expr  # m_in of the use that sets the copy scale
    fan_in_axes: tuple[int, ...]
    copy_scale: sympy.Expr  # c
    role: Role
    is_buffer: bool = False
    aliases: tuple[str, ...] = ()
    use_multipliers: dict[str, sympy.Expr] = field(default_factory=dict)  # node -> inserted factor

    @classmethod
    def from_multipliers(cls, name: str, shape: tuple[int, ...], *, total: sympy.Expr, fan_in: sympy.Expr,
                         fan_in_axes: tuple[int, ...] = (), axis_multipliers: tuple[sympy.Expr, ...] = (),
                         is_buffer: bool = False, aliases: tuple[str, ...] = ()) -> ScalingRule:
        """The rule of a tensor with width multiplicity ``total`` (M) and fan-in multiplier ``fan_in``: its
        copy scale ``1/fan_in`` and its role (:func:`graphscale.laws.weight_role`) follow."""
        total, fan_in = sympy.sympify(total), sympy.sympify(fan_in)
        return cls(name, shape, axis_multipliers, total, fan_in, fan_in_axes, 1 / fan_in,
                   laws.weight_role(len(shape), total, fan_in, is_buffer), is_buffer, aliases)

    # Every law comes from the one table in graphscale.laws, evaluated on this tensor's (c, M).
    def hparam_law(self, family: str, hparam: str) -> sympy.Expr:
        """The factor on ``hparam`` of optimizer ``family`` for this tensor (1 where the table has none).

        Example:
            >>> k = sympy.Symbol("k", positive=True)
            >>> ScalingRule.from_multipliers("w", (8, 4), total=k**2, fan_in=k).hparam_law("adam", "eps")
            1/k
        """
        law = laws.FAMILIES[family].hparams.get(hparam)
        return sympy.Integer(1) if law is None else sympy.simplify(law(self.copy_scale, self.total))

    def family_laws(self, family: str) -> dict[str, dict[str, sympy.Expr]]:
        """Every hyperparameter and state factor of ``family`` for this tensor.

        Example:
            >>> k = sympy.Symbol("k", positive=True)
            >>> ScalingRule.from_multipliers("w", (8, 4), total=k**2, fan_in=k).family_laws("adam")["state"]
            {'exp_avg': 1/k, 'exp_avg_sq': k**(-2), 'max_exp_avg_sq': k**(-2)}
        """
        fam = laws.FAMILIES[family]
        c, m = self.copy_scale, self.total
        return {"hparams": {k: sympy.simplify(f(c, m)) for k, f in fam.hparams.items()},
                "state": {k: sympy.simplify(f(c, m)) for k, f in fam.state.items()}}

    def _plan_law(self, key: str) -> sympy.Expr:
        (entry,) = [e for e in laws.PLAN_LAWS if e.key == key]
        return sympy.simplify(entry.law()(self.copy_scale, self.total))

    @property
    def grad_scale(self) -> sympy.Expr:
        return self._plan_law("grad")

    @property
    def sgd_lr(self) -> sympy.Expr:
        return self._plan_law("sgd_lr")

    @property
    def adam_lr(self) -> sympy.Expr:
        return self._plan_law("adam_lr")

    @property
    def adam_eps(self) -> sympy.Expr:
        return self._plan_law("adam_eps")

    @property
    def coupled_wd(self) -> sympy.Expr:
        return self._plan_law("wd_coupled")

    @property
    def decoupled_wd(self) -> sympy.Expr:
        return self._plan_law("wd_decoupled")

    @property
    def exp_avg_scale(self) -> sympy.Expr:
        return self._plan_law("exp_avg")

    @property
    def exp_avg_sq_scale(self) -> sympy.Expr:
        return self._plan_law("exp_avg_sq")

    @property
    def init_std(self) -> sympy.Expr:
        """μP init std relative to the base: hidden m_in^(-1/2), readout m_in^(-1), input/vector 1."""
        return laws.init_std(self.role, self.fan_in)

    def laws(self) -> dict[str, sympy.Expr]:
        """Every derived quantity by name (what ``explain`` prints and ``to_dict`` exports)."""
        return {"copy_scale": self.copy_scale, "M": self.total, "m_in": self.fan_in,
                **{e.key: self._plan_law(e.key) for e in laws.PLAN_LAWS}, "init_std": self.init_std}

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "role": self.role, "buffer": self.is_buffer,
                "aliases": list(self.aliases), "fan_in_axes": list(self.fan_in_axes),
                "axis_multipliers": [str(m) for m in self.axis_multipliers],
                **{k: str(v) for k, v in self.laws().items()},
                "use_multipliers": {k: str(v) for k, v in self.use_multipliers.items()}}


def tree_multiplier(tree: tuple, symbol_of: dict[int, sympy.Symbol]) -> sympy.Expr:
    """The multiplier of an axis: product over its growing atoms (a concatenation takes its first part's)."""
    kind = tree[0]
    if kind == "atom":
        return symbol_of.get(tree[1], sympy.Integer(1))
    parts = [tree_multiplier(c, symbol_of) for c in tree[1]]
    if kind == "prod":
        return sympy.Mul(*parts)
    return parts[0]


def derive_rules(walk: Walk, res: Resolution, classes: Classes,
                 symbol_of: dict[int, sympy.Symbol]) -> dict[str, ScalingRule]:
    """One :class:`ScalingRule` per parameter and buffer (tied names share the canonical one's rule)."""
    uses: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for u in walk.requests.uses:
        name = walk.aliases.get(u.param, u.param)
        uses.setdefault(name, []).append((u.node, u.fan_in_axes))
    rules: dict[str, ScalingRule] = {}
    aliases: dict[str, list[str]] = {}
    for alias, canonical in walk.aliases.items():
        aliases.setdefault(canonical, []).append(alias)
    for name, dims in walk.tensor_dims.items():
        shape = walk.tensor_shapes[name]
        axis_m = tuple(tree_multiplier(res.tree(d), symbol_of) for d in dims)
        total = sympy.Mul(*axis_m)
        its_uses = uses.get(name, [])
        base_axes = _smallest_fan_in(name, its_uses)
        fan_in = sympy.Mul(*(axis_m[i] for i in base_axes))
        is_buffer = not walk.is_param[name]
        rule = ScalingRule.from_multipliers(name, shape, total=total, fan_in=fan_in, fan_in_axes=base_axes,
                                            axis_multipliers=axis_m, is_buffer=is_buffer,
                                            aliases=tuple(aliases.get(name, ())))
        for node, axes in its_uses:
            extra = sympy.simplify(fan_in / sympy.Mul(*(axis_m[i] for i in axes)))
            if extra != 1:
                rule.use_multipliers[node] = extra
        rules[name] = rule
    return rules


def _smallest_fan_in(name: str, uses: list[tuple[str, tuple[int, ...]]]) -> tuple[int, ...]:
    if not uses:
        return ()
    sets = [set(a) for _, a in uses]
    for s in sorted(sets, key=len):
        if all(s <= other for other in sets):
            return tuple(sorted(s))
    raise UnsupportedOpError(
        f"parameter {name!r} is used by ops that sum over different axes "
        f"({', '.join(f'{n}: axes {sorted(a)}' for n, a in uses)}); graphscale can compensate a shared "
        "parameter only when one use's summed axes are contained in every other's")
