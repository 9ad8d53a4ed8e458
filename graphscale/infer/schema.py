"""What a rule may say: each kind's keys (type, default, whether required), and the parsed axis pattern.

A kind is registered with :func:`kind`, which carries its schema next to its code; the rule book checks
every ``[[rule]]`` table against it when the file loads (:mod:`graphscale.infer.rulebook`), so a
misspelled key, a wrong type or a malformed pattern is a :class:`~graphscale.errors.RuleError` naming the
file, the rule and the key, not a crash in the middle of an analysis.

Key types: ``ref`` (an argument name, ``"a|b"`` alternatives, ``"param:weight"``; see
:class:`~graphscale.infer.call.Ref`), ``refs`` (a list of those), ``pattern`` (``"... i, o i -> ... o"``,
parsed into a :class:`Pattern`), ``letters`` (a list of pattern letters), ``ints``, ``bool``, ``int``,
``str``, ``attrs`` (a table of strings).

Example:
    >>> Pattern.parse("... i, o i, o -> ... o").operands
    (('...', 'i'), ('o', 'i'), ('o',))
    >>> sorted(Pattern.parse("b i j, b j k -> b i k").letters)
    ['b', 'i', 'j', 'k']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from graphscale.infer.call import Ref

KEY_TYPES = ("ref", "refs", "pattern", "letters", "strs", "ints", "bool", "int", "str", "attrs")


@dataclass(frozen=True)
class Pattern:
    """An einsum-like axis pattern: one tuple of letters per operand, and the output's letters.

    ``...`` stands for any number of leading (or middle) axes, broadcast across operands.
    """

    operands: tuple[tuple[str, ...], ...]
    output: tuple[str, ...]

    @staticmethod
    def parse(text: str) -> Pattern:
        """Parse ``"a b, b c -> a c"`` (letters are whitespace-separated names); ValueError if malformed.

        >>> Pattern.parse("b i j -> b j i").output
        ('b', 'j', 'i')
        """
        if text.count("->") != 1:
            raise ValueError(f"pattern {text!r} needs exactly one '->' between operands and output")
        lhs, rhs = text.split("->")
        operands = tuple(tuple(op.split()) for op in lhs.split(","))
        output = tuple(rhs.split())
        for axes in operands + (output,):
            if axes.count("...") > 1:
                raise ValueError(f"pattern {text!r}: '...' appears twice in one operand")
            for a in axes:
                if a != "..." and not a.isidentifier():
                    raise ValueError(f"pattern {text!r}: axis {a!r} is not a name")
        if not any(operands):
            raise ValueError(f"pattern {text!r} has no operand axes")
        missing = [a for a in output if a != "..." and all(a not in op for op in operands)]
        if missing:
            raise ValueError(f"pattern {text!r}: output axes {missing} appear in no operand")
        return Pattern(operands, output)

    @property
    def letters(self) -> frozenset[str]:
        """Every axis name in the operands (not ``...``)."""
        return frozenset(a for op in self.operands for a in op if a != "...")


@dataclass(frozen=True)
class Key:
    """One key a kind accepts: its type (one of ``KEY_TYPES``), default, and whether it is required."""

    type: str
    default: Any = None
    required: bool = False
    doc: str = ""


@dataclass(frozen=True)
class KindSpec:
    """A registered kind: its handler and schema. ``check`` validates keys against each other and
    returns ``(key, problem)`` pairs (e.g. a pattern's operand count against ``operands``)."""

    name: str
    handler: Callable[[Any], Any]
    keys: Mapping[str, Key]
    check: Callable[[Mapping[str, Any], list[str]], list[tuple[str, str]]] | None = None
    tolerates_opaque: bool = False


#: keys every rule has, whatever its kind
COMMON_KEYS: Mapping[str, Key] = MappingProxyType({
    "name": Key("str", doc="the rule's name, used in messages"),
    "kind": Key("str", required=True, doc="one of the registered kinds"),
    "targets": Key("strs", default=(), doc="the ops the rule covers; each must resolve"),
    "optional_targets": Key("strs", default=(), doc="ops that older torch versions may lack"),
    "module_attrs": Key("attrs", default=MappingProxyType({}),
                        doc="size attributes of a called module, recomputed from its wide tensors"),
    "backward": Key("str", default="own",
                    doc="for a custom torch.autograd.Function: 'own' (graphscale keeps the Function whole, "
                        "under tracer='fx') or 'derivative' (its backward is its forward's derivative, so "
                        "torch.export may inline the forward; checked numerically where it is met)"),
})
#: the values of the common key ``backward``
BACKWARDS = ("own", "derivative")

KINDS: dict[str, KindSpec] = {}


def kind(name: str, *, check: Callable[[Mapping[str, Any], list[str]], list[tuple[str, str]]] | None = None,
         tolerates_opaque: bool = False, **keys: Key) -> Callable[[Callable], Callable]:
    """Register the decorated function as the handler of kind ``name`` with the given keys.

    >>> @kind("doc_example_identity", input=Key("ref", "input"))
    ... def identity(call):
    ...     return call.info(call.spec("input"))
    >>> sorted(KINDS["doc_example_identity"].keys)
    ['input']
    >>> del KINDS["doc_example_identity"]
    """
    for key, spec in keys.items():
        if spec.type not in KEY_TYPES:
            raise TypeError(f"kind {name!r}: key {key!r} has unknown type {spec.type!r}")
        if key in COMMON_KEYS:
            raise TypeError(f"kind {name!r}: key {key!r} is common to every rule")

    def register(fn: Callable) -> Callable:
        if name in KINDS:
            raise TypeError(f"kind {name!r} is registered twice")
        KINDS[name] = KindSpec(name, fn, MappingProxyType(dict(keys)), check, tolerates_opaque)
        return fn

    return register


def convert(key_type: str, value: Any) -> Any:
    """Check ``value`` against ``key_type`` and return its parsed, immutable form; ValueError if wrong.

    >>> convert("refs", ["input", "param:weight"])[1].source
    'param'
    >>> convert("int", "2")
    Traceback (most recent call last):
    ...
    ValueError: expected an integer, got str '2'
    """
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"expected {what}, got {type(value).__name__} {value!r}")

    if key_type == "ref":
        need(isinstance(value, str), "an argument reference (a string)")
        return Ref.parse(value)
    if key_type == "refs":
        need(isinstance(value, list) and all(isinstance(v, str) for v in value),
             "a list of argument references (strings)")
        return tuple(Ref.parse(v) for v in value)
    if key_type == "pattern":
        need(isinstance(value, str), "an axis pattern (a string with '->')")
        return Pattern.parse(value)
    if key_type in ("letters", "strs"):
        need(isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings")
        return tuple(value)
    if key_type == "ints":
        need(isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
             "a list of integers")
        return tuple(value)
    if key_type == "bool":
        need(isinstance(value, bool), "true or false")
        return value
    if key_type == "int":
        need(isinstance(value, int) and not isinstance(value, bool), "an integer")
        return value
    if key_type == "str":
        need(isinstance(value, str), "a string")
        return value
    if key_type == "attrs":
        need(isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
             "a table of strings")
        return MappingProxyType(dict(value))
    raise ValueError(f"unknown key type {key_type!r}")
