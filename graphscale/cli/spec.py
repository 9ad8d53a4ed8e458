"""Model specs of the command line: what ``MODEL`` (and ``--into``) may name, and which files they read.

A spec is one of

- a built-in name from :data:`graphscale.zoo.EXAMPLES` (``gpt``), optionally with builder keyword
  arguments after a colon: ``gpt:n_embd=128``, ``mlp:widths=(100,200,400)``, ``hf-gpt2:n_embd=128,n_head=4``
  (values are Python literals, read with :func:`ast.literal_eval`, never evaluated as code);
- ``path/to/file.py:callable``: **the file is executed** (imported as a fresh module), as ``python file.py``
  would; only name files you trust;
- ``package.module:callable``: the module is imported the usual way (its import runs its code);
- with ``--hf``: a Hugging Face config JSON file or a directory holding ``config.json``; the model is built
  from the config with random weights and no Python from the config directory ever runs.

The callable takes no arguments and returns ``(model, example_inputs)``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphscale.errors import ModelSpecError

__all__ = ["builtin_kwargs", "load", "load_model_spec", "spec_files"]

Example = tuple[nn.Module, tuple[Any, ...]]


def _examples() -> dict[str, Any]:
    from graphscale.zoo import EXAMPLES

    return EXAMPLES


def _spec_help() -> str:
    return (f"a built-in name ({', '.join(_examples())}) optionally with keyword arguments "
            "('gpt:n_embd=128'), 'path/to/file.py:callable' or 'package.module:callable', where the callable "
            "takes no arguments and returns (model, example_inputs)")


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: ``"a=(1,2),b=3"`` -> ``["a=(1,2)", "b=3"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def builtin_kwargs(spec: str) -> tuple[str, dict[str, Any]] | None:
    """``(name, kwargs)`` when ``spec`` is a built-in name with optional ``:key=value,...`` arguments.

    Values are Python literals (numbers, strings, tuples, booleans), parsed with :func:`ast.literal_eval`:
    nothing is evaluated. Returns ``None`` for any other spec form.

    Example:
        >>> builtin_kwargs("mlp:widths=(100,200,400),seed=1")
        ('mlp', {'widths': (100, 200, 400), 'seed': 1})
        >>> builtin_kwargs("gpt"), builtin_kwargs("pkg.mod:build")
        (('gpt', {}), None)
    """
    name, sep, rest = spec.partition(":")
    if name not in _examples():
        return None
    if not sep:
        return name, {}
    if "=" not in rest:  # 'gpt:build' would be a module spec of a module named gpt
        return None
    kwargs: dict[str, Any] = {}
    for item in _split_top_level(rest):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ModelSpecError(f"model spec {spec!r}: {item!r} is not KEY=VALUE")
        if key in kwargs:
            raise ModelSpecError(f"model spec {spec!r}: {key!r} is given twice")
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ModelSpecError(f"model spec {spec!r}: {value.strip()!r} is not a Python literal "
                                 "(a number, string, tuple or boolean)") from None
    return name, kwargs


def load_model_spec(spec: str) -> Example:
    """Build ``(model, example_inputs)`` from a spec string (see the module docstring).

    ``path/to/file.py:callable`` executes the file. The callable (``attr`` or dotted ``attr.sub``) is called
    with no arguments and must return ``(nn.Module, example_inputs)``; a single tensor or a list of inputs is
    turned into a tuple. Raises :class:`~graphscale.errors.ModelSpecError` on any failure to resolve the
    spec.

    Example:
        >>> model, inputs = load_model_spec("mlp:widths=(8,16)")
        >>> type(model).__name__, model[0].out_features, len(inputs)
        ('Sequential', 8, 1)
    """
    builtin = builtin_kwargs(spec)
    if builtin is not None:
        name, kwargs = builtin
        try:
            result = _examples()[name](**kwargs)
        except TypeError as e:  # an unknown keyword argument of the builder
            raise ModelSpecError(f"model spec {spec!r}: {e}") from None
        return _check_example(result, spec)
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ModelSpecError(f"unknown model {spec!r}; expected {_spec_help()}")
    if target.endswith(".py") or "/" in target or "\\" in target:
        file = Path(target)
        if not file.is_file():
            raise ModelSpecError(f"model spec {spec!r}: file {target!r} does not exist")
        name = f"_graphscale_spec_{abs(hash(str(file.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, file)
        if module_spec is None or module_spec.loader is None:
            raise ModelSpecError(f"model spec {spec!r}: cannot import {target!r} as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        try:
            module_spec.loader.exec_module(module)
        except Exception:
            sys.modules.pop(name, None)
            raise
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise ModelSpecError(f"model spec {spec!r}: cannot import module {target!r} ({e}); "
                                 f"expected {_spec_help()}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"model spec {spec!r}: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"model spec {spec!r}: {attr!r} is not callable")
    return _check_example(obj(), spec)


def _check_example(result: Any, spec: str) -> Example:
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ModelSpecError(f"model spec {spec!r} returned {type(result).__name__}, "
                             "expected a pair (model, example_inputs)")
    model, inputs = result
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec {spec!r}: the model is a {type(model).__name__}, not an nn.Module")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, list):
        inputs = tuple(inputs)
    if not isinstance(inputs, tuple):
        raise ModelSpecError(f"model spec {spec!r}: example_inputs is a {type(inputs).__name__}, "
                             "expected a tuple of positional inputs")
    return model, inputs


def load(spec: str, hf: bool = False) -> Example:
    """``(model, example_inputs)`` for a CLI spec: an HF config path with ``hf=True``, else a model spec.

    Example:
        >>> model, inputs = load("gpt:n_embd=32,n_layer=1")
        >>> model.transformer.wte.weight.shape
        torch.Size([65, 32])
    """
    if hf:
        from graphscale.zoo import hf_from_config

        return hf_from_config(spec)
    return load_model_spec(spec)


def spec_files(spec: str, hf: bool = False) -> list[Path]:
    """The files a spec reads, so that ``--out`` can refuse to overwrite any of them.

    A ``file.py:callable`` spec reads its file; ``package.module:callable`` its module's file once imported
    (see :func:`module_file`); an HF config file itself; an HF config directory every file in it.

    Example:
        >>> spec_files("mlp")
        []
    """
    if hf:
        p = Path(spec)
        if p.is_dir():
            return [f for f in p.iterdir() if f.is_file()]
        return [p] if p.is_file() else []
    if builtin_kwargs(spec) is not None:
        return []
    target, sep, _ = spec.rpartition(":")
    if sep and (target.endswith(".py") or "/" in target or "\\" in target):
        return [Path(target)] if Path(target).is_file() else []
    file = module_file(spec)
    return [file] if file is not None else []


def module_file(spec: str) -> Path | None:
    """The source file of an already imported ``package.module:callable`` spec's module, if any.

    Example:
        >>> module_file("graphscale.zoo:mlp").name
        'zoo.py'
    """
    target, sep, _ = spec.rpartition(":")
    module = sys.modules.get(target) if sep else None
    file = getattr(module, "__file__", None)
    return Path(file) if file else None
