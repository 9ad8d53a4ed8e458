"""What widening did to each parameter: the contract between the widen stage and the train-time pieces.

A :class:`ParamScaling` says, for one tensor of the wide model, which tensor of the source (narrow) model
it was copied from, how each of its axes was replicated, and the two numbers that every μP law follows
from (docs/math.md §1-2): the copy scale ``c`` (``P' = c * E(P)``) and ``M``, the product of the multipliers
of its width axes. The optimizer, state transfer, clipping and noise read only this record, so they work
on any model that :func:`graphscale.widen` produced (or on a model compared with a smaller base).

Example:
    >>> s = ParamScaling("fc.weight", "fc.weight", (4, 3), (8, 3),
    ...                  (AxisReplication.atomic(4, 2), None), copy_scale=1.0, total_mult=2, fan_in_mult=1)
    >>> s.replicate(torch.arange(12.).view(4, 3)).shape
    torch.Size([8, 3])
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch

Role = Literal["input", "hidden", "output", "vector", "fixed"]


@dataclass(frozen=True)
class AxisReplication:
    """How one width axis of a tensor maps from narrow to wide.

    ``tree`` describes the axis as the engine resolved it: ``("atom", size, multiplier)`` for a plain
    axis, ``("prod", (child, ...))`` for a row-major product (``heads x head_dim``, outermost first) and
    ``("sum", (child, ...))`` for a concatenation (GPT-2's fused q|k|v, a rotary half split). Replication
    repeats every index of each grown atom ``multiplier`` times *adjacently* (``repeat_interleave``), inside
    whichever product or concatenation holds it.
    """

    tree: tuple

    @staticmethod
    def atomic(size: int, multiplier: int) -> AxisReplication:
        """A plain axis of ``size`` whose every unit is copied ``multiplier`` times."""
        return AxisReplication(("atom", int(size), int(multiplier)))

    @property
    def narrow_size(self) -> int:
        return _size(self.tree, wide=False)

    @property
    def wide_size(self) -> int:
        return _size(self.tree, wide=True)

    @property
    def multiplier(self) -> int:
        """The axis's multiplier (wide size over narrow size)."""
        return self.wide_size // self.narrow_size

    def index(self, device: torch.device | None = None) -> torch.Tensor:
        """Long tensor of length ``wide_size``: the narrow index each wide position copies."""
        return _index(self.tree).to(device) if device is not None else _index(self.tree)

    def plain_multiplier(self) -> int | None:
        """``k`` when this axis is plain adjacent repetition of every index (``repeat_interleave(k)``)."""
        return _plain_multiplier(self.tree)

    def is_identity(self) -> bool:
        return self.wide_size == self.narrow_size


def _size(tree: tuple, wide: bool) -> int:
    kind = tree[0]
    if kind == "atom":
        return tree[1] * (tree[2] if wide else 1)
    sizes = [_size(c, wide) for c in tree[1]]
    return _prod(sizes) if kind == "prod" else sum(sizes)


@functools.lru_cache(maxsize=4096)
def _plain_multiplier(tree: tuple) -> int | None:
    n, wide = _size(tree, wide=False), _size(tree, wide=True)
    k = wide // n
    return k if torch.equal(_index(tree), torch.arange(n).repeat_interleave(k)) else None


@functools.lru_cache(maxsize=4096)
def _index(tree: tuple) -> torch.Tensor:
    kind = tree[0]
    if kind == "atom":
        return torch.arange(tree[1]).repeat_interleave(tree[2])
    if kind == "sum":
        parts, offset = [], 0
        for child in tree[1]:
            parts.append(_index(child) + offset)
            offset += _size(child, wide=False)
        return torch.cat(parts)
    # prod: mixed-radix combination of the children's maps, row-major over the wide grid
    out = torch.zeros(1, dtype=torch.long)
    for child in tree[1]:
        out = (out[:, None] * _size(child, wide=False) + _index(child)[None, :]).reshape(-1)
    return out


@dataclass(frozen=True)
class ParamScaling:
    """The derived rule of one wide parameter or buffer, relative to its source (see module doc).

    ``axes[i]`` is ``None`` for a fixed axis. ``fan_in_mult`` is ``m_in``, the product of multipliers of
    the axes the consuming op contracts (``fan_in_axes``, e.g. ``(1,)`` for a Linear weight);
    ``copy_scale`` is ``c`` (``1/m_in`` times any compensation the weight carries, e.g. ``k**-0.5`` for
    standard attention when the user's class fixes the formula).
    """

    name: str
    source: str
    narrow_shape: tuple[int, ...]
    wide_shape: tuple[int, ...]
    axes: tuple[AxisReplication | None, ...]
    copy_scale: float
    total_mult: int
    fan_in_mult: int
    fan_in_axes: tuple[int, ...] = ()
    is_buffer: bool = False
    role: Role = "fixed"
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fan_out_mult(self) -> int:
        return self.total_mult // self.fan_in_mult

    def replicate(self, narrow: torch.Tensor) -> torch.Tensor:
        """``E(narrow)``: copy every width index adjacently, no rescale. Returns a new tensor."""
        plain = [a.plain_multiplier() if a is not None and not a.is_identity() else 1 for a in self.axes]
        if all(plain) and len(plain) == narrow.dim():
            # Every axis is plain repetition: one broadcast view and one copy (repeat_interleave per axis
            # would write the tensor once per widened axis).
            view_shape, expand_shape = [], []
            for size, k in zip(narrow.shape, plain):
                view_shape += [size, 1]
                expand_shape += [size, k]
            out = narrow.reshape(view_shape).expand(expand_shape).reshape(self.wide_shape)
            return out if any(k > 1 for k in plain) else out.clone()  # reshape copied unless nothing grew
        out = narrow
        for dim, axis in enumerate(self.axes):
            if axis is not None and not axis.is_identity():
                k = axis.plain_multiplier()
                if k:
                    out = out.repeat_interleave(k, dim=dim)
                else:
                    out = out.index_select(dim, axis.index(out.device))
        return out.clone() if out is narrow else out

    def widen(self, narrow: torch.Tensor) -> torch.Tensor:
        """``c * E(narrow)``: the wide value that keeps the function exact."""
        if self.copy_scale != 1.0 and narrow.is_floating_point():
            narrow = narrow * self.copy_scale  # scale the narrow tensor: a pass over 1/M of the memory
        return self.replicate(narrow)

    def collapse(self, wide: torch.Tensor) -> torch.Tensor:
        """Inverse view of :meth:`replicate`: the first copy of every group (for checks and reports)."""
        out = wide
        for dim, axis in enumerate(self.axes):
            if axis is not None and not axis.is_identity():
                idx = axis.index(out.device)
                first = torch.zeros(axis.narrow_size, dtype=torch.long, device=out.device)
                first.scatter_reduce_(0, idx, torch.arange(len(idx), device=out.device), "amin",
                                      include_self=False)
                out = out.index_select(dim, first)
        return out


@dataclass
class WideningRecord:
    """Attached to every widened module as ``module.graphscale``: one :class:`ParamScaling` per tensor.

    ``multipliers`` maps width-class names to their integer multipliers; ``frontend`` says which
    capture made the graph; ``notes`` collects what the user should know (noise applied, warnings,
    compensations ``widen_into`` put into weights).
    """

    params: dict[str, ParamScaling]
    multipliers: dict[str, int]
    frontend: str = "fx"
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> ParamScaling:
        return self.params[name]

    def summary(self) -> str:
        """A readable table of what was done to every tensor."""
        lines = [f"widened with multipliers {self.multipliers} ({self.frontend} graph)"]
        w = max((len(n) for n in self.params), default=4)
        lines.append(f"{'tensor':<{w}}  {'source shape':>14}  {'wide shape':>14}  {'c':>9}  {'M':>4}  m_in")
        for p in self.params.values():
            lines.append(f"{p.name:<{w}}  {str(tuple(p.narrow_shape)):>14}  {str(tuple(p.wide_shape)):>14}  "
                         f"{p.copy_scale:>9.4g}  {p.total_mult:>4}  {p.fan_in_mult}")
        lines.extend(self.notes)
        return "\n".join(lines)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out
