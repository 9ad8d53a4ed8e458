"""Capture: turn a user's model into an fx graph, with ``torch.fx.symbolic_trace`` or ``torch.export``.

``tracer="fx"`` keeps ``torch.nn`` modules as leaves (so a widened model still switches train/eval like
the original) and proxies buffers (so a causal mask sliced by the sequence length traces).
``tracer="export"`` runs ``torch.export.export(..., strict=False)`` and works on models fx cannot trace,
such as Hugging Face transformers 5.x. ``tracer="auto"`` tries fx, and falls back to export when fx
fails or produces a graph with a leaf module that no rule covers (``nn.MultiheadAttention``, whose
internals export lowers to ops that rules do cover). The user's model is never modified.

Example:
    >>> cap = capture(torch.nn.Linear(3, 4), (torch.randn(2, 3),))
    >>> cap.frontend, [n.op for n in cap.gm.graph.nodes]
    ('fx', ['placeholder', 'call_module', 'output'])
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphscale.errors import TraceError
from graphscale.infer.rulebook import RuleBook
from graphscale.mupcompat import assert_in_graph, carry_param_constants, trace_time_constants

Tracer = Literal["auto", "fx", "export"]


@dataclass
class Captured:
    """A traced model: the graph module, which frontend made it, and its flat example inputs."""

    gm: fx.GraphModule
    frontend: str
    flat_inputs: list[Any]
    args: tuple
    kwargs: dict[str, Any]
    fallback_reason: str | None = None


class _BufferProxyTracer(fx.Tracer):
    # Buffers such as a causal mask are sliced by the traced sequence length: they must be proxies.
    proxy_buffer_attributes = True

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True  # so errors can name the user's source line

    # μP code (graphscale.mupcompat): mup's per-parameter infshape is a trace-time constant, and an
    # `assert t <= block_size` on a traced size becomes torch._assert in the graph.
    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        return carry_param_constants(super().getattr(attr, attr_val, parameter_proxy_cache), attr_val)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return assert_in_graph(self, obj)


@contextlib.contextmanager
def preserved_buffers(module: torch.nn.Module) -> Iterator[None]:
    """Run code that may update buffers in place (BatchNorm in train mode) without changing the model."""
    # Restore every buffer: kernels such as batch_norm update running statistics in place without
    # bumping the tensor's version counter, so "what changed" cannot be detected cheaply.
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """Accept ``x``, ``(x, y)``, ``{"input_ids": ids}`` or ``((x,), {"mask": m})``."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2
            and isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], dict)):
        return example_inputs[0], dict(example_inputs[1])
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs), {}
    raise TraceError(f"example_inputs must be a tensor, a tuple of inputs, a dict of keyword inputs or "
                     f"(args, kwargs); got {type(example_inputs).__name__}")


def capture(model: torch.nn.Module, example_inputs: Any, tracer: Tracer = "auto",
            book: RuleBook | None = None) -> Captured:
    """Trace ``model`` called on ``example_inputs``; see the module doc for the frontends."""
    if tracer not in ("auto", "fx", "export"):
        raise TraceError(f"tracer must be 'auto', 'fx' or 'export', got {tracer!r}")
    args, kwargs = normalize_inputs(example_inputs)
    fx_error: str | None = None
    if tracer in ("auto", "fx"):
        try:
            cap = _capture_fx(model, args, kwargs)
        except Exception as e:  # fx raises many kinds of errors on untraceable code
            if tracer == "fx":
                raise TraceError(f"torch.fx.symbolic_trace could not trace {type(model).__name__}: "
                                 f"{type(e).__name__}: {e}. Try tracer='export'.") from e
            fx_error = f"fx could not trace it ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        else:
            uncovered = _uncovered_modules(cap.gm, book) if book is not None and tracer == "auto" else []
            if not uncovered:
                return cap
            fx_error = f"fx keeps {', '.join(uncovered)} as leaf modules with no rule"
    try:
        cap = _capture_export(model, args, kwargs)
    except Exception as e:
        extra = f" ({fx_error})" if fx_error else ""
        raise TraceError(
            f"could not capture {type(model).__name__} as a graph: torch.export failed with "
            f"{type(e).__name__}: {str(e).splitlines()[0][:300]}{extra}. graphscale needs a model whose "
            "forward torch.fx or torch.export can trace for the given example inputs (no data-dependent "
            "Python control flow).") from e
    cap.fallback_reason = fx_error
    return cap


def _bind_placeholders(gm: fx.GraphModule, forward: Any, args: tuple, kwargs: dict) -> list[Any]:
    sig = inspect.signature(forward)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    flat = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            name = str(n.target).lstrip("*")
            flat.append(values.get(name, n.args[0] if n.args else None))
    return flat


def _capture_fx(model: torch.nn.Module, args: tuple, kwargs: dict) -> Captured:
    # Concrete (non-tensor) keyword inputs are baked in, as fx does for any Python constant.
    concrete = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    graph = _BufferProxyTracer().trace(model, concrete_args=concrete or None)
    gm = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Graph")
    flat = _bind_placeholders(gm, model.forward, args, {k: v for k, v in kwargs.items() if k not in concrete})
    return Captured(gm, "fx", flat, args, kwargs)


def _capture_export(model: torch.nn.Module, args: tuple, kwargs: dict) -> Captured:
    with warnings.catch_warnings(), preserved_buffers(model), trace_time_constants(model):
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, args, kwargs, strict=False)
    gm = ep.module()
    flat = pytree.tree_leaves((args, kwargs))
    n_ph = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(flat) != n_ph:
        raise TraceError(f"exported graph takes {n_ph} inputs, example inputs flatten to {len(flat)}")
    return Captured(gm, "export", flat, args, kwargs)


def _uncovered_modules(gm: fx.GraphModule, book: RuleBook) -> list[str]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            if book.lookup_module(mod) is None:
                out.append(f"{type(mod).__name__} ({n.target})")
    return out
