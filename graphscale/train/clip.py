"""Gradient clipping by the base-equivalent global norm.

Clipping by the global gradient norm is not width invariant: the wide gradient of a copied parameter is
``g' = E(g) / (c M)`` (docs/math.md §2; :func:`graphscale.laws.gradient` in the table of laws), so
``||g'||_2**2 = M ||g||_2**2 / (c M)**2 = ||g||_2**2 / (c**2 M)``, and each parameter's share of the raw
wide norm changes with its own ``(c, M)``. Clipping the wide model by its raw norm therefore clips at
different steps, and by a different factor, than the narrow model -- dynamic equivalence breaks.
Weighting each parameter back, ``||g||_p = (c M) M**(-1/p) ||g'||_p``, gives exactly the norm the narrow
model would see; scaling every wide gradient by the same coefficient the narrow model uses then keeps the
pair equivalent (any common factor on ``g`` maps to the same one on ``g'``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from graphscale import laws
from graphscale.record import WideningRecord
from graphscale.train._common import resolve_record, scalings_for


def clip_grad_norm_(
    model: nn.Module,
    max_norm: float,
    *,
    record: WideningRecord | None = None,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Clip ``model``'s gradients in place by their base-equivalent ``norm_type`` norm; return that norm.

    Same contract as :func:`torch.nn.utils.clip_grad_norm_` -- every gradient is multiplied by
    ``min(1, max_norm / (norm + 1e-6))`` -- except that ``norm`` is the norm the narrow (base) model would
    have (see the module doc), so ``torch.nn.utils.clip_grad_norm_(narrow.parameters(), m)`` on the narrow
    model and ``clip_grad_norm_(wide, m)`` on its zero-noise widening clip identically. Each parameter's
    norm is weighted with its own ``(c, M)`` from the record (``model.graphscale`` unless ``record=``).
    A tensor whose blocks have different ``(c, M)`` (``ParamScaling.blocks``) is weighted block by block.
    Parameters without a gradient are skipped; tied parameters count once. Under DDP every process holds
    the same averaged gradients; under FSDP2 (``fully_shard``) each gradient is a sharded ``DTensor``,
    and DTensor's own norm and multiply reduce across the shards and scale each process's shard
    (tests/test_distributed.py).

    Example:
        >>> loss.backward()                                              # doctest: +SKIP
        >>> norm = clip_grad_norm_(wide, 1.0)  # same value as the narrow model's torch norm  # doctest: +SKIP
        >>> opt.step()                                                   # doctest: +SKIP
    """
    record = resolve_record(model, record)
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    scalings = scalings_for(named, record)
    p_ = float(norm_type)
    if not named:
        return torch.tensor(0.0)
    norms = []
    for name, p in named:
        # each block of the tensor (one, unless its parts grow differently or carry folds) with its (c, M)
        for b in scalings[name].blocks():
            m = b.total_mult
            cm = 1.0 / laws.gradient(b.copy_scale, m)  # g = (cM) g' on each copy
            grad = p.grad.detach()
            raw = torch.linalg.vector_norm(grad[b.index] if b.index else grad, p_)  # DTensor: no ()
            # ||g||_p**p = (cM)**p / M * ||g'||_p**p; for p = inf the max is unchanged by copying.
            weight = cm if math.isinf(p_) else cm * m ** (-1.0 / p_)
            norms.append(raw * weight)
    device = named[0][1].grad.device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), p_)
    if error_if_nonfinite and (total.isnan() or total.isinf()):
        raise RuntimeError(
            f"The total norm of order {p_} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    # Same arithmetic as torch: multiply even when the coefficient clamps to 1, so the two stay bitwise
    # comparable (a multiplication by exactly 1.0 is a no-op anyway).
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for _, p in named:
        p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return total
