"""Capture: turn a user's model into an fx graph, with ``torch.fx.symbolic_trace`` or ``torch.export``.

Each frontend is one module implementing :class:`~graphscale.capture.frontend.Frontend` (tracing,
argument normalization, the multiply it inserts, where slice and attention arguments sit):
:mod:`~graphscale.capture.fx_frontend` and :mod:`~graphscale.capture.export_frontend`, registered in
:data:`FRONTENDS`. The model-safety checks shared by both are in :mod:`~graphscale.capture.safety`.

``tracer="fx"`` keeps ``torch.nn`` modules as leaves (so a widened model still switches train/eval like
the original) and proxies buffers (so a causal mask sliced by the sequence length traces).
``tracer="export"`` runs ``torch.export.export(..., strict=False)`` and works on models fx cannot trace,
such as Hugging Face transformers 5.x. ``tracer="auto"`` tries fx, and falls back to export when fx
fails or produces a graph with a leaf module or a function that no rule covers (``nn.MultiheadAttention``,
``torchvision.ops.stochastic_depth``, whose internals export lowers to ops that rules do cover).

The user's model is never modified: both frontends trace a private deep copy (so a ``forward`` that
reassigns a buffer, or runs in-place ops, changes only the copy), and the captured graph, the walk and
the widening read that copy. The copy's parameters share storage with the model's (cloning every weight
cost a third of the analysis of a 124M model): tracing only reads them, a graph that writes one is
refused, a graph that may write one inside a kernel (``nn.Embedding(max_norm=...)``, a custom autograd
Function, a leaf module that is not ``torch.nn``'s) gets a copy of its own, and a trace that wrote one
anyway (through ``self.parameters()``) is refused by name.
Captures that would not stay exact are refused with a
:class:`~graphscale.errors.GraphscaleError` before anything runs:

- a custom ``torch.autograd.Function``: fx would inline its forward and drop its backward, so fx keeps
  ``Function.apply`` as one call that needs a rule; torch.export, which cannot keep it, refuses it;
- a ``forward`` that writes into a parameter in place (its effect would repeat on every wide call);
- a ``forward`` that reassigns a buffer or tensor attribute (``self.n = self.n + 1``): fx cannot carry
  the assignment, so fx refuses it (``tracer="auto"`` then uses torch.export, which keeps it as a copy);
- parametrized modules (``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``, and the
  older hook-based ``torch.nn.utils.weight_norm``), whose stored tensors are not the ones the graph uses.

In-place updates of buffers (an EMA via ``mul_``/``add_``, ``out=``) are kept in the graph; they are
listed in :attr:`Captured.mutated_buffers`.

Example:
    >>> cap = capture(torch.nn.Sequential(torch.nn.Linear(3, 4)), (torch.randn(2, 3),))
    >>> cap.frontend, [n.op for n in cap.gm.graph.nodes]  # the Linear stays a leaf module
    ('fx', ['placeholder', 'call_module', 'output'])
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.fx as fx

from graphscale.capture.export_frontend import ExportFrontend
from graphscale.capture.frontend import Captured, Frontend, get_frontend, preserved_buffers
from graphscale.capture.fx_frontend import FxFrontend
from graphscale.capture.safety import (
    FunctionCall,
    ParameterWriteError,
    _check_function_rules,
    _check_mutations,
    _refuse_parametrizations,
    function_rules,
    live_attributes,
    live_nodes,
    parameters_unchanged,
    private_copy,
    refuse_parameter_writes,
    unshare_parameters,
    writes_parameters_in_kernels,
    written_operand,
)
from graphscale.errors import TraceError, UnsupportedOpError
from graphscale.infer.rulebook import RuleBook

__all__ = ["FRONTENDS", "TRACERS", "Captured", "Frontend", "FunctionCall", "Tracer", "capture",
           "get_frontend", "live_attributes", "live_nodes", "normalize_inputs", "parameters_unchanged",
           "preserved_buffers", "private_copy", "written_operand"]

Tracer = Literal["auto", "fx", "export"]

# The registry: a new frontend is one module with a Frontend subclass, added here (and to Tracer).
FRONTENDS: dict[str, Frontend] = {f.name: f for f in (FxFrontend(), ExportFrontend())}
TRACERS: tuple[str, ...] = ("auto", *FRONTENDS)  # what ``tracer=`` / ``--tracer`` accept


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
    """Trace ``model`` called on ``example_inputs``; see the module doc for the frontends and refusals.

    ``model`` itself is only read: the graph is traced from a private deep copy.
    """
    if tracer not in TRACERS:
        raise TraceError(f"tracer must be 'auto', 'fx' or 'export', got {tracer!r}")
    args, kwargs = normalize_inputs(example_inputs)
    _refuse_parametrizations(model)
    with parameters_unchanged(model, "tracing the model"):
        cap = _capture_copy(model, args, kwargs, tracer, book)
    if writes_parameters_in_kernels(cap.gm):  # running it (verify, widen_into) must not reach the model
        unshare_parameters(cap.gm, *([cap.private] if cap.private is not None else []))
    cap.source = model
    cap.mutated_buffers = _check_mutations(cap.gm)
    return cap


def _capture_copy(model: torch.nn.Module, args: tuple, kwargs: dict, tracer: Tracer,
                  book: RuleBook | None) -> Captured:
    fx_error: str | None = None
    if tracer in ("auto", "fx"):
        private = private_copy(model, share_parameters=True)
        try:
            with refuse_parameter_writes(private, "tracing the model"):  # its storage is the user's
                cap = FRONTENDS["fx"].trace(private, args, kwargs)
        except ParameterWriteError:
            raise
        except Exception as e:  # fx raises many kinds of errors on untraceable code
            if tracer == "fx":
                raise TraceError(f"torch.fx.symbolic_trace could not trace {type(model).__name__}: "
                                 f"{type(e).__name__}: {e}. Try tracer='export'.") from e
            fx_error = f"fx could not trace it ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        else:
            if book is not None:
                _check_function_rules(cap.gm, book)  # export would inline them too: refuse, no fallback
            uncovered = _uncovered_modules(cap.gm, book) if book is not None and tracer == "auto" else []
            calls = _uncovered_calls(cap.gm, book) if book is not None and tracer == "auto" else []
            if not uncovered and not calls:
                return cap
            fx_error = "; ".join(
                ([f"fx keeps {', '.join(uncovered)} as leaf modules with no rule"] if uncovered else [])
                + ([f"fx's graph calls {', '.join(calls)}, which no rule covers"] if calls else []))
    private = private_copy(model, share_parameters=True)  # fresh: fx tracing may have changed the first
    try:
        with function_rules(book):  # a custom Function that export may inline (backward = "derivative")
            cap = FRONTENDS["export"].trace(private, args, kwargs)
    except UnsupportedOpError:
        raise
    except Exception as e:
        extra = f" ({fx_error})" if fx_error else ""
        raise TraceError(
            f"could not capture {type(model).__name__} as a graph: torch.export failed with "
            f"{type(e).__name__}: {str(e).splitlines()[0][:300]}{extra}. graphscale needs a model whose "
            "forward torch.fx or torch.export can trace for the given example inputs (no data-dependent "
            "Python control flow).") from e
    cap.fallback_reason = fx_error
    return cap


def _uncovered_calls(gm: fx.GraphModule, book: RuleBook) -> list[str]:
    """The functions and tensor methods in an fx graph that no rule covers (the walk would stop at the
    first; torch.export lowers most of them, e.g. ``torchvision.ops.stochastic_depth``, to ATen ops)."""
    out: dict[str, str] = {}  # op -> the first node calling it
    for n in gm.graph.nodes:
        if n.op == "call_function" and book.lookup_function(n.target) is None:
            name = f"{getattr(n.target, '__module__', '') or ''}.{getattr(n.target, '__name__', n.target)}"
            out.setdefault(name.lstrip("."), n.name)
        elif n.op == "call_method" and book.lookup_method(str(n.target)) is None:
            out.setdefault(f".{n.target}()", n.name)
    return [f"{op} (node {node!r})" for op, node in list(out.items())[:5]]  # enough to say why


def _uncovered_modules(gm: fx.GraphModule, book: RuleBook) -> list[str]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            if book.lookup_module(mod) is None:
                out.append(f"{type(mod).__name__} ({n.target})")
    return out
