"""The width-inference walk: run the captured graph once on the example inputs, apply each node's rule.

One :class:`torch.fx.Interpreter` pass (like torch's ``ShapeProp``) computes every node's real value and,
from its rule, a :class:`~graphscale.infer.values.Info` whose dimensions are related to its inputs'. The
engine knows nothing about particular ops: it finds the rule (:mod:`graphscale.infer.rulebook`) and calls
the rule's kind (:mod:`graphscale.infer.kinds`). An op with no rule stops the walk with an error that
names the op, the node, its source line and how to add a rule.

Example:
    >>> walk = walk_graph(captured, RuleBook.load())  # doctest: +SKIP
    >>> walk.info[node].dims  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphscale.errors import GraphscaleError, UnsupportedOpError
from graphscale.infer.call import Call
from graphscale.infer.dims import DimSystem
from graphscale.infer.rulebook import Rule, RuleBook
from graphscale.infer.schema import KINDS
from graphscale.infer.values import Const, Info, Opaque, Requests, TensorInfo


@dataclass
class Walk:
    """Everything the walk learned: dimensions, each node's info, the tensors' dims, the requests."""

    ds: DimSystem
    info: dict[str, Info]
    tensor_dims: dict[str, tuple[int, ...]]  # parameter/buffer name -> its dims
    tensor_shapes: dict[str, tuple[int, ...]]
    is_param: dict[str, bool]
    aliases: dict[str, str]  # tied names -> the canonical (first) name
    requests: Requests
    input_dims: list[int] = field(default_factory=list)
    output_dims: list[int] = field(default_factory=list)
    module_rules: dict[str, Rule] = field(default_factory=dict)  # call_module target -> its rule
    node_rules: dict[str, Rule] = field(default_factory=dict)


class _Walker(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, book: RuleBook, walk: Walk) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.extra_traceback = False  # our errors already name the node and its source line
        self.book, self.walk = book, walk
        self._by_id: dict[int, str] = {}
        for name, p in gm.named_parameters(remove_duplicate=False):
            self._register(name, p, True)
        for name, b in gm.named_buffers(remove_duplicate=False):
            self._register(name, b, False)

    def _register(self, name: str, t: torch.Tensor, is_param: bool) -> None:
        canonical = self._by_id.setdefault(id(t), name)
        if canonical != name:
            self.walk.aliases[name] = canonical
            return
        w = self.walk
        w.tensor_dims[name] = tuple(w.ds.new(s, f"{name}[{i}]") for i, s in enumerate(t.shape))
        w.tensor_shapes[name] = tuple(t.shape)
        w.is_param[name] = is_param

    def tensor_info(self, name: str, t: torch.Tensor) -> TensorInfo:
        name = self._by_id.get(id(t), name)
        if name not in self.walk.tensor_dims:  # a constant tensor attribute (export lifts some)
            self._register(name, t, False)
        dims = self.walk.tensor_dims[name]
        return TensorInfo(dims, tuple(t.shape), (name, tuple(range(len(dims)))))

    def info_of(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.walk.info[a.name]
        if isinstance(a, list | tuple):
            return tuple(self.info_of(x) for x in a)
        if isinstance(a, dict):  # a dict output (fx keeps ``return {"y": y}`` as one): its axes count
            return {k: self.info_of(v) for k, v in a.items()}
        if isinstance(a, torch.Tensor):  # a tensor written into the graph: its axes are unknown
            return Opaque("(a literal argument)", "a tensor literal in the graph")
        return Const(a)

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        info = self._infer(n, result)
        self.walk.info[n.name] = info
        n.meta["graphscale_info"] = info  # per-node results live with the node, as fx passes keep theirs
        if isinstance(result, torch.Tensor):  # fx graphs carry no meta["val"]: the dtype each node computes
            n.meta["graphscale_dtype"] = result.dtype
        return result

    def _infer(self, n: fx.Node, result: Any) -> Info:
        w = self.walk
        if n.op == "placeholder":
            return self._input_info(n.name, result)
        if n.op == "get_attr":
            if isinstance(result, torch.Tensor):
                return self.tensor_info(str(n.target), result)
            return Const(result)
        if n.op == "output":
            out = self.info_of(n.args[0])
            self._refuse_opaque(n, out, "a model output")
            self._collect_outputs(out)
            return Const(None)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.fetch_attr(str(n.target)) if n.op == "call_module" else None
        rule = self._rule_for(n, module)
        w.node_rules[n.name] = rule
        if module is not None:
            w.module_rules[str(n.target)] = rule
        kind = KINDS[rule.kind]
        if not kind.tolerates_opaque:
            for a in list(n.args) + list(n.kwargs.values()):
                self._refuse_opaque(n, self.info_of(a), f"an argument of rule {rule.name!r}")
        call = Call(n, rule, result, args, kwargs, module, w.ds, w.requests, self.info_of, self.tensor_info,
                    describe_node)
        info = kind.handler(call)
        self._check(n, rule, info, result)
        return info

    def _refuse_opaque(self, n: fx.Node, info: Any, what: str) -> None:
        """A value the walk could not describe must not reach an op that relates axes (never a constant)."""
        if isinstance(info, Opaque):
            raise UnsupportedOpError(
                f"{describe_node(n)}: {what} is a value graphscale cannot describe ({info.why}, made at "
                f"node {info.node!r}), so it cannot tell how its axes relate to the width. Rewrite the "
                "model to avoid it (e.g. x.t() or x.transpose(0, 1) instead of an unusual attribute), or "
                "add a rule that describes the op that made it")
        if isinstance(info, tuple):
            for i in info:
                self._refuse_opaque(n, i, what)
        elif isinstance(info, dict):
            for i in info.values():
                self._refuse_opaque(n, i, what)

    def _check(self, n: fx.Node, rule: Rule, info: Any, result: Any) -> None:
        """A rule whose dimensions disagree with the real shapes is a bug in the rule: say which."""
        if isinstance(info, TensorInfo):
            sizes = tuple(self.walk.ds.size[d] for d in info.dims)
            if not isinstance(result, torch.Tensor) or sizes != tuple(result.shape):
                raise UnsupportedOpError(
                    f"rule {rule.name!r} ({rule.source}) gave {describe_node(n)} axes of sizes {sizes}, but "
                    f"the op returned {getattr(result, 'shape', type(result).__name__)}; the rule does "
                    "not describe this op correctly")
        elif isinstance(info, tuple) and isinstance(result, list | tuple) and len(info) == len(result):
            for i, r in zip(info, result):
                self._check(n, rule, i, r)

    def _input_info(self, name: str, value: Any) -> Info:
        if isinstance(value, torch.Tensor):
            dims = tuple(self.walk.ds.new(s, f"input {name}[{i}]") for i, s in enumerate(value.shape))
            for d in dims:
                self.walk.ds.fix(d, f"an axis of model input {name!r}")
                self.walk.input_dims.append(d)
            return TensorInfo(dims, tuple(value.shape))
        if isinstance(value, list | tuple):
            return tuple(self._input_info(f"{name}[{i}]", v) for i, v in enumerate(value))
        return Const(value)

    def _collect_outputs(self, info: Any) -> None:
        if isinstance(info, TensorInfo):
            self.walk.output_dims.extend(info.dims)
        elif isinstance(info, tuple):
            for i in info:
                self._collect_outputs(i)
        elif isinstance(info, dict):
            for i in info.values():
                self._collect_outputs(i)

    def _rule_for(self, n: fx.Node, module: torch.nn.Module | None) -> Rule:
        if n.op == "call_module":
            rule = self.book.lookup_module(module)
        elif n.op == "call_method":
            rule = self.book.lookup_method(str(n.target))
        else:
            rule = self.book.lookup_function(n.target)
        if rule is not None:
            return rule
        # naming the op is for the error only: _fn_name scans torch's namespaces (milliseconds a node)
        if n.op == "call_module":
            what = f"module {type(module).__module__}.{type(module).__qualname__}"
            target = f"module:{type(module).__module__}.{type(module).__qualname__}"
        elif n.op == "call_method":
            what, target = f"tensor method .{n.target}()", f"method:{n.target}"
        else:
            target = _fn_name(n.target)
            what = f"function {target}"
        raise UnsupportedOpError(
            f"no graphscale rule covers {what}, called at {describe_node(n)}. "
            f"Add a rule for it: a [[rule]] table with targets = [\"{target}\"] and the kind that says "
            "how it relates its inputs' axes to its outputs' (see rules/*.toml for examples), in a "
            ".toml file passed as rules=... (API) or --rules (CLI)."
        )


def describe_node(n: fx.Node) -> str:
    """``node 'linear_3' (model.py:41 in forward: y = self.fc(x))`` where the source line is known."""
    trace = n.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    where = ""
    torch_dir = os.path.dirname(torch.__file__)
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File ") and torch_dir not in lines[i]:  # the user's frame, not fx's
            code = lines[i + 1] if i + 1 < len(lines) else ""
            where = f" ({lines[i].removeprefix('File ')}: {code})"
            break
    return f"node {n.name!r}{where}"


_PUBLIC_NAMESPACES = ("torch", "torch.nn.functional", "torch.special", "torch.fft", "torch.linalg",
                      "operator", "math", "builtins")


def _fn_name(fn: Any) -> str:
    """A target string a rule can use for ``fn``: its public name where one exists (``torch.sinh``)."""
    if isinstance(fn, torch._ops.OpOverload):
        return f"aten.{fn._overloadpacket.__name__}.{fn._overloadname}"
    import importlib

    for ns in _PUBLIC_NAMESPACES:
        module = importlib.import_module(ns)
        for name in dir(module):
            if not name.startswith("_") and getattr(module, name, None) is fn:
                return f"{ns}.{name}"
    mod = getattr(fn, "__module__", None) or ""
    return f"{mod}.{getattr(fn, '__qualname__', getattr(fn, '__name__', repr(fn)))}".lstrip(".")


def walk_graph(gm: fx.GraphModule, flat_inputs: list[Any], book: RuleBook, *, meta: bool = True) -> Walk:
    """Run ``gm`` on ``flat_inputs`` (one per placeholder) and infer every node's dimensions.

    The walk needs shapes, not values. With ``meta`` it first runs on meta tensors (torch's shape
    functions, dispatched in C++: several times faster than fake tensors on a 124M model), with factory
    calls defaulting to the meta device; pass ``meta=False`` for a graph that names devices (an ATen
    graph from torch.export: its first factory call would fail there). If anything fails on meta tensors
    (a CPU tensor made with an explicit device, an op without a meta kernel, a refusal), the walk runs
    again under a fake-tensor mode, whose shapes are the same meta kernels' but which also takes real
    tensors and ops that need a fake implementation; a graph that needs real values (data-dependent ops)
    is walked for real last. An error is reported from the fake walk, or the real one. The parameters are
    swapped for stand-ins meanwhile (meta or fake tensors, or clones for the real walk): a kernel can write
    a weight in place (``nn.Embedding(max_norm=...)`` renormalizes rows), and the graph's parameters share
    storage with the user's model (see :mod:`graphscale.capture`). The meta and fake walks' buffers are
    stand-ins too (nothing to save and restore); the real walk restores them.

    Example:
        >>> gm = fx.symbolic_trace(torch.nn.Linear(3, 4))
        >>> walk = walk_graph(gm, [torch.randn(2, 3)], RuleBook.load())
        >>> walk.tensor_shapes["weight"], walk.is_param["weight"]
        ((4, 3), True)
    """
    if meta:
        with contextlib.suppress(Exception):  # the fake walk below gives the same shapes, or the error
            stand_ins = [_meta_stand_in(x) if isinstance(x, torch.Tensor) else x for x in flat_inputs]
            with _tensors_replaced(gm, _meta_stand_in, buffers=True):
                return _walk(gm, stand_ins, book, torch.device("meta"))
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in flat_inputs]
        with _tensors_replaced(gm, mode.from_tensor, buffers=True):
            return _walk(gm, fake, book, mode)
    except GraphscaleError:
        raise
    except Exception:  # an op fake tensors cannot run (data-dependent): walk with the real values
        # (inside the handler, so an error of the real walk also shows the fake walk's, as its context)
        with _tensors_replaced(gm, lambda p: p.detach().clone(), buffers=False):
            return _walk(gm, flat_inputs, book, contextlib.nullcontext())


def _meta_stand_in(t: torch.Tensor) -> torch.Tensor:
    """``t``'s shape, strides and dtype on the meta device; a parameter stays a parameter. (``empty_like``
    names no dtype, which a torch-function mode of the caller's could rewrite: a float32 buffer stays one.)"""
    m = torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
    return torch.nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else m


@contextlib.contextmanager
def _tensors_replaced(gm: fx.GraphModule, stand_in: Any, buffers: bool) -> Iterator[None]:
    """Every parameter (and buffer) of ``gm`` is ``stand_in(t)`` meanwhile (tied ones one object, Python
    attributes such as mup's ``infshape`` kept), then the originals are put back."""
    made: dict[int, torch.Tensor] = {}
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for module in gm.modules():
            for store in (module._parameters, module._buffers) if buffers else (module._parameters,):
                for name, p in list(store.items()):
                    if p is None:
                        continue
                    if id(p) not in made:
                        new = stand_in(p)
                        for attr, value in vars(p).items():
                            setattr(new, attr, value)
                        made[id(p)] = new
                    swapped.append((store, name, p))
                    store[name] = made[id(p)]
        yield
    finally:
        for store, name, p in swapped:
            store[name] = p


def _walk(gm: fx.GraphModule, inputs: list[Any], book: RuleBook, mode: Any) -> Walk:
    from graphscale.capture import preserved_buffers  # capture imports the rulebook, not the engine

    walk = Walk(DimSystem(), {}, {}, {}, {}, {}, Requests())
    # a real walk's kernels update buffers in place (BatchNorm): save them, outside the fake mode
    saved = preserved_buffers(gm) if isinstance(mode, contextlib.nullcontext) else contextlib.nullcontext()
    with torch.no_grad(), saved, mode:
        _Walker(gm, book, walk).run(*inputs, enable_io_processing=False)
    return walk
