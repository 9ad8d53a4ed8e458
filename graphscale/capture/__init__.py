"""Capture: turn a user's model into an fx graph, with ``torch.fx.symbolic_trace`` or ``torch.export``.

``tracer="fx"`` keeps ``torch.nn`` modules as leaves (so a widened model still switches train/eval like
the original) and proxies buffers (so a causal mask sliced by the sequence length traces).
``tracer="export"`` runs ``torch.export.export(..., strict=False)`` and works on models fx cannot trace,
such as Hugging Face transformers 5.x. ``tracer="auto"`` tries fx, and falls back to export when fx
fails or produces a graph with a leaf module that no rule covers (``nn.MultiheadAttention``, whose
internals export lowers to ops that rules do cover).

The user's model is never modified: both frontends trace a private deep copy (so a ``forward`` that
reassigns a buffer, or runs in-place ops, changes only the copy), and the captured graph, the walk and
the widening read that copy. Captures that would not stay exact are refused with a
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

import contextlib
import copy
import inspect
import operator
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphscale.errors import TraceError, UnsupportedOpError
from graphscale.infer.rulebook import RuleBook

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
    source: torch.nn.Module | None = None  # the user's model (read-only); gm was traced from a copy of it
    private: torch.nn.Module | None = None  # the private copy that was traced (runs instead of source)
    mutated_buffers: dict[str, str] | None = None  # buffer -> graph node that updates it in place


class _BufferProxyTracer(fx.Tracer):
    # Buffers such as a causal mask are sliced by the traced sequence length: they must be proxies.
    proxy_buffer_attributes = True

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True  # so errors can name the user's source line


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
    """Trace ``model`` called on ``example_inputs``; see the module doc for the frontends and refusals.

    ``model`` itself is only read: the graph is traced from a private deep copy.
    """
    if tracer not in ("auto", "fx", "export"):
        raise TraceError(f"tracer must be 'auto', 'fx' or 'export', got {tracer!r}")
    args, kwargs = normalize_inputs(example_inputs)
    _refuse_parametrizations(model)
    cap = _capture_copy(model, args, kwargs, tracer, book)
    cap.source = model
    cap.mutated_buffers = _check_mutations(cap.gm)
    return cap


def _private_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy to trace, so that nothing tracing or running ``forward`` does reaches ``model``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return copy.deepcopy(model)
    except Exception as e:
        raise TraceError(
            f"could not deep-copy {type(model).__name__} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "graphscale traces a private copy so that your model is never modified. Make the model "
            "deep-copyable (copy.deepcopy) and try again.") from e


def _capture_copy(model: torch.nn.Module, args: tuple, kwargs: dict, tracer: Tracer,
                  book: RuleBook | None) -> Captured:
    fx_error: str | None = None
    if tracer in ("auto", "fx"):
        private = _private_copy(model)
        try:
            cap = _capture_fx(private, args, kwargs)
        except Exception as e:  # fx raises many kinds of errors on untraceable code
            if tracer == "fx":
                raise TraceError(f"torch.fx.symbolic_trace could not trace {type(model).__name__}: "
                                 f"{type(e).__name__}: {e}. Try tracer='export'.") from e
            fx_error = f"fx could not trace it ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        else:
            if book is not None:
                _check_function_rules(cap.gm, book)  # export would inline them too: refuse, no fallback
            uncovered = _uncovered_modules(cap.gm, book) if book is not None and tracer == "auto" else []
            if not uncovered:
                return cap
            fx_error = f"fx keeps {', '.join(uncovered)} as leaf modules with no rule"
    private = _private_copy(model)  # a fresh one: fx tracing may have changed the first
    try:
        cap = _capture_export(private, args, kwargs)
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
    tracer = _BufferProxyTracer()
    with _functions_as_calls(tracer):
        graph = tracer.trace(model, concrete_args=concrete or None)
    _refuse_reassigned(model)
    gm = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Graph")
    flat = _bind_placeholders(gm, model.forward, args, {k: v for k, v in kwargs.items() if k not in concrete})
    return Captured(gm, "fx", flat, args, kwargs, private=model)


_ORIGINAL_APPLY = torch.autograd.Function.__dict__["apply"]  # a classmethod object


class FunctionCall:
    """The graph target for ``SomeFunction.apply``: calls it, and is named after the Function's class
    (``pkg.mod.SomeFunction.apply``) so that rules, error messages and generated code name it rightly.
    It compares equal to ``SomeFunction.apply``, so a rule whose target is that finds it.

    Example:
        >>> call = FunctionCall(torch.autograd.Function)
        >>> call == torch.autograd.Function.apply, call.__qualname__
        (True, 'Function.apply')
    """

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.__module__ = cls.__module__
        self.__qualname__ = f"{cls.__qualname__}.apply"
        self.__name__ = f"{cls.__name__}_apply"

    def _bound(self) -> Any:
        return _ORIGINAL_APPLY.__get__(None, self.cls)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._bound()(*args, **kwargs)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FunctionCall):
            return other.cls is self.cls
        return self._bound() == other

    def __hash__(self) -> int:
        return hash(self._bound())

    def __repr__(self) -> str:
        return f"{self.__module__}.{self.__qualname__}"


def _function_class(target: Any) -> type | None:
    """The custom ``torch.autograd.Function`` subclass a graph target applies, else None."""
    return target.cls if isinstance(target, FunctionCall) else None


@contextlib.contextmanager
def _functions_as_calls(tracer: fx.Tracer) -> Iterator[None]:
    """Record ``SomeFunction.apply(x)`` as one graph call instead of inlining its forward.

    fx would run the forward on proxies and record its ops, silently dropping the custom backward
    (a gradient reversal would flip sign, a straight-through estimator would give zero gradients).
    """
    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        leaves = pytree.tree_leaves((args, kwargs))
        if any(isinstance(a, fx.Proxy) for a in leaves):
            proxy = tracer.create_proxy("call_function", FunctionCall(cls), args, kwargs)
            # errors name the user's line, not this wrapper's
            frames = [f for f in traceback.extract_stack()[:-1] if f.filename != __file__]
            proxy.node.meta["stack_trace"] = "".join(traceback.format_list(frames))
            return proxy
        return _ORIGINAL_APPLY.__get__(None, cls)(*args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        torch.autograd.Function.apply = _ORIGINAL_APPLY  # type: ignore[method-assign]


@contextlib.contextmanager
def _functions_refused() -> Iterator[None]:
    """torch.export keeps only a Function's forward: refuse any custom Function it meets."""
    seen: list[type] = []

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        seen.append(cls)
        return _ORIGINAL_APPLY.__get__(None, cls)(*args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        torch.autograd.Function.apply = _ORIGINAL_APPLY  # type: ignore[method-assign]
    if seen:
        raise UnsupportedOpError(
            f"the model calls the custom torch.autograd.Function {_describe_function(seen[0])}; torch.export "
            "keeps only its forward and would drop its backward, so the wide model's gradients would be "
            "wrong. Use tracer='fx' (which keeps Function.apply as one call) and add a rule for it, e.g. "
            f"[[rule]] name = \"{seen[0].__name__}\", kind = \"elementwise\", "
            f"targets = [\"{seen[0].__module__}.{seen[0].__qualname__}.apply\"] if it acts elementwise.")


def _describe_function(cls: type) -> str:
    try:
        where = f" ({inspect.getsourcefile(cls)}:{inspect.getsourcelines(cls)[1]})"
    except (OSError, TypeError):
        where = ""
    return f"{cls.__module__}.{cls.__qualname__}{where}"


def _check_function_rules(gm: fx.GraphModule, book: RuleBook) -> None:
    """A kept ``Function.apply`` call needs a rule saying how it relates axes; say which one to add."""
    for n in gm.graph.nodes:
        cls = _function_class(n.target) if n.op == "call_function" else None
        if cls is not None and book.lookup_function(n.target) is None:
            from graphscale.infer.engine import describe_node  # the engine imports this module

            raise UnsupportedOpError(
                f"{describe_node(n)} applies the custom torch.autograd.Function {_describe_function(cls)}. "
                "graphscale keeps it as one call so that its backward survives (inlining its forward would "
                "drop the backward), and needs a rule for it: add a [[rule]] table with targets = "
                f"[\"{cls.__module__}.{cls.__qualname__}.apply\"] and the kind that describes it "
                "(\"elementwise\" if every output element depends only on the same input element, as for "
                "a gradient reversal or a straight-through estimator) in a .toml file passed as rules=... "
                "(API) or --rules (CLI).")


def _refuse_reassigned(model: torch.nn.Module) -> None:
    """fx cannot record ``self.x = <traced value>``: the assignment would vanish from the graph."""
    for path, module in model.named_modules(remove_duplicate=False):
        for store in (module._buffers, module._parameters, module.__dict__):
            for name, value in store.items():
                if isinstance(value, fx.Proxy):
                    where = f"{path}.{name}" if path else name
                    raise TraceError(
                        f"forward reassigns {where!r} ({type(module).__name__}); fx cannot carry the "
                        "assignment into the graph, so the wide model would never update it. Update it in "
                        f"place (self.{name}.copy_(...) or .add_(...)) or use tracer='export', which records "
                        "it as a copy")


def _refuse_parametrizations(model: torch.nn.Module) -> None:
    """The graph reads a parametrized tensor, the module stores its originals: refuse, naming both."""
    from torch.nn.utils import parametrize

    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():
                kinds = ", ".join(type(p).__name__ for p in plist)
                raise UnsupportedOpError(
                    f"module {path or '(root)'!r} ({type(module).__name__}) has a parametrization "
                    f"({kinds}) on {tensor_name!r}; graphscale cannot widen parametrized tensors exactly "
                    f"(the model stores {path + '.' if path else ''}parametrizations.{tensor_name}"
                    f".original*, not {tensor_name!r}). "
                    "Remove it first (torch.nn.utils.parametrize.remove_parametrizations(module, "
                    f"{tensor_name!r})), widen, then parametrize the wide model again.")
        for hook in list(module._forward_pre_hooks.values()):
            kind = type(hook).__name__
            if kind in ("WeightNorm", "SpectralNorm"):
                fn = "weight_norm" if kind == "WeightNorm" else "spectral_norm"
                raise UnsupportedOpError(
                    f"module {path or '(root)'!r} ({type(module).__name__}) uses the hook-based {kind} "
                    f"(torch.nn.utils.{fn}); graphscale cannot widen it exactly. Remove it first "
                    f"(torch.nn.utils.remove_{fn}(module)), widen, then apply it to the wide model again.")


# Ops that return a view of their first argument: an in-place write to the view writes the base.
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "transpose", "t", "permute", "narrow", "select",
                 "detach", "expand", "expand_as", "squeeze", "unsqueeze", "flatten", "unflatten", "unfold",
                 "__getitem__", "split", "chunk", "as_strided", "diagonal", "movedim", "swapaxes", "T", "mT",
                 "data", "contiguous", "real", "imag"}


_TORCH_NAMESPACES = ("torch", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions")


def _written_operand(n: fx.Node) -> Any:
    """The argument ``n`` writes into in place, or None (in-place methods, ``out=``, mutable aten ops)."""
    if "out" in n.kwargs and n.kwargs["out"] is not None:
        return n.kwargs["out"]
    if n.op == "call_method" and str(n.target).endswith("_") and not str(n.target).startswith("_") and n.args:
        return n.args[0]
    if n.op == "call_function":
        if n.target in (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv):
            return n.args[0] if n.args else None
        if n.kwargs.get("inplace") is True and n.args:
            return n.args[0]
        schema = getattr(n.target, "_schema", None)
        if schema is not None:
            for i, a in enumerate(schema.arguments):
                written = a.alias_info is not None and a.alias_info.is_write
                if written and not a.kwarg_only and i < len(n.args):
                    return n.args[i]
        name = getattr(n.target, "__name__", "")
        module = getattr(n.target, "__module__", "")
        if name.endswith("_") and not name.startswith("_") and n.args and module in _TORCH_NAMESPACES:
            return n.args[0]
    return None


def _base_attr(x: Any) -> fx.Node | None:
    """The ``get_attr`` node a value is a view of (through view ops), else None."""
    for _ in range(64):
        if not isinstance(x, fx.Node):
            return None
        if x.op == "get_attr":
            return x
        if x.op == "call_function" and x.target is getattr and len(x.args) > 1 and x.args[1] in _VIEW_METHODS:
            x = x.args[0]
        elif x.op == "call_method" and str(x.target) in _VIEW_METHODS:
            x = x.args[0]
        elif x.op == "call_function" and (x.target is operator.getitem or getattr(x.target, "_schema", None)
                                          is not None and _is_view_op(x.target)):
            x = x.args[0]
        else:
            return None
    return None


def _is_view_op(op: Any) -> bool:
    schema = op._schema
    return bool(schema.returns) and schema.returns[0].alias_info is not None \
        and not schema.returns[0].alias_info.is_write


def _check_mutations(gm: fx.GraphModule) -> dict[str, str]:
    """Refuse in-place writes to parameters; return the buffers written in place (kept in the graph)."""
    params = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    mutated: dict[str, str] = {}
    for n in gm.graph.nodes:
        base = _base_attr(_written_operand(n))
        if base is None:
            continue
        target = str(base.target)
        if target in params:
            from graphscale.infer.engine import describe_node

            raise UnsupportedOpError(
                f"{describe_node(n)} writes into parameter {target!r} in place; every call of the model "
                "would change its weights (and graphscale's tracing would change yours). Move the update "
                "out of forward (e.g. into a training step under torch.no_grad()).")
        mutated.setdefault(target, n.name)
    return mutated


def _capture_export(model: torch.nn.Module, args: tuple, kwargs: dict) -> Captured:
    with warnings.catch_warnings(), preserved_buffers(model), _functions_refused():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, args, kwargs, strict=False)
    gm = ep.module()
    flat = pytree.tree_leaves((args, kwargs))
    n_ph = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(flat) != n_ph:
        raise TraceError(f"exported graph takes {n_ph} inputs, example inputs flatten to {len(flat)}")
    return Captured(gm, "export", flat, args, kwargs, private=model)


def _uncovered_modules(gm: fx.GraphModule, book: RuleBook) -> list[str]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            if book.lookup_module(mod) is None:
                out.append(f"{type(mod).__name__} ({n.target})")
    return out
