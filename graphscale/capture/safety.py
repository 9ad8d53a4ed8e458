"""Model safety for capture: trace a private copy, keep custom autograd Functions whole, refuse mutations.

The user's model is never modified: both frontends trace a private deep copy (so a ``forward`` that
reassigns a buffer, or runs in-place ops, changes only the copy). Captures that would not stay exact are
refused with a :class:`~graphscale.errors.GraphscaleError` before anything runs (see
:mod:`graphscale.capture` for the list). Every frontend uses these checks; none of them depends on how
the graph was traced.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> private_copy(model) is model, private_copy(model).weight is model.weight
    (False, False)
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import operator
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from graphscale.errors import TraceError, UnsupportedOpError
from graphscale.infer.rulebook import RuleBook
from graphscale.mupcompat import deepcopy_keeping_tensor_attributes


def private_copy(model: torch.nn.Module, share_parameters: bool = False) -> torch.nn.Module:
    """A deep copy to trace, so that nothing tracing or running ``forward`` does reaches ``model``.

    ``share_parameters=True`` (what capture uses) gives the copy new ``nn.Parameter`` objects over the
    same storage as ``model``'s instead of cloning every weight: tracing and the width walk only read
    parameters (a graph that writes one is refused), and a 124M model's clone was a third of analyze.
    Everything else (buffers, attributes, submodules) is copied. Never write into such a copy's
    parameters; :func:`parameters_unchanged` refuses a capture that did.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> twin = private_copy(lin, share_parameters=True)
        >>> twin.weight is lin.weight, twin.weight.data_ptr() == lin.weight.data_ptr()
        (False, True)
    """
    memo = _detached_caches(model)  # a forward's cached non-leaf tensors, which deepcopy refuses
    if share_parameters:
        for p in model.parameters():
            if type(p) is torch.nn.Parameter:  # a subclass may carry state its own __deepcopy__ copies
                memo[id(p)] = torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return deepcopy_keeping_tensor_attributes(model, memo)  # mup's p.infshape too
    except Exception as e:
        raise TraceError(
            f"could not deep-copy {type(model).__name__} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "graphscale traces a private copy so that your model is never modified. Make the model "
            "deep-copyable (copy.deepcopy) and try again.") from e


# leaf modules outside torch.nn known to write no tensor: torch.export's input guards (generated asserts on
# the inputs' sizes; every exported graph calls them, and counting them would copy every exported model)
_READ_ONLY_MODULES = frozenset({"torch.export._unlift.GuardsFn"})


def writes_parameters_in_kernels(gm: fx.GraphModule) -> bool:
    """Whether running ``gm`` for real may write a parameter inside a kernel, where the graph shows no
    in-place op: an embedding with ``max_norm`` (it renormalizes rows in place), a custom autograd
    Function, a leaf module whose code is not ``torch.nn``'s (but export's input guards). Such a capture
    gets its own weights.

    Example:
        >>> writes_parameters_in_kernels(fx.symbolic_trace(torch.nn.Embedding(4, 2, max_norm=1.0)))
        True
    """
    for module in gm.modules():
        if getattr(module, "max_norm", None) is not None:
            return True
    for n in gm.graph.nodes:
        if n.op == "call_module":
            cls = type(gm.get_submodule(str(n.target)))
            if not cls.__module__.startswith("torch.nn.") \
                    and f"{cls.__module__}.{cls.__qualname__}" not in _READ_ONLY_MODULES:
                return True
        elif n.op == "call_function":
            if _function_class(n.target) is not None or "renorm" in str(n.target):
                return True
            if n.target in (torch.nn.functional.embedding, torch.nn.functional.embedding_bag) and \
                    any(a is not None for a in (n.kwargs.get("max_norm"), *n.args[2:3])):
                return True
    return False


def unshare_parameters(*modules: torch.nn.Module) -> None:
    """Give the parameters of ``modules`` storage of their own (one clone per shared storage), in place of
    the user's model's that :func:`private_copy` shared."""
    clones: dict[tuple[int, torch.dtype, tuple, tuple, int], torch.Tensor] = {}
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                key = (p.untyped_storage().data_ptr(), p.dtype, tuple(p.shape), tuple(p.stride()),
                       p.storage_offset())
                if key not in clones:
                    clones[key] = p.detach().clone()
                p.data = clones[key]


@contextlib.contextmanager
def parameters_unchanged(model: torch.nn.Module, what: str) -> Iterator[None]:
    """Refuse, naming the parameter, when code run meanwhile wrote into one of ``model``'s parameters in
    place (a private copy made with ``share_parameters=True`` shares their storage). In-place ops bump a
    tensor's version counter, which the copy's parameters share with ``model``'s.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> with parameters_unchanged(lin, "tracing"):
        ...     _ = lin(torch.randn(1, 2))
    """
    before = {name: p._version for name, p in model.named_parameters()}
    yield
    for name, p in model.named_parameters():
        if name in before and p._version != before[name]:
            raise TraceError(
                f"{what} wrote into parameter {name!r} in place (its forward modifies its own weights, e.g. "
                "through self.parameters()); graphscale cannot widen a model whose forward changes its "
                "weights, and the write has reached your model. Move the update out of forward (into the "
                "training step) and reload the weights.")


class ParameterWriteError(TraceError):
    """Tracing ``forward`` tried to write into one of the model's parameters (refused before the write)."""


class refuse_parameter_writes(TorchDispatchMode):
    """While active, an in-place write (any ATen op whose schema marks an argument as written, ``out=``
    included) into the storage of one of ``model``'s parameters raises :class:`ParameterWriteError`
    *before* the kernel runs. fx tracing runs ``forward``'s eager code on real tensors; a private copy made
    with ``share_parameters=True`` shares its storage with the user's model, so a ``forward`` that writes its
    weights through ``self.parameters()`` or ``.data`` (which no version counter sees) must be stopped
    before the write, not detected after it.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> with refuse_parameter_writes(lin, "tracing"):
        ...     lin.weight.data.mul_(0.5)
        Traceback (most recent call last):
        graphscale.capture.safety.ParameterWriteError: tracing tried to write into parameter 'weight' ...
    """

    def __init__(self, model: torch.nn.Module, what: str) -> None:
        super().__init__()
        self.what = what
        self.storages = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            ptr = _storage_ptr(p)
            if ptr:
                self.storages.setdefault(ptr, name)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = kwargs.get(arg.name) if arg.kwarg_only or i >= len(args) else args[i]
            for t in value if isinstance(value, (list, tuple)) else (value,):
                name = self.storages.get(_storage_ptr(t)) if isinstance(t, torch.Tensor) else None
                if name is not None:
                    raise ParameterWriteError(
                        f"{self.what} tried to write into parameter {name!r} in place ({func}; its forward "
                        "modifies its own weights, e.g. through self.parameters() or .data); refused before "
                        "the write, so your model is unchanged. graphscale cannot widen a model whose "
                        "forward changes its weights: move the update out of forward (into the training "
                        "step).")
        return func(*args, **kwargs)


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # fake, meta or otherwise storage-less tensors hold no weights
        return 0


def _detached_caches(model: torch.nn.Module) -> dict[int, Any]:
    """Copies, for ``copy.deepcopy``'s memo, of the non-leaf tensors a module keeps in plain attributes.

    A forward that caches a tensor computed from parameters (attention biases cached per device in eval
    mode) leaves one with autograd history, which ``copy.deepcopy`` refuses; the private copy gets it
    detached, as a forward under ``torch.no_grad`` would have cached it. ``model`` keeps its own.
    """
    memo: dict[int, Any] = {}

    def visit(value: Any, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            if value.grad_fn is not None and id(value) not in memo:
                memo[id(value)] = value.detach().clone()
        elif depth < 3 and isinstance(value, dict):
            for v in value.values():
                visit(v, depth + 1)
        elif depth < 3 and isinstance(value, list | tuple):
            for v in value:
                visit(v, depth + 1)

    for module in model.modules():
        for key, value in vars(module).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                visit(value, 0)
    return memo


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

    with _apply_replaced_by(apply):
        yield


@contextlib.contextmanager
def _apply_replaced_by(apply: Any) -> Iterator[None]:
    """Every ``torch.autograd.Function.apply`` call goes to ``apply(cls, *args, **kwargs)`` meanwhile."""
    torch.autograd.Function.apply = classmethod(apply)  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        torch.autograd.Function.apply = _ORIGINAL_APPLY  # type: ignore[method-assign]


#: the rules capture consults while torch.export runs (set by :func:`function_rules`)
_FUNCTION_RULES: contextvars.ContextVar[RuleBook | None] = contextvars.ContextVar("graphscale_function_rules",
                                                                                 default=None)


@contextlib.contextmanager
def function_rules(book: RuleBook | None) -> Iterator[None]:
    """While active, :func:`_functions_refused` lets through a custom Function whose rule says
    ``backward = "derivative"`` (after checking that claim numerically)."""
    token = _FUNCTION_RULES.set(book)
    try:
        yield
    finally:
        _FUNCTION_RULES.reset(token)


@contextlib.contextmanager
def _functions_refused() -> Iterator[None]:
    """torch.export keeps only a Function's forward: refuse any custom Function it meets, unless its rule
    says its backward is its forward's derivative (``backward = "derivative"``), which a gradient check on
    random inputs of the shapes met then confirms."""
    seen: dict[type, tuple] = {}

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        seen.setdefault(cls, args)
        return _ORIGINAL_APPLY.__get__(None, cls)(*args, **kwargs)

    with _apply_replaced_by(apply):
        yield
    book = _FUNCTION_RULES.get()
    for cls, args in seen.items():
        rule = book.lookup_function(FunctionCall(cls)) if book is not None else None
        if rule is None or rule.get("backward") != "derivative":
            raise UnsupportedOpError(
                f"the model calls the custom torch.autograd.Function {_describe_function(cls)}; torch.export "
                "keeps only its forward and would drop its backward, so the wide model's gradients would be "
                "wrong. Use tracer='fx' (which keeps Function.apply as one call) and add a rule for it, e.g. "
                f"[[rule]] name = \"{cls.__name__}\", kind = \"elementwise\", "
                f"targets = [\"{cls.__module__}.{cls.__qualname__}.apply\"] if it acts elementwise; if "
                "its backward is exactly its forward's derivative, add backward = \"derivative\" to that "
                "rule and torch.export may inline it.")
        problem = _derivative_mismatch(cls, args)
        if problem:
            raise UnsupportedOpError(
                f"rule {rule.name!r} ({rule.source}) says the backward of {_describe_function(cls)} is its "
                f"forward's derivative, but {problem}; remove backward = \"derivative\" from the rule and "
                "use tracer='fx'")


class _PlainContext:
    """A stand-in ``ctx`` for calling a Function's ``forward`` outside ``apply``."""

    needs_input_grad: tuple = ()

    def save_for_backward(self, *tensors: Any) -> None:
        self.saved_tensors = tensors

    def mark_dirty(self, *args: Any) -> None: ...

    def mark_non_differentiable(self, *args: Any) -> None: ...

    def set_materialize_grads(self, value: bool) -> None: ...


def _derivative_mismatch(cls: type, example: tuple) -> str:
    """Empty if ``cls``'s own backward equals autograd's derivative of its forward (float64, random inputs
    of the shapes in ``example``, 1e-8 relative), else what differs."""
    gen = torch.Generator().manual_seed(0)

    def real(a: Any) -> Any:
        if not isinstance(a, torch.Tensor):
            return a
        if a.is_floating_point():
            return torch.randn(tuple(a.shape), generator=gen, dtype=torch.float64)
        return torch.zeros(tuple(a.shape), dtype=a.dtype)

    base = [real(a) for a in example]

    def grads(call: Any) -> list[torch.Tensor | None]:
        xs = [x.clone().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
              for x in base]
        out = call(*xs)
        outs = [o for o in (out if isinstance(out, tuple | list) else (out,))
                if isinstance(o, torch.Tensor) and o.is_floating_point()]
        g = torch.Generator().manual_seed(1)
        seeds = [torch.randn(tuple(o.shape), generator=g, dtype=o.dtype) for o in outs]
        inputs = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
        return list(torch.autograd.grad(outs, inputs, seeds, allow_unused=True))

    own_setup = getattr(cls, "setup_context", None) is not torch.autograd.Function.setup_context
    try:
        custom = grads(lambda *xs: _ORIGINAL_APPLY.__get__(None, cls)(*xs))
        plain = grads(lambda *xs: cls.forward(*xs) if own_setup else cls.forward(_PlainContext(), *xs))
    except Exception as e:  # noqa: BLE001 - any failure means the claim cannot be checked
        return f"the check could not run it ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    for i, (a, b) in enumerate(zip(custom, plain)):
        if (a is None) != (b is None):
            return f"one of them gives no gradient for input {i}"
        if a is not None and b is not None and \
                not (a - b).abs().max().item() <= 1e-8 * (1 + b.abs().max().item()):
            return (f"on random inputs its gradient for input {i} differs from the derivative by "
                    f"{(a - b).abs().max().item():.3g}")
    return ""


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


def written_operand(n: fx.Node) -> Any:
    """The argument ``n`` writes into in place, or None (in-place methods, ``out=``, mutable aten ops).

    Example:
        >>> gm = fx.symbolic_trace(lambda x: x.add_(1).relu())
        >>> [written_operand(n) for n in gm.graph.nodes if n.op == "call_method"]
        [x, None]
    """
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


def _alias_chain(x: Any) -> list[fx.Node]:
    """The nodes a value is a view of, itself first, back through view ops to the first that is none."""
    chain: list[fx.Node] = []
    while isinstance(x, fx.Node) and x not in chain and len(chain) < 64:
        chain.append(x)
        if x.op == "call_function" and x.target is getattr and len(x.args) > 1 and x.args[1] in _VIEW_METHODS:
            x = x.args[0]
        elif x.op == "call_method" and str(x.target) in _VIEW_METHODS:
            x = x.args[0]
        elif x.op == "call_function" and (x.target is operator.getitem or getattr(x.target, "_schema", None)
                                          is not None and _is_view_op(x.target)):
            x = x.args[0]
        elif x.op == "call_function" and getattr(x.target, "__name__", "") in _VIEW_METHODS and x.args \
                and getattr(x.target, "__module__", "") in _TORCH_NAMESPACES:  # torch.narrow(x, ...)
            x = x.args[0]
        else:
            break
    return chain


def _base_attr(x: Any) -> fx.Node | None:
    """The ``get_attr`` node a value is a view of (through view ops), else None."""
    chain = _alias_chain(x)
    return chain[-1] if chain and chain[-1].op == "get_attr" else None


def live_attributes(gm: fx.GraphModule) -> set[str]:
    """The ``get_attr`` targets the graph's output depends on: through data edges, and through in-place
    writes whose destination may alias a live value or the model's state (an input, a parameter or a
    buffer: a batch-norm's running statistics are written, not read, in training mode, yet they are the
    model's). A destination is followed back through views to what it aliases.

    Example:
        >>> class M(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.register_buffer("table", torch.ones(3))  # read only by a dead computation
        ...         self.register_buffer("count", torch.zeros(()))  # written: model state
        ...     def forward(self, x):
        ...         scratch = self.table * x
        ...         scratch[0].copy_(x.sum())  # a write into a value nothing reads
        ...         self.count.add_(x.sum())
        ...         return x + 1
        >>> sorted(live_attributes(fx.symbolic_trace(M())))
        ['count']
    """
    return {str(n.target) for n in live_nodes(gm) if n.op == "get_attr"}


def live_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes the graph's output depends on, as :func:`live_attributes` judges them: through data
    edges, and through in-place writes into a live value or the model's state.

    Example:
        >>> def f(x):
        ...     dead = x * 2  # computed, never used
        ...     return x + 1
        >>> sorted(n.name for n in live_nodes(fx.symbolic_trace(f)))
        ['add', 'output', 'x']
    """
    live: set[fx.Node] = set()

    def mark(start: fx.Node) -> None:
        todo = [start]
        while todo:
            n = todo.pop()
            if n not in live:
                live.add(n)
                todo.extend(n.all_input_nodes)

    for n in gm.graph.nodes:
        if n.op == "output":
            mark(n)
    writes = [(n, _alias_chain(dest)) for n in gm.graph.nodes
              if n.op in ("call_function", "call_method") and (dest := written_operand(n)) is not None]
    changed = True
    while changed:
        changed = False
        for n, chain in writes:
            if n not in live and any(c in live or c.op in ("placeholder", "get_attr") for c in chain):
                mark(n)
                changed = True
    return live


def _is_view_op(op: Any) -> bool:
    schema = op._schema
    return bool(schema.returns) and schema.returns[0].alias_info is not None \
        and not schema.returns[0].alias_info.is_write


def _check_mutations(gm: fx.GraphModule) -> dict[str, str]:
    """Refuse in-place writes to parameters; return the buffers written in place (kept in the graph)."""
    params = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    mutated: dict[str, str] = {}
    for n in gm.graph.nodes:
        base = _base_attr(written_operand(n))
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


