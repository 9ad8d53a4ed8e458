"""Derive: every parameter's μP scaling rule, as sympy expressions in the width-class multipliers.

From its use in the graph each parameter gets ``M`` (the product of the multipliers of its width axes)
and ``m_in`` (the product over the axes its consuming op sums over); the copy scale is ``c = 1/m_in``.
Every other law follows from ``(c, M)`` exactly (DESIGN.md §2): gradient ``E(g)/(cM)``, SGD lr
``lr c^2 M``, Adam lr ``lr c``, Adam eps ``eps/(cM)``, coupled weight decay ``wd/(c^2 M)``, decoupled
``wd/c``, momentum/exp_avg ``E(buf)/(cM)``, exp_avg_sq ``E(buf)/(cM)^2``. A parameter used both as a
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

from graphscale.errors import UnsupportedOpError
from graphscale.infer.classes import Classes
from graphscale.infer.dims import Resolution
from graphscale.infer.engine import Walk
from graphscale.record import Role


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
                         is_buffer: bool = False) -> ScalingRule:
        return cls(name, shape, axis_multipliers, sympy.sympify(total), sympy.sympify(fan_in), fan_in_axes,
                   1 / sympy.sympify(fan_in), _role(shape, total, fan_in, is_buffer), is_buffer)

    # the laws of DESIGN.md §2, all from (c, M)
    @property
    def grad_scale(self) -> sympy.Expr:
        return sympy.simplify(1 / (self.copy_scale * self.total))

    @property
    def sgd_lr(self) -> sympy.Expr:
        return sympy.simplify(self.copy_scale**2 * self.total)

    @property
    def adam_lr(self) -> sympy.Expr:
        return sympy.simplify(self.copy_scale)

    @property
    def adam_eps(self) -> sympy.Expr:
        return sympy.simplify(1 / (self.copy_scale * self.total))

    @property
    def coupled_wd(self) -> sympy.Expr:
        return sympy.simplify(1 / (self.copy_scale**2 * self.total))

    @property
    def decoupled_wd(self) -> sympy.Expr:
        return sympy.simplify(1 / self.copy_scale)

    @property
    def exp_avg_scale(self) -> sympy.Expr:
        return self.grad_scale

    @property
    def exp_avg_sq_scale(self) -> sympy.Expr:
        return sympy.simplify(self.grad_scale**2)

    @property
    def init_std(self) -> sympy.Expr:
        """μP init std relative to the base: hidden m_in^(-1/2), readout m_in^(-1), input/vector 1."""
        if self.role == "hidden":
            return sympy.simplify(self.fan_in ** sympy.Rational(-1, 2))
        if self.role == "output":
            return sympy.simplify(1 / self.fan_in)
        return sympy.Integer(1)

    def laws(self) -> dict[str, sympy.Expr]:
        """Every derived quantity by name (what ``explain`` prints and ``to_dict`` exports)."""
        return {"copy_scale": self.copy_scale, "M": self.total, "m_in": self.fan_in,
                "grad": self.grad_scale, "sgd_lr": self.sgd_lr, "adam_lr": self.adam_lr,
                "adam_eps": self.adam_eps, "wd_coupled": self.coupled_wd, "wd_decoupled": self.decoupled_wd,
                "exp_avg": self.exp_avg_scale, "exp_avg_sq": self.exp_avg_sq_scale, "init_std": self.init_std}

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "role": self.role, "buffer": self.is_buffer,
                "aliases": list(self.aliases), "fan_in_axes": list(self.fan_in_axes),
                "axis_multipliers": [str(m) for m in self.axis_multipliers],
                **{k: str(v) for k, v in self.laws().items()},
                "use_multipliers": {k: str(v) for k, v in self.use_multipliers.items()}}


def _role(shape: tuple[int, ...], total: Any, fan_in: Any, is_buffer: bool) -> Role:
    total, fan_in = sympy.sympify(total), sympy.sympify(fan_in)
    if total == 1:
        return "fixed"
    if fan_in == 1:
        return "vector" if len(shape) <= 1 or is_buffer else "input"
    return "output" if sympy.simplify(total / fan_in) == 1 else "hidden"


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
        rule = ScalingRule(name, shape, axis_m, total, fan_in, base_axes, 1 / fan_in,
                           _role(shape, total, fan_in, is_buffer), is_buffer, tuple(aliases.get(name, ())))
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
