"""The frontend protocol: what one way of tracing a model into an fx graph provides to the other stages.

A frontend (:mod:`~graphscale.capture.fx_frontend`, :mod:`~graphscale.capture.export_frontend`) traces a
model, maps the user's inputs to the graph's placeholders, and knows how its graphs spell the ops the
widen stage edits: the multiply it inserts, where a slice's bounds and an attention's scale sit. Adding
a frontend is one module with one :class:`Frontend` subclass, registered in :data:`FRONTENDS` of
:mod:`graphscale.capture`; no other stage compares frontend names.

Example:
    >>> from graphscale.capture import get_frontend
    >>> fe = get_frontend("fx")
    >>> fe.name, fe.shapes_generalize
    ('fx', True)
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx


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


@contextlib.contextmanager
def preserved_buffers(module: torch.nn.Module) -> Iterator[None]:
    """Run code that may update buffers in place (BatchNorm in train mode) without changing the model.

    Example:
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> with preserved_buffers(bn):
        ...     _ = bn(torch.randn(4, 2) + 5)
        >>> bn.running_mean.tolist()
        [0.0, 0.0]
    """
    # Restore every buffer: kernels such as batch_norm update running statistics in place without
    # bumping the tensor's version counter, so "what changed" cannot be detected cheaply.
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


class Frontend:
    """One way to capture a model as an fx graph, and how that frontend's graphs spell what widen edits.

    Subclasses set :attr:`name`, :attr:`shapes_generalize` and :attr:`multiply`, and implement
    :meth:`trace`. The argument-layout methods have defaults that read both spellings an fx graph can
    hold (Python-level calls and ATen ops); a frontend whose ops differ overrides them.
    """

    name: ClassVar[str]
    shapes_generalize: ClassVar[bool]  # the graph also runs at batch sizes / sequence lengths not traced
    multiply: ClassVar[Any]  # the call_function target of ``tensor * scalar`` in this frontend's graphs

    def trace(self, model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Captured:
        """Trace ``model(*args, **kwargs)`` (``model`` is already a private copy) into a :class:`Captured`."""
        raise NotImplementedError

    def bind_inputs(self, gm: fx.GraphModule, model: torch.nn.Module, args: tuple,
                    kwargs: dict[str, Any]) -> list[Any]:
        """Argument normalization: the values of ``gm``'s placeholders, in order, for ``model(*args,
        **kwargs)`` (what :attr:`Captured.flat_inputs` holds and ``verify`` feeds the graph)."""
        raise NotImplementedError

    def insert_multiply_after(self, graph: fx.Graph, node: fx.Node, factor: float) -> fx.Node:
        """Scale ``node``'s output by ``factor`` for all its users; return the new node.

        Example:
            >>> gm = fx.symbolic_trace(lambda x: x.sum(-1).relu())
            >>> node = next(n for n in gm.graph.nodes if n.target == "sum")
            >>> get_frontend("fx").insert_multiply_after(gm.graph, node, 0.5).args
            (sum_1, 0.5)
        """
        users = list(node.users)
        node.meta["graphscale"] = f"compensated by the next node (x{factor:.6g})"
        with graph.inserting_after(node):
            scaled = graph.call_function(self.multiply, (node, factor))
            scaled.meta["graphscale"] = "inserted multiplier"
        for u in users:
            u.replace_input_with(node, scaled)
        return scaled

    def insert_multiply_before(self, graph: fx.Graph, user: fx.Node, operand: Any, factor: float) -> fx.Node:
        """A new node ``operand * factor`` placed before ``user`` (which the caller then rewires)."""
        with graph.inserting_before(user):
            scaled = graph.call_function(self.multiply, (operand, factor))
            scaled.meta["graphscale"] = "inserted multiplier (shared parameter)"
        return scaled

    def attention_scale(self, node: fx.Node) -> Any:
        """The ``scale`` an SDPA call passes (``None``: the op's default ``1/sqrt(head_dim)``)."""
        return node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)

    def set_attention_scale(self, node: fx.Node, scale: float) -> None:
        """Pass ``scale`` to an SDPA call as the keyword (F.scaled_dot_product_attention and
        aten.scaled_dot_product_attention both accept it by name)."""
        kwargs = dict(node.kwargs)
        if len(node.args) > 6:
            node.args = tuple(node.args[:6])
        kwargs["scale"] = scale
        node.kwargs = kwargs

    def set_slice_bounds(self, node: fx.Node, index_pos: int | None, start: int, stop: int) -> None:
        """Give a slice on a width axis new bounds: ``x[..., a:b]`` (``operator.getitem``, entry
        ``index_pos`` of its index) or ``aten.slice(x, dim, start, end, step)``."""
        if index_pos is None:
            args = list(node.args) + [None] * max(0, 5 - len(node.args))
            args[2], args[3] = start, stop
            node.args = tuple(args[:max(len(node.args), 4)])
        else:
            index = node.args[1]
            items = list(index) if isinstance(index, tuple) else [index]
            old = items[index_pos]
            items[index_pos] = slice(start, stop, old.step if isinstance(old, slice) else None)
            node.args = (node.args[0], tuple(items) if isinstance(index, tuple) else items[0])


def get_frontend(name: str) -> Frontend:
    """The frontend that made a graph, by the name recorded in ``Captured.frontend`` / ``Plan.frontend``."""
    from graphscale.capture import FRONTENDS  # the registry imports the frontend modules, which import this

    try:
        return FRONTENDS[name]
    except KeyError:
        from graphscale.errors import TraceError

        raise TraceError(f"unknown frontend {name!r}; the frontends are {', '.join(FRONTENDS)}") from None


#: export's checks of a ``.to()`` operand's dtype and device as traced: they compute nothing, and kept they
#: make a dead chain look used (HF's rotary tables, which a model of only linear-attention layers never
#: reads, held ``inv_freq`` in the graph, and widen_into then demanded its narrow shape of the larger model)
_TRACE_METADATA_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)


def drop_unused_values(gm: fx.GraphModule) -> None:
    """Remove the calls whose value nothing uses and that have no effect: pure ATen ops (no mutable
    schema, no side effects, as torch judges them) and ``operator.getitem``. Models keep such code, e.g.
    BART's ``embed_positions(inputs_embeds[:, :, -1])  # needed for the shape only``: with static
    shapes the select is dead, yet walking it would fix d_model as "an axis indexed at one position".
    Export's metadata asserts on ``.to()`` go too. Modules (export's input guards), methods and other
    functions stay: an unused in-place call is not dead.

    Example:
        >>> g = fx.symbolic_trace(lambda x: (x[:, -1], x + 1)[1])
        >>> drop_unused_values(g); [n.op for n in g.graph.nodes]
        ['placeholder', 'call_function', 'output']
    """
    removed = False
    for n in reversed(gm.graph.nodes):  # reversed: a dead chain goes user first
        if n.op != "call_function" or n.users:
            continue
        pure_aten = isinstance(n.target, torch._ops.OpOverload) and not n.is_impure()
        if n.target is operator.getitem or pure_aten or n.target in _TRACE_METADATA_ASSERTS:
            gm.graph.erase_node(n)
            removed = True
    if removed:
        gm.recompile()

