"""``graphscale.analyze``: capture -> infer -> derive, returned as a :class:`Plan` the user can read.

Example:
    >>> import graphscale, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> plan = graphscale.analyze(model, (torch.randn(3, 4),))
    >>> [c.name for c in plan.width_classes]
    ['0.weight[0]']
    >>> str(plan.rules["2.weight"].adam_lr)
    '1/k1'
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import sympy
import torch

from graphscale.capture import Captured, Tracer, capture, live_attributes, parameters_unchanged
from graphscale.derive import ScalingRule, derive_rules
from graphscale.edits import Edit
from graphscale.errors import MultiplierError, UnsupportedOpError, WidthConflictError
from graphscale.infer.classes import Classes, HeadsPolicy, WidthClass, classify
from graphscale.infer.dims import Resolution, leaves
from graphscale.infer.engine import Walk, walk_graph
from graphscale.infer.rulebook import Rule, RuleBook
from graphscale.infer.values import Info, Requests
from graphscale.laws import PLAN_LAWS
from graphscale.record import AxisReplication


@dataclass
class Plan:
    """What graphscale inferred about a model: its width classes and every tensor's scaling rule.

    ``classes`` lists width classes first, then the fixed classes that parameters carry; ``rules`` maps
    each parameter and buffer name to its :class:`~graphscale.derive.ScalingRule`, whose expressions use
    one symbol per width class (``plan.symbols``).
    """

    classes: list[WidthClass]
    rules: dict[str, ScalingRule]
    symbols: dict[str, sympy.Symbol]
    frontend: str
    captured: Captured
    walk: Walk
    resolution: Resolution
    classification: Classes
    heads: str
    notes: list[str]
    _numeric: dict = field(default_factory=dict, repr=False)

    @property
    def width_classes(self) -> list[WidthClass]:
        return [c for c in self.classes if c.role == "width"]

    # What the later stages read of the walk, by name (they do not reach into ``walk``).

    @property
    def aliases(self) -> dict[str, str]:
        """Tied tensor names -> the canonical (first) name that holds the tensor."""
        return self.walk.aliases

    def canonical(self, name: str) -> str:
        """The name under which a (possibly tied) tensor is stored: ``plan.canonical("lm_head.weight")``."""
        return self.walk.aliases.get(name, name)

    @property
    def tensor_dims(self) -> dict[str, tuple[int, ...]]:
        """Each parameter's and buffer's dimensions (ids resolved by :attr:`resolution`)."""
        return self.walk.tensor_dims

    @property
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each parameter's and buffer's narrow shape."""
        return self.walk.tensor_shapes

    @property
    def node_info(self) -> dict[str, Info]:
        """What inference knows about each graph node's value, by node name."""
        return self.walk.info

    @property
    def requests(self) -> Requests:
        """Everything the rules asked for: graph edits, refusals, parameter uses, warnings."""
        return self.walk.requests

    @property
    def edits(self) -> list[Edit]:
        """The graph edits :func:`graphscale.widen` applies, in order (see :mod:`graphscale.edits`)."""
        return self.walk.requests.edits(self.walk.info)

    def unused_tensors(self) -> set[str]:
        """The tensors the graph reads (``get_attr`` targets) that its output does not depend on: read only
        by a dead computation (HF's ``original_inv_freq``; the rotary table of a model whose layers are
        all linear attention), or not at all. Judged per tensor, not per name: a tied tensor read under
        one name is live under all. Widening leaves these to the larger model.

        Example:
            >>> class M(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.fc = torch.nn.Linear(3, 4)
            ...         self.register_buffer("table", torch.ones(4))
            ...     def forward(self, x):
            ...         dead = self.table * 2  # computed, never used
            ...         return self.fc(x)
            >>> sorted(analyze(M(), (torch.randn(2, 3),)).unused_tensors())
            ['table']
        """
        live = {self.canonical(t) for t in live_attributes(self.captured.gm)}
        return {str(n.target) for n in self.captured.gm.graph.nodes
                if n.op == "get_attr" and self.canonical(str(n.target)) not in live}

    def module_rule(self, path: str) -> Rule | None:
        """The rule that describes the leaf module called at ``path`` (None if not a called module)."""
        return self.walk.module_rules.get(path)

    def node_rule(self, node: str) -> Rule | None:
        """The rule that described graph node ``node`` (None for placeholders, attributes and outputs)."""
        return self.walk.node_rules.get(node)

    def sizes(self, multipliers: int | dict[str, int]) -> Sizes:
        """The numeric :class:`Sizes` under ``multipliers`` (as :meth:`multipliers` accepts them)."""
        return Sizes(self, self.multipliers(multipliers))

    def multipliers(self, multiplier: int | dict[str, int]) -> dict[str, int]:
        """Resolve ``multiplier`` (an int for all classes, or per class name/member axis) per width class."""
        names = [c.name for c in self.width_classes]
        if isinstance(multiplier, dict):
            out = {n: 1 for n in names}
            named_by: dict[str, str] = {}
            for key, k in multiplier.items():
                try:
                    cls = self.classification.lookup(key)
                except KeyError:
                    raise MultiplierError(f"unknown width class {key!r}; the width classes are: "
                                          f"{', '.join(names) or '(none)'}") from None
                if cls.role != "width":
                    raise MultiplierError(f"class {key!r} is fixed ({cls.reason}); it cannot be widened")
                if cls.name in named_by:  # otherwise the last key would silently win
                    raise MultiplierError(f"{named_by[cls.name]!r} and {key!r} both name width class "
                                          f"{cls.name!r}; give each class one multiplier")
                named_by[cls.name] = key
                out[cls.name] = _check_k(k, key)
            return out
        k = _check_k(multiplier, "multiplier")
        return {n: k for n in names}

    def substitute(self, expr: sympy.Expr, multipliers: dict[str, int]) -> float:
        """The numeric value of a derived expression under the given class multipliers."""
        key = (expr, tuple(sorted(multipliers.items())))
        if key not in self._numeric:  # many tensors share an expression; xreplace is much cheaper than subs
            self._numeric[key] = float(expr.xreplace({self.symbols[n]: sympy.Integer(k)
                                                      for n, k in multipliers.items()}))
        return self._numeric[key]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: classes, symbols and every tensor's laws as strings."""
        return {
            "frontend": self.frontend,
            "heads": self.heads,
            "classes": [dict(c.to_dict(), symbol=str(self.symbols.get(c.name, "")) or None)
                        for c in self.classes],
            "rules": {n: r.to_dict() for n, r in self.rules.items()},
            "notes": self.notes,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    def __str__(self) -> str:
        lines = [f"graphscale plan ({self.frontend} graph, heads={self.heads})", "", "width classes:"]
        for c in self.width_classes:
            detail = f"  [{c.reason}]" if c.reason else ""
            lines.append(f"  {self.symbols[c.name]!s:<4} {c.name:<40} size {c.size:<6}"
                         f" {len(c.members)} axes{detail}")
        if not self.width_classes:
            lines.append("  (none)")
        lines += ["", "fixed classes carried by parameters:"]
        for c in self.classes:
            if c.role == "fixed":
                lines.append(f"  {c.name:<45} size {c.size:<6} ({c.reason})")
        lines += ["", "scaling rules (relative to the narrow model; c = copy scale, M = width multiplicity):"]
        # the columns are the table's laws (graphscale.laws.PLAN_LAWS), the same entries the optimizer uses
        shown = [e for e in PLAN_LAWS if e.column is not None]
        header = ["tensor", "role", "c", "M", *(e.column for e in shown), "init std"]
        rows = []
        for name, r in self.rules.items():
            tied = f" (= {', '.join(r.aliases)})" if r.aliases else ""
            exported = r.laws()
            rows.append([name + tied, r.role, str(r.copy_scale), str(r.total),
                         *(str(exported[e.key]) for e in shown), str(r.init_std)])
        widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
        lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in rows:
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)))
        for name, r in self.rules.items():
            for node, factor in r.use_multipliers.items():
                lines.append(f"  note: {name} is shared; its use at {node} gets an inserted "
                             f"multiplier {factor}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def multipliers_from(self, state: dict[str, torch.Tensor]) -> dict[str, int]:
        """Each width class's multiplier, read off a larger model's tensors (``state``, by name): from an
        axis that is the class alone, or -- for a class that is only ever a part or factor of an axis (a
        state size concatenated with other parts) -- solved from an axis whose other classes are known by
        then. A size no integer multiplier gives is refused (``MultiplierError``).

        Example:
            >>> plan = analyze(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1)),
            ...                (torch.randn(1, 2),))
            >>> plan.multipliers_from({"0.weight": torch.zeros(12, 2), "1.weight": torch.zeros(1, 12)})
            {'0.weight[0]': 3}
        """
        res = self.resolution
        by_atom = {c.atom: c for c in self.width_classes}
        known: dict[int, int] = {}
        axes = [(name, i, tree, int(state[name].shape[i]), set(leaves(tree)) & by_atom.keys())
                for name, dims in self.tensor_dims.items() if name in state and state[name].dim() == len(dims)
                for i, d in enumerate(dims) for tree in [res.tree(d)]]
        problems: dict[int, str] = {}
        progress, joint = True, False
        while len(known) < len(by_atom):
            if not progress:
                if joint:
                    break
                joint = True  # stuck: let the classes of one axis share a multiplier, as one part grows
            progress = False
            for name, axis, tree, large_size, atoms in axes:
                unknown = atoms - known.keys()
                if not unknown or (len(unknown) > 1 and not joint):
                    continue
                atom = min(unknown)
                m = _solve_multiplier(tree, atom, known, large_size, res.ds.size, together=unknown)
                if m is None:
                    small_size = _tree_size(tree, known, res.ds.size)
                    part = "" if tree[0] == "atom" else \
                        f" for any multiplier of its part {by_atom[atom].name}"
                    problems.setdefault(atom, f"{name}[{axis}]: the larger model's size {large_size} is not "
                                              f"an integer multiple of the small model's {small_size}{part}")
                    continue
                known.update(dict.fromkeys(unknown, m))
                progress, joint = True, False
        for atom, c in by_atom.items():
            if atom not in known:
                if atom in problems:
                    raise MultiplierError(problems[atom])
                raise WidthConflictError(f"the larger model has no tensor to read class {c.name!r} from")
        return {c.name: known[a] for a, c in by_atom.items()}


class Sizes:
    """Numeric sizes and multipliers of dimensions under one choice of class multipliers.

    The one width assignment widen, its graph edits, verify and the record read.

    Example:
        >>> plan = analyze(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1)),
        ...                (torch.randn(1, 2),))
        >>> sizes = plan.sizes(3)
        >>> d = plan.tensor_dims["0.weight"][0]
        >>> sizes.mult(d), sizes.wide(d), sizes.class_multipliers()
        (3, 12, {'0.weight[0]': 3})
    """

    def __init__(self, plan: Plan, multipliers: dict[str, int]) -> None:
        self.plan = plan
        self.res = plan.resolution
        self.atom_mult = {c.atom: multipliers[c.name] for c in plan.width_classes}

    def record_tree(self, tree: tuple) -> tuple:
        """A resolution tree with each atom's narrow size and multiplier (the record's axis layout)."""
        if tree[0] == "atom":
            return ("atom", self.res.ds.size[tree[1]], self.atom_mult.get(tree[1], 1))
        return (tree[0], tuple(self.record_tree(c) for c in tree[1]))

    def axis(self, d: int) -> AxisReplication:
        """How dimension ``d`` is replicated."""
        return AxisReplication(self.record_tree(self.res.tree(d)))

    def mult(self, d: int) -> int:
        """Dimension ``d``'s multiplier (1 if it does not grow). A concatenation whose parts grow by
        different multipliers has none: an op that needs one there (a sum over it, which one inserted
        factor cannot keep; a shape entry) is refused. Parameters' own axes may be such concatenations
        (their blocks carry their own factors, ``ParamScaling.blocks``), which the record reads via
        :meth:`axis`, not here."""
        axis = self.axis(d)
        if axis.is_mixed():
            raise MultiplierError(
                "an op of the graph needs one multiplier for the axis "
                f"{self.res.ds.origin[self.res.root(d)]} (size {axis.narrow_size} -> {axis.wide_size}), "
                "whose concatenated parts would grow by different multipliers (a sum over it, a "
                "reshape): give the classes of its parts the same multiplier")
        return axis.multiplier

    def wide(self, d: int) -> int:
        """Dimension ``d``'s wide size."""
        return self.axis(d).wide_size

    def class_multipliers(self) -> dict[str, int]:
        """Width class name -> multiplier (the argument of :meth:`Plan.substitute`)."""
        return {c.name: self.atom_mult[c.atom] for c in self.plan.width_classes}


def _tree_size(tree: tuple, mult: dict[int, int], size: dict[int, int]) -> int:
    """The size of a resolution tree with each atom multiplied by ``mult`` (1 where absent)."""
    if tree[0] == "atom":
        return size[tree[1]] * mult.get(tree[1], 1)
    parts = [_tree_size(c, mult, size) for c in tree[1]]
    return math.prod(parts) if tree[0] == "prod" else sum(parts)


def _solve_multiplier(tree: tuple, atom: int, known: dict[int, int], target: int,
                      size: dict[int, int], together: set[int] | None = None) -> int | None:
    """The integer multiplier of ``atom`` (and of the atoms ``together`` with it) that gives ``tree`` the
    size ``target`` (the others at ``known``), or None; the size grows with it, so the search stops once
    it passes ``target``."""
    def at(m: int) -> int:
        return _tree_size(tree, {**known, **dict.fromkeys(together or {atom}, m)}, size)

    m = 1
    while True:
        got = at(m)
        if got == target:
            return m
        if got > target or got == at(m + 1):
            return None
        m += 1


def _check_k(k: Any, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int | float) or int(k) != k or k < 1:
        raise MultiplierError(f"{what} must be an integer >= 1, got {k!r}: widening copies each unit an "
                              "integer number of times")
    return int(k)


def analyze(model: torch.nn.Module, example_inputs: Any, *, tracer: Tracer = "auto",
            rules: str | Path | list[str | Path] | RuleBook | None = None, heads: HeadsPolicy = "fixed",
            outputs: Literal["fixed", "width"] = "fixed", names: dict[str, str] | None = None) -> Plan:
    """Capture ``model``, infer its width classes and derive every tensor's μP scaling rule.

    ``rules`` adds the user's own rule files (a ``.toml`` file, a folder of them, or a list), or is a
    loaded :class:`~graphscale.infer.rulebook.RuleBook` (e.g. ``RuleBook.load(path, allow_imports=True)``).
    ``heads="grow"`` widens the head count instead of head_dim. ``outputs="width"`` lets the axes of the
    model's outputs grow (a backbone whose output is its hidden state); by default they are fixed.
    ``names`` renames classes (key: a class name or any member axis, value: the new name), e.g.
    ``{"transformer.wte.weight[1]": "d_model"}``; multipliers can then use the new names.

    Example:
        >>> plan = analyze(torch.nn.Linear(4, 2), (torch.randn(1, 4),))
        >>> plan.width_classes
        []
    """
    book = rules if isinstance(rules, RuleBook) else RuleBook.load(rules)
    cap = capture(model, example_inputs, tracer, book)
    with parameters_unchanged(model, "the width walk"):  # the graph shares the model's weights
        walk = walk_graph(cap.gm, cap.flat_inputs, book, meta=cap.frontend == "fx")
    res = walk.ds.resolve()
    classes = classify(walk, res, heads=heads, outputs=outputs)
    for key, new in (names or {}).items():
        try:
            classes.lookup(key).name = new
        except KeyError:
            raise MultiplierError(f"names: no class {key!r}; the classes are "
                                  f"{', '.join(c.name for c in classes.width + classes.fixed)}") from None
    symbols = {c.name: sympy.Symbol(f"k{i + 1}", positive=True, integer=True)
               for i, c in enumerate(classes.width)}
    symbol_of = {c.atom: symbols[c.name] for c in classes.width}
    derived = derive_rules(walk, res, classes, symbol_of)
    notes = list(walk.requests.warnings)
    if cap.fallback_reason:
        notes.append(f"captured with torch.export because {cap.fallback_reason}")
    notes += classes.notes
    pinned = _pinned_hidden_fan_in(walk, res, classes) if outputs == "fixed" else []
    if pinned:
        from graphscale.zoo import HFWrapper

        cls = type(model.model if isinstance(model, HFWrapper) else model).__name__
        msg = (f"{cls}: its output is a hidden state, so with outputs='fixed' (the default) "
               f"the width of {', '.join(pinned[:3])} stays narrow although hidden weights sum over it; "
               "pass outputs='width' to widen it (the wide model's output then grows too)")
        notes.append(msg)
        warnings.warn(msg, stacklevel=2)
    plan = Plan(classes.width + classes.fixed, derived, symbols, cap.frontend, cap, walk, res, classes,
                heads, notes)
    _check_refusals(plan)
    return plan


def _pinned_hidden_fan_in(walk: Walk, res: Resolution, classes: Classes) -> list[str]:
    """Fixed classes pinned only by being a model output axis that a hidden weight (one with a width axis)
    sums over: a backbone's residual stream (BertModel's last_hidden_state) left narrow by outputs='fixed'."""
    out: list[str] = []
    for u in walk.requests.uses:
        name = walk.aliases.get(u.param, u.param)
        dims = walk.tensor_dims.get(name, ())
        if not any(classes.by_atom.get(a) is not None and classes.by_atom[a].role == "width"
                   for d in dims for a in res.atoms(d)):
            continue
        for ax in u.fan_in_axes:
            for a in res.atoms(dims[ax]):
                c = classes.by_atom.get(a)
                if c is not None and c.reason == "an axis of a model output" and c.name not in out:
                    out.append(c.name)
    return out


def _check_refusals(plan: Plan) -> None:
    """Ops that are not replication-invariant over an axis fail as soon as that axis is width."""
    from graphscale.infer.engine import describe_node

    nodes = {n.name: n for n in plan.captured.gm.graph.nodes}
    width_atoms = {c.atom: c for c in plan.width_classes}
    for r in plan.requests.refusals:
        hit = [width_atoms[a] for a in plan.resolution.atoms(r.dim) if a in width_atoms]
        if hit:
            raise UnsupportedOpError(
                f"{describe_node(nodes[r.node])} is not replication-invariant over width class "
                f"{hit[0].name!r}: {r.why}. Widening would change the function. Fix: make the op act over a "
                "fixed axis, mark the class fixed, or add a rule that says how to compensate it.")
