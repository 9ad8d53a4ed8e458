"""μP initialisation of a model built from scratch at a width relative to a smaller base.

μP (Yang & Hu) initialises, relative to a base width where the standard init is tuned:

* hidden weights (width on fan-in and fan-out): std ``base_std * m_in**-1/2`` -- the usual fan-in law;
* input weights (fixed fan-in): ``base_std``, unchanged;
* readout weights (fixed fan-out): ``base_std / m_in`` -- one power of width smaller than the standard
  parametrisation, so the output does not blow up as width grows -- or zero (``readout_zero``);
* vectors (biases, norm gains) and tensors without a width axis: as the module constructed them.

The classes are read from the record (:func:`graphscale.train.noise.weight_kind`, the same rules the noise
schemes use), so any architecture the engine understands is covered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from graphscale.laws import INIT_STD_POWER
from graphscale.record import WideningRecord
from graphscale.train._common import resolve_record, scalings_for, tensor_blocks
from graphscale.train.noise import weight_kind


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt()) if t.numel() else 0.0


def mup_init_(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    base: nn.Module | Mapping[str, int] | None = None,
    record: WideningRecord | None = None,
    readout_zero: bool = False,
    std: float | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Re-initialise ``model``'s weights in place by μP relative to ``base``; return ``model``.

    The record (each weight's ``m_in`` and class) is ``record`` if given, else
    ``graphscale.relative_record(model, example_inputs, base)``. ``base_std``, the std a weight would have
    at the base width, is:

    * ``std`` if given -- every hidden/input/readout weight is then redrawn from ``N(0, (std*f)**2)``,
      with ``f`` the μP factor of its class (see the module doc);
    * otherwise, if ``base`` is a module, the RMS of the base's matching parameter (so pass a freshly
      constructed base: its default init *is* the base init); the wide weight keeps its own draw, rescaled
      to RMS ``base_std * f`` -- the distribution's shape (uniform, normal, ...) is kept;
    * otherwise (``base`` a dict of multipliers, or only ``record`` given), the wide weight's own default
      init is assumed fan-in scaled, as torch's ``Linear``/``Conv`` defaults are (``std ∝ fan_in**-1/2``),
      so ``base_std = rms * m_in**1/2``: hidden and input weights are left as they are and the readout is
      scaled by ``m_in**-1/2``. A module whose default init ignores fan-in (GPT-2's ``N(0, 0.02)``) should
      pass ``std=`` or a base module instead.

    Example:
        >>> wide = MyMLP(width=1024)                                           # doctest: +SKIP
        >>> mup_init_(wide, (x,), base=MyMLP(width=128), readout_zero=True)    # doctest: +SKIP
    """
    if record is None:
        record = resolve_record(model, None, base=base, example_inputs=example_inputs)
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    scalings = scalings_for(named, record)
    base_params = dict(base.named_parameters(remove_duplicate=False)) if isinstance(base, nn.Module) else {}
    with torch.no_grad():
        # a tensor whose blocks differ in (c, M) is initialised block by block (views of it)
        for p, s in [pair for n, t in named for pair in tensor_blocks(n, t, scalings[n], "mup_init_")]:
            kind = weight_kind(s)
            if kind is None:
                continue  # vectors and fixed tensors: as constructed
            factor = float(s.fan_in_mult) ** -float(INIT_STD_POWER.get(kind, 0))  # the laws' init std
            if kind == "output" and readout_zero:
                p.zero_()
            elif std is not None:
                p.normal_(0.0, std * factor, generator=generator)
            else:
                current = _rms(p)
                if current == 0.0:
                    continue  # an all-zero init (a zero readout) has no scale to correct
                src = base_params.get(s.source)
                base_std = _rms(src) if src is not None else current * math.sqrt(s.fan_in_mult)
                p.mul_(base_std * factor / current)
    return model
