"""Tracing models built with Microsoft's ``mup`` package (and fx-hostile idioms common in μP code).

``mup`` attaches an ``InfShape`` to every parameter (``p.infshape``, set by ``mup.set_base_shapes``) and
its ``MuReadout`` divides its input by ``self.weight.infshape.width_mult()`` in ``forward``. That number
is a per-module constant of the model, not a function of the input, so graphscale reads it at trace
time and records it in the graph as a literal:

- ``torch.fx``: the proxy of a parameter carries the real parameter's ``infshape``, so
  ``self.weight.infshape.width_mult()`` is a Python float while tracing;
- ``torch.export``: fake parameters have no ``infshape``; while exporting, every module's own
  ``width_mult()`` method (``MuReadout``, ``MuSharedReadout``) answers its real value. The model is
  restored afterwards.

GPT-2 code also checks ``assert t <= block_size`` on a traced size, which fx cannot turn into a bool:
:func:`assert_in_graph` records such an assert as ``torch._assert`` in the graph (it is checked when the
graph runs) instead of failing the trace.

Example:
    >>> lin = torch.nn.Linear(2, 3)
    >>> with trace_time_constants(lin):  # a model without mup: nothing to do
    ...     pass
"""

from __future__ import annotations

import contextlib
import copy
import dis
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx


def carry_param_constants(proxy: Any, value: Any) -> Any:
    """Give the fx proxy of a parameter the real parameter's ``infshape`` (a trace-time constant).

    Example:
        >>> carry_param_constants(1.0, torch.zeros(1))  # not a proxy: unchanged
        1.0
    """
    infshape = getattr(value, "infshape", None) if isinstance(value, torch.Tensor) else None
    if infshape is not None and isinstance(proxy, fx.Proxy):
        object.__setattr__(proxy, "infshape", infshape)
    return proxy


@contextlib.contextmanager
def trace_time_constants(model: torch.nn.Module) -> Iterator[None]:
    """While exporting, make each module's own ``width_mult()`` return its real (constant) value.

    Only modules whose class defines ``width_mult`` and whose call succeeds on the real model are touched;
    the instance attribute is removed again on exit, so the model is left as it was.

    Example:
        >>> with trace_time_constants(torch.nn.Linear(2, 2)):
        ...     pass
    """
    patched: list[torch.nn.Module] = []
    try:
        for module in model.modules():
            method = getattr(type(module), "width_mult", None)
            if not callable(method) or "width_mult" in module.__dict__:
                continue
            try:
                value = module.width_mult()
            except Exception:  # e.g. set_base_shapes was never called: leave it to fail as it would
                continue
            module.__dict__["width_mult"] = _constant(value)
            patched.append(module)
        yield
    finally:
        for module in patched:
            module.__dict__.pop("width_mult", None)


def _constant(value: Any) -> Any:
    def width_mult() -> Any:
        return value
    return width_mult


def deepcopy_keeping_tensor_attributes(model: torch.nn.Module,
                                       memo: dict[int, Any] | None = None) -> torch.nn.Module:
    """``copy.deepcopy(model)``, with the Python attributes of its parameters (mup's ``infshape``) copied too.

    ``nn.Parameter.__deepcopy__`` keeps only the data and ``requires_grad``; a mup model's ``forward``
    reads ``self.weight.infshape``, so a private copy without it could not run. ``model`` is only read.
    ``memo`` may hold copies decided beforehand (``copy.deepcopy``'s memo, keyed by ``id``).

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> lin.weight.infshape = "base shape"
        >>> twin = deepcopy_keeping_tensor_attributes(lin)
        >>> twin.weight.infshape, twin.weight is lin.weight
        ('base shape', False)
    """
    memo = {} if memo is None else memo
    twin = copy.deepcopy(model, memo)
    copies = dict(twin.named_parameters(remove_duplicate=False))
    for name, p in model.named_parameters(remove_duplicate=False):
        target = copies.get(name)
        if target is None:
            continue
        for attr, value in vars(p).items():
            if attr not in vars(target):
                setattr(target, attr, copy.deepcopy(value, memo))
    return twin


def assert_in_graph(tracer: fx.Tracer, proxy: fx.Proxy) -> bool:
    """Called for ``bool(proxy)``: inside an ``assert`` statement, record ``torch._assert(proxy)`` in the
    graph and let tracing continue; anywhere else raise fx's usual error (data-dependent control flow).
    """
    caller = inspect.currentframe()
    while caller is not None and caller.f_code.co_filename.endswith(_TRACING_FILES):
        caller = caller.f_back  # up to the user's frame, past graphscale's and fx's own
    if caller is not None and _is_assert(caller):
        tracer.create_proxy("call_function", torch._assert, (proxy, "assertion traced by graphscale"), {})
        return True
    raise fx.proxy.TraceError("symbolically traced variables cannot be used as inputs to control flow")


_TRACING_FILES = ("mupcompat.py", "capture/fx_frontend.py", "fx/proxy.py", "fx/_symbolic_trace.py")


def _is_assert(frame: Any) -> bool:
    """Whether the instruction being executed in ``frame`` is the jump of an ``assert`` statement."""
    insts = list(dis.get_instructions(frame.f_code))
    offsets = [i.offset for i in insts]
    if frame.f_lasti not in offsets:
        return False
    cur = offsets.index(frame.f_lasti)
    if "JUMP" not in insts[cur].opname or "IF_TRUE" not in insts[cur].opname:
        return False
    nxt = insts[cur + 1:cur + 3]
    return any(i.opname == "LOAD_ASSERTION_ERROR"
               or (i.opname == "LOAD_GLOBAL" and i.argval == "AssertionError") for i in nxt)


def _mup_factors(small_p: Any, large_p: Any, optimizer: str) -> dict[str, float]:
    """The hyperparameter factors mup's ``MuAdam``/``MuAdamW``/``MuSGD`` give the large tensor relative to
    the small one (each from its own ``infshape``, as ``mup.optim`` groups them)."""
    def rule(p: Any) -> dict[str, float]:
        shape, ninf = p.infshape, p.infshape.ninf()
        if optimizer == "MuSGD":
            if ninf == 1:
                return {"lr": shape.width_mult(), "weight_decay": 1 / shape.width_mult()}
            if ninf == 2:
                r = shape.fanin_fanout_mult_ratio()
                return {"lr": 1 / r, "weight_decay": r}
            return {"lr": 1.0, "weight_decay": 1.0}
        if ninf == 2:
            return {"lr": 1 / shape.width_mult(), "eps": 1.0, "weight_decay": shape.width_mult()}
        return {"lr": 1.0, "eps": 1.0, "weight_decay": 1.0}

    s, m = rule(small_p), rule(large_p)
    return {k: m[k] / s[k] for k in m}


def mup_optimizer_gaps(small: torch.nn.Module, large: torch.nn.Module, record: Any,
                       optimizer: str = "MuAdamW") -> dict[str, dict[str, tuple[float, float]]]:
    """Where the user's own ``mup`` optimizer on ``large`` departs from exact equivalence with ``small``.

    For every parameter of ``large`` carrying a mup ``infshape`` (and its source in ``small``), compare the
    factor ``mup.optim`` applies to each hyperparameter (relative to the small model) with the factor
    graphscale's law derives from the record (:func:`graphscale.train.optim.scaling_factors`). Returns
    ``{tensor: {hyperparameter: (mup's factor, graphscale's factor)}}`` for the mismatches only; empty when
    the mup optimizer is exact (or the models carry no base shapes).

    Example:
        >>> mup_optimizer_gaps(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), None)  # no mup: no gaps
        {}
    """
    from graphscale.train.optim import scaling_factors

    if optimizer not in ("MuAdam", "MuAdamW", "MuSGD"):
        raise ValueError(f"optimizer must be 'MuAdam', 'MuAdamW' or 'MuSGD', got {optimizer!r}")
    family = {"MuAdam": "adam", "MuAdamW": "adamw", "MuSGD": "sgd"}[optimizer]
    small_params = dict(small.named_parameters(remove_duplicate=False))
    gaps: dict[str, dict[str, tuple[float, float]]] = {}
    for name, p in large.named_parameters():
        if not hasattr(p, "infshape") or record is None or name not in record.params:
            continue
        s = record.params[name]
        src = small_params.get(s.source)
        if src is None or not hasattr(src, "infshape"):
            continue
        ours = scaling_factors(s, family)  # type: ignore[arg-type]
        theirs = _mup_factors(src, p, optimizer)
        off = {hp: (theirs.get(hp, 1.0), f) for hp, f in ours.items()
               if abs(theirs.get(hp, 1.0) - f) > 1e-12 * max(1.0, abs(f))}
        if off:
            gaps[name] = off
    return gaps


def mup_optimizer_note(small: torch.nn.Module, large: torch.nn.Module, record: Any) -> list[str]:
    """Lines for ``record.notes`` saying which of mup's optimizers train ``large`` exactly like ``small``.

    Example:
        >>> mup_optimizer_note(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), None)
        []
    """
    if not any(hasattr(p, "infshape") for p in large.parameters()):
        return []
    lines = []
    for optimizer in ("MuSGD", "MuAdam", "MuAdamW"):
        gaps = mup_optimizer_gaps(small, large, record, optimizer)
        if not gaps:
            lines.append(f"mup.{optimizer} on both models trains the large one exactly like the small one")
            continue
        by_hp: dict[str, dict[str, list[str]]] = {}
        for name, off in gaps.items():
            for hp, (theirs, ours) in off.items():
                key = f"x{theirs:.4g} where exactness needs x{_fraction(ours)}"
                by_hp.setdefault(hp, {}).setdefault(key, []).append(name)
        detail = "; ".join(f"{hp} {key} ({len(names)} tensors: {', '.join(names[:3])}"
                           f"{', ...' if len(names) > 3 else ''})"
                           for hp, keys in by_hp.items() for key, names in keys.items())
        unscaled = " (it leaves eps unscaled)" if set(by_hp) == {"eps"} else ""
        lines.append(f"mup.{optimizer} is not exact here{unscaled}: {detail}; the runs drift apart as far "
                     "as that hyperparameter matters (eps: where it is not negligible against "
                     f"sqrt(exp_avg_sq)). graphscale.mup_optimizer(large, torch.optim.{optimizer[2:]}, ...) "
                     "with the small model's hyperparameters is exact")
    return lines


def _fraction(x: float) -> str:
    inv = 1 / x if x else 0
    return f"1/{round(inv)}" if x < 1 and abs(inv - round(inv)) < 1e-9 else f"{x:.4g}"
