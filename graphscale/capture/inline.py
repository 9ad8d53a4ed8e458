"""Inlining torch.export's grad-mode regions into the graph that contains them.

``torch.export`` turns a ``with torch.no_grad():`` (or ``torch.enable_grad()``) block inside ``forward``
into the higher-order op ``wrap_with_set_grad_enabled(enabled, submodule, *operands)``, whose body is a
separate graph. Width inference and the graph edits work on one flat graph, so the body's nodes are
copied in place of the call, between ``torch._C._set_grad_enabled(enabled)`` and a restore of the mode
read before it (``torch.is_grad_enabled()``): the same computation under the same grad mode, only
written inline. Any other use of the call's result than taking its outputs by index is refused.

Example:
    >>> class M(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(2, 2)
    ...     def forward(self, x):
    ...         with torch.no_grad():
    ...             g = self.fc(x).sigmoid()
    ...         return self.fc(x) * g
    >>> gm = torch.export.export(M(), (torch.randn(1, 2),), strict=False).module()
    >>> inline_grad_mode_regions(gm)
    1
    >>> [n for n in gm.graph.nodes if n.target is _GRAD_REGION]
    []
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from graphscale.errors import TraceError

_GRAD_REGION = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)


def inline_grad_mode_regions(gm: fx.GraphModule) -> int:
    """Replace every ``wrap_with_set_grad_enabled`` call in ``gm`` by its body (see the module doc);
    returns how many were inlined. ``gm`` is changed in place (a graph the capture made, never the user's)."""
    if _GRAD_REGION is None:
        return 0
    count = 0
    while True:  # a body may hold a region of its own: it is inlined on a later pass
        node = next((n for n in gm.graph.nodes if n.op == "call_function" and n.target is _GRAD_REGION), None)
        if node is None:
            break
        _inline(gm, node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _inline(gm: fx.GraphModule, node: fx.Node) -> None:
    enabled, sub_node, *operands = node.args
    if not isinstance(sub_node, fx.Node) or sub_node.op != "get_attr" or not isinstance(enabled, bool):
        raise TraceError(f"cannot read the grad-mode region at node {node.name!r}: expected "
                         f"(enabled, submodule, *operands), got {node.args!r}")
    sub = gm.get_submodule(str(sub_node.target))
    if not isinstance(sub, fx.GraphModule):
        raise TraceError(f"the grad-mode region at node {node.name!r} has no graph to inline")
    users = list(node.users)
    if any(u.op != "call_function" or u.target is not operator.getitem or not isinstance(u.args[1], int)
           for u in users):
        raise TraceError(f"the grad-mode region at node {node.name!r} is used other than by taking its "
                         "outputs by index; graphscale cannot inline it")
    graph = gm.graph
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(operands):
        raise TraceError(f"the grad-mode region at node {node.name!r} takes {len(placeholders)} inputs but "
                         f"is given {len(operands)}")
    env.update(zip(placeholders, operands))
    outputs: Any = None
    with graph.inserting_before(node):
        prev = graph.call_function(torch.is_grad_enabled, ())
        graph.call_function(torch._C._set_grad_enabled, (enabled,))
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                outputs = fx.map_arg(n.args[0], lambda a: env[a])
                continue
            if n.op == "get_attr":  # the body's own attribute (a nested region's graph): move it over
                name = _free_name(gm, f"{sub_node.target}_{n.target}".replace(".", "_"))
                setattr(gm, name, sub.get_submodule(str(n.target)) if _is_module(sub, str(n.target))
                        else _get_attr(sub, str(n.target)))
                env[n] = graph.get_attr(name)
                continue
            new = graph.node_copy(n, lambda a: env[a])
            env[n] = new
        graph.call_function(torch._C._set_grad_enabled, (prev,))
    outs = outputs if isinstance(outputs, list | tuple) else (outputs,)
    for u in users:
        u.replace_all_uses_with(outs[u.args[1]])
        graph.erase_node(u)
    graph.erase_node(node)
    if not sub_node.users:
        graph.erase_node(sub_node)
        if not any(n.op == "get_attr" and n.target == sub_node.target for n in graph.nodes):
            delattr(gm, str(sub_node.target))


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _is_module(root: torch.nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


def _get_attr(root: torch.nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
