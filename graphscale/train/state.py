"""Carry optimizer state from a narrow model's optimizer to its widened copy's μP optimizer.

A warm start from a checkpoint mid-training must keep the optimizer's memory too, or the first wide steps
differ from the narrow ones. Since the wide gradient is ``g' = E(g) / (c M)`` (DESIGN.md §2), a state entry
that is linear in the gradient (SGD's ``momentum_buffer``, Adam's ``exp_avg``) becomes ``E(buf) / (c M)``
and one that is quadratic (``exp_avg_sq``, ``max_exp_avg_sq``) becomes ``E(buf) / (c M)**2``. Step counters
and other scalars are copied -- as new tensors, because torch optimizers update ``step`` in place and a
shared tensor would let the wide optimizer advance the narrow one's clock.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphscale.record import ParamScaling
from graphscale.train._common import (
    RecordError,
    RecordLike,
    resolve_record,
    scalings_for,
    source_optimizer,
    unwrap_module,
)

#: State entries that are linear in the gradient (momentum-like): scaled by ``1 / (c M)``.
FIRST_MOMENT_KEYS = frozenset({"momentum_buffer", "exp_avg", "grad_avg"})
#: State entries that are quadratic in the gradient (second moments): scaled by ``1 / (c M)**2``.
SECOND_MOMENT_KEYS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg"})


def widen_state_entry(key: str, value: Any, scaling: ParamScaling, like: torch.Tensor) -> Any:
    """The wide value of one optimizer state entry ``key`` of the source parameter (a new object).

    ``like`` is the wide parameter: replicated entries take its device. Raises :class:`RecordError` for a
    parameter-shaped entry whose law is unknown, rather than guessing.

    Example:
        >>> from graphscale.record import AxisReplication
        >>> s = ParamScaling("b", "b", (2,), (4,), (AxisReplication.atomic(2, 2),), 1.0, 2, 1)
        >>> widen_state_entry("exp_avg", torch.tensor([2., 4.]), s, torch.zeros(4))
        tensor([1., 1., 2., 2.])
    """
    cm = float(scaling.copy_scale) * float(scaling.total_mult)
    if not isinstance(value, torch.Tensor):
        return value  # python scalars (and None momentum buffers) are immutable: sharing is safe
    if key in FIRST_MOMENT_KEYS:
        return scaling.replicate(value).to(like.device).div_(cm)
    if key in SECOND_MOMENT_KEYS:
        return scaling.replicate(value).to(like.device).div_(cm * cm)
    if value.numel() == 1 and tuple(value.shape) != tuple(scaling.narrow_shape):
        return value.detach().clone()  # step counters and other scalars: a new tensor, never shared
    raise RecordError(
        f"optimizer state entry {key!r} of {scaling.source} has shape {tuple(value.shape)} and no known "
        f"width law (known: {sorted(FIRST_MOMENT_KEYS)} scale by 1/(cM), {sorted(SECOND_MOMENT_KEYS)} by "
        "1/(cM)^2)"
    )


def transfer_optimizer_state(
    small: nn.Module,
    small_opt: torch.optim.Optimizer | dict[str, Any],
    wide: nn.Module,
    wide_opt: torch.optim.Optimizer,
    *,
    record: RecordLike | None = None,
) -> None:
    """Set ``wide_opt``'s state to the widened state of ``small_opt`` (in place on ``wide_opt`` only).

    For each parameter of ``wide`` that ``wide_opt`` optimises, the record names its source parameter of
    ``small``; that parameter's state in ``small_opt`` is widened entry by entry (see the module doc) and
    *replaces* whatever ``wide_opt`` held, so it works before or after ``wide_opt`` has stepped. A source
    parameter without state (never stepped) clears the wide one's state. ``small_opt`` is never mutated
    (its state is read without touching its defaultdict). Hyperparameters are not copied: build
    ``wide_opt`` with :func:`graphscale.train.mup_optimizer` from the same hyperparameters.

    The record is ``wide.graphscale`` unless ``record=`` is given (a record or a saved record's path).
    ``small_opt`` may also be a saved ``small_opt.state_dict()`` (see
    :class:`graphscale.train._common.SavedOptimizerState` for how its entries are matched to ``small``).

    Example:
        >>> wide = graphscale.widen(small, (x,), multiplier=2)                  # doctest: +SKIP
        >>> wide_opt = mup_optimizer(wide, torch.optim.Adam, lr=1e-3)          # doctest: +SKIP
        >>> transfer_optimizer_state(small, small_opt, wide, wide_opt)         # doctest: +SKIP
    """
    record = resolve_record(wide, record)
    small_opt, small = source_optimizer(small, small_opt), unwrap_module(small)  # saved dicts; wrappers
    in_opt = {id(p) for g in wide_opt.param_groups for p in g["params"]}
    wide_named = [(n, p) for n, p in wide.named_parameters() if id(p) in in_opt]
    scalings = scalings_for(wide_named, record)
    # remove_duplicate=False: a source named by its tied alias must still resolve.
    small_params = dict(small.named_parameters(remove_duplicate=False))
    missing = sorted({s.source for s in scalings.values() if s.source not in small_params})
    if missing:
        raise RecordError(f"source parameters not found in the small model: {', '.join(missing)}")

    for name, p in wide_named:
        s = scalings[name]
        src = small_params[s.source]
        if src not in small_opt.state:  # `in`, not indexing: indexing a defaultdict would mutate small_opt
            wide_opt.state.pop(p, None)
            continue
        src_state = small_opt.state[src]
        if tuple(src.shape) != tuple(s.narrow_shape):
            raise RecordError(
                f"{s.source} has shape {tuple(src.shape)} but the record expects {tuple(s.narrow_shape)}"
            )
        wide_opt.state[p] = {k: widen_state_entry(k, v, s, p) for k, v in src_state.items()}
