"""Loading the declarative rules in ``rules/*.toml`` and finding the rule for a graph node.

A rule file holds ``[[rule]]`` tables. Each names the ops it covers (``targets``) and one of the *kinds*
in :mod:`graphscale.infer.kinds` with that kind's arguments; the kind says how the op relates the axes
of its inputs and outputs. Targets are written as

- ``torch.nn.functional.linear``, ``operator.add``: a Python callable (fx ``call_function``);
- ``aten.linear.default``: an ATen overload (what ``torch.export`` produces);
- ``method:view``: a tensor method (fx ``call_method``);
- ``module:torch.nn.Linear``: an ``nn.Module`` class kept as a leaf by ``torch.fx`` (subclasses match too).

Operand and argument references are ``"name@position"`` (looked up as keyword ``name``, else positional
``position``), ``"param:weight"`` / ``"buffer:running_mean"`` (an attribute of the called module), or
``"varargs@1"`` (all positional arguments from 1 on, or a single sequence there).

Example:
    >>> book = RuleBook.load()
    >>> book.lookup_function(torch.nn.functional.linear).kind
    'einsum'
"""

from __future__ import annotations

import importlib
import importlib.resources
import operator  # noqa: F401  (targets such as "operator.add" resolve through importlib)
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphscale.errors import GraphscaleError


@dataclass(frozen=True)
class Rule:
    """One declarative rule: the ops it covers, its kind, and the kind's arguments (``spec``)."""

    name: str
    kind: str
    targets: tuple[str, ...]
    spec: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def get(self, key: str, default: Any = None) -> Any:
        return self.spec.get(key, default)


class RuleBook:
    """All loaded rules, indexed by the object or name each fx/export node calls."""

    def __init__(self) -> None:
        self.functions: dict[Any, Rule] = {}
        self.methods: dict[str, Rule] = {}
        self.modules: list[tuple[type, Rule]] = []
        self.unresolved: list[str] = []
        self.rules: list[Rule] = []

    @classmethod
    def load(cls, extra: str | Path | Iterable[str | Path] | None = None) -> RuleBook:
        """The built-in rules plus the user's own (a ``.toml`` file, a directory of them, or a list).

        Later rules override earlier ones for the same target, so a user's rule replaces a built-in.
        """
        book = cls()
        builtin = importlib.resources.files("graphscale.rules")
        for entry in sorted(builtin.iterdir(), key=lambda p: p.name):
            if entry.name.endswith(".toml"):
                book.add_text(entry.read_text(), f"graphscale.rules/{entry.name}")
        if extra is not None:
            paths = [extra] if isinstance(extra, str | Path) else list(extra)
            for p in paths:
                p = Path(p)
                files = sorted(p.glob("*.toml")) if p.is_dir() else [p]
                if not files or not all(f.exists() for f in files):
                    raise GraphscaleError(f"rules path {p} has no .toml rule files")
                for f in files:
                    book.add_text(f.read_text(), str(f))
        return book

    def add_text(self, text: str, source: str) -> None:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise GraphscaleError(f"rule file {source} is not valid TOML: {e}") from e
        for i, raw in enumerate(data.get("rule", [])):
            raw = dict(raw)
            name = raw.pop("name", f"{source}#{i}")
            kind = raw.pop("kind", None)
            targets = raw.pop("targets", None)
            from graphscale.infer.kinds import KIND_HANDLERS  # kinds -> engine -> rulebook: import late

            if kind not in KIND_HANDLERS:
                raise GraphscaleError(f"rule {name!r} in {source}: kind {kind!r} is not one of "
                                      f"{sorted(KIND_HANDLERS)}")
            if not targets:
                raise GraphscaleError(f"rule {name!r} in {source} names no targets")
            rule = Rule(name, kind, tuple(targets), raw, source)
            self.rules.append(rule)
            for t in targets:
                self._index(t, rule)

    def _index(self, target: str, rule: Rule) -> None:
        if target.startswith("method:"):
            self.methods[target.removeprefix("method:")] = rule
            return
        if target.startswith("module:"):
            obj = _resolve(target.removeprefix("module:"))
            if isinstance(obj, type):
                self.modules.insert(0, (obj, rule))  # newest first, so user rules win
            else:
                self.unresolved.append(target)
            return
        obj = _resolve_aten(target) if target.startswith("aten.") else _resolve(target)
        if obj is None:
            self.unresolved.append(target)  # e.g. an op this torch version does not have
        else:
            self.functions[obj] = rule

    def lookup_function(self, fn: Any) -> Rule | None:
        rule = self.functions.get(fn)
        if rule is None and isinstance(fn, torch._ops.OpOverload):
            rule = self.functions.get(fn.overloadpacket)  # "aten.add" covers every overload
        return rule

    def lookup_method(self, name: str) -> Rule | None:
        return self.methods.get(name)

    def lookup_module(self, module: torch.nn.Module) -> Rule | None:
        for cls, rule in self.modules:
            if type(module) is cls:
                return rule
        for cls, rule in self.modules:
            if isinstance(module, cls):
                return rule
        return None


def _resolve(path: str) -> Any:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _resolve_aten(path: str) -> Any:
    _, name, *overload = path.split(".")
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return None
    if not overload:
        return packet
    return getattr(packet, overload[0], None)
