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

import builtins
import copy
import functools
import inspect
import itertools
import json
import math
import os
import pickle
import secrets
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from graphscale.errors import GraphscaleError

Role = Literal["input", "hidden", "output", "vector", "fixed"]

#: File name of the record written beside a state dict (in a model directory) by :func:`save_record`.
RECORD_FILE = "graphscale.json"
#: Key of the record's JSON in a safetensors file's metadata (see :func:`record_metadata`).
METADATA_KEY = "graphscale"
#: Name of the record's format in its JSON, and its version: a reader refuses other formats and versions.
RECORD_FORMAT = "graphscale-widening-record"
RECORD_VERSION = 1
#: The version written when some tensor has ``slice_folds``: a reader of version 1 would ignore them and
#: train that tensor silently wrong, so it must refuse the file instead.
RECORD_VERSION_SLICE_FOLDS = 2
#: The version written when some tensor concatenates parts that grow by different multipliers (its
#: blocks have different ``(c, M)``, :meth:`ParamScaling.blocks`): an older reader would train it with one
#: factor. This graphscale reads all three.
RECORD_VERSION_MIXED_PARTS = 3
READABLE_VERSIONS = (RECORD_VERSION, RECORD_VERSION_SLICE_FOLDS, RECORD_VERSION_MIXED_PARTS)


class RecordFileError(GraphscaleError, ValueError):
    """A saved widening record is missing, unreadable, or not in a format this graphscale reads."""


class UnpicklableModelError(GraphscaleError, pickle.PicklingError):
    """A widened model that pickle/torch.save cannot write in a form that loads back."""


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
        """The axis's multiplier (wide size over narrow size; 1 for an empty axis, which has no unit to copy).

        >>> AxisReplication.atomic(0, 2).multiplier, AxisReplication.atomic(4, 3).multiplier
        (1, 3)
        """
        narrow = self.narrow_size
        return self.wide_size // narrow if narrow else 1

    def index(self, device: torch.device | None = None) -> torch.Tensor:
        """Long tensor of length ``wide_size``: the narrow index each wide position copies."""
        return _index(self.tree).to(device) if device is not None else _index(self.tree)

    def plain_multiplier(self) -> int | None:
        """``k`` when this axis is plain adjacent repetition of every index (``repeat_interleave(k)``)."""
        return _plain_multiplier(self.tree)

    def is_identity(self) -> bool:
        return self.wide_size == self.narrow_size

    def is_mixed(self) -> bool:
        """Whether some concatenation in the axis has parts that grow by different multipliers.

        >>> AxisReplication(("sum", (("atom", 2, 2), ("atom", 3, 1)))).is_mixed()
        True
        """
        return _mixed(self.tree)


def _flat_parts(tree: tuple) -> list[tuple]:
    """The parts of a concatenation, concatenations inside it opened (their parts are contiguous too).

    >>> _flat_parts(("sum", (("atom", 2, 2), ("sum", (("atom", 3, 1), ("atom", 1, 1))))))
    [('atom', 2, 2), ('atom', 3, 1), ('atom', 1, 1)]
    """
    if tree[0] != "sum":
        return [tree]
    return [p for c in tree[1] for p in _flat_parts(c)]


def _mixed(tree: tuple) -> bool:
    if tree[0] == "atom":
        return False
    if tree[0] == "sum" and len({AxisReplication(c).multiplier for c in tree[1]}) > 1:
        return True
    return any(_mixed(c) for c in tree[1])


def _size(tree: tuple, wide: bool) -> int:
    kind = tree[0]
    if kind == "atom":
        return tree[1] * (tree[2] if wide else 1)
    sizes = [_size(c, wide) for c in tree[1]]
    return _prod(sizes) if kind == "prod" else sum(sizes)


@functools.lru_cache(maxsize=4096)
def _atom_factors(tree: tuple) -> tuple[tuple[int, int], ...] | None:
    """``((size, multiplier), ...)``, outermost first, such that the axis's wide index is row-major over
    ``size_i x multiplier_i`` and reads narrow index ``(n_1, n_2, ...)``: an atom; a product of such axes;
    a concatenation whose parts all repeat each index adjacently ``k`` times (the same ``k``: the whole is
    then one such atom). None for any other concatenation (parts that grow differently, or products).

    >>> _atom_factors(("prod", (("atom", 16, 2), ("sum", (("atom", 64, 1), ("atom", 64, 1))))))
    ((16, 2), (128, 1))
    >>> _atom_factors(("sum", (("atom", 4, 3), ("atom", 2, 3))))
    ((6, 3),)
    >>> _atom_factors(("sum", (("atom", 4, 3), ("atom", 2, 1)))) is None
    True
    """
    if tree[0] == "atom":
        return ((int(tree[1]), int(tree[2])),)
    parts: list[tuple[tuple[int, int], ...]] = []
    for child in tree[1]:
        factors = _atom_factors(child)
        if factors is None:
            return None
        # an axis that copies nothing is one factor of its size (a part of a concatenation like any atom)
        parts.append(((_prod([n for n, _ in factors]), 1),) if all(k == 1 for _, k in factors) else factors)
    if tree[0] == "prod":
        return tuple(x for factors in parts for x in factors)
    ks = {factors[0][1] for factors in parts}
    if all(len(factors) == 1 for factors in parts) and len(ks) == 1:
        return ((sum(factors[0][0] for factors in parts), ks.pop()),)
    return None


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
class Block:
    """A box of a wide tensor whose elements share one ``(c, M)``: ``index`` selects it (one slice per
    leading axis; ``()`` is the whole tensor). See :meth:`ParamScaling.blocks`."""

    index: tuple[slice, ...]
    copy_scale: float
    total_mult: float
    fan_in_mult: float


@dataclass(frozen=True)
class ParamScaling:
    """The derived rule of one wide parameter or buffer, relative to its source (see module doc).

    ``axes[i]`` is ``None`` for a fixed axis. ``fan_in_mult`` is ``m_in``, the product of multipliers of
    the axes the consuming op contracts (``fan_in_axes``, e.g. ``(1,)`` for a Linear weight);
    ``copy_scale`` is ``c`` (``1/m_in`` times any compensation the weight carries, e.g. ``k**-0.5`` for
    standard attention when the user's class fixes the formula).

    ``slice_folds`` lists factors folded onto only PART of the tensor, beyond ``c``: ``(axis, start, stop,
    factor, why)`` says wide indices ``start:stop`` of ``axis`` carry a further ``factor`` (the query rows of
    a fused q|k|v projection with ``heads="fixed"``). The function stays exact, and such a tensor trains
    like the narrow one only blockwise (docs/math.md §8): see :meth:`blocks`.

    ``copy_scale``, ``total_mult`` and ``fan_in_mult`` are those of the tensor's first block. An axis that
    concatenates parts growing by different multipliers (Mamba's ``x_proj`` rows ``dt | B | C`` when only
    ``dt_rank`` grows) makes blocks of their own ``M`` (and ``c``, where the axis is summed), which
    :meth:`blocks` lists with ``slice_folds``' boxes; :meth:`widen` applies them.

    ``shift`` is a constant added after scaling: the wide tensor is ``c E(w) + shift``. A gain written as
    ``s + w`` (Gemma's ``1 + w``) that carries a factor ``f`` needs ``s + w' = f (s + w)``, so
    ``w' = f w + (f - 1) s``. Gradients and updates see only ``c``; decoupled weight decay would pull
    ``w'`` toward 0 instead of toward the shift, so :func:`graphscale.mup_optimizer` refuses a non-zero one.
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
    slice_folds: tuple[tuple[int, int, int, float, str], ...] = ()
    shift: float = 0.0

    @property
    def fan_out_mult(self) -> int:
        return self.total_mult // self.fan_in_mult

    def blocks(self, folds: bool = True) -> tuple[Block, ...]:
        """The boxes of the wide tensor that share one ``(c, M, m_in)``, covering it: one box ``()`` for a
        tensor copied uniformly. A concatenated axis whose parts grow by different multipliers cuts the
        tensor at its parts (each part's multiplier relative to the first part's scales ``M``, and ``m_in``
        where the axis is summed, whose inverse scales ``c``); ``slice_folds`` cut it at their rows and
        multiply their ``c`` (only with ``folds``; :meth:`widen` leaves them out, because the folds are
        already in the values that ``widen_into`` wrote).

        Example:
            >>> parts = AxisReplication(("sum", (("atom", 2, 2), ("atom", 3, 1))))   # grows 2x | kept
            >>> s = ParamScaling("x_proj", "x_proj", (5, 4), (7, 8), (parts, AxisReplication.atomic(4, 2)),
            ...                  0.5, 4, 2, fan_in_axes=(1,))
            >>> [(b.index, b.copy_scale, b.total_mult) for b in s.blocks()]
            [((slice(0, 4, None),), 0.5, 4.0), ((slice(4, 7, None),), 0.5, 2.0)]
        """
        return _blocks(self, folds)

    def block_scaling(self, block: Block) -> ParamScaling | None:
        """``block`` as a :class:`ParamScaling` of its own (its shapes, axes, ``(c, M)``), for the pieces
        that need a block's copy structure (noise, init); ``None`` where a cut falls inside a part of a
        concatenation (a fold on per-head rows), which no axis tree describes.

        Example:
            >>> parts = AxisReplication(("sum", (("atom", 2, 2), ("atom", 3, 1))))
            >>> s = ParamScaling("x", "x", (5, 4), (7, 4), (parts, None), 1.0, 2, 1)
            >>> b = s.block_scaling(s.blocks()[1])
            >>> b.narrow_shape, b.wide_shape, b.total_mult, b.axes   # the kept part: copied once
            ((3, 4), (3, 4), 1, (None, None))
        """
        axes, narrow, wide = list(self.axes), list(self.narrow_shape), list(self.wide_shape)
        for axis, cut in enumerate(block.index):
            if cut == slice(0, self.wide_shape[axis]):
                continue
            rep = self.axes[axis]
            children = _flat_parts(rep.tree) if rep is not None and rep.tree[0] == "sum" else ()
            lo, picked = 0, []
            for child in children:
                hi = lo + _size(child, wide=True)
                if cut.start <= lo and hi <= cut.stop:
                    picked.append(child)
                elif lo < cut.stop and cut.start < hi:
                    return None  # the cut splits this part
                lo = hi
            if not picked:
                return None
            tree = picked[0] if len(picked) == 1 else ("sum", tuple(picked))
            axes[axis] = None if _size(tree, False) == _size(tree, True) else AxisReplication(tree)
            narrow[axis], wide[axis] = _size(tree, False), _size(tree, True)
        return replace(self, narrow_shape=tuple(narrow), wide_shape=tuple(wide), axes=tuple(axes),
                       copy_scale=block.copy_scale, total_mult=round(block.total_mult),
                       fan_in_mult=round(block.fan_in_mult), slice_folds=())

    def is_blockwise(self) -> bool:
        """Whether the tensor's blocks differ in ``(c, M)`` (see :meth:`blocks`)."""
        return len({(b.copy_scale, b.total_mult) for b in self.blocks()}) > 1

    def has_mixed_parts(self) -> bool:
        """Whether an axis concatenates parts that grow by different multipliers."""
        return any(b.total_mult != self.total_mult or b.copy_scale != self.copy_scale
                   for b in self.blocks(folds=False))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with every field (axis trees as nested lists); :meth:`from_dict` inverts it."""
        out = {
            "name": self.name, "source": self.source, "narrow_shape": list(self.narrow_shape),
            "wide_shape": list(self.wide_shape),
            "axes": [None if a is None else _tree_to_json(a.tree) for a in self.axes],
            "copy_scale": float(self.copy_scale), "total_mult": int(self.total_mult),
            "fan_in_mult": int(self.fan_in_mult), "fan_in_axes": list(self.fan_in_axes),
            "is_buffer": bool(self.is_buffer), "role": self.role, "notes": list(self.notes),
        }
        if self.slice_folds:  # only when present: records without one stay as they were written before
            out["slice_folds"] = [[int(a), int(lo), int(hi), float(f), str(why)]
                                  for a, lo, hi, f, why in self.slice_folds]
        if self.shift:  # likewise
            out["shift"] = float(self.shift)
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ParamScaling:
        """The :class:`ParamScaling` that :meth:`to_dict` wrote (equal to the original)."""
        return ParamScaling(
            name=str(d["name"]), source=str(d["source"]),
            narrow_shape=tuple(int(x) for x in d["narrow_shape"]),
            wide_shape=tuple(int(x) for x in d["wide_shape"]),
            axes=tuple(None if a is None else AxisReplication(_tree_from_json(a)) for a in d["axes"]),
            copy_scale=float(d["copy_scale"]), total_mult=int(d["total_mult"]),
            fan_in_mult=int(d["fan_in_mult"]), fan_in_axes=tuple(int(x) for x in d["fan_in_axes"]),
            is_buffer=bool(d["is_buffer"]), role=d["role"], notes=tuple(str(x) for x in d["notes"]),
            slice_folds=tuple((int(a), int(lo), int(hi), float(f), str(why))
                              for a, lo, hi, f, why in d.get("slice_folds", ())),
            shift=float(d.get("shift", 0.0)),
        )

    def _broadcast(self, narrow: torch.Tensor) -> tuple[list[int], list[int]] | None:
        """``(view, expand)`` shapes such that ``narrow.reshape(view).expand(expand)`` is ``E(narrow)`` laid
        out as the wide tensor, where every axis is fixed or a product of atoms (heads x head_dim with the
        heads grown: each narrow index block repeats as a whole); None where an axis concatenates parts
        that repeat differently (:func:`_atom_factors`)."""
        if len(self.axes) != narrow.dim():
            return None
        view_shape: list[int] = []
        expand_shape: list[int] = []
        for size, axis in zip(narrow.shape, self.axes):
            factors = [(size, 1)] if axis is None else _atom_factors(axis.tree)
            if factors is None:
                return None
            for n, k in factors:  # wide index n_i * k_i + r_i of each factor reads narrow index n_i
                view_shape += [n, 1]
                expand_shape += [n, k]
        return view_shape, expand_shape

    def replicate(self, narrow: torch.Tensor) -> torch.Tensor:
        """``E(narrow)``: copy every width index adjacently, no rescale. Returns a new tensor."""
        pattern = self._broadcast(narrow)
        if pattern is not None:
            # one broadcast view and one copy (repeat_interleave or index_select per axis would write the
            # tensor once per widened axis)
            out = narrow.reshape(pattern[0]).expand(pattern[1]).reshape(self.wide_shape)
            return out if pattern[0] != pattern[1] else out.clone()  # nothing grew: reshape gave a view
        out = narrow
        for dim, axis in enumerate(self.axes):
            if axis is not None and not axis.is_identity():
                k = axis.plain_multiplier()
                if k:
                    out = out.repeat_interleave(k, dim=dim)
                else:
                    out = out.index_select(dim, axis.index(out.device))
        return out.clone() if out is narrow else out

    def widen(self, narrow: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``c * E(narrow) + shift``: the wide value that keeps the function exact; written into ``out`` (a
        tensor of the wide shape, e.g. the larger model's own) when given, which is returned.

        Example:
            >>> s = ParamScaling("w", "w", (2,), (4,), (AxisReplication.atomic(2, 2),), 0.5, 2, 2)
            >>> s.widen(torch.tensor([1.0, 3.0])).tolist()
            [0.5, 0.5, 1.5, 1.5]
            >>> from dataclasses import replace
            >>> replace(s, shift=-0.5).widen(torch.tensor([1.0, 3.0])).tolist()  # a gain 1 + w halved
            [0.0, 0.0, 1.0, 1.0]
            >>> into = torch.empty(4, dtype=torch.float64)
            >>> s.widen(torch.tensor([1.0, 3.0]), out=into) is into, into.tolist()
            (True, [0.5, 0.5, 1.5, 1.5])
        """
        if out is not None and tuple(out.shape) != tuple(self.wide_shape):
            raise ValueError(f"{self.name}: out has shape {tuple(out.shape)}, the wide shape is "
                             f"{self.wide_shape}")
        parts = [b for b in self.blocks(folds=False) if b.copy_scale != self.copy_scale]
        if parts and narrow.is_floating_point():
            # a summed axis whose parts grow differently: each part carries its own 1/m_in
            wide = self.replicate(narrow).mul_(self.copy_scale)
            for b in parts:
                wide[b.index].mul_(b.copy_scale / self.copy_scale)
            if self.shift:
                wide.add_(self.shift)
            return wide if out is None else out.copy_(wide)
        scale = self.copy_scale != 1.0 and narrow.is_floating_point()
        pattern = self._broadcast(narrow)
        if (pattern is not None and pattern[0] != pattern[1]
                and (out is None or (out.dtype == narrow.dtype and out.is_contiguous()))):
            # One pass: write c * narrow straight into the wide tensor through a broadcast view (scaling
            # the narrow tensor first and then copying would read and write memory twice). Elementwise
            # the same product x * c as below, so bitwise the same result.
            view_shape, expand_shape = pattern
            wide = out if out is not None else torch.empty(self.wide_shape, dtype=narrow.dtype,
                                                           device=narrow.device)
            src = narrow.reshape(view_shape).expand(expand_shape)
            if scale:
                torch.mul(src, self.copy_scale, out=wide.view(expand_shape))
            else:
                wide.view(expand_shape).copy_(src)
            return wide.add_(self.shift) if self.shift and wide.is_floating_point() else wide
        if scale:
            narrow = narrow * self.copy_scale  # scale the narrow tensor: a pass over 1/M of the memory
        if self.shift and narrow.is_floating_point():
            narrow = narrow + self.shift  # c w + shift, replicated: the same values as c E(w) + shift
        wide = self.replicate(narrow)
        return wide if out is None else out.copy_(wide)

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


@functools.lru_cache(maxsize=4096)
def _blocks(scaling: ParamScaling, folds: bool) -> tuple[Block, ...]:
    """:meth:`ParamScaling.blocks`, cached: clipping asks for every parameter's blocks at every step."""
    cuts: list[list[tuple[int, int, float, float]]] = []  # per axis: (lo, hi, ratio, fold)
    for axis, rep in enumerate(scaling.axes):
        wide = scaling.wide_shape[axis]
        edges = {0, wide}
        parts: list[tuple[int, int, float]] = []  # (lo, hi, multiplier relative to the first part)
        if rep is not None and rep.tree[0] == "sum":
            pieces = _flat_parts(rep.tree)
            ms = [AxisReplication(c).multiplier for c in pieces]
            if len(set(ms)) > 1:
                lo = 0
                for child, m in zip(pieces, ms):
                    hi = lo + _size(child, wide=True)
                    parts.append((lo, hi, m / ms[0]))
                    edges |= {lo, hi}
                    lo = hi
        axis_folds = [(lo, hi, f) for a, lo, hi, f, _ in scaling.slice_folds if a == axis] if folds else []
        for lo, hi, _ in axis_folds:
            edges |= {lo, hi}
        bounds = sorted(edges)
        cuts.append([(lo, hi,
                      next((r for plo, phi, r in parts if plo <= lo and hi <= phi), 1.0),
                      math.prod(f for flo, fhi, f in axis_folds if flo <= lo and hi <= fhi))
                     for lo, hi in zip(bounds, bounds[1:])])
    if all(len(c) <= 1 for c in cuts):
        return (Block((), float(scaling.copy_scale), float(scaling.total_mult), float(scaling.fan_in_mult)),)
    last = max(i for i, c in enumerate(cuts) if len(c) > 1)
    out = []
    for combo in itertools.product(*cuts[:last + 1]):
        ratio = math.prod(r for _, _, r, _ in combo)
        ratio_in = math.prod(combo[i][2] for i in scaling.fan_in_axes if i <= last)
        fold = math.prod(f for *_, f in combo)
        out.append(Block(tuple(slice(lo, hi) for lo, hi, _, _ in combo),
                         float(scaling.copy_scale) / ratio_in * fold, float(scaling.total_mult) * ratio,
                         float(scaling.fan_in_mult) * ratio_in))
    return tuple(out)


@dataclass
class WideningRecord:
    """Attached to every widened module as ``module.graphscale``: one :class:`ParamScaling` per tensor.

    ``multipliers`` maps width-class names to their integer multipliers; ``frontend`` says which
    capture made the graph; ``notes`` collects what the user should know (noise applied, warnings,
    compensations ``widen_into`` put into weights); ``info`` holds free-form JSON-ready facts that travel
    with the record (for example the source model's config).

    The record round-trips through JSON exactly (:meth:`to_json`, :meth:`from_json`), so it can be saved
    beside a state dict (:func:`save_record`) and a new process can rebuild the μP optimizer from it
    (``graphscale.mup_optimizer(model, cls, lr=..., record=path)``).

    Example:
        >>> rec = WideningRecord({"w": ParamScaling("w", "w", (2,), (4,), (AxisReplication.atomic(2, 2),),
        ...                                         1.0, 2, 1)}, {"h": 2})
        >>> WideningRecord.from_json(rec.to_json()) == rec
        True
    """

    params: dict[str, ParamScaling]
    multipliers: dict[str, int]
    frontend: str = "fx"
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ParamScaling:
        return self.params[name]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole record, tagged with its format and version."""
        return {
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION_MIXED_PARTS if any(p.has_mixed_parts() for p in self.params.values())
            else RECORD_VERSION_SLICE_FOLDS if any(p.slice_folds for p in self.params.values())
            else RECORD_VERSION,
            "multipliers": {k: int(v) for k, v in self.multipliers.items()},
            "frontend": self.frontend, "notes": list(self.notes), "info": dict(self.info),
            "params": {name: p.to_dict() for name, p in self.params.items()},
        }

    @staticmethod
    def from_dict(d: Any, where: str = "the record") -> WideningRecord:
        """Rebuild a record from :meth:`to_dict`'s output; refuse another format or a newer version."""
        if not isinstance(d, dict) or d.get("format") != RECORD_FORMAT:
            raise RecordFileError(f"{where} is not a graphscale widening record (no format "
                                  f"{RECORD_FORMAT!r}); write it with graphscale.save_record")
        if d.get("version") not in READABLE_VERSIONS:
            raise RecordFileError(f"{where} has record version {d.get('version')!r}; this graphscale reads "
                                  f"versions {', '.join(map(str, READABLE_VERSIONS))}: upgrade graphscale or "
                                  "re-save the record")
        try:
            params = {str(n): ParamScaling.from_dict(p) for n, p in d["params"].items()}
            return WideningRecord(params, {str(k): int(v) for k, v in d["multipliers"].items()},
                                  str(d["frontend"]), [str(x) for x in d["notes"]], dict(d["info"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RecordFileError(f"{where} is a damaged graphscale record ({type(e).__name__}: {e})") from e

    def to_json(self) -> str:
        """The record as a JSON string (floats written exactly: ``repr`` round-trips)."""
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    @staticmethod
    def from_json(text: str | bytes, where: str = "the record") -> WideningRecord:
        """Parse :meth:`to_json`'s output back into an equal record."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise RecordFileError(f"{where} is not valid JSON ({e})") from e
        return WideningRecord.from_dict(data, where)

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


def _tree_to_json(tree: tuple) -> list:
    if tree[0] == "atom":
        return ["atom", int(tree[1]), int(tree[2])]
    return [tree[0], [_tree_to_json(c) for c in tree[1]]]


def _tree_from_json(tree: list) -> tuple:
    if tree[0] == "atom":
        return ("atom", int(tree[1]), int(tree[2]))
    if tree[0] not in ("prod", "sum"):
        raise ValueError(f"unknown axis kind {tree[0]!r}")
    return (str(tree[0]), tuple(_tree_from_json(c) for c in tree[1]))


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def attach_record(module: torch.nn.Module, record: WideningRecord) -> None:
    """Attach ``record`` as ``module.graphscale``, so that it survives deepcopy, pickle and torch.save.

    A plain ``nn.Module`` keeps the attribute through copies by itself. A ``torch.fx.GraphModule`` does
    not: its ``__deepcopy__`` and its unpickling rebuild the module from the graph and keep only what the
    graph uses. So the module's class -- torch gives every GraphModule instance a class of its own -- gets
    a ``__deepcopy__`` and a ``__reduce__`` that call torch's and attach the (copied) record to the
    result. Pickling a GraphModule regenerates its code, which fails when a node's type annotation is a
    string (what fx records from a ``forward`` under ``from __future__ import annotations``); such
    annotations are resolved to the class they name (``"torch.Tensor"``) or dropped. Annotations do not
    affect what the module computes.

    Example:
        >>> import copy
        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
        >>> attach_record(gm, WideningRecord({}, {"h": 1}))
        >>> copy.deepcopy(gm).graphscale
        WideningRecord(params={}, multipliers={'h': 1}, frontend='fx', notes=[], info={})
    """
    module.graphscale = record  # type: ignore[assignment]
    if not isinstance(module, torch.fx.GraphModule):
        return
    cls = type(module)
    if cls is not torch.fx.GraphModule and cls.__qualname__.endswith("<locals>.GraphModuleImpl"):
        cls.__deepcopy__ = _deepcopy_keeping_record  # type: ignore[method-assign]
        cls.__reduce__ = _reduce_keeping_record  # type: ignore[method-assign]
    else:  # pragma: no cover - a torch whose GraphModules share a class: its own preservation hook
        module.meta.setdefault("_user_preserved_attributes", {})["graphscale"] = record
    if resolve_string_annotations(module.graph):
        module.recompile()


def resolve_string_annotations(graph: torch.fx.Graph) -> bool:
    """Replace every node's string type annotation by the class it names (or ``None``); returns whether
    any was changed (a ``GraphModule`` then needs ``recompile()``). Call it on a graph before building its
    module to spare :func:`attach_record` a second code generation.

    Example:
        >>> g = torch.fx.Graph(); x = g.placeholder("x", type_expr="torch.Tensor"); _ = g.output(x)
        >>> resolve_string_annotations(g), x.type is torch.Tensor, resolve_string_annotations(g)
        (True, True, False)
    """
    changed = False
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = _named_type(node.type)
            changed = True
    return changed


def _deepcopy_keeping_record(self: torch.fx.GraphModule, memo: dict[int, Any]) -> torch.fx.GraphModule:
    out = torch.fx.GraphModule.__deepcopy__(self, memo)
    record = self.__dict__.get("graphscale")
    if isinstance(record, WideningRecord):
        attach_record(out, copy.deepcopy(record, memo))
    return out


def _reduce_keeping_record(self: torch.fx.GraphModule) -> tuple[Any, ...]:
    if _export_layout(self):
        return _reduce_export_graph(self)
    _refuse_unloadable(self)
    rebuild, args = torch.fx.GraphModule.__reduce__(self)[:2]
    return (_rebuild_keeping_record, (rebuild, args))


class InputGuards(torch.nn.Module):
    """Stands in, in a pickled widening, for the input guards ``torch.export`` generated.

    ``torch.export`` inserts a ``_guards_fn`` submodule whose ``forward`` is code generated at export time
    (a local function, which pickle cannot write) that asserts the graph's specialisation, e.g.
    ``torch._assert(args[0].size()[1] == 8, "Guard failed: idx.size()[1] == 8")``. This module makes the
    same assertions, in the same order, with the same messages, from plain data: ``checks`` holds one
    ``(argument index, dimension, size, message)`` per assertion. Like the original it is impure, so
    dead-code elimination keeps its call.

    Example:
        >>> guards = InputGuards([(0, 1, 8, "Guard failed: idx.size()[1] == 8")])
        >>> guards(torch.zeros(2, 8)) is None
        True
        >>> guards(torch.zeros(2, 7))
        Traceback (most recent call last):
        ...
        AssertionError: Guard failed: idx.size()[1] == 8
    """

    _is_impure = True

    def __init__(self, checks: list[tuple[int, int, int, str]]) -> None:
        super().__init__()
        self.checks = [(int(i), int(d), int(n), str(msg)) for i, d, n, msg in checks]

    def forward(self, *args: Any) -> None:
        for i, d, n, msg in self.checks:
            torch._assert(args[i].size()[d] == n, msg)
        return None


#: Bytecode instructions that carry no meaning for :func:`_size_guards` (version-specific bookkeeping).
_IGNORED_OPS = frozenset({"RESUME", "PRECALL", "CACHE", "PUSH_NULL", "NOP", "EXTENDED_ARG", "TO_BOOL",
                          "NOT_TAKEN", "COPY_FREE_VARS", "MAKE_CELL"})
_SAME_OPS = {"LOAD_METHOD": "LOAD_ATTR", "CALL_METHOD": "CALL", "CALL_FUNCTION": "CALL",
             "LOAD_FAST_BORROW": "LOAD_FAST", "LOAD_SMALL_INT": "LOAD_CONST"}


def _size_guards(fn: Any) -> list[tuple[int, int, int, str]] | None:
    """The ``(argument index, dimension, size, message)`` of each assertion of a generated guard function
    made only of ``torch._assert(args[i].size()[d] == n, "message")`` statements (what ``torch.export``
    writes for a graph specialised to static shapes), read from its bytecode; ``None`` when the function
    does anything else, so that the caller refuses it rather than guess."""
    code = getattr(fn, "__code__", None)
    if code is None or code.co_freevars or code.co_varnames[:1] != ("args",) or code.co_argcount != 0:
        return None
    import dis

    ops = []
    for ins in dis.get_instructions(fn):
        name = _SAME_OPS.get(ins.opname, ins.opname)
        if name in _IGNORED_OPS:
            continue
        if name == "BINARY_OP" and ins.argrepr == "[]":
            name = "BINARY_SUBSCR"
        ops.append((name, ins.argval))
    checks: list[tuple[int, int, int, str]] = []
    pattern = ["LOAD_GLOBAL", "LOAD_ATTR", "LOAD_FAST", "LOAD_CONST", "BINARY_SUBSCR", "LOAD_ATTR", "CALL",
               "LOAD_CONST", "BINARY_SUBSCR", "LOAD_CONST", "COMPARE_OP", "LOAD_CONST", "CALL", "POP_TOP"]
    while len(ops) >= len(pattern) and ops[0] == ("LOAD_GLOBAL", "torch"):
        step, ops = ops[:len(pattern)], ops[len(pattern):]
        if [op for op, _ in step] != pattern:
            return None
        v = [arg for _, arg in step]
        if (v[1], v[2], v[5], v[6], v[12]) != ("_assert", "args", "size", 0, 2) \
                or v[10] not in ("==", "bool(==)") or not isinstance(v[11], str) \
                or not all(type(x) is int for x in (v[3], v[7], v[9])):
            return None
        checks.append((v[3], v[7], v[9], v[11]))
    if ops in ([("LOAD_CONST", None), ("RETURN_VALUE", None)], [("RETURN_CONST", None)]):
        return checks
    return None


def _export_layout(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` is laid out as ``torch.export``'s ``ExportedProgram.module()`` builds it: pytree input
    and output handling in its code, or a tracer class that cannot be rebuilt without arguments."""
    from torch.fx.graph import _PyTreeCodeGen

    return isinstance(gm.graph._codegen, _PyTreeCodeGen) or bool(_tracer_arguments(gm))


def _tracer_arguments(gm: torch.fx.GraphModule) -> list[str]:
    """The arguments that ``gm``'s tracer class needs (unpickling re-traces the code with it)."""
    tracer_cls = gm.__dict__.get("_tracer_cls")
    if tracer_cls is None:
        return []
    try:
        params = inspect.signature(tracer_cls.__init__).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a tracer class without a signature
        return []
    return [p.name for p in params
            if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD][1:]


def _generated_forward(module: torch.nn.Module) -> Any:
    """The function ``module`` runs instead of its class's ``forward`` when that is generated code (a
    local function set on the instance), unwrapped; ``None`` otherwise."""
    forward = module.__dict__.get("forward")
    if forward is None or "<locals>" not in getattr(forward, "__qualname__", ""):
        return None
    for _ in range(8):  # unwrap decorators: functools.wraps's __wrapped__, or a closure over ``func``
        code = getattr(forward, "__code__", None)
        if hasattr(forward, "__wrapped__"):
            forward = forward.__wrapped__
        elif code is not None and "func" in code.co_freevars and forward.__closure__:
            forward = forward.__closure__[code.co_freevars.index("func")].cell_contents
        else:
            break
    return forward


def _reduce_export_graph(gm: torch.fx.GraphModule) -> tuple[Any, ...]:
    """Pickle a ``torch.export``-captured widening: flat code, pytree layout and guards kept apart.

    torch's own ``GraphModule.__reduce__`` writes the module's code and re-traces it on load with the
    module's tracer class. For an exported graph that cannot work: the tracer class (``_ModuleStackTracer``)
    needs arguments, the code's pytree flattening of inputs and outputs would be traced away, and the
    input-guard submodule runs generated code. So the code is written *flat* (one placeholder per input
    leaf, the outputs as a tuple), re-traced on load with the plain ``torch.fx.Tracer`` (every submodule
    a leaf, as torch does), and the pytree layout (argument names, input and output specs) is put back
    before the code is regenerated: the loaded module runs the same ATen calls in the same order, so its
    outputs are bitwise equal. The generated input-guard function is replaced by an :class:`InputGuards`
    holding the same assertions as data; a guard function that does anything else is refused, since
    dropping it would let the graph run on inputs it was not specialised for.
    """
    from torch.fx.graph import _PyTreeCodeGen

    modules = dict(gm._modules)
    guards = []
    for name, module in gm.named_modules():
        forward = _generated_forward(module)
        if forward is None:
            continue
        checks = _size_guards(forward) if name and "." not in name else None
        if checks is None:
            guards.append(name or "(root)")
        else:
            modules[name] = InputGuards(checks)
    if guards:
        raise UnpicklableModelError(
            f"cannot pickle this widened {type(gm).__name__}: submodule(s) {', '.join(guards)} run code "
            "generated at capture time that is not only input-size assertions (torch.export guards), so "
            "graphscale cannot write it as data, and pickle cannot write code. Save its state_dict and "
            "record instead -- torch.save(wide.state_dict(), ...) and graphscale.save_record(wide, ...) -- "
            "and rebuild it with graphscale.widen (or fill your own larger model with graphscale.widen_into)")
    codegen = gm.graph._codegen
    pytree_info = None
    if isinstance(codegen, _PyTreeCodeGen):
        info = codegen.pytree_info
        pytree_info = (list(info.orig_args), _spec_state(info.in_spec), _spec_state(info.out_spec))
    flat = torch.fx.Graph()
    flat.output(flat.graph_copy(gm.graph, {}))  # a copy with the default (flat) code generation
    # torch's reduction of a module built on the flat graph gives its code and the imports it needs.
    _, (flat_body, import_block) = torch.fx.GraphModule.__reduce__(torch.fx.GraphModule(gm, flat))[:2]
    body = {k: v for k, v in gm.__dict__.items() if k not in ("_graph", "_tracer_cls", "_tracer_extras")}
    body["_modules"] = modules
    body["_code"] = flat_body["_code"]
    body["_graphmodule_cls_name"] = type(gm).__name__
    import torch.utils._pytree as pytree

    specs = {k: _spec_state(body.pop(k)) for k, v in list(body.items()) if isinstance(v, pytree.TreeSpec)}
    return (_rebuild_export_graph, (body, import_block, pytree_info, specs))


def _rebuild_export_graph(body: dict[str, Any], import_block: str, pytree_info: Any,
                          specs: dict[str, Any] | None = None) -> torch.nn.Module:
    """Unpickle what :func:`_reduce_export_graph` wrote: torch re-traces the flat code, then the pytree
    layout is restored and the record re-attached."""
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
    from torch.fx.graph_module import reduce_graph_module

    body.update({k: _spec_from_state(v) for k, v in (specs or {}).items()})  # e.g. _in_spec, _out_spec
    module = reduce_graph_module(body, import_block)
    if pytree_info is not None:
        orig_args, in_spec, out_spec = pytree_info
        module.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(orig_args, _spec_from_state(in_spec),
                                                           _spec_from_state(out_spec)))
        module.recompile()
    record = module.__dict__.get("graphscale")
    if isinstance(record, WideningRecord):
        attach_record(module, record)
    return module


def _spec_state(spec: Any) -> Any:
    """A pytree spec as pytree's own JSON (pickling a spec object warns on load in torch >= 2.10); the
    spec itself when its containers have no JSON form (a user's registered type)."""
    if spec is None:
        return None
    import torch.utils._pytree as pytree

    try:
        return ("json", pytree.treespec_dumps(spec))
    except (TypeError, NotImplementedError, ValueError):
        return ("spec", spec)


def _spec_from_state(state: Any) -> Any:
    if state is None:
        return None
    import torch.utils._pytree as pytree

    kind, value = state
    return pytree.treespec_loads(value) if kind == "json" else value


def _refuse_unloadable(gm: torch.fx.GraphModule) -> None:
    """Refuse, before anything is written, a GraphModule whose pickle would fail or would not load back:
    one whose submodules run generated code (a local function, which pickle cannot write)."""
    why = [f"submodule {name or '(root)'} runs generated code" for name, module in gm.named_modules()
           if _generated_forward(module) is not None]
    if why:
        raise UnpicklableModelError(
            f"cannot pickle this widened {type(gm).__name__} ({'; '.join(why)}): save its state_dict and "
            "record instead -- torch.save(wide.state_dict(), ...) and graphscale.save_record(wide, ...) -- "
            "and rebuild it with graphscale.widen (or fill your own larger model with graphscale.widen_into)")


def _rebuild_keeping_record(rebuild: Any, args: tuple) -> torch.nn.Module:
    """Unpickle a widened GraphModule with torch's own function, then re-attach its record."""
    module = rebuild(*args)
    record = module.__dict__.get("graphscale")
    if isinstance(record, WideningRecord):
        attach_record(module, record)
    return module


def _named_type(name: str) -> type | None:
    """The class a string annotation names, looked up among loaded modules only (nothing is imported or
    evaluated); ``None`` when it names anything else."""
    parts = name.split(".")
    obj: Any = None
    if len(parts) == 1:
        obj = getattr(builtins, name, None)
    else:
        for i in range(len(parts) - 1, 0, -1):
            mod = sys.modules.get(".".join(parts[:i]))
            if mod is not None:
                obj = mod
                for attr in parts[i:]:
                    obj = getattr(obj, attr, None)
                break
    return obj if isinstance(obj, type) else None


def record_metadata(record: WideningRecord) -> dict[str, str]:
    """Safetensors metadata that carries ``record`` inside the weights file (:func:`load_record` reads it).

    Example:
        >>> from safetensors.torch import save_file                       # doctest: +SKIP
        >>> save_file(wide.state_dict(), "wide.safetensors",
        ...           metadata=record_metadata(wide.graphscale))           # doctest: +SKIP
    """
    return {METADATA_KEY: record.to_json()}


def save_record(model_or_record: torch.nn.Module | WideningRecord, path: str | os.PathLike) -> Path:
    """Write the widening record as JSON beside a state dict; return the file written.

    ``path`` is a directory (the record goes to ``path/graphscale.json``) or a file name. The write is
    atomic (a temporary file in the same directory, then a rename), so a reader never sees half a record.
    A model passed here may be wrapped (``torch.compile``, DDP): its record is found through the wrappers.
    In a new process, ``graphscale.mup_optimizer(model, cls, lr=..., record=path)`` reads it back.

    Example:
        >>> torch.save(wide.state_dict(), "run/wide.pt")                   # doctest: +SKIP
        >>> graphscale.save_record(wide, "run")                           # doctest: +SKIP
        PosixPath('run/graphscale.json')
    """
    if isinstance(model_or_record, WideningRecord):
        record = model_or_record
    else:
        from graphscale.train._common import resolve_record  # lazy: train imports this module

        record = resolve_record(model_or_record)
    target = Path(path)
    if target.is_dir():
        target = target / RECORD_FILE
    text = record.to_json()
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # os.open with mode 0o666: the kernel applies the umask, as for any file the user creates.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_record(path: str | os.PathLike) -> WideningRecord:
    """Read a record saved by :func:`save_record` (a directory or a JSON file) or carried in a safetensors
    file's metadata (:func:`record_metadata`). Raises :class:`RecordFileError` naming the path otherwise.

    Example:
        >>> rec = graphscale.load_record("run")         # run/graphscale.json   # doctest: +SKIP
    """
    p = Path(path)
    if p.is_dir():
        p = p / RECORD_FILE
        if not p.is_file():
            raise RecordFileError(f"{p.parent} holds no {RECORD_FILE}: save the record there with "
                                  "graphscale.save_record(wide, directory)")
    if not p.is_file():
        raise RecordFileError(f"no widening record at {p} (expected a directory with {RECORD_FILE}, a JSON "
                              "file, or a .safetensors file whose metadata carries one)")
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise RecordFileError(f"{p} is not a readable safetensors file ({e})") from e
        if METADATA_KEY not in meta:
            raise RecordFileError(f"{p} carries no graphscale record in its metadata (key {METADATA_KEY!r}); "
                                  f"look for a {RECORD_FILE} beside it")
        return WideningRecord.from_json(meta[METADATA_KEY], str(p))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecordFileError(f"cannot read the widening record {p} ({e})") from e
    return WideningRecord.from_json(text, str(p))
