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
    notes: list[str] = field(default_factory=list)  # policy decisions the plan reports
    # under heads="fixed": the heads x head_dim axes where head_dim grew, and those where it could not
    # (a concatenation with a fixed part) and the heads grew instead
    head_dim_grown: list[str] = field(default_factory=list)
    heads_grown: list[str] = field(default_factory=list)

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
    classes = _classify(walk, res, heads, outputs, {})
    if heads != "fixed":
        return classes
    # an op that is not replication-invariant over a head_dim left growing (XCiT's softmax over
    # channels) would refuse the plan: classify again with those head_dims blocked, so that the heads
    # grow instead. Only then: a plan that holds as it is stays as it is.
    refused: dict[int, str] = {}
    for r in walk.requests.refusals:
        for a in res.atoms(r.dim):
            c = classes.by_atom.get(a)
            if c is not None and c.role == "width":
                refused.setdefault(a, f"{r.node}: {r.why}")
    return _classify(walk, res, heads, outputs, refused) if refused else classes


def _classify(walk: Walk, res: Resolution, heads: HeadsPolicy, outputs: Literal["fixed", "width"],
              refused: dict[int, str]) -> Classes:
    """:func:`classify` with the atoms in ``refused`` (atom -> why) kept from growing as a head_dim."""
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
    # heads policy: a product keeps one growing factor (a concatenation such as a partial-rotary head,
    # rotary | pass, is one factor: all its width atoms grow together)
    notes: list[str] = []
    grew_heads: dict[int, str] = {}
    heads_grown: list[str] = []
    head_dim_grown: list[str] = []
    # heads that must grow: where their head_dim cannot grow as one; every product over such a head
    # count then grows it (v's plain head_dim, o's input), so q, k, v and o stay consistent
    must_grow: set[int] = set()
    def blocked(tree: tuple) -> bool:
        """Whether head_dim ``tree`` cannot grow: not one class, or an op over it is not
        replication-invariant (XCiT's softmax over channels); under heads='fixed' the heads grow."""
        return not _can_grow_whole(tree, width) or any(a in refused for a in leaves(tree))

    if heads == "fixed":
        for root in res.prods:
            children = res.factors(root)
            factors = [[a for a in leaves(f) if a in width] for f in children]
            growing = [i for i, f in enumerate(factors) if f]
            if len(growing) >= 2 and blocked(children[growing[-1]]):
                must_grow.update(factors[growing[0]])
        # a parameter's heads x head_dim axis whose head_dim is fixed by nature (PhiMoE's rotary, whose
        # frequencies the forward computes from head_dim with arange) could not grow at all with the heads
        # fixed by the policy: its heads must grow instead, and so in every product over them. The axis
        # is a projection's (a matrix's: Nystromformer's value, whose head_dim a depthwise convolution
        # fixes) or its fixed factor is one attention sums over (q . k): a vector over heads = kv heads x
        # copies (GPT-OSS's sinks) has a fixed factor too, the copies, which must not make heads grow
        summed = {a for r in walk.requests.scales for a in res.atoms(r.dim)}
        summed |= {a for m in walk.requests.multipliers for d in m.dims for a in res.atoms(d)}
        for name in params:
            for d in walk.tensor_dims[name]:
                children = res.factors(d) if res.tree(d)[0] == "prod" else []
                if len(children) < 2:
                    continue
                inner = leaves(children[-1])
                # one growing factor before it (the heads): not [heads, head_dim / 2, 2], a complex
                # rotary's pairs, whose fixed last factor is the pair, not head_dim
                outer = [[a for a in leaves(f) if a in width] for f in children[:-1]]
                outer = [f for f in outer if f]
                if len(outer) == 1 and all(a in fixed and ds.size[a] > 1 for a in inner) \
                        and (summed & set(inner) or len(walk.tensor_dims[name]) >= 2):
                    must_grow.update(outer[0])
    # parts of one concatenated parameter axis must grow alike (widen copies them with one multiplier),
    # unless the concatenation is only ever a parameter's whole axis: its parts are then contiguous blocks
    # of rows, each trained with its own factors (docs/math.md §8)
    trees = list(dict.fromkeys(res.tree(d) for name in params for d in walk.tensor_dims[name]))
    concats = [list(node[1]) for tree in trees for node in _sums(tree)
               if not _only_whole_axes(node, trees, res)]
    changed = True
    while changed:
        changed = False
        for root in res.prods:
            trees = res.factors(root)
            factors = [[a for a in leaves(f) if a in width] for f in trees]
            growing = [i for i, f in enumerate(factors) if f]
            if len(growing) < 2:
                continue  # one factor, a concatenation of parts: they grow together
            keep = growing[-1] if heads == "fixed" else growing[0]
            axis = _axis_name(root, walk, res, params) if heads == "fixed" else ""
            if heads == "fixed" and (blocked(trees[keep]) or must_grow & set(factors[growing[0]])):
                # head_dim is a concatenation of parts (a partial rotary's rotary | pass): a fixed part
                # (a size-1 frequency axis) cannot grow at all, and growing the parts together would
                # repeat the rotary frequencies, which a model built at the wider head_dim computes
                # otherwise; the heads grow instead and head_dim keeps its layout
                keep = growing[0]
                heads_grown.append(axis)
                why = ", ".join(sorted({fixed.get(a, "carried by no parameter")
                                        for a in leaves(trees[growing[-1]]) if a not in width})
                                ) or "parts of several classes, e.g. a partial rotary's rotary | pass"
                for a in factors[keep]:
                    grew_heads[a] = "heads grow: head_dim cannot grow as one"
                ops = sorted({refused[a] for a in leaves(trees[growing[-1]]) if a in refused})
                if ops:
                    notes.append(f"heads='fixed': {axis} is heads x head_dim, and head_dim cannot grow "
                                 f"({'; '.join(ops)}), so its heads grow instead (head_dim kept)")
                elif _can_grow_whole(trees[growing[-1]], width):
                    notes.append(f"heads='fixed': {axis} shares its heads with an attention whose head_dim "
                                 "cannot grow as one, so its heads grow too (head_dim kept)")
                else:
                    notes.append(f"heads='fixed': {axis} is heads x head_dim, and head_dim concatenates "
                                 f"parts that cannot grow as one ({why}), so its heads grow instead "
                                 "(head_dim kept)")
            elif heads == "fixed":
                head_dim_grown.append(axis)
            for i in growing:
                if i == keep:
                    continue
                for a in factors[i]:
                    width.discard(a)
                    fixed[a] = ("a head count (heads='fixed')" if heads == "fixed" and i < keep
                                else "a per-head size (heads='grow')" if heads == "grow"
                                else "a per-head size (heads grow: head_dim cannot grow as one)")
                    changed = True
        # after the heads policy: a part left with more growing factors than another cannot grow alike
        for parts in concats:
            counts = {_growing_factors(part, width) for part in parts}
            if len(counts) > 1:  # some parts stay fixed (a layout no widening keeps, a head count)
                for a in {a for part in parts for a in leaves(part)} & width:
                    width.discard(a)
                    fixed[a] = "a part of a concatenated axis whose other parts cannot grow alike"
                changed = True
    by_atom: dict[int, WidthClass] = {}
    out_width, out_fixed = [], []
    for a in sorted(carried, key=lambda a: _first_index(a, carried[a], params)):
        name, size, detail = _name(a, walk, res, params, width)
        role = "width" if a in width else "fixed"
        cls = WidthClass(name, role, size, carried[a], fixed.get(a, grew_heads.get(a, detail)), a, ds.size[a])
        by_atom[a] = cls
        (out_width if role == "width" else out_fixed).append(cls)
    _dedupe_names(out_width + out_fixed)
    notes += _joint_parts_notes(walk, res, params, width, by_atom)
    # the policy loop may revisit a product: each note and axis once, in first-seen order
    return Classes(by_atom, out_width, out_fixed, _unique(notes), _unique(head_dim_grown),
                   _unique(heads_grown))


def _unique(xs: list[str]) -> list[str]:
    return list(dict.fromkeys(xs))


def _joint_parts_notes(walk: Walk, res: Resolution, params: list[str], width: set[int],
                       by_atom: dict[int, WidthClass]) -> list[str]:
    """Say where a product's growing factor is a concatenation of several classes (a partial-rotary
    head_dim, rotary | pass): they grow together, and the buffers over them (the rotary frequencies) are
    repeated with them."""
    notes, seen = [], set()
    for root in res.prods:
        children = res.tree(root)[1]
        factors = [[a for a in leaves(f) if a in width] for f in children]
        growing = [f for f in factors if f]
        if len(growing) != 1 or len(set(growing[0])) < 2 or frozenset(growing[0]) in seen:
            continue
        atoms = list(dict.fromkeys(growing[0]))
        seen.add(frozenset(atoms))
        buffers = [n for n, is_p in walk.is_param.items() if not is_p
                   and any(a in atoms for d in walk.tensor_dims[n] for a in res.atoms(d))]
        names = ", ".join(f"{by_atom[a].name} ({res.ds.size[a]})" for a in atoms)
        notes.append(f"{_axis_name(root, walk, res, params)}: one factor of this product concatenates "
                     f"the classes {names}; they grow together (give them one multiplier)"
                     + (f", and the buffers over them ({', '.join(buffers)}) are repeated with them"
                        if buffers else ""))
    return notes


def _only_whole_axes(node: tuple, trees: list[tuple], res: Resolution) -> bool:
    """Whether the concatenation ``node`` is the whole tree of every parameter axis it is in and is in no
    product (per head: its blocks would interleave)."""
    if any(tree != node and _contains(tree, node) for tree in trees):
        return False
    return not any(_contains(res.tree(root), node) for root in res.prods)


def _can_grow_whole(tree: tuple, width: set[int]) -> bool:
    """Whether a product's factor is one width class (possibly in several parts, as a rotary half split),
    so that head_dim grows as one: a factor with a fixed part would concatenate parts growing by
    different multipliers, and one of several classes is a partial rotary's rotary | pass."""
    atoms = set(leaves(tree))
    return len(atoms) == 1 and atoms <= width


def _growing_factors(tree: tuple, width: set[int]) -> int:
    """How many growing factors multiply a concatenation part's size: a product counts each factor, a
    nested concatenation (a rotary half split, its two halves one class) counts once, not per half.

    >>> _growing_factors(("prod", (("atom", 1), ("sum", (("atom", 2), ("atom", 2))))), {2})
    1
    """
    if tree[0] == "atom":
        return int(tree[1] in width)
    counts = [_growing_factors(c, width) for c in tree[1]]
    return sum(counts) if tree[0] == "prod" else max(counts)


def _axis_name(d: int, walk: Walk, res: Resolution, params: list[str]) -> str:
    """The first parameter axis whose tree contains dimension ``d``'s (for messages), else its origin."""
    r = res.root(d)
    target = res.tree(r)
    for name in params:
        for i, e in enumerate(walk.tensor_dims[name]):
            if _contains(res.tree(e), target):
                return f"{name}[{i}]"
    return res.ds.origin[r]


def _contains(tree: tuple, sub: tuple) -> bool:
    return tree == sub or (tree[0] in ("sum", "prod") and any(_contains(c, sub) for c in tree[1]))


def _sums(t: tuple) -> list[tuple]:
    """The concatenation nodes of a resolution tree, outermost first."""
    if t[0] == "atom":
        return []
    own = [t] if t[0] == "sum" else []
    return own + [s for c in t[1] for s in _sums(c)]


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
