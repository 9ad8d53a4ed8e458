"""Carry optimizer state from a narrow model's optimizer to its widened copy's μP optimizer.

A warm start from a checkpoint mid-training must keep the optimizer's memory too, or the first wide steps
differ from the narrow ones. Each state entry's law is read from its optimizer family's entry in
:data:`graphscale.laws.FAMILIES` (docs/math.md §2): since the wide gradient is ``g' = E(g) / (c M)``, an
entry linear in the gradient (SGD's ``momentum_buffer``, Adam's ``exp_avg``) becomes ``E(buf) / (c M)``
and one quadratic in it (``exp_avg_sq``, ``max_exp_avg_sq``) ``E(buf) / (c M)**2``; an entry already in
update units (RMSprop's ``momentum_buffer``) is copied, ``E(buf)``. Step counters are copied -- as new
tensors, because torch optimizers update ``step`` in place and a shared tensor would let the wide
optimizer advance the narrow one's clock. Any other entry is refused, naming the key and the family.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from graphscale import laws
from graphscale.record import ParamScaling
from graphscale.train._common import (
    RecordError,
    RecordLike,
    like_parameter,
    resolve_record,
    scalings_for,
    source_optimizer,
    unwrap_module,
    whole,
)
from graphscale.train.optim import FAMILY_KEY, optimizer_family


def widen_state_entry(key: str, value: Any, scaling: ParamScaling, like: torch.Tensor, *,
                      family: str) -> Any:
    """The wide value of one optimizer state entry ``key`` of the source parameter (a new object).

    ``family`` (a key of :data:`graphscale.laws.FAMILIES`) gives the entry's law; ``like`` is the wide
    parameter: replicated entries take its device. Raises :class:`RecordError` naming the key and the
    family for an entry the family has no law for, rather than guessing.

    Example:
        >>> from graphscale.record import AxisReplication
        >>> s = ParamScaling("b", "b", (2,), (4,), (AxisReplication.atomic(2, 2),), 1.0, 2, 1)
        >>> widen_state_entry("exp_avg", torch.tensor([2., 4.]), s, torch.zeros(4), family="adam")
        tensor([1., 1., 2., 2.])
    """
    fam = laws.FAMILIES[family]
    if key in fam.state:
        if value is None:
            return value  # SGD keeps None before momentum starts: immutable, sharing is safe
        if not isinstance(value, torch.Tensor):
            raise RecordError(
                f"optimizer state entry {key!r} of {scaling.source} is a {type(value).__name__}, not a "
                f"tensor shaped like the parameter: the {family!r} law scales a per-entry copy, so this "
                "state cannot be widened")
        if tuple(value.shape) != tuple(scaling.narrow_shape):
            raise RecordError(
                f"optimizer state entry {key!r} of {scaling.source} has shape {tuple(value.shape)}, not the "
                f"parameter's {tuple(scaling.narrow_shape)}: the {family!r} law scales a per-entry copy, "
                "so this state cannot be widened")
        factor = float(fam.state_factor(key, float(scaling.copy_scale), float(scaling.total_mult)))
        out = scaling.replicate(whole(value))  # a sharded narrow state is gathered first
        if factor != 1.0:
            out.mul_(factor)
        return like_parameter(out, like)  # sharded like the wide parameter under FSDP2
    if key in laws.COUNTERS:
        return value.detach().clone() if isinstance(value, torch.Tensor) else value
    raise RecordError(
        f"optimizer state entry {key!r} of {scaling.source} has no width law in optimizer family {family!r} "
        f"(its laws: {sorted(fam.state)}; counters copied: {sorted(laws.COUNTERS)}). If the optimizer is "
        "another family, pass family=; otherwise register its laws with graphscale.laws.register_family"
    )


def transfer_optimizer_state(
    small: nn.Module,
    small_opt: torch.optim.Optimizer | dict[str, Any],
    wide: nn.Module,
    wide_opt: torch.optim.Optimizer,
    *,
    record: RecordLike | None = None,
    family: str | None = None,
) -> None:
    """Set ``wide_opt``'s state to the widened state of ``small_opt`` (in place on ``wide_opt`` only).

    For each parameter of ``wide`` that ``wide_opt`` optimises, the record names its source parameter of
    ``small``; that parameter's state in ``small_opt`` is widened entry by entry (see the module doc) and
    *replaces* whatever ``wide_opt`` held, so it works before or after ``wide_opt`` has stepped. A source
    parameter without state (never stepped) clears the wide one's state. ``small_opt`` is never mutated
    (its state is read without touching its defaultdict). Hyperparameters are not copied: build
    ``wide_opt`` with :func:`graphscale.train.mup_optimizer` from the same hyperparameters.

    The record is ``wide.graphscale`` unless ``record=`` is given (a record or a saved record's path).
    Each entry's law comes from the optimizer family: ``family=`` if given, else the one
    :func:`graphscale.train.mup_optimizer` recorded in the wide param group, else the wide optimizer's
    class. ``small_opt`` may also be a saved ``small_opt.state_dict()`` (see
    :class:`graphscale.train._common.SavedOptimizerState` for how its entries are matched to ``small``).

    Example:
        >>> wide = graphscale.widen(small, (x,), multiplier=2)                  # doctest: +SKIP
        >>> wide_opt = mup_optimizer(wide, torch.optim.Adam, lr=1e-3)          # doctest: +SKIP
        >>> transfer_optimizer_state(small, small_opt, wide, wide_opt)         # doctest: +SKIP
    """
    record = resolve_record(wide, record)
    small_opt, small = source_optimizer(small, small_opt), unwrap_module(small)  # saved dicts; wrappers
    # a parameter stepped block by block (mup_optimizer, docs/math.md §8) is in no group: its blocks are
    blocks_of: dict[int, list[tuple[tuple[slice, ...], torch.Tensor]]] = {}
    for p, index, shadow in getattr(wide_opt, "graphscale_blocks", ()):
        blocks_of.setdefault(id(p), []).append((index, shadow))
    in_opt = {id(p) for g in wide_opt.param_groups for p in g["params"]} | set(blocks_of)
    wide_named = [(n, p) for n, p in wide.named_parameters() if id(p) in in_opt]
    scalings = scalings_for(wide_named, record)
    # remove_duplicate=False: a source named by its tied alias must still resolve.
    small_params = dict(small.named_parameters(remove_duplicate=False))
    missing = sorted({s.source for s in scalings.values() if s.source not in small_params})
    if missing:
        raise RecordError(f"source parameters not found in the small model: {', '.join(missing)}")

    family_of_param = {}
    for group in wide_opt.param_groups:
        fam = family or group.get(FAMILY_KEY) or optimizer_family(type(wide_opt), None,
                                                                    {**wide_opt.defaults, **group})
        optimizer_family(type(wide_opt), fam)  # validates the name
        family_of_param.update({id(p): fam for p in group["params"]})
    for pid, shadows in blocks_of.items():
        family_of_param[pid] = family_of_param[id(shadows[0][1])]
    for name, p in wide_named:
        s = scalings[name]
        src = small_params[s.source]
        if src not in small_opt.state:  # `in`, not indexing: indexing a defaultdict would mutate small_opt
            for t in [p, *(shadow for _, shadow in blocks_of.get(id(p), ()))]:
                wide_opt.state.pop(t, None)
            continue
        src_state = small_opt.state[src]
        if tuple(src.shape) != tuple(s.narrow_shape):
            raise RecordError(
                f"{s.source} has shape {tuple(src.shape)} but the record expects {tuple(s.narrow_shape)}"
            )
        if id(p) in blocks_of:
            for index, shadow in blocks_of[id(p)]:
                b = next((b for b in s.blocks() if b.index == index), None)
                if b is None:
                    raise RecordError(f"{name}: the optimizer steps a block {index} that the record's blocks "
                                      "do not have; build the optimizer with the same record")
                block = replace(s, copy_scale=b.copy_scale, total_mult=b.total_mult, slice_folds=())
                entries = {k: widen_state_entry(k, v, block, p, family=family_of_param[id(p)])
                           for k, v in src_state.items()}
                wide_opt.state[shadow] = {k: v[index].clone() if _like(v, p) else v
                                          for k, v in entries.items()}
            continue
        wide_opt.state[p] = {k: widen_state_entry(k, v, s, p, family=family_of_param[id(p)])
                             for k, v in src_state.items()}


def _like(value: Any, p: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(p.shape)

