"""Shared plumbing of the train-time pieces: finding a module's record and matching it to tensors.

Every train-time piece reads only the :class:`~graphscale.record.WideningRecord`; these helpers find it
(``module.graphscale``, an explicit ``record=``, or one computed against a smaller ``base``) and check
that it describes the module it is applied to, so that a stale or foreign record fails loudly instead of
silently training with the wrong factors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from graphscale.errors import GraphscaleError
from graphscale.laws import OptimizerFamilyError  # noqa: F401 - re-exported: the laws table raises it
from graphscale.record import ParamScaling, WideningRecord


class RecordError(GraphscaleError, ValueError):
    """A module has no widening record, or its record does not describe the module's tensors."""


def resolve_record(
    model: nn.Module,
    record: WideningRecord | None = None,
    *,
    base: nn.Module | Mapping[str, int] | None = None,
    example_inputs: Any = None,
) -> WideningRecord:
    """The record to use for ``model``: ``record`` if given, else from ``base``, else ``model.graphscale``.

    ``base`` (a smaller instance of the same architecture, or a dict of width-class multipliers) asks
    :func:`graphscale.relative_record` to compare ``model`` against it; that function belongs to the
    engine and is imported only when this path is used.
    """
    if record is not None:
        if base is not None:
            raise RecordError("pass either record= or base=, not both")
        return record
    if base is not None:
        try:
            from graphscale import relative_record  # lazy: the engine is optional for hand-built records
        except ImportError as e:  # pragma: no cover - depends on the engine being installed
            raise RecordError(
                "base= needs graphscale.relative_record, which this installation does not provide"
            ) from e
        if example_inputs is None:
            raise RecordError("base= needs example_inputs to trace the model and compare it with the base")
        if not isinstance(example_inputs, tuple):
            example_inputs = (example_inputs,)
        return relative_record(model, example_inputs, base)
    found = getattr(model, "graphscale", None)
    if not isinstance(found, WideningRecord):
        raise RecordError(
            f"{type(model).__name__} carries no widening record (module.graphscale): widen it with "
            "graphscale.widen, or pass record= or base="
        )
    return found


def scalings_for(
    named: Iterable[tuple[str, torch.Tensor]], record: WideningRecord, what: str = "parameters"
) -> dict[str, ParamScaling]:
    """Map each name to its :class:`ParamScaling`, checking presence and shape.

    Raises one :class:`RecordError` naming *every* missing or mis-shaped tensor, so a user fixes them in
    one go rather than one per run.
    """
    out: dict[str, ParamScaling] = {}
    missing: list[str] = []
    wrong: list[str] = []
    for name, t in named:
        s = record.params.get(name)
        if s is None:
            missing.append(name)
        elif tuple(s.wide_shape) != tuple(t.shape):
            wrong.append(f"{name} (record says {tuple(s.wide_shape)}, tensor is {tuple(t.shape)})")
        else:
            out[name] = s
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{what} not in the widening record: {', '.join(missing)}")
        if wrong:
            parts.append(f"{what} whose shape disagrees with the record: {', '.join(wrong)}")
        raise RecordError("; ".join(parts))
    return out
