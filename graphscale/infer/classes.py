"""From resolved dimensions to width classes: which atoms grow, which stay fixed, and their names.

An atom is fixed when it touches a model input (or output, by default), or when a rule fixed it by
nature (kernel window, lookup index, spatial, expand-created axis); an atom no parameter carries is fixed
too (nothing to widen). The rest are width. Where one axis is a product with several width atoms
(``heads x head_dim``) the ``heads`` policy keeps one: ``"fixed"`` grows the innermost (head_dim),
``"grow"`` the outermost (the head count; grouped-query attention's kv heads follow).

Each class is named after the first parameter axis that carries it whole (``"blocks.0.mlp.fc.weight[0]"``),
or, for a head_dim that is never a whole axis, after the axis of which it is the growing factor.

Example:
    >>> classes = classify(walk, res, heads="fixed", outputs="fixed")  # doctest: +SKIP
    >>> [c.name for c in classes.width]  # doctest: +SKIP
    ['0.weight[0]', '2.weight[0]', '4.weight[0]']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from graphscale.errors import GraphscaleError
from graphscale.infer.dims import Resolution, leaves
from graphscale.infer.engine import Walk

HeadsPolicy = Literal["fixed", "grow"]


@dataclass
class WidthClass:
    """A dimension class: a set of axes that grow together (``role="width"``) or never (``"fixed"``)."""

    name: str
    role: Literal["width", "fixed"]
    size: int  # size of the named axis (a product such as heads x head_dim counts whole)
    members: list[str] = field(default_factory=list)  # parameter axes that carry it, "name[axis]"
    reason: str = ""  # why fixed, or how it sits in a product (e.g. "4 fixed heads x 16 per head")
    atom: int = -1
    atom_size: int = 0

    def to_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "size": self.size, "members": self.members,
                "reason": self.reason}


@dataclass
class Classes:
    """The classification: every atom's class, and the width and fixed classes in parameter order."""

    by_atom: dict[int, WidthClass]
    width: list[WidthClass]
    fixed: list[WidthClass]

    def lookup(self, key: str) -> WidthClass:
        for c in self.width + self.fixed:
            if c.name == key or key in c.members:
                return c
        raise KeyError(key)


def classify(walk: Walk, res: Resolution, heads: HeadsPolicy = "fixed",
             outputs: Literal["fixed", "width"] = "fixed") -> Classes:
    """Decide every atom's role (see module doc)."""
    if heads not in ("fixed", "grow"):
        raise GraphscaleError(f"heads must be 'fixed' or 'grow', got {heads!r}")
    if outputs not in ("fixed", "width"):
        raise GraphscaleError(f"outputs must be 'fixed' or 'width', got {outputs!r}")
    ds = walk.ds
    fixed: dict[int, str] = {}
    for d, reason in ds.fixed.items():
        for a in res.atoms(d):
            fixed.setdefault(a, reason)
    if outputs == "fixed":
        for d in walk.output_dims:
            for a in res.atoms(d):
                fixed.setdefault(a, "an axis of a model output")
    params = [n for n, is_p in walk.is_param.items() if is_p]
    carried: dict[int, list[str]] = {}
    for name in params:
        for i, d in enumerate(walk.tensor_dims[name]):
            for a in res.atoms(d):
                carried.setdefault(a, []).append(f"{name}[{i}]")
    for a in list(carried):
        if ds.size[a] == 1:
            fixed.setdefault(a, "size 1")
    width = {a for a in carried if a not in fixed}
    # parts of one concatenated parameter axis must grow alike (widen copies them with one multiplier)
    concats = [[leaves(part) for part in node[1]] for name in params for d in walk.tensor_dims[name]
               for node in _sums(res.tree(d))]
    # heads policy: a product keeps one growing factor
    changed = True
    while changed:
        changed = False
        for parts in concats:
            counts = {sum(1 for a in part if a in width) for part in parts}
            if len(counts) > 1:  # some parts stay fixed (a layout no widening keeps, a head count)
                for a in {a for part in parts for a in part} & width:
                    width.discard(a)
                    fixed[a] = "a part of a concatenated axis whose other parts cannot grow alike"
                changed = True
        for root in res.prods:
            groups = [g for g in (_width_factors(res, root, width)) if g]
            if len(groups) < 2:
                continue
            keep = groups[-1] if heads == "fixed" else groups[0]
            for a in {a for g in groups for a in g} - set(keep):
                width.discard(a)
                fixed[a] = ("a head count (heads='fixed')" if heads == "fixed"
                            else "a per-head size (heads='grow')")
                changed = True
    by_atom: dict[int, WidthClass] = {}
    out_width, out_fixed = [], []
    for a in sorted(carried, key=lambda a: _first_index(a, carried[a], params)):
        name, size, detail = _name(a, walk, res, params, width)
        role = "width" if a in width else "fixed"
        cls = WidthClass(name, role, size, carried[a], fixed.get(a, detail), a, ds.size[a])
        by_atom[a] = cls
        (out_width if role == "width" else out_fixed).append(cls)
    _dedupe_names(out_width + out_fixed)
    return Classes(by_atom, out_width, out_fixed)


def _sums(t: tuple) -> list[tuple]:
    """The concatenation nodes of a resolution tree, outermost first."""
    if t[0] == "atom":
        return []
    own = [t] if t[0] == "sum" else []
    return own + [s for c in t[1] for s in _sums(c)]


def _width_factors(res: Resolution, root: int, width: set[int]) -> list[list[int]]:
    """The width atoms of each factor of ``root``'s product, nested products flattened. A factor that is a
    concatenation is one group: its parts sit side by side in one factor (a fused q|k|v reshaped to
    heads x head_dim, a shuffled channel axis), so the policy keeps or fixes them together."""
    def groups(t: tuple) -> list[list[int]]:
        if t[0] == "atom":
            return [[t[1]]]
        if t[0] == "prod":
            return [g for c in t[1] for g in groups(c)]
        return [leaves(t)]

    out: list[list[int]] = []
    for f in res.prods[root][0]:
        out.extend(groups(res.tree(f)))
    return [[a for a in g if a in width] for g in out]


def _first_index(a: int, members: list[str], params: list[str]) -> tuple[int, str]:
    first = members[0]
    return params.index(first.rsplit("[", 1)[0]), first


def _name(a: int, walk: Walk, res: Resolution, params: list[str], width: set[int]) -> tuple[str, int, str]:
    """Name an atom after the first parameter axis it is whole in, else the axis it grows."""
    for name in params:
        for i, d in enumerate(walk.tensor_dims[name]):
            if res.tree(d) == ("atom", a):
                return f"{name}[{i}]", res.size(d), ""
    for name in params:
        for i, d in enumerate(walk.tensor_dims[name]):
            tree = res.tree(d)
            tree_atoms = leaves(tree)
            if tree[0] == "prod" and a in tree_atoms and all(x == a or x not in width for x in tree_atoms):
                others = [res.ds.size[x] for x in tree_atoms if x != a]
                return (f"{name}[{i}]", res.size(d),
                        f"{' x '.join(map(str, others))} fixed x {res.ds.size[a]} growing")
            if tree[0] == "sum" and set(tree_atoms) == {a}:  # e.g. a rotary half split: parts of one class
                return f"{name}[{i}]", res.size(d), f"{len(tree_atoms)} parts of {res.ds.size[a]}"
    for name in params:
        for i, d in enumerate(walk.tensor_dims[name]):
            if a in leaves(res.tree(d)):
                return f"{name}[{i}]:{res.ds.size[a]}", res.ds.size[a], "a factor or part of this axis"
    return res.ds.origin[a], res.ds.size[a], ""


def _dedupe_names(classes: list[WidthClass]) -> None:
    seen: dict[str, int] = {}
    for c in classes:
        if c.name in seen:
            seen[c.name] += 1
            c.name = f"{c.name}#{seen[c.name]}"
        else:
            seen[c.name] = 0
