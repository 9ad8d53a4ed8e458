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


_TRACING_FILES = ("mupcompat.py", "capture.py", "fx/proxy.py", "fx/_symbolic_trace.py")


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
    return any(i.opname == "LOAD_ASSERTION_ERROR" or (i.opname == "LOAD_GLOBAL" and i.argval == "AssertionError")
               for i in nxt)
