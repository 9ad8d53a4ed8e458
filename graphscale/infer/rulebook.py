"""Loading the declarative rules in ``rules/*.toml`` and finding the rule for a graph node.

A rule file holds ``[[rule]]`` tables. Each names the ops it covers (``targets``) and one of the *kinds*
in :mod:`graphscale.infer.kinds` with that kind's arguments; the kind says how the op relates the axes
of its inputs and outputs. Targets are written as

- ``torch.nn.functional.linear``, ``operator.add``: a Python callable (fx ``call_function``);
- ``aten.linear.default``: an ATen overload (what ``torch.export`` produces);
- ``method:view``: a tensor method (fx ``call_method``);
- ``module:torch.nn.Linear``: an ``nn.Module`` class kept as a leaf by ``torch.fx`` (subclasses match too).

Argument references are names as the op's signature spells them (``"dim"``; ``"split_size|split_sizes"``
for alternatives; see :mod:`graphscale.infer.call`), or ``"param:weight"`` / ``"buffer:running_mean"`` /
``"attr:groups"`` (an attribute of the called module). User rules for ops whose signature cannot be read
may write ``"name@position"``: keyword ``name``, else positional ``position``.

Every rule is checked against its kind's schema (:mod:`graphscale.infer.schema`) when it loads; any
problem is a :class:`~graphscale.errors.RuleError` naming the file, the rule and the key. Targets resolve
only in ``torch``, ``operator``, ``math``, ``builtins`` and modules already imported (the model's own);
``allow_imports=True`` lets a rule file import the module it names.

Example:
    >>> book = RuleBook.load()
    >>> book.lookup_function(torch.nn.functional.linear).kind
    'einsum'
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.resources
import operator  # noqa: F401  (targets such as "operator.add" resolve through importlib)
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

import graphscale.infer.kinds  # noqa: F401  (registers the kinds and their schemas)
from graphscale.errors import GraphscaleError, RuleError
from graphscale.infer.schema import BACKWARDS, COMMON_KEYS, KINDS, convert


@dataclass(frozen=True)
class Rule:
    """One validated rule: the ops it covers, its kind, and the kind's keys parsed (``spec``, with the
    kind's defaults filled in)."""

    name: str
    kind: str
    targets: tuple[str, ...]
    spec: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    source: str = ""

    def get(self, key: str, default: Any = None) -> Any:
        """The parsed value of ``key`` (``default`` if the rule and its kind give none)."""
        value = self.spec.get(key)
        return default if value is None else value


_SAFE_ROOTS = ("torch", "operator", "math", "builtins")


@functools.cache
def _builtin_book() -> RuleBook:
    """The built-in rules, loaded once: :meth:`RuleBook.load` copies its indexes (the rules themselves
    are frozen). Its optional targets in modules not imported yet stay lazy (matched by name when a node
    calls them), so loading it earlier or later than a model's imports finds the same rules."""
    book = RuleBook(allow_imports=False)
    builtin = importlib.resources.files("graphscale.rules")
    for entry in sorted(builtin.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            book.add_text(entry.read_text(), f"graphscale.rules/{entry.name}")
    return book


class RuleBook:
    """All loaded rules, indexed by the object or name each fx/export node calls."""

    def __init__(self, allow_imports: bool = False) -> None:
        self.functions: dict[Any, Rule] = {}
        self.methods: dict[str, Rule] = {}
        self.modules: list[tuple[type, Rule]] = []
        self.unresolved: list[str] = []  # optional targets this torch version does not have
        # optional targets in a module nothing has imported (torchvision's ops next to a model that may
        # never import it): matched by their dotted name when a node calls them, never imported here
        self.lazy: dict[str, Rule] = {}
        self.rules: list[Rule] = []
        self.allow_imports = allow_imports

    @classmethod
    def load(cls, extra: str | Path | Iterable[str | Path] | None = None, *,
             allow_imports: bool = False) -> RuleBook:
        """The built-in rules plus the user's own (a ``.toml`` file, a directory of them, or a list).

        Later rules override earlier ones for the same target, so a user's rule replaces a built-in.
        ``allow_imports=True`` lets a user's target import a module nothing has imported yet.
        """
        book = cls(allow_imports)
        builtin = _builtin_book()  # parsed and validated once per process (a tenth of analyze's time)
        book.functions.update(builtin.functions)
        book.methods.update(builtin.methods)
        book.modules.extend(builtin.modules)
        book.unresolved.extend(builtin.unresolved)
        book.lazy.update(builtin.lazy)
        book.rules.extend(builtin.rules)
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
        """Validate and index the ``[[rule]]`` tables of one rule file (``source`` names it in errors)."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RuleError(f"rule file {source} is not valid TOML: {e}") from e
        unknown_top = [k for k in data if k != "rule"]
        if unknown_top:
            raise RuleError(f"rule file {source}: unknown top-level key {unknown_top[0]!r}; rules are "
                            "[[rule]] tables")
        rules = data.get("rule", [])
        if not isinstance(rules, list):
            raise RuleError(f"rule file {source}: 'rule' must be an array of tables ([[rule]])")
        for i, raw in enumerate(rules):
            rule = _validate(raw, source, i)
            for t in rule.targets:
                self._index(t, rule, optional=False)
            for t in rule.get("optional_targets", ()):
                self._index(t, rule, optional=True)
            self.rules.append(rule)

    def _index(self, target: str, rule: Rule, optional: bool) -> None:
        where = f"{rule.source}: rule {rule.name!r}: key {'optional_targets' if optional else 'targets'!r}"
        if target.startswith("method:"):
            name = target.removeprefix("method:")
            if not name.isidentifier():
                raise RuleError(f"{where}: {target!r} is not a method name")
            self.methods[name] = rule
            return
        if target.startswith("module:"):
            obj = self._resolve(target.removeprefix("module:"), where)
            if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
                self.modules.insert(0, (obj, rule))  # newest first, so user rules win
                return
        else:
            if optional and not target.startswith("aten.") and self._unimported(target):
                self.lazy[target] = rule
                return
            obj = _resolve_aten(target) if target.startswith("aten.") else self._resolve(target, where)
            if obj is not None and (callable(obj) or isinstance(obj, torch._ops.OpOverloadPacket)):
                self.functions[obj] = rule
                return
        if optional:
            self.unresolved.append(target)  # allowed to be absent (an op this torch version lacks)
            return
        what = "an nn.Module class" if target.startswith("module:") else "a callable"
        raise RuleError(f"{where}: target {target!r} does not resolve to {what} (with torch "
                        f"{torch.__version__}); fix the name, or list it under optional_targets if some "
                        "supported torch versions lack it")

    def _resolve(self, path: str, where: str) -> Any:
        """``path``'s object; imports only the safe roots and modules already imported, unless allowed."""
        parts = path.split(".")
        if not all(p.isidentifier() for p in parts):
            raise RuleError(f"{where}: target {path!r} is not a dotted name")
        for cut in range(len(parts), 0, -1):
            modname = ".".join(parts[:cut])
            module = sys.modules.get(modname)
            if module is None:
                if parts[0] not in _SAFE_ROOTS and not self.allow_imports:
                    continue
                try:
                    module = importlib.import_module(modname)
                except ImportError:
                    continue
            obj: Any = module
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                return None
            return obj
        if parts[0] not in _SAFE_ROOTS and not self.allow_imports:
            raise RuleError(
                f"{where}: target {path!r} names module {parts[0]!r}, which is not imported; graphscale "
                "resolves targets in torch, operator, math, builtins and modules the model has already "
                "imported, and does not import others (that would run their code). Import it first, or "
                "opt in with RuleBook.load(..., allow_imports=True) / --rules-allow-imports")
        return None

    def _unimported(self, path: str) -> bool:
        """Whether no prefix of ``path`` outside the safe roots is an imported module (and imports are
        not allowed), so that resolving it now would fail."""
        parts = path.split(".")
        if parts[0] in _SAFE_ROOTS or self.allow_imports:
            return False
        return not any(".".join(parts[:cut]) in sys.modules for cut in range(len(parts), 0, -1))

    def lookup_function(self, fn: Any) -> Rule | None:
        """The rule for a ``call_function`` target (an ATen overload falls back to its packet; a lazy
        optional target matches the function's ``module.qualname``)."""
        try:
            rule = self.functions.get(fn)
        except TypeError:  # an unhashable callable
            return None
        if rule is None and isinstance(fn, torch._ops.OpOverload):
            rule = self.functions.get(fn.overloadpacket)  # "aten.add" covers every overload
        if rule is None and self.lazy:
            name = f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', None)}"
            rule = self.lazy.get(name)
        return rule

    def lookup_method(self, name: str) -> Rule | None:
        """The rule for a ``call_method`` target."""
        return self.methods.get(name)

    def lookup_module(self, module: torch.nn.Module) -> Rule | None:
        """The rule for a leaf module: its exact class first, else the newest rule for a base class."""
        for cls, rule in self.modules:
            if type(module) is cls:
                return rule
        for cls, rule in self.modules:
            if isinstance(module, cls):
                return rule
        return None


def _validate(raw: Any, source: str, index: int) -> Rule:
    """Check one ``[[rule]]`` table against its kind's schema; parse its keys (see module doc)."""
    if not isinstance(raw, dict):
        raise RuleError(f"{source}: rule #{index} is not a table")
    name = raw.get("name", f"#{index}")
    if not isinstance(name, str):
        raise RuleError(f"{source}: rule #{index}: key 'name': expected a string, got {name!r}")
    where = f"{source}: rule {name!r}"
    kind_name = raw.get("kind")
    if kind_name is None:
        raise RuleError(f"{where}: key 'kind' is missing; one of {sorted(KINDS)}")
    if kind_name not in KINDS:
        close = difflib.get_close_matches(str(kind_name), KINDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RuleError(f"{where}: key 'kind': {kind_name!r} is not a kind; {hint}the kinds are "
                        f"{sorted(KINDS)}")
    kind = KINDS[kind_name]
    allowed = {**COMMON_KEYS, **kind.keys}
    spec: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RuleError(f"{where}: key {key!r} is not a key of kind {kind_name!r}; {hint}its keys are "
                            f"{sorted(set(allowed) - {'name', 'kind'})}")
        try:
            spec[key] = convert(allowed[key].type, value)
        except ValueError as e:
            raise RuleError(f"{where}: key {key!r}: {e}") from None
    for key, k in allowed.items():
        if key in spec:
            continue
        if k.required:
            raise RuleError(f"{where}: key {key!r} is missing (kind {kind_name!r} requires it: {k.doc})")
        if k.default is not None:
            spec[key] = convert(k.type, k.default) if isinstance(k.default, str | list) else k.default
    if spec.get("backward") not in BACKWARDS:
        raise RuleError(f"{where}: key 'backward': {spec.get('backward')!r} is not one of {list(BACKWARDS)}")
    if not spec.get("targets") and not spec.get("optional_targets"):
        raise RuleError(f"{where}: key 'targets' is missing or empty; the rule covers no op")
    for t in spec["targets"] + spec["optional_targets"]:
        if not t:
            raise RuleError(f"{where}: key 'targets': an empty target")
    if kind.check is not None:
        targets = list(spec["targets"] + spec["optional_targets"])
        for key, problem in kind.check(spec, targets):
            raise RuleError(f"{where}: key {key!r}: {problem}")
    spec.pop("name", None)
    spec.pop("kind", None)
    targets = spec.pop("targets")
    return Rule(name if "name" in raw else f"{source}#{index}", kind_name, targets,
                MappingProxyType(spec), source)


def _resolve_aten(path: str) -> Any:
    _, name, *overload = path.split(".")
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return None
    if not overload:
        return packet
    return getattr(packet, overload[0], None)
