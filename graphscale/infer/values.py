"""What width inference knows about each value in the graph, and the edits it asks the widen stage for.

The walk (:mod:`graphscale.infer.engine`) gives every node a value description: a tensor's dimensions
(:class:`TensorInfo`), an integer read off a tensor's shape (:class:`SizeInfo`), a tuple of those, or a
plain constant. Rules also leave *requests*: graph edits (an argument to rewrite in the wide graph, a
multiplier to insert; the classes, with their ``apply``, are in :mod:`graphscale.edits`), an op to
refuse if an axis turns out to be width. The widen stage applies the edits once the multipliers are
known; nothing here touches the user's model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from graphscale.edits import (  # the edits kinds emit; defined with their apply in graphscale.edits
    ArgLoc,
    AttentionScale,
    Edit,
    NarrowSize,
    OutputMultiplier,
    ParamUse,
    ScalarSize,
    ShapeEntries,
    SliceBounds,
)

__all__ = ["ArgLoc", "AttentionScale", "Const", "Info", "NarrowSize", "Opaque", "OutputMultiplier",
           "ParamUse", "Refusal", "Requests", "ScalarSize", "ShapeEntries", "SizeInfo", "SliceBounds",
           "TensorInfo"]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's dimensions (ids into the :class:`~graphscale.infer.dims.DimSystem`) and shape.

    ``param`` is set when the tensor is a parameter or buffer, or a pure view of one (transpose, view
    that keeps its axes): the tensor's qualified name and, for each of this tensor's axes, the axis of
    that parameter it is (``None`` where a view merged axes).
    """

    dims: tuple[int, ...]
    shape: tuple[int, ...]
    param: tuple[str, tuple[int | None, ...]] | None = None


@dataclass(frozen=True)
class SizeInfo:
    """A Python int the graph read off a tensor's shape; ``dim`` is the dimension it measures."""

    value: int
    dim: int | None


@dataclass(frozen=True)
class Const:
    """Anything else: a literal, a dtype, ``None``."""

    value: Any


@dataclass(frozen=True)
class Opaque:
    """A value the engine cannot describe (a tensor attribute it does not know, a tensor literal).

    It is never taken for a constant: a kind that needs it as a tensor or a size refuses the op, naming
    ``node`` (where the value was made) and ``why``.
    """

    node: str
    why: str


Info = TensorInfo | SizeInfo | Const | Opaque | tuple  # a tuple holds Infos (split outputs, x.size(), ...)


@dataclass(frozen=True)
class Refusal:
    """The op at ``node`` is not replication-invariant over ``dim``; refuse if that dimension grows."""

    node: str
    dim: int
    why: str


@dataclass
class Requests:
    """All requests one walk produced, in graph order."""

    shapes: list[ShapeEntries] = field(default_factory=list)
    scalars: list[ScalarSize] = field(default_factory=list)
    slices: list[SliceBounds] = field(default_factory=list)
    scales: list[AttentionScale] = field(default_factory=list)
    multipliers: list[OutputMultiplier] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    uses: list[ParamUse] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def edits(self, info: dict[str, Info] | None = None) -> list[Edit]:
        """The graph edits, in the order widen applies them: shapes, scalars, slices, attention scales,
        inserted multipliers, shared-parameter factors, then (given the walk's ``info``) the ints read off
        width axes, which keep their narrow value.

        Example:
            >>> Requests(scalars=[ScalarSize("split", ("pos", 1), 3)]).edits()
            [ScalarSize(node='split', loc=('pos', 1), dim=3)]
        """
        out: list[Edit] = [*self.shapes, *self.scalars, *self.slices, *self.scales, *self.multipliers,
                           *self.uses]
        for node, value in (info or {}).items():
            if isinstance(value, SizeInfo) and value.dim is not None:
                out.append(NarrowSize(node, value.dim, value.value))
        return out
