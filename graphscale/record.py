"""What widening did to each parameter: the contract between the widen stage and the train-time pieces.

A :class:`ParamScaling` says, for one tensor of the wide model, which tensor of the source (narrow) model
it was copied from, how each of its axes was replicated, and the two numbers that every μP law follows
from (DESIGN.md §2): the copy scale ``c`` (``P' = c * E(P)``) and ``M``, the product of the multipliers
of its width axes. The optimizer, state transfer, clipping and noise read only this record, so they work
on any model that :func:`graphscale.widen` produced (or on a model compared with a smaller base).

Example:
    >>> s = ParamScaling("fc.weight", "fc.weight", (4, 3), (8, 3),
    ...                  (AxisReplication.atomic(4, 2), None), copy_scale=1.0, total_mult=2, fan_in_mult=1)
    >>> s.replicate(torch.arange(12.).view(4, 3)).shape
    torch.Size([8, 3])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Role = Literal["input", "hidden", "output", "vector", "fixed"]


@dataclass(frozen=True)
class AxisReplication:
    """How one width axis of a tensor maps from narrow to wide.

    The axis is a concatenation of ``segments`` (a ``cat``/``split`` axis such as GPT-2's fused q|k|v has
    several, a plain axis has one). Each segment is a row-major product of factors ``(size, multiplier)``,
    outermost first: ``heads x head_dim`` with fixed heads is ``((12, 1), (64, 2))``. Replication repeats
    every index of each grown factor ``multiplier`` times *adjacently* (``repeat_interleave``).
    """

    segments: tuple[tuple[tuple[int, int], ...], ...]

    @staticmethod
    def atomic(size: int, multiplier: int) -> AxisReplication:
        """A plain axis of ``size`` whose every unit is copied ``multiplier`` times."""
        return AxisReplication((((size, multiplier),),))

    @property
    def narrow_size(self) -> int:
        return sum(_prod(s for s, _ in seg) for seg in self.segments)

    @property
    def wide_size(self) -> int:
        return sum(_prod(s * m for s, m in seg) for seg in self.segments)

    @property
    def multiplier(self) -> int:
        """The axis's multiplier; every segment must grow by the same factor (checked at build time)."""
        return self.wide_size // self.narrow_size

    def index(self, device: torch.device | None = None) -> torch.Tensor:
        """Long tensor of length ``wide_size``: the narrow index each wide position copies."""
        parts, offset = [], 0
        for seg in self.segments:
            sizes = [s for s, _ in seg]
            idx = torch.arange(_prod(sizes), device=device).view(*sizes) if sizes else torch.zeros(1)
            for dim, (_, mult) in enumerate(seg):
                if mult != 1:
                    idx = idx.repeat_interleave(mult, dim=dim)
            parts.append(idx.reshape(-1) + offset)
            offset += _prod(sizes)
        return torch.cat(parts)

    def is_identity(self) -> bool:
        return all(m == 1 for seg in self.segments for _, m in seg)


@dataclass(frozen=True)
class ParamScaling:
    """The derived rule of one wide parameter or buffer, relative to its source (see module doc).

    ``axes[i]`` is ``None`` for a fixed axis. ``fan_in_mult`` is ``m_in``, the product of multipliers of
    the axes the consuming op contracts (``fan_in_axes``, e.g. ``(1,)`` for a Linear weight); ``copy_scale`` is ``c`` (``1/m_in`` times any compensation the
    weight carries, e.g. ``k**-0.5`` for standard attention when the user's class fixes the formula).
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
        out = narrow
        for dim, axis in enumerate(self.axes):
            if axis is not None and not axis.is_identity():
                out = out.index_select(dim, axis.index(out.device))
        return out.clone() if out is narrow else out

    def widen(self, narrow: torch.Tensor) -> torch.Tensor:
        """``c * E(narrow)``: the wide value that keeps the function exact."""
        wide = self.replicate(narrow)
        return wide.mul_(self.copy_scale) if self.copy_scale != 1.0 and wide.is_floating_point() else wide

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

    ``multipliers`` maps width-class names to their integer multipliers; ``source_shapes`` holds the
    narrow shapes so that a record can be checked against the module it is attached to.
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
