"""The ``torch.fx.symbolic_trace`` frontend.

``torch.nn`` modules stay leaves (so a widened model still switches train/eval like the original) and
buffers are proxies (so a causal mask sliced by the sequence length traces). A custom
``torch.autograd.Function`` is kept as one call (:class:`~graphscale.capture.safety.FunctionCall`), and
a ``forward`` that reassigns an attribute is refused. Sizes read at run time stay dynamic, so the graph
runs at other batch sizes and sequence lengths than the example's.

Example:
    >>> cap = FxFrontend().trace(torch.nn.Sequential(torch.nn.Linear(3, 4)), (torch.randn(2, 3),), {})
    >>> cap.frontend, [n.op for n in cap.gm.graph.nodes]  # the Linear stays a leaf module
    ('fx', ['placeholder', 'call_module', 'output'])
"""

from __future__ import annotations

import inspect
import linecache
import operator
import os
import sys
from typing import Any

import torch
import torch.fx as fx

from graphscale.capture.frontend import Captured, Frontend, drop_unused_values
from graphscale.capture.safety import _functions_as_calls, _refuse_reassigned
from graphscale.mupcompat import assert_in_graph, carry_param_constants

_SKIPPED_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(__file__))  # torch's and capture's


def _innermost_user_frame() -> str:
    """The innermost calling frame outside torch and graphscale.capture, formatted as a traceback entry
    (``File "m.py", line 41, in forward`` and its code line), or "" when there is none."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_SKIPPED_DIRS):
            code = linecache.getline(path, frame.f_lineno).strip()
            return f'  File "{path}", line {frame.f_lineno}, in {frame.f_code.co_name}\n    {code}\n'
        frame = frame.f_back
    return ""


class _BufferProxyTracer(fx.Tracer):
    # Buffers such as a causal mask are sliced by the traced sequence length: they must be proxies.
    proxy_buffer_attributes = True

    # Errors name the user's source line (engine.describe_node). fx's own record_stack_traces formats
    # the whole stack of every node, a third of capture's time at 124M; one frame is all that is read.
    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict[str, Any],
                    name: str | None = None, type_expr: Any = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["stack_trace"] = _innermost_user_frame()
        return node

    # μP code (graphscale.mupcompat): mup's per-parameter infshape is a trace-time constant, and an
    # `assert t <= block_size` on a traced size becomes torch._assert in the graph.
    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        return carry_param_constants(super().getattr(attr, attr_val, parameter_proxy_cache), attr_val)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return assert_in_graph(self, obj)


class FxFrontend(Frontend):
    """``torch.fx`` symbolic tracing with leaf modules and proxied buffers (see the module doc)."""

    name = "fx"
    shapes_generalize = True
    multiply = operator.mul

    def trace(self, model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Captured:
        # Concrete (non-tensor) keyword inputs are baked in, as fx does for any Python constant.
        concrete = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        tracer = _BufferProxyTracer()
        with _functions_as_calls(tracer):
            graph = tracer.trace(model, concrete_args=concrete or None)
        _refuse_reassigned(model)
        gm = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Graph")
        drop_unused_values(gm)
        flat = self.bind_inputs(gm, model, args, {k: v for k, v in kwargs.items() if k not in concrete})
        return Captured(gm, self.name, flat, args, kwargs, private=model)

    def bind_inputs(self, gm: fx.GraphModule, model: torch.nn.Module, args: tuple,
                    kwargs: dict[str, Any]) -> list[Any]:
        """Placeholders are ``forward``'s parameters: bind the inputs to its signature, by name."""
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        flat = []
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                name = str(n.target).lstrip("*")
                flat.append(values.get(name, n.args[0] if n.args else None))
        return flat
