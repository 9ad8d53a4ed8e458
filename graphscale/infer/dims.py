"""Dimensions and the relations between them: the small algebra that width inference solves.

Every axis of every tensor in the graph is a *dimension* with a size. Rules relate dimensions by
equality (``union``), row-major products (``prod``: ``d = heads x head_dim``) and concatenations
(``concat``: GPT-2's fused ``3d = q | k | v``, a rotary half split). :meth:`DimSystem.resolve` closes the
relations (merging equal dimensions, refining two different factorisations of one dimension into a common
one) and returns each dimension as a tree over *atoms*: the dimensions that nothing splits further. Atoms
are what a multiplier applies to.

Example:
    >>> ds = DimSystem()
    >>> d, h, e = ds.new(64, "d"), ds.new(4, "heads"), ds.new(16, "head_dim")
    >>> ds.prod(d, [h, e], "view")
    >>> res = ds.resolve()
    >>> res.tree(d)
    ('prod', (('atom', 1), ('atom', 2)))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from graphscale.errors import WidthConflictError

#: passes of :meth:`DimSystem.resolve`; each is linear in the relations, and real models settle in a few
MAX_PASSES = 200


@dataclass
class DimSystem:
    """Union-find over dimensions plus product and concatenation relations (see module doc)."""

    size: list[int] = field(default_factory=list)
    origin: list[str] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    prods: list[tuple[int, list[int], str]] = field(default_factory=list)
    sums: list[tuple[int, list[int], str]] = field(default_factory=list)
    fixed: dict[int, str] = field(default_factory=dict)
    _splits: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict, repr=False)
    _stretches: dict[tuple[int, int, int], int] = field(default_factory=dict, repr=False)

    def new(self, size: int, origin: str) -> int:
        """A fresh dimension of ``size``; ``origin`` says where it came from (used in messages)."""
        self.size.append(int(size))
        self.origin.append(origin)
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, d: int) -> int:
        root = d
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[d] != root:  # path compression keeps resolution linear in graph size
            self.parent[d], d = root, self.parent[d]
        return root

    def union(self, a: int, b: int, why: str) -> None:
        """Declare two dimensions equal; their sizes must agree."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise WidthConflictError(
                f"{why}: dimension {self.origin[ra]} (size {self.size[ra]}) would have to equal "
                f"{self.origin[rb]} (size {self.size[rb]}). A rule relates axes of different sizes; "
                "check the rule for this op (graphscale.rules) or the op's arguments."
            )
        lo, hi = sorted((ra, rb))  # the older dimension stays root, so names follow the first use
        self.parent[hi] = lo

    def prod(self, target: int, factors: list[int], why: str) -> None:
        """``target`` is the row-major flattening of ``factors`` (outermost first)."""
        total = 1
        for f in factors:
            total *= self.size[f]
        if total != self.size[target]:
            raise WidthConflictError(f"{why}: {self.origin[target]} has size {self.size[target]}, "
                                     f"not the product {total} of its factors")
        self.prods.append((target, list(factors), why))

    def concat(self, target: int, parts: list[int], why: str) -> None:
        """``target`` is the concatenation of ``parts`` in order."""
        if sum(self.size[p] for p in parts) != self.size[target]:
            raise WidthConflictError(f"{why}: {self.origin[target]} has size {self.size[target]}, "
                                     "not the sum of its parts")
        self.sums.append((target, list(parts), why))

    def fix(self, d: int, reason: str) -> None:
        """Mark a dimension fixed by nature (batch, kernel window, lookup index, ...)."""
        self.fixed.setdefault(d, reason)

    def resolve(self) -> Resolution:
        """Close all relations and return the atom tree of every dimension."""
        for _ in range(MAX_PASSES):
            if not self._refine_once():
                break
        else:  # bounded work: a relation that keeps changing is named, not looped on
            where = sorted({self.origin[self.find(r)] for r in self._changed})[:4]
            why = sorted({w for t, _, w in self.prods + self.sums
                          if self.find(t) in {self.find(r) for r in self._changed}})[:2]
            raise WidthConflictError(
                f"width inference did not settle in {MAX_PASSES} passes over the shape relations: the "
                f"decomposition of {', '.join(where)} keeps changing (from {'; '.join(why)}). graphscale "
                "cannot relate this layout; mark the classes involved fixed, or report it with the model")
        return Resolution(self)

    # -- closing the relations -------------------------------------------------------------------------

    def _defs(self) -> tuple[dict[int, list[list[int]]], dict[int, list[list[int]]]]:
        prods: dict[int, list[list[int]]] = {}
        for t, fs, _ in self.prods:
            fs = [self.find(f) for f in fs if self.size[f] != 1]
            if self.size[t] == 1:
                continue
            key = self.find(t)
            if fs == [key]:  # e.g. channels = groups x 1 once the size-1 factor is dropped: no relation
                continue
            if fs not in prods.setdefault(key, []):
                prods[key].append(fs)
        sums: dict[int, list[list[int]]] = {}
        for t, ps, _ in self.sums:
            ps = [self.find(p) for p in ps if self.size[p] != 0]
            key = self.find(t)
            if ps == [key]:
                continue
            if ps not in sums.setdefault(key, []):
                sums[key].append(ps)
        return prods, sums

    def _refine_once(self) -> bool:
        """One pass over every decomposed dimension; True if anything changed (then pass again).

        Each pass handles all dimensions, so the number of passes stays small and resolution is close to
        linear in the graph size (a pass per change would make it quadratic).
        """
        prods, sums = self._defs()
        self._changed = []
        for root, defs in prods.items():
            single = [fs[0] for fs in defs if len(fs) == 1 and self.find(fs[0]) != self.find(root)]
            if single:
                self.union(root, single[0], "a product with one factor")
                self._changed.append(root)
            elif len(defs) > 1 and self._align_all(defs, prods):
                self._changed.append(root)
        for root, defs in sums.items():
            single = [ps[0] for ps in defs if len(ps) == 1 and self.find(ps[0]) != self.find(root)]
            if single:
                self.union(root, single[0], "a concatenation with one part")
                self._changed.append(root)
            elif len(defs) > 1 and self._cut_all(root, defs, sums):
                self._changed.append(root)
            if root in prods and self._reconcile(root, prods[root][0], defs[0], sums, prods):
                self._changed.append(root)
        return bool(self._changed)

    def _align_all(self, defs: list[list[int]], prods: dict[int, list[list[int]]]) -> bool:
        """Align every factorization of one dimension with its first: all of them, not a pair (a view left
        out would keep axes that widening does not tie to the others')."""
        first = self._flatten(defs[0], prods, product=True)
        changed = False
        for other in defs[1:]:
            changed |= self._align(first, self._flatten(other, prods, product=True))
        return changed

    def _cut_all(self, root: int, defs: list[list[int]], sums: dict[int, list[list[int]]]) -> bool:
        """Refine every concatenation of one dimension to the pieces between all of their cuts at once
        (a loop that slices position ``i`` of 64 cuts one axis 64 ways; aligning the ways pairwise took
        a pass per position). A piece that is one stretch between cuts is that stretch; a longer piece
        is the concatenation of the stretches it spans."""
        flats = [self._flatten(ps, sums, product=False) for ps in defs]
        spans: list[list[tuple[int, int, int]]] = []  # per decomposition: (start, end, piece)
        cuts: set[int] = set()
        for flat in flats:
            at, span = 0, []
            for p in flat:
                span.append((at, at + self.size[p], p))
                cuts.add(at)
                at += self.size[p]
            spans.append(span)
        edges = sorted(cuts | {self.size[root]})
        at_edge = {e: i for i, e in enumerate(edges)}
        stretch: dict[tuple[int, int], int] = {}
        changed = False
        for span in spans:  # a piece that already is one stretch names it (no fresh dimension)
            for lo, hi, p in span:
                if at_edge[hi] != at_edge[lo] + 1:
                    continue
                if (lo, hi) not in stretch:
                    stretch[(lo, hi)] = p
                elif self.find(stretch[(lo, hi)]) != self.find(p):
                    self.union(stretch[(lo, hi)], p, "two decompositions of one dimension")
                    changed = True
        for lo, hi in zip(edges, edges[1:]):
            if (lo, hi) not in stretch:
                key = (self.find(root), lo, hi)
                if key not in self._stretches:
                    self._stretches[key] = self.new(hi - lo, f"{self.origin[root]}[{lo}:{hi}]")
                stretch[(lo, hi)] = self._stretches[key]
        for span in spans:
            for lo, hi, p in span:
                bounds = edges[at_edge[lo]:at_edge[hi] + 1]
                inside = [stretch[ab] for ab in zip(bounds, bounds[1:])]
                if len(inside) > 1 and [self.find(q) for q in inside] not in sums.get(self.find(p), []):
                    self.concat(p, inside, "refining a concatenation")
                    changed = True
        return changed

    def _flatten(self, pieces: list[int], defs: dict[int, list[list[int]]], product: bool,
                 expanding: frozenset[int] = frozenset()) -> list[int]:
        """Expand pieces through their first decomposition of the same kind, down to undivided pieces.

        A piece already being expanded stays whole: decompositions can form a cycle within one pass (A's
        first factorization reaches B, B's reaches A through a size-1 factor not yet merged), and a
        coarser piece is still a true factorization, which the next pass refines."""
        out: list[int] = []
        for p in pieces:
            r = self.find(p)
            if r in defs and defs[r] and r not in defs[r][0] and r not in expanding:
                out.extend(self._flatten(defs[r][0], defs, product, expanding | {r}))
            elif not product or self.size[r] != 1:
                out.append(r)
        return out

    def _align(self, a: list[int], b: list[int]) -> bool:
        """Make two factorizations of one dimension agree, splitting the coarser factors."""
        a, b = list(a), list(b)
        changed = False
        while a and b:
            x, y = self.find(a[0]), self.find(b[0])
            sx, sy = self.size[x], self.size[y]
            if sx == sy:
                if x != y:
                    self.union(x, y, "two decompositions of one dimension")
                    changed = True
                a.pop(0)
                b.pop(0)
                continue
            small, big, rest_of_big = (x, y, b) if sx < sy else (y, x, a)
            if self.size[big] % self.size[small]:
                # e.g. a spatial axis cut into windows (8 x 7) and into a grid (7 x 8): no common
                # refinement relates the factors, so none of them may grow (fixing is exact)
                why = (f"a factor of {self.origin[big]} (size {self.size[big]}), split two incompatible "
                       f"ways ({self.size[x]} against {self.size[y]} first)")
                for d in [x, y, *a, *b]:
                    self.fix(d, why)
                return changed
            # one split per (dimension, leading size): the leading piece of any such split is the same
            # piece, so aligning several decompositions against one (and again on every pass) reuses it
            # instead of making fresh pieces that would in turn need aligning
            key = (self.find(big), self.size[small])
            if key in self._splits:
                lead, rest = self._splits[key]
                if self.find(lead) != self.find(small):
                    self.union(lead, small, "two decompositions of one dimension")
                    changed = True
            else:
                rest = self.new(self.size[big] // self.size[small], f"{self.origin[big]}/rest")
                self.prod(big, [small, rest], "refining a factorization")
                self._splits[key] = (small, rest)
                changed = True
            rest_of_big[0] = rest
            (a if rest_of_big is b else b).pop(0)
        return changed

    def _reconcile(self, root: int, factors: list[int], parts: list[int],
                   sums: dict[int, list[list[int]]], prods: dict[int, list[list[int]]]) -> bool:
        """A dimension both ``outer x inner`` and ``p_1 | ... | p_n``.

        With ``n`` outer positions and equal parts, each part is one: ``p_i = inner`` (the outer factor,
        a count of parts, is fixed). Where every part is a whole number of ``inner`` blocks, each part is
        a slice of the outer factor: ``outer = o_1 | ... | o_n`` and ``p_i = o_i x inner`` (a channel
        shuffle flattens ``(c, g)`` and then halves it; heads split into groups of different sizes).
        Otherwise every dimension involved is fixed: widening keeps them, which is exact.
        """
        if len(factors) < 2:  # a product with one factor is an equality, which the product pass applies
            return False
        outer, inner = factors[0], factors[1:]
        n, sizes = len(parts), [self.size[p] for p in parts]
        block = self.size[root] // self.size[outer]
        changed = False
        if self.size[outer] == n and len(set(sizes)) == 1:
            self.fix(outer, "the count of concatenated parts an axis is reshaped into")
            rest = parts[0]  # every part is inner; relate them once (no fresh dimension per pass)
            for p in parts[1:]:
                if self.find(p) != self.find(rest):
                    self.union(p, rest, "a reshaped concatenation")
                    changed = True
            want = [self.find(f) for f in inner if self.size[f] != 1]
            if len(want) == 1 and want[0] != self.find(rest):
                self.union(rest, want[0], "a reshaped concatenation")
                changed = True
            elif len(want) > 1 and want not in prods.get(self.find(rest), []):
                self.prod(rest, inner, "a reshaped concatenation")
                changed = True
            return changed
        if any(s % block for s in sizes):
            # a part ends inside a block of the inner factors (channel shuffles nested deeper than the
            # outer factor halves): no replication of the atoms keeps both layouts, so none may grow
            why = (f"{self.origin[root]} is both reshaped into {[self.size[f] for f in factors]} and "
                   f"concatenated from parts {sizes}, which no widening keeps consistent")
            for d in [root, *factors, *parts]:
                self.fix(d, why)
            return False
        counts = [s // block for s in sizes]
        pieces = next((ps for ps in sums.get(self.find(outer), [])
                       if [self.size[q] for q in ps] == counts), None)
        if pieces is None:
            pieces = [self.new(c, f"{self.origin[outer]}/{i}") for i, c in enumerate(counts)]
            self.concat(outer, pieces, "a reshaped concatenation")
            changed = True
        for p, piece in zip(parts, pieces):
            want = [self.find(f) for f in [piece, *inner] if self.size[f] != 1]
            if want not in prods.get(self.find(p), []) and want != [self.find(p)]:
                self.prod(p, [piece, *inner], "a slice of a reshaped concatenation")
                changed = True
        return changed


class Resolution:
    """The closed system: each dimension's atom tree (``("atom", r)``, ``("prod", ..)``, ``("sum", ..)``)."""

    def __init__(self, ds: DimSystem) -> None:
        self.ds = ds
        self.prods, self.sums = ds._defs()
        self._trees: dict[int, tuple] = {}

    def root(self, d: int) -> int:
        return self.ds.find(d)

    def tree(self, d: int) -> tuple:
        r = self.ds.find(d)
        if r not in self._trees:
            self._trees[r] = ("pending",)  # marks recursion so a cyclic definition is caught, not looped
            if r in self.sums:
                t = ("sum", tuple(self.tree(p) for p in self.sums[r][0]))
            elif r in self.prods:
                t = ("prod", tuple(self.tree(f) for f in self.prods[r][0]))
            else:
                t = ("atom", r)
            if any(c == ("pending",) for c in _children(t)):
                raise WidthConflictError(f"{self.ds.origin[r]} is defined in terms of itself")
            self._trees[r] = t
        return self._trees[r]

    def atoms(self, d: int) -> list[int]:
        """The atoms of a dimension, outermost first."""
        return leaves(self.tree(d))

    def factors(self, d: int) -> list[tuple]:
        """The factors of a dimension's product, outermost first, nested products flattened (a dimension
        that is no product is its own one factor). A factor that is a concatenation stays one factor:
        its parts sit side by side in it (a fused q|k|v reshaped to heads x head_dim, a partial
        rotary's rotary | pass)."""
        def flat(tree: tuple) -> list[tuple]:
            return [f for c in tree[1] for f in flat(c)] if tree[0] == "prod" else [tree]

        return flat(self.tree(d))

    def size(self, d: int) -> int:
        return self.ds.size[self.ds.find(d)]


def _children(t: tuple) -> tuple:
    return t[1] if t[0] in ("sum", "prod") else ()


def leaves(t: tuple) -> list[int]:
    """The atoms of a resolution tree (:meth:`Resolution.tree`), left to right.

    Example:
        >>> leaves(("prod", (("atom", 3), ("sum", (("atom", 1), ("atom", 2))))))
        [3, 1, 2]
    """
    if t[0] == "atom":
        return [t[1]]
    out: list[int] = []
    for c in t[1]:
        out.extend(leaves(c))
    return out
