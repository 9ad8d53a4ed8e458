"""Graph edits: each rewrite the widen stage makes to the graph, as one object with an ``apply`` method.

Width inference (the kinds in :mod:`graphscale.infer.kinds`) emits these as it walks the graph, before
any multiplier is known: a shape literal that holds a width size, a scalar argument equal to one (a
``split`` size, ``groups``), a slice bound on a width axis, an attention scale, a sum over width that
needs a ``1/k``, a shared parameter's further factor. :func:`graphscale.widen` copies the graph and
applies :attr:`graphscale.plan.Plan.edits` in order, each under one :class:`EditContext` (the wide graph,
the :class:`~graphscale.plan.Sizes` of one choice of multipliers, and the frontend that made the graph,
which knows how its ops spell a multiply, a slice or an attention scale). An edit whose dimensions do
not grow leaves the graph alone. Nothing here touches the user's model.

Adding an edit is one class here with an ``apply``, emitted by a kind into
:class:`~graphscale.infer.values.Requests`.

Example:
    >>> import graphscale, torch
    >>> class Halves(torch.nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.fc, self.out = torch.nn.Linear(2, 8), torch.nn.Linear(4, 1)
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         a, b = self.fc(x).split(4, -1)
    ...         return self.out(a * b)
    >>> plan = graphscale.analyze(Halves(), (torch.randn(1, 2),))
    >>> [(type(e).__name__, e.node) for e in plan.edits if not isinstance(e, ParamUse)]  # split size 4 grows
    [('ScalarSize', 'split')]
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.fx as fx

from graphscale.errors import UnsupportedOpError

if TYPE_CHECKING:
    from graphscale.capture import Frontend
    from graphscale.plan import Plan, Sizes

ArgLoc = tuple[Literal["pos", "kw", "attr"], int | str]  # "attr": an attribute of a called module


def get_arg(node: fx.Node, loc: ArgLoc) -> Any:
    """The argument of ``node`` at ``loc`` (``("pos", i)`` or ``("kw", name)``).

    Example:
        >>> gm = fx.symbolic_trace(lambda x: x.view(2, -1))
        >>> node = next(n for n in gm.graph.nodes if n.op == "call_method")
        >>> get_arg(node, ("pos", 1))
        2
    """
    return node.kwargs.get(loc[1]) if loc[0] == "kw" else node.args[loc[1]]  # type: ignore[index, call-overload]


def set_arg(node: fx.Node, loc: ArgLoc, value: Any) -> None:
    """Set the argument of ``node`` at ``loc`` to ``value``.

    Example:
        >>> gm = fx.symbolic_trace(lambda x: x.view(2, -1))
        >>> node = next(n for n in gm.graph.nodes if n.op == "call_method")
        >>> set_arg(node, ("pos", 1), 6); node.args[1:]
        (6, -1)
    """
    if loc[0] == "kw":
        kwargs = dict(node.kwargs)
        kwargs[loc[1]] = value  # type: ignore[index]
        node.kwargs = kwargs
    else:
        args = list(node.args)
        args[loc[1]] = value  # type: ignore[index, call-overload]
        node.args = tuple(args)


def set_module_attrs(module: torch.nn.Module, rule: Any) -> None:
    """Set the size attributes a rule names (``in_features``...) from the module's (wide) tensors.

    Example:
        >>> lin = torch.nn.Linear(2, 3)
        >>> lin.weight = torch.nn.Parameter(torch.zeros(6, 2))
        >>> set_module_attrs(lin, {"module_attrs": {"out_features": "weight[0]"}}); lin.out_features
        6
    """
    for attr, spec in (rule.get("module_attrs", {}) if rule else {}).items():
        value = eval_module_attr(module, spec)
        if value is not None:
            setattr(module, attr, value)


def eval_module_attr(module: torch.nn.Module, spec: str) -> Any:
    """Evaluate a rule's ``module_attrs`` entry (``"weight[1]"``, ``"weight.shape"``, ``"a[1]*groups"``;
    ``|`` separates alternatives, the first whose tensors exist wins).

    Example:
        >>> eval_module_attr(torch.nn.Conv1d(4, 6, 3, groups=2), "weight[1]*groups")
        4
    """
    for alt in spec.split("|"):
        value: Any = 1
        ok = True
        for factor in alt.split("*"):
            factor = factor.strip()
            if factor.endswith(".shape"):
                t = getattr(module, factor.removesuffix(".shape"), None)
                if t is None:
                    ok = False
                    break
                return tuple(t.shape)
            if "[" in factor:
                tname, idx = factor[:-1].split("[")
                t = getattr(module, tname, None)
                if t is None:
                    ok = False
                    break
                value *= int(t.shape[int(idx)])
            else:
                value *= int(getattr(module, factor))
        if ok:
            return value
    return None


@dataclass
class EditContext:
    """What an edit needs to apply itself: the wide graph (a copy), the plan, the sizes under one choice
    of multipliers, the frontend that made the graph, and the wide graph's root attributes (the leaf
    module clones, by path). ``nodes`` indexes the graph's nodes by name as the walk saw them."""

    graph: fx.Graph
    plan: Plan
    sizes: Sizes
    frontend: Frontend
    modules: dict[str, Any]
    nodes: dict[str, fx.Node] = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = {n.name: n for n in self.graph.nodes}


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

    def apply(self, ctx: EditContext) -> None:
        """Write the wide sizes into the shape argument."""
        node, sizes = ctx.nodes[self.node], ctx.sizes
        if self.varargs_from is not None:
            entries = list(node.args[self.varargs_from:])
        else:
            raw = get_arg(node, self.loc)
            entries = _expand_size_node(ctx.graph, node, raw, len(self.entries)) if isinstance(raw, fx.Node) \
                else list(raw) if isinstance(raw, list | tuple) else [raw]
        changed = False
        for k, d in self.entries:
            if sizes.mult(d) != 1 and not (isinstance(entries[k], int) and entries[k] == -1):
                entries[k] = sizes.wide(d)
                changed = True
        if not changed:
            return
        if self.varargs_from is not None:
            node.args = tuple(node.args[:self.varargs_from]) + tuple(entries)
        else:
            raw = get_arg(node, self.loc)
            set_arg(node, self.loc, tuple(entries) if isinstance(raw, tuple) else
                    entries if isinstance(raw, list | fx.Node) else entries[0])


def _expand_size_node(graph: fx.Graph, user: fx.Node, size_node: fx.Node, n: int) -> list[Any]:
    """``view(x.size())``: split the size tuple into per-axis items so width entries can be replaced."""
    with graph.inserting_before(user):
        return [graph.call_function(operator.getitem, (size_node, k)) for k in range(n)]


@dataclass(frozen=True)
class ScalarSize:
    """Rewrite a scalar argument that equals the size of ``dim`` (``split`` size, ``groups``, heads)."""

    node: str
    loc: ArgLoc
    dim: int

    def apply(self, ctx: EditContext) -> None:
        """Write the wide size into the argument (or the called module's attribute)."""
        if ctx.sizes.mult(self.dim) == 1:
            return
        node = ctx.nodes[self.node]
        if self.loc[0] == "attr":
            module = ctx.modules[str(node.target)]
            setattr(module, str(self.loc[1]), ctx.sizes.wide(self.dim))
            # attributes computed from it (Conv's in_channels = weight[1] * groups) follow
            set_module_attrs(module, ctx.plan.module_rule(str(node.target)))
        else:
            set_arg(node, self.loc, ctx.sizes.wide(self.dim))


@dataclass(frozen=True)
class SliceBounds:
    """Rewrite a slice on a width axis: ``start``/``stop`` become the wide offsets of the part ``[dim]``."""

    node: str
    loc: ArgLoc | None  # for aten.slice (start at loc, end at loc+1); None for fx getitem indices
    index_pos: int | None  # position in a getitem index tuple
    before: int | None  # dimension before the part (None: starts at 0)
    part: int

    def apply(self, ctx: EditContext) -> None:
        """Give the slice the wide bounds of its part (the frontend knows where they sit)."""
        sizes = ctx.sizes
        if sizes.mult(self.part) == 1 and (self.before is None or sizes.mult(self.before) == 1):
            return
        start = sizes.wide(self.before) if self.before is not None else 0
        stop = start + sizes.wide(self.part)
        ctx.frontend.set_slice_bounds(ctx.nodes[self.node], None if self.loc is not None else self.index_pos,
                                      start, stop)


@dataclass(frozen=True)
class AttentionScale:
    """SDPA's ``scale``: q.k over ``dim`` grows with its multiplier; the scale is divided by it."""

    node: str
    dim: int
    head_dim: int  # narrow head_dim, for scale=None (1/sqrt(head_dim))

    def apply(self, ctx: EditContext) -> None:
        """Divide the attention's scale (explicit, or the default 1/sqrt(head_dim)) by the multiplier."""
        m = ctx.sizes.mult(self.dim)
        if m == 1:
            return
        node = ctx.nodes[self.node]
        old = ctx.frontend.attention_scale(node)
        base = old if old is not None else 1.0 / math.sqrt(self.head_dim)
        ctx.frontend.set_attention_scale(node, base / m)


@dataclass(frozen=True)
class OutputMultiplier:
    """A sum over ``dims`` with no parameter to absorb it (``q @ k.T``, ``x.sum(-1)``): scale the output."""

    node: str
    dims: tuple[int, ...]
    why: str
    # where the op adds another term to the sum (baddbmm's ``input + b1 @ b2``), scale this factor of the
    # product instead of the whole output
    operand: ArgLoc | None = None

    def apply(self, ctx: EditContext) -> None:
        """Insert ``* 1/k`` after the node (or on ``operand``), k the product of the summed dimensions'
        multipliers."""
        m = math.prod(ctx.sizes.mult(d) for d in self.dims)
        if m == 1:
            return
        node = ctx.nodes[self.node]
        if self.operand is None:
            ctx.frontend.insert_multiply_after(ctx.graph, node, 1.0 / m)
            return
        scaled = ctx.frontend.insert_multiply_before(ctx.graph, node, get_arg(node, self.operand), 1.0 / m)
        scaled.meta["graphscale"] = "inserted multiplier (a sum with no parameter to absorb it)"
        set_arg(node, self.operand, scaled)


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

    def apply(self, ctx: EditContext) -> None:
        """A shared parameter whose use here needs a further factor: multiply the other operand by it."""
        plan = ctx.plan
        name = plan.canonical(self.param)
        factor = plan.rules[name].use_multipliers.get(self.node)
        if factor is None:
            return
        value = plan.substitute(factor, ctx.sizes.class_multipliers())
        if value != 1.0 and self.operand is None:  # never drop a shared parameter's compensation silently
            raise UnsupportedOpError(f"cannot compensate shared parameter {name!r} at node {self.node!r}: "
                                     "the op's other operand cannot be located in its arguments")
        if value != 1.0:
            node = ctx.nodes[self.node]
            scaled = ctx.frontend.insert_multiply_before(ctx.graph, node, get_arg(node, self.operand),  # type: ignore[arg-type]
                                                         value)
            set_arg(node, self.operand, scaled)  # type: ignore[arg-type]


@dataclass(frozen=True)
class NarrowSize:
    """An int the graph reads off a width axis (``x.size(-1)``, ``x.shape[2]``, ``aten.sym_size``) keeps
    its narrow ``value``, so arithmetic on it (a scale ``1/sqrt(head_dim)``) means what it meant; shape
    arguments that take it are rewritten by :class:`ShapeEntries` (applied before)."""

    node: str
    dim: int
    value: int

    def apply(self, ctx: EditContext) -> None:
        """Replace the node's uses by the narrow literal if its dimension grows."""
        node = ctx.nodes[self.node]
        if ctx.sizes.mult(self.dim) != 1 and node.users:
            node.replace_all_uses_with(self.value)  # type: ignore[arg-type]


Edit = ShapeEntries | ScalarSize | SliceBounds | AttentionScale | OutputMultiplier | ParamUse | NarrowSize
