"""Coordinate check: the RMS of every activation over a few training steps, across widths.

The standard μP sanity check (Yang et al., "Tensor Programs V", and microsoft/mup's ``coord_check``)
trains models of several widths for a few steps and plots the size of each activation against width:
under a correct parametrisation the curves are flat, under a wrong one they grow or shrink with width.
For graphscale the check is sharper: the wide models are *widenings of one small model*, and with zero
noise the μP optimizer keeps them exactly equivalent to it, so every activation's RMS is the same at
every width to rounding error (RMS is invariant under adjacent replication), while naive copying trained
with the plain optimizer drifts apart. The recorder is one :class:`torch.fx.Interpreter` subclass, so
every node of the graph is measured, not only module outputs.

One exception is by design: where a compensation lives in a weight (``c = k**-1/2 / m_in`` on ``W_q`` when
the user's class fixes the attention formula, docs/math.md §4), the node between that weight and the
formula's own scale is ``k**-1/2`` times the narrow one; only the scaled result is invariant. Such nodes
can be left out of :meth:`CoordCheckResult.spread` with ``exclude``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphscale.record import ParamScaling, WideningRecord
from graphscale.train.optim import mup_optimizer

MODES = ("mup", "naive")


class RMSRecorder(fx.Interpreter):
    """Runs a GraphModule and records the RMS of every floating-point tensor a node produces.

    Placeholders (the inputs, equal at every width) and ``get_attr`` nodes (parameters, whose size μP
    deliberately changes with width) are skipped; the ``output`` node repeats its argument and is skipped
    too. Autograd flows through as in a normal forward, so the result can be backpropagated.
    """

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.rms: dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        # Nodes whose output widening deliberately rescales (a sum over a width axis, followed by the
        # inserted 1/k) are not coordinates of the narrow model: widen marks them, and they are skipped.
        if n.op in ("call_function", "call_method", "call_module") and isinstance(result, torch.Tensor) \
                and result.is_floating_point() and result.numel() > 0 and "graphscale" not in n.meta:
            self.rms[n.name] = float(result.detach().double().pow(2).mean().sqrt())
        return result


@dataclass
class CoordCheckResult:
    """``rms[mode][node][i][t]``: RMS of ``node`` at width ``widths[i]`` in the forward before step ``t``."""

    widths: list[int]
    steps: int
    rms: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)

    def spread(self, mode: str, exclude: Sequence[str] = ()) -> float:
        """Worst relative spread across widths, ``(max - min) / mean``, over all nodes (but ``exclude``)
        and steps.

        About 1e-15 for zero-noise μP widenings in float64; O(1) for naive copying after a step or two.
        """
        worst = 0.0
        for node, per_width in self.rms[mode].items():
            if node in exclude:
                continue
            for t in range(self.steps):
                vals = [w[t] for w in per_width if t < len(w) and math.isfinite(w[t])]
                if len(vals) < 2:
                    continue
                mean = sum(vals) / len(vals)
                if mean > 0:
                    worst = max(worst, (max(vals) - min(vals)) / mean)
        return worst

    def to_dict(self) -> dict[str, Any]:
        return {"widths": self.widths, "steps": self.steps, "rms": self.rms,
                "spread": {m: self.spread(m) for m in self.rms}}

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def plot(self, path: str | Path) -> Path:
        """One panel per (mode, step): RMS against width on log axes, one line per node.

        Uses matplotlib's Agg canvas directly (imported here), so it never touches a global backend.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        modes = list(self.rms)
        fig = Figure(figsize=(3.2 * self.steps, 2.8 * len(modes)), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(modes), self.steps, squeeze=False)
        for r, mode in enumerate(modes):
            for t in range(self.steps):
                ax = axes[r][t]
                for node, per_width in self.rms[mode].items():
                    ys = [w[t] if t < len(w) else math.nan for w in per_width]
                    ax.plot(self.widths, ys, marker=".", linewidth=0.8, label=node)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"{mode}, step {t}", fontsize=9)
                ax.set_xlabel("width multiplier", fontsize=8)
                if t == 0:
                    ax.set_ylabel("activation RMS", fontsize=8)
        fig.suptitle(f"coordinate check (spread: {', '.join(f'{m} {self.spread(m):.2g}' for m in modes)})")
        path = Path(path)
        fig.savefig(path, dpi=110)
        return path


def identity_record(model: nn.Module) -> WideningRecord:
    """A record that widens nothing (``c = M = 1`` everywhere): multiplier 1 of a coord check."""
    params = {}
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        params[n] = ParamScaling(n, n, tuple(t.shape), tuple(t.shape), (None,) * t.ndim, 1.0, 1, 1,
                                 is_buffer=not isinstance(t, nn.Parameter))
    return WideningRecord(params, {})


def _default_widen(model: nn.Module, k: int, example_inputs: tuple) -> nn.Module:
    import graphscale  # lazy: the engine is not needed when the caller brings its own widen_fn

    return graphscale.widen(model, example_inputs, multiplier=k)


def _trace(model: nn.Module, inputs: tuple) -> fx.GraphModule:
    from graphscale.capture import capture  # its fx tracer proxies buffers (causal-mask slicing)

    return capture(model, inputs, tracer="fx").gm


def _as_tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def coord_check(
    make_model: Callable[[], nn.Module],
    widths: Sequence[int],
    example_inputs_fn: Callable[[int], Any],
    *,
    steps: int = 3,
    loss_fn: Callable[[Any, int], torch.Tensor] | None = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.SGD,
    hparams: dict[str, Any] | None = None,
    widen_fn: Callable[[nn.Module, int, tuple], nn.Module] | None = None,
    modes: Sequence[str] = MODES,
    out_dir: str | Path | None = None,
    name: str = "coord_check",
) -> CoordCheckResult:
    """Widen one small model to each multiplier in ``widths``, train a few steps, record activation RMS.

    ``make_model()`` builds the small (trained or initialised) model, once. ``example_inputs_fn(t)``
    returns the inputs of step ``t`` (a tensor or a tuple; step 0's also trace the model). ``loss_fn(out,
    t)`` defaults to ``out.pow(2).mean()``. ``widen_fn(small, k, example_inputs)`` defaults to
    ``graphscale.widen(small, example_inputs, multiplier=k)`` and must return a module carrying its record
    (``module.graphscale``); multiplier 1 is the small model itself. Mode ``"mup"`` trains with
    :func:`~graphscale.train.mup_optimizer` and ``"naive"`` with ``optimizer_cls`` as is, both with
    ``hparams`` (default ``{"lr": 0.1}``). With ``out_dir`` the data is saved as ``<name>.json`` and the
    plot as ``<name>.png``.

    Example:
        >>> res = coord_check(lambda: MLP(64), [1, 2, 4, 8], lambda t: torch.randn(32, 10),
        ...                   out_dir="runs")                                   # doctest: +SKIP
        >>> res.spread("mup") < 1e-6 < res.spread("naive")                      # doctest: +SKIP
        True
    """
    hparams = dict(hparams or {"lr": 0.1})
    loss_fn = loss_fn or (lambda out, t: out.pow(2).mean())
    widen_fn = widen_fn or _default_widen
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown coord-check modes {unknown}; choose from {MODES}")
    small = make_model()
    inputs0 = _as_tuple(example_inputs_fn(0))
    result = CoordCheckResult(list(widths), steps, {m: {} for m in modes})
    for i, k in enumerate(widths):
        for mode in modes:
            if k == 1 and widen_fn is not _default_widen:
                wide = copy.deepcopy(small)
                wide.graphscale = identity_record(wide)
            else:  # graphscale.widen(..., multiplier=1) is the small model as a graph, with its record
                wide = widen_fn(copy.deepcopy(small), k, inputs0)
            record = wide.graphscale
            gm = wide if isinstance(wide, fx.GraphModule) else _trace(wide, inputs0)
            # Optimise the traced module's parameters: symbolic_trace shares them with `wide`, and a
            # GraphModule built by widen is `wide` itself.
            opt = (mup_optimizer(gm, optimizer_cls, record=record, **hparams) if mode == "mup"
                   else optimizer_cls(gm.parameters(), **hparams))
            gm.train()
            for t in range(steps):
                rec = RMSRecorder(gm)
                out = rec.run(*_as_tuple(example_inputs_fn(t)))
                for node, v in rec.rms.items():
                    series = result.rms[mode].setdefault(node, [[] for _ in widths])
                    series[i].append(v)
                opt.zero_grad()
                loss_fn(out, t).backward()
                opt.step()
    for per_node in result.rms.values():  # a node missing at some width: pad so every series has `steps`
        for per_width in per_node.values():
            for w in per_width:
                w.extend([math.nan] * (steps - len(w)))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.save_json(out / f"{name}.json")
        result.plot(out / f"{name}.png")
    return result
