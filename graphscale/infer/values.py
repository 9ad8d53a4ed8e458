"""What width inference knows about each value in the graph, and the edits it asks the widen stage for.

The walk (:mod:`graphscale.infer.engine`) gives every node a value description: a tensor's dimensions
(:class:`TensorInfo`), an integer read off a tensor's shape (:class:`SizeInfo`), a tuple of those, or a
plain constant. Rules also leave *requests*: an argument to rewrite in the wide graph, a multiplier to
insert, an op to refuse if an axis turns out to be width. The widen stage carries them out once the
multipliers are known; nothing here touches the user's model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ArgLoc = tuple[Literal["pos", "kw", "attr"], int | str]  # "attr": an attribute of a called module


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
class ShapeEntries:
    """Rewrite a shape-like argument: entry ``i`` of the sequence at ``loc`` is the size of ``dim``.

    In the wide graph each entry whose dimension grows becomes the wide literal (``-1`` stays); entries of
    fixed dimensions keep whatever they were (a batch size read at run time stays dynamic).
    """

    node: str
    loc: ArgLoc
    entries: tuple[tuple[int, int], ...]
    varargs_from: int | None = None  # the sizes were passed as separate positional args from here


@dataclass(frozen=True)
class ScalarSize:
    """Rewrite a scalar argument that equals the size of ``dim`` (``split`` size, ``groups``, heads)."""

    node: str
    loc: ArgLoc
    dim: int


@dataclass(frozen=True)
class SliceBounds:
    """Rewrite a slice on a width axis: ``start``/``stop`` become the wide offsets of the part ``[dim]``."""

    node: str
    loc: ArgLoc | None  # for aten.slice (start at loc, end at loc+1); None for fx getitem indices
    index_pos: int | None  # position in a getitem index tuple
    before: int | None  # dimension before the part (None: starts at 0)
    part: int


@dataclass(frozen=True)
class AttentionScale:
    """SDPA's ``scale``: q.k over ``dim`` grows with its multiplier; the scale is divided by it."""

    node: str
    dim: int
    head_dim: int  # narrow head_dim, for scale=None (1/sqrt(head_dim))


@dataclass(frozen=True)
class OutputMultiplier:
    """A sum over ``dims`` with no parameter to absorb it (``q @ k.T``, ``x.sum(-1)``): scale the output."""

    node: str
    dims: tuple[int, ...]
    why: str


@dataclass(frozen=True)
class Refusal:
    """The op at ``node`` is not replication-invariant over ``dim``; refuse if that dimension grows."""

    node: str
    dim: int
    why: str


@dataclass(frozen=True)
class ParamUse:
    """One use of a parameter by an op; ``fan_in_axes`` are the parameter axes the op sums over.

    ``operand`` locates the *other* operand of a contraction (the activation), where a tied parameter's
    extra compensation is inserted.
    """

    param: str
    node: str
    fan_in_axes: tuple[int, ...]
    operand: ArgLoc | None = None


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
