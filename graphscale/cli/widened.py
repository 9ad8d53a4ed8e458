"""Reading back what ``graphscale widen`` wrote, into the one kind of model that computes the right function.

``graphscale widen`` writes one of two formats, named in the file's safetensors metadata
(``graphscale.format``):

- ``"module"`` (with ``--into``): the state dict of the user's own larger model, filled with
  :func:`graphscale.widen_into` (every scale folded into the weights). It loads strictly into that class, with
  ``safetensors.torch.load_model`` or :func:`load_widened`, and computes the narrow model's function.
- ``"graphmodule"`` (without ``--into``): the state dict of graphscale's wide ``torch.fx.GraphModule``. Some
  of the function lives in that graph, not in the weights (a tied readout's ``1/k``, the attention scale of a
  wider head), so these weights compute **something else** in a plain wider instance of the user's class,
  even though the names and shapes match and a strict load succeeds. :func:`load_widened` rebuilds the wide
  GraphModule from the narrow model and refuses a plain module; ``safetensors.torch.load_model`` cannot
  know and does not refuse.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import fx, nn

from graphscale.capture import TRACERS
from graphscale.errors import GraphscaleError

__all__ = ["FORMAT_GRAPHMODULE", "FORMAT_MODULE", "load_widened", "read_metadata"]

FORMAT_GRAPHMODULE = "graphmodule"
FORMAT_MODULE = "module"


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The safetensors metadata of ``path`` (empty if it has none).

    Example:
        >>> import tempfile, safetensors.torch
        >>> p = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> safetensors.torch.save_file({"x": torch.zeros(1)}, p, {"graphscale.format": "module"})
        >>> read_metadata(p)
        {'graphscale.format': 'module'}
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # OSError, or safetensors' own SafetensorError (not an OSError) for a bad header
        raise GraphscaleError(f"cannot read {path} as a safetensors file: {e}") from e


def _file_format(path: str | os.PathLike[str], meta: dict[str, str]) -> str:
    fmt = meta.get("graphscale.format")
    if fmt is None and "graphscale.multipliers" in meta:
        return FORMAT_GRAPHMODULE  # files written before the format key: always the wide GraphModule's
    if fmt not in (FORMAT_GRAPHMODULE, FORMAT_MODULE):
        raise GraphscaleError(f"{path} was not written by `graphscale widen` (no graphscale.format in its "
                              "metadata); load it with safetensors.torch.load_model if you know its model")
    return fmt


def _load_strict(model: nn.Module, path: str | os.PathLike[str]) -> None:
    import safetensors.torch

    try:
        safetensors.torch.load_model(model, str(path), strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        detail = " ".join(str(e).split())[:500]
        raise GraphscaleError(f"cannot load {path} into {type(model).__name__}: {detail}") from e


def _is_wide_graph(model: Any) -> bool:
    return isinstance(model, fx.GraphModule) and hasattr(model, "graphscale")


def load_widened(model_or_spec: str | nn.Module | tuple[nn.Module, Any], path: str | os.PathLike[str],
                 *, hf: bool | None = None, rules: Any = None) -> nn.Module:
    """Load a file written by ``graphscale widen`` into the model that computes the intended function.

    For a ``graphmodule``-format file (``widen`` without ``--into``), ``model_or_spec`` is the **narrow**
    model: a spec string (``"gpt"``, ``"file.py:build"``, an HF config path; ``hf`` defaults to what the file
    records), a ``(narrow_model, example_inputs)`` pair, or a wide GraphModule already made by
    :func:`graphscale.widen`. The wide GraphModule is rebuilt with the multipliers and options recorded in
    the file, the weights are loaded strictly, and it is returned. A plain ``nn.Module`` (e.g. your own class
    built wider) is refused with :class:`~graphscale.errors.GraphscaleError`: it would load, but compute a
    different function.

    For a ``module``-format file (``widen --into``), ``model_or_spec`` is the larger model, or its spec; the
    weights are loaded strictly into it. A wide GraphModule is refused (the scales would be applied twice).

    A spec string is loaded as the command line loads it: ``file.py:callable`` executes that file. A file
    written with ``--rules`` needs the same ``rules=`` here (its metadata names them; they are not loaded
    from the file's say-so).

    Example:
        >>> import tempfile, graphscale
        >>> from graphscale.cli import main
        >>> p = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> main(["widen", "gpt:n_embd=32,n_layer=1", "--out", p])  # doctest: +ELLIPSIS
        widened ...
        0
        >>> type(load_widened("gpt:n_embd=32,n_layer=1", p)).__name__
        'WideGPT'
        >>> from graphscale import zoo
        >>> load_widened(zoo.gpt(n_embd=64, n_layer=1)[0], p)
        Traceback (most recent call last):
        ...
        graphscale.errors.GraphscaleError: ... holds the weights of graphscale's wide GraphModule ...
    """
    meta = read_metadata(path)
    fmt = _file_format(path, meta)
    if fmt == FORMAT_MODULE:
        if isinstance(model_or_spec, str):
            from graphscale.cli.spec import load

            model_or_spec, _ = load(model_or_spec, hf=bool(hf))
        if isinstance(model_or_spec, tuple):
            model_or_spec = model_or_spec[0]
        if _is_wide_graph(model_or_spec):
            raise GraphscaleError(
                f"{path} holds the state dict of a plain larger model (written by `graphscale widen --into`, "
                "scales folded into the weights); loading it into graphscale's wide GraphModule would apply "
                "them twice. Load it into the larger model instead.")
        if not isinstance(model_or_spec, nn.Module):
            raise GraphscaleError("load_widened: expected a model or a spec, got "
                                  f"{type(model_or_spec).__name__}")
        _load_strict(model_or_spec, path)
        return model_or_spec
    if _is_wide_graph(model_or_spec):
        _load_strict(model_or_spec, path)
        return model_or_spec
    if isinstance(model_or_spec, nn.Module):
        raise GraphscaleError(
            f"{path} holds the weights of graphscale's wide GraphModule (written by `graphscale widen` "
            f"without --into): in a plain {type(model_or_spec).__name__} they would compute a different "
            "function (a tied readout's 1/k and the attention scale live in the graph, not the weights). "
            f"Pass the narrow model's spec ({meta.get('graphscale.source', 'MODEL')!r}) or a (narrow_model, "
            "example_inputs) pair to load_widened, or write a file for your class with `graphscale widen "
            "MODEL --into LARGER --out FILE`.")
    import graphscale

    if isinstance(model_or_spec, str):
        from graphscale.cli.spec import load

        if hf is None:
            hf = meta.get("graphscale.hf") == "true"
        model, inputs = load(model_or_spec, hf=hf)
    elif isinstance(model_or_spec, tuple) and len(model_or_spec) == 2:
        model, inputs = model_or_spec
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    else:
        raise GraphscaleError(f"load_widened: expected a spec, a (model, example_inputs) pair or a wide "
                              f"GraphModule, got {type(model_or_spec).__name__}")
    try:
        multipliers = json.loads(meta["graphscale.multipliers"])
        options = json.loads(meta.get("graphscale.options", "{}"))
    except (KeyError, ValueError) as e:
        raise GraphscaleError(f"{path}: its graphscale metadata is damaged ({e})") from e
    allowed = {"tracer": TRACERS, "heads": ("fixed", "grow"), "outputs": ("fixed", "width")}
    if not isinstance(options, dict) or any(options[k] not in allowed.get(k, ()) for k in options):
        raise GraphscaleError(f"{path}: unexpected graphscale.options {options!r} in its metadata")
    if "graphscale.rules" in meta and rules is None:
        raise GraphscaleError(f"{path} was widened with --rules {meta['graphscale.rules']}; pass the same "
                              "rules= to load_widened")
    if rules is not None:
        options["rules"] = rules
    with torch.no_grad():
        wide = graphscale.widen(model, inputs, multiplier=multipliers, **options)
    _load_strict(wide, path)
    return wide
