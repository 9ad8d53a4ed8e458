"""The ``torch.export.export(..., strict=False)`` frontend.

It works on models fx cannot trace (Hugging Face transformers 5.x) and lowers modules to ATen ops, so
every op needs a rule. Its graphs are specialized to the example's shapes, take the inputs' pytree
leaves as placeholders and multiply with ``aten.mul.Tensor``. A custom ``torch.autograd.Function`` is
refused (export keeps only its forward); an attribute reassigned in ``forward`` is kept as a copy. A
``torch.no_grad()`` block, which export wraps in a higher-order op with its own graph, is inlined
between grad-mode switches (:mod:`graphscale.capture.inline`).

Example:
    >>> cap = ExportFrontend().trace(torch.nn.Linear(3, 4), (torch.randn(2, 3),), {})
    >>> cap.frontend, len(cap.flat_inputs)
    ('export', 1)
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphscale.capture.frontend import Captured, Frontend, drop_unused_values, preserved_buffers
from graphscale.capture.inline import inline_grad_mode_regions
from graphscale.capture.safety import _functions_refused
from graphscale.errors import TraceError
from graphscale.mupcompat import trace_time_constants


class ExportFrontend(Frontend):
    """``torch.export`` (non-strict), lowered to ATen ops (see the module doc)."""

    name = "export"
    shapes_generalize = False
    multiply = torch.ops.aten.mul.Tensor

    def trace(self, model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Captured:
        with (warnings.catch_warnings(), preserved_buffers(model), _functions_refused(),
              trace_time_constants(model)):
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, args, kwargs, strict=False)
        gm = ep.module()
        inline_grad_mode_regions(gm)  # one flat graph for inference and edits (no_grad blocks kept)
        drop_unused_values(gm)
        return Captured(gm, self.name, self.bind_inputs(gm, model, args, kwargs), args, kwargs, private=model)

    def bind_inputs(self, gm: fx.GraphModule, model: torch.nn.Module, args: tuple,
                    kwargs: dict[str, Any]) -> list[Any]:
        """Placeholders are the inputs' pytree leaves, in order."""
        flat = pytree.tree_leaves((args, kwargs))
        n_ph = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
        if len(flat) != n_ph:
            raise TraceError(f"exported graph takes {n_ph} inputs, example inputs flatten to {len(flat)}")
        return flat
