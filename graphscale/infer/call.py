"""One op call as a rule's kind sees it: the arguments by name, the called module, the result.

Kinds never read an argument at a position written in a rule file: a :class:`Call` binds the node's
arguments to the op's signature once, so ``call.value("dim")`` is ``dim`` whether the user wrote
``x.sum(-1)``, ``x.sum(dim=-1)`` or export wrote ``aten.sum.dim_IntList(x, [-1])``. The signature comes from

- the ATen schema, for an ``OpOverload`` (what ``torch.export`` produces);
- :func:`inspect.signature`, for a Python function or an ``nn.Module``'s ``forward``;
- :func:`torch.fx.operator_schemas.get_signature_for_torch_op`, for a builtin torch function (overloads
  are told apart by the argument types, as :func:`torch.fx.operator_schemas.normalize_function` does);
- for a tensor method, a small table of the methods that take sizes as separate arguments (``view``,
  ``expand``, ``permute``...), the Python method where ``torch.Tensor`` defines one, else the ATen schema.

The first tensor argument is also reachable as ``input`` (ATen and methods call it ``self``, ``torch.split``
``tensor``, ``operator.getitem`` ``a``). Where no signature can be read (a user's op), a reference written
``name@pos`` falls back to keyword ``name``, else position ``pos``.

Example:
    >>> Ref.parse("split_size|split_sizes")
    Ref(names=('split_size', 'split_sizes'), pos=None, source='arg')
    >>> Ref.parse("dim@1").pos, Ref.parse("param:weight").source
    (1, 'param')
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx

from graphscale.edits import get_arg
from graphscale.errors import UnsupportedOpError
from graphscale.infer.values import ArgLoc, Const, Info, Opaque, TensorInfo

#: where an argument sits in the node as written; ``("varargs", i)``: the sizes were passed as separate
#: positional arguments from position ``i`` on (``x.view(b, t, c)``)
Loc = ArgLoc | tuple[Literal["varargs"], int]

_INPUT_NAMES = ("input", "self", "tensor", "a", "obj")


@dataclass(frozen=True)
class Ref:
    """A reference to an argument of a call: alternative names (first present wins), or an attribute of
    the called module (``source`` ``param``/``buffer``/``attr``); ``pos`` only for the ``name@pos``
    fallback of user rules on ops whose signature cannot be read."""

    names: tuple[str, ...]
    pos: int | None = None
    source: Literal["arg", "param", "buffer", "attr"] = "arg"

    @staticmethod
    @functools.cache
    def parse(text: str) -> Ref:
        """Parse ``"dim"``, ``"split_size|split_sizes"``, ``"dim@1"``, ``"param:weight"``.

        >>> Ref.parse("attr:groups")
        Ref(names=('groups',), pos=None, source='attr')
        """
        head, sep, rest = text.partition(":")
        if sep and head in ("param", "buffer", "attr"):
            return Ref((rest,), None, head)  # type: ignore[arg-type]
        name, at, pos = text.partition("@")
        if at and not pos.isdigit():
            raise ValueError(f"{text!r}: the position after '@' must be a non-negative integer")
        names = tuple(n.strip() for n in name.split("|"))
        if not all(n.isidentifier() for n in names):
            raise ValueError(f"{text!r} is not an argument name (or names separated by '|')")
        return Ref(names, int(pos) if at else None)

    def __str__(self) -> str:
        if self.source != "arg":
            return f"{self.source}:{self.names[0]}"
        return "|".join(self.names) + (f"@{self.pos}" if self.pos is not None else "")


# Tensor methods whose Python-level signature the ATen schema does not describe (sizes as varargs).
_METHOD_SIGNATURES: dict[str, Callable[..., Any]] = {
    "view": lambda self, *shape: None,
    "reshape": lambda self, *shape: None,
    "expand": lambda self, *size: None,
    "broadcast_to": lambda self, size: None,
    "permute": lambda self, *dims: None,
    "repeat": lambda self, *repeats: None,
    "size": lambda self, dim=None: None,
    "new_zeros": lambda self, *size, dtype=None, device=None, requires_grad=False, layout=None,
    pin_memory=False: None,
    "new_ones": lambda self, *size, dtype=None, device=None, requires_grad=False, layout=None,
    pin_memory=False: None,
    "new_empty": lambda self, *size, dtype=None, device=None, requires_grad=False, layout=None,
    pin_memory=False: None,
    "new_full": lambda self, size, fill_value, dtype=None, device=None, requires_grad=False, layout=None,
    pin_memory=False: None,
    "transpose": lambda self, dim0, dim1: None,
    "swapaxes": lambda self, axis0, axis1: None,
    "t": lambda self: None,
    "__matmul__": lambda self, other: None,
}


def _creation(*size: Any, out: Any = None, dtype: Any = None, layout: Any = None, device: Any = None,
              pin_memory: bool = False, requires_grad: bool = False, names: Any = None,
              generator: Any = None, memory_format: Any = None) -> None:
    """``torch.zeros(2, 3)`` and ``torch.zeros((2, 3))``: sizes as varargs or one sequence."""


def _getattr(obj: Any, name: str, default: Any = None, /) -> None:
    """``builtins.getattr``, which has no readable signature."""


_FUNCTION_SIGNATURES: dict[Any, Callable[..., Any]] = {
    torch.zeros: _creation, torch.ones: _creation, torch.empty: _creation, torch.randn: _creation,
    torch.rand: _creation, getattr: _getattr,
    torch.nonzero: lambda input, *, out=None, as_tuple=False: None,  # its docstring has no signature
}


def _schema_signature(op: torch._ops.OpOverload) -> inspect.Signature:
    from torch.fx.operator_schemas import _torchscript_schema_to_signature

    try:  # annotated (so overloads can be told apart by type), with ``self`` named ``input``
        return _torchscript_schema_to_signature(op._schema)
    except Exception:  # noqa: BLE001  (a schema type fx does not know: names without annotations)
        pass
    params = []
    for a in op._schema.arguments:
        kind = inspect.Parameter.KEYWORD_ONLY if a.kwarg_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        default = a.default_value if a.has_default_value() else inspect.Parameter.empty
        params.append(inspect.Parameter(a.name, kind, default=default))
    return inspect.Signature(params)


@functools.cache
def _method_candidates(name: str) -> tuple[inspect.Signature, ...]:
    if name in _METHOD_SIGNATURES:
        return (inspect.signature(_METHOD_SIGNATURES[name]),)
    fn = getattr(torch.Tensor, name, None)
    if fn is not None:
        try:
            return (inspect.signature(fn),)
        except (TypeError, ValueError):
            pass  # a C method: read the ATen schema below
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return ()
    sigs = []
    for overload in packet.overloads():
        op = getattr(packet, overload)
        args = op._schema.arguments
        if args and args[0].name == "self" and not any(a.is_out for a in args):
            sigs.append(_schema_signature(op))
    return tuple(sigs)


def _function_candidates(fn: Any) -> tuple[inspect.Signature, ...]:
    try:
        hash(fn)
    except TypeError:  # an unhashable target
        return ()
    return _hashable_function_candidates(fn)  # once per op, not per node (operator.add: ~1 ms)


@functools.lru_cache(maxsize=1024)  # bounded: it holds the targets (a user's functions) alive
def _hashable_function_candidates(fn: Any) -> tuple[inspect.Signature, ...]:
    if isinstance(fn, torch._ops.OpOverload):
        return (_schema_signature(fn),)
    if fn in _FUNCTION_SIGNATURES:
        return (inspect.signature(_FUNCTION_SIGNATURES[fn]),)
    try:
        return (inspect.signature(fn),)
    except (TypeError, ValueError):
        pass
    from torch.fx.operator_schemas import get_signature_for_torch_op

    try:
        return tuple(get_signature_for_torch_op(fn) or ())
    except Exception:  # noqa: BLE001  (torch's schema lookup fails in several ways on non-torch callables)
        return ()


def _types_match(sig: inspect.Signature, bound: inspect.BoundArguments) -> bool:
    from torch.fx.operator_schemas import type_matches

    for name, value in bound.arguments.items():
        ann = sig.parameters[name].annotation
        if ann is inspect.Parameter.empty or sig.parameters[name].kind in (
                inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        try:
            if not type_matches(ann, type(value)) and value is not None:
                return False
        except Exception:  # noqa: BLE001  (an annotation type_matches does not understand: accept)
            continue
    return True


@dataclass(frozen=True)
class Binding:
    """The call's arguments by name: real value, and where each sits in the node (None: a default)."""

    values: dict[str, Any]
    locs: dict[str, Loc | None]
    first: str | None  # the first parameter's name (reachable as ``input``)


def bind(candidates: tuple[inspect.Signature, ...], node_args: tuple, node_kwargs: dict,
         args: tuple, kwargs: dict) -> Binding | None:
    """Bind a call to the one candidate signature it fits; None if none or several fit differently.

    >>> sig = inspect.signature(lambda input, dim=None, keepdim=False: None)
    >>> b = bind((sig,), ("x", -1), {}, ("x", -1), {})
    >>> b.values["dim"], b.locs["dim"], b.values["keepdim"], b.locs["keepdim"]
    (-1, ('pos', 1), False, None)
    """
    markers = tuple(("pos", i) for i in range(len(node_args)))
    kw_markers = {k: ("kw", k) for k in node_kwargs}
    fits: list[tuple[inspect.Signature, inspect.BoundArguments, inspect.BoundArguments]] = []
    for sig in candidates:
        try:
            real = sig.bind(*args, **kwargs)
            where = sig.bind(*markers, **kw_markers)
        except TypeError:
            continue
        fits.append((sig, real, where))
    if len(fits) > 1:
        fits = [f for f in fits if _types_match(f[0], f[1])] or fits
    if not fits or len({tuple(sorted(f[2].arguments.items())) for f in fits}) > 1:
        return None
    sig, real, where = fits[0]
    real.apply_defaults()
    values: dict[str, Any] = {}
    locs: dict[str, Loc | None] = {}
    for name, value in real.arguments.items():
        p = sig.parameters[name]
        loc = where.arguments.get(name)
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            if len(value) == 1 and isinstance(value[0], list | tuple | torch.Size):
                values[name], locs[name] = list(value[0]), loc[0] if loc else None
            else:
                values[name] = list(value)
                locs[name] = ("varargs", loc[0][1]) if loc else None
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        values[name], locs[name] = value, loc
    first = next(iter(sig.parameters), None)
    return Binding(values, locs, first)


class Call:
    """One node as its rule's kind sees it (see the module doc).

    ``info_of`` maps a raw graph argument (a Node, a literal, a list of those) to its
    :class:`~graphscale.infer.values.Info`; ``tensor_info`` describes a module's parameter or buffer.
    """

    def __init__(self, node: fx.Node, rule: Any, result: Any, args: tuple, kwargs: dict,
                 module: torch.nn.Module | None, ds: Any, requests: Any,
                 info_of: Callable[[Any], Info], tensor_info: Callable[[str, torch.Tensor], TensorInfo],
                 where: Callable[[fx.Node], str]) -> None:
        self.node, self.rule, self.result = node, rule, result
        self.args, self.kwargs, self.module = args, kwargs, module
        self.ds, self.requests = ds, requests
        self.info_of, self._tensor_info, self._where = info_of, tensor_info, where
        self.binding = bind(self._candidates(), node.args, dict(node.kwargs), args, kwargs)

    def _candidates(self) -> tuple[inspect.Signature, ...]:
        if self.node.op == "call_module" and self.module is not None:
            try:
                return (inspect.signature(self.module.forward),)
            except (TypeError, ValueError):
                return ()
        if self.node.op == "call_method":
            return _method_candidates(str(self.node.target))
        if self.node.op == "call_function":
            return _function_candidates(self.node.target)
        return ()

    # -- rule keys -------------------------------------------------------------------------------------

    def spec(self, key: str) -> Any:
        """The rule's value for ``key`` (the kind's declared default where the rule gives none)."""
        return self.rule.spec.get(key)

    # -- arguments -------------------------------------------------------------------------------------

    def _name(self, ref: Ref) -> str | None:
        b = self.binding
        if b is None:
            return None
        for n in ref.names:
            if n in b.values:
                return n
        if "input" in ref.names and b.first in _INPUT_NAMES:
            return b.first
        return None

    def loc(self, ref: Ref | str) -> Loc | None:
        """Where the argument sits in the node as written; None if it was not passed."""
        ref = Ref.parse(ref) if isinstance(ref, str) else ref
        if ref.source == "attr":
            return ("attr", ref.names[0])
        if ref.source != "arg":
            return None
        if self.binding is not None:
            name = self._name(ref)
            return self.binding.locs.get(name) if name is not None else None
        for n in ref.names:  # no readable signature: keyword, else the position a user rule gives
            if n in self.node.kwargs:
                return ("kw", n)
        pos = ref.pos if ref.pos is not None else (0 if "input" in ref.names else None)
        if pos is not None and pos < len(self.node.args):
            return ("pos", pos)
        return None

    def has(self, ref: Ref | str) -> bool:
        """Whether the call passes this argument (not a signature default)."""
        return self.loc(ref) is not None

    def value(self, ref: Ref | str, default: Any = None) -> Any:
        """The real value of an argument (the signature's default if not passed, else ``default``)."""
        ref = Ref.parse(ref) if isinstance(ref, str) else ref
        if ref.source != "arg":
            return getattr(self.module, ref.names[0], default)
        if self.binding is not None:
            name = self._name(ref)
            return self.binding.values[name] if name is not None else default
        loc = self.loc(ref)
        if loc is None:
            return default
        return self.kwargs[loc[1]] if loc[0] == "kw" else self.args[loc[1]]  # type: ignore[index]

    def raw(self, ref: Ref | str) -> Any:
        """The argument as written in the graph (a Node, a literal, a list of those); None if absent."""
        loc = self.loc(ref)
        if loc is None or loc[0] == "attr":
            return None
        if loc[0] == "varargs":
            return tuple(self.node.args[loc[1]:])  # type: ignore[misc]
        return get_arg(self.node, loc)  # type: ignore[arg-type]

    def info(self, ref: Ref | str) -> Any:
        """The inferred info of an argument (a tuple for a sequence), None if the argument is absent."""
        ref = Ref.parse(ref) if isinstance(ref, str) else ref
        if ref.source in ("param", "buffer"):
            t = getattr(self.module, ref.names[0], None)
            if t is None:
                return None
            return self._tensor_info(f"{self.node.target}.{ref.names[0]}", t)
        loc = self.loc(ref)
        if loc is None:
            if ref.source == "arg" and self.binding is not None and self._name(ref) is not None:
                return Const(self.value(ref))  # a signature default
            return None
        return self.info_of(self.raw(ref))

    def tensor(self, ref: Ref | str, what: str = "") -> TensorInfo:
        """The argument's info, which must describe a tensor (an opaque value is refused)."""
        info = self.info(ref)
        if isinstance(info, TensorInfo):
            return info
        ref_text = str(ref)
        if isinstance(info, Opaque):
            raise UnsupportedOpError(
                f"{self.where()}: argument {ref_text!r} of {self.rule.name!r}{what} is a value graphscale "
                f"cannot describe ({info.why}, at node {info.node!r}); it cannot take part in widening")
        raise UnsupportedOpError(f"{self.where()}: argument {ref_text!r} of rule {self.rule.name!r} "
                                 f"({self.rule.source}) is not a tensor here")

    def arg_infos(self) -> list[Any]:
        """The info of every argument as written (flattening nothing)."""
        return [self.info_of(a) for a in list(self.node.args) + list(self.node.kwargs.values())]

    # -- building results ------------------------------------------------------------------------------

    def fresh(self, shape: tuple[int, ...], label: str | None = None) -> tuple[int, ...]:
        """A new dimension per entry of ``shape``, named after this node."""
        label = label or self.node.name
        return tuple(self.ds.new(s, f"{label}[{i}]") for i, s in enumerate(shape))

    def where(self) -> str:
        """The node, with its source line where known (for messages)."""
        return self._where(self.node)
