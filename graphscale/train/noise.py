"""Symmetry-breaking noise for widened models.

With zero noise the ``k`` copies of a unit receive identical updates forever and the extra width is
wasted; a small perturbation at widening time lets them separate (docs/math.md §5). Each scheme is a small
frozen dataclass with ``apply(module, record, generator)`` (in place, under ``torch.no_grad``) and
``describe(scaling)`` (the per-parameter formula shown to users). :func:`graphscale.widen` calls
``scheme.apply(wide, wide.graphscale, generator)`` right after copying.

Which tensors get noise is decided from the record alone, by :func:`weight_kind`:

* buffers, non-float tensors and tensors with fewer than 2 dims (biases, norm gains, scalars) -- none;
* ``role`` ``"vector"`` or ``"fixed"``, or no width axis at all (``M == 1``) -- none;
* **readout** (``role == "output"`` or fan-out multiplier 1): none for ``gaussian``/``spectral`` (the
  reference leaves it alone; in μP it should stay small), but ``symmetric`` perturbs it, because its
  perturbation cancels in the contraction and the function stays exact;
* **input** (fan-in multiplier ``m_in == 1``, ``M > 1``): ``gaussian`` and ``symmetric`` (the latter only
  if the tensor has a contracted width axis, which an input weight has not: so none);
* **hidden** (width on both fan-in and fan-out): every scheme.

Noise is added *inside* the copy scale: ``W' = c * (E(W) + e)``, which for a plain hidden weight
(``c = 1/m_in``) is the reference's ``(E(W) + e) / m_in`` and for an input weight (``c = 1``) its
``E(W) + e``; a weight that also carries a compensation (attention's ``k**-0.5``) keeps the same relative
noise. ``e`` has standard deviation ``std / sqrt(fan_in_wide)`` (see :func:`fan_in_wide`): the scale of a
fresh μP init, whatever the trained weight's scale is.

The ``relative`` variants (:func:`gaussian_relative`, :func:`symmetric_relative`) give ``e`` standard
deviation ``std * rms(W)`` instead, the root mean square of the narrow tensor's own entries. Training
moves a weight's scale far from its init (a small GPT trained with AdamW at lr 0.032 ends ~35x its init
RMS, at 0.008 ~12x), and a fixed absolute std then means a very different perturbation; so when the
proxy and the target bases were trained differently (each at its own tuned lr), the std that transfers
is the relative one (examples/README.md, "Noise relative to the weight's scale").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn

from graphscale.errors import GraphscaleError
from graphscale.laws import weight_role
from graphscale.record import ParamScaling, WideningRecord
from graphscale.train._common import scalings_for, tensor_blocks

WeightKind = Literal["input", "hidden", "output"]


class NoiseError(GraphscaleError, ValueError):
    """A noise scheme's strength is not a finite number >= 0."""


def _check_strength(scheme: object, name: str, value: float) -> None:
    # A NaN std would fill every weight with NaN and an infinite or negative one means nothing: refuse
    # at construction, naming the scheme, rather than corrupting a model at widening time.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise NoiseError(f"{type(scheme).__name__}: {name} must be a finite number >= 0, got {value!r}")


@runtime_checkable
class NoiseScheme(Protocol):
    """What :func:`graphscale.widen` needs from a noise scheme."""

    def apply(self, module: nn.Module, record: WideningRecord, generator: torch.Generator) -> None:
        """Perturb ``module``'s parameters in place."""
        ...

    def describe(self, scaling: ParamScaling) -> str:
        """The formula this scheme applies to the tensor described by ``scaling``."""
        ...


def weight_kind(s: ParamScaling) -> WeightKind | None:
    """``"input"``, ``"hidden"``, ``"output"`` (readout) or ``None`` (no noise ever): see the module doc.

    The role is :func:`graphscale.laws.weight_role` -- the function derive decides it with -- evaluated on
    this widening's numbers ``(M, m_in)``: a hidden weight whose fan-out class has multiplier 1 is a
    readout here. A record that calls the tensor ``vector`` or ``fixed`` (a hand-built one) is believed.

    Example:
        >>> from graphscale.record import AxisReplication
        >>> ax = AxisReplication.atomic(4, 2)
        >>> weight_kind(ParamScaling("w", "w", (4, 4), (8, 8), (ax, ax), 0.5, 4, 2, (1,), role="hidden"))
        'hidden'
    """
    if s.is_buffer or len(s.wide_shape) < 2 or s.role in ("vector", "fixed"):
        return None
    role = weight_role(len(s.wide_shape), int(s.total_mult), int(s.fan_in_mult), s.is_buffer)
    return role if role in ("input", "hidden", "output") else None  # type: ignore[return-value]


def fan_in_wide(s: ParamScaling) -> int:
    """The wide tensor's fan-in: the number of terms each output unit sums over.

    The product of the wide sizes of ``fan_in_axes``; for a convolution-like weight (more than 2 dims,
    fan-in on dim 0 or 1 only) times its kernel window, as torch's own init counts it; ``1`` for a lookup
    table (an embedding has no contracted axis: its rows are read one at a time, like a one-hot input).
    """
    if not s.fan_in_axes:
        return 1
    fan = math.prod(s.wide_shape[a] for a in s.fan_in_axes)
    if len(s.wide_shape) > 2 and all(a < 2 for a in s.fan_in_axes):
        fan *= math.prod(s.wide_shape[2:])
    return int(fan)


def _copy_expr(s: ParamScaling, inner: str) -> str:
    """``c * inner`` written the way a user reads it: ``(E(W) + e)/2`` rather than ``0.5*(E(W) + e)``."""
    c = float(s.copy_scale)
    wrapped = inner if inner == "E(W)" else f"({inner})"
    if c == 1.0:
        return inner
    if s.fan_in_mult > 1 and math.isclose(c, 1.0 / s.fan_in_mult, rel_tol=1e-12):
        return f"{wrapped}/{s.fan_in_mult}"
    return f"{c:.4g}*{wrapped}"


def _randn(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Draw on the generator's device (CPU generators are the common, reproducible case), in float64 for
    # float64 models and float32 otherwise (randn in half precision is coarse), then move to the tensor.
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device).to(like)


def _named_scalings(module: nn.Module, record: WideningRecord) -> list[tuple[torch.Tensor, ParamScaling]]:
    named = list(module.named_parameters())
    scalings = scalings_for(named, record)
    # a tensor whose blocks differ in (c, M) gets noise block by block (views), each as a tensor of its own
    return [pair for n, p in named if p.is_floating_point()
            for pair in tensor_blocks(n, p, scalings[n], "noise")]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _noise_std(p: torch.Tensor, s: ParamScaling, std: float, relative: bool) -> float:
    """The standard deviation of ``e`` for the tensor ``p`` (which holds ``c E(W)`` when noise is applied).

    Absolute: ``std / sqrt(fan_in_wide)``. Relative: ``std * rms(W)``, read off ``p`` as
    ``rms(c E(W)) / |c|`` (every entry of ``W`` has the same number of copies, so ``E`` keeps the RMS).
    """
    if not relative:
        return std / math.sqrt(fan_in_wide(s))
    c = abs(float(s.copy_scale))
    return std * float(p.detach().double().pow(2).mean().sqrt()) / c


def _std_expr(std: float, s: ParamScaling, relative: bool) -> str:
    return f"({_fmt(std)}*rms(W))^2" if relative else f"({_fmt(std)})^2/{fan_in_wide(s)}"


@dataclass(frozen=True)
class NoNoise:
    """No perturbation: the wide model stays exactly equivalent (and its copies never separate)."""

    def apply(self, module: nn.Module, record: WideningRecord, generator: torch.Generator) -> None:
        """Do nothing (the record is still checked against the module)."""
        _named_scalings(module, record)

    def describe(self, scaling: ParamScaling) -> str:
        return f"W' = {_copy_expr(scaling, 'E(W)')} (no noise)"


@dataclass(frozen=True)
class GaussianNoise:
    """The reference MLP's noise: ``W' = c (E(W) + e)``, ``e ~ N(0, std**2 / fan_in_wide)``.

    Hidden and input weights only (for an input weight ``fan_in_wide`` is ``d_in``); see the module doc.
    With ``relative``, ``e ~ N(0, (std * rms(W))**2)`` instead (the module doc says why).
    """

    std: float
    relative: bool = False

    def __post_init__(self) -> None:
        _check_strength(self, "std", self.std)

    def apply(self, module: nn.Module, record: WideningRecord, generator: torch.Generator) -> None:
        with torch.no_grad():
            for p, s in _named_scalings(module, record):
                if weight_kind(s) in ("hidden", "input") and self.std != 0:
                    e = _randn(tuple(p.shape), p, generator) * _noise_std(p, s, self.std, self.relative)
                    p.add_(e, alpha=float(s.copy_scale))

    def describe(self, scaling: ParamScaling) -> str:
        kind = weight_kind(scaling)
        if kind not in ("hidden", "input"):
            return f"W' = {_copy_expr(scaling, 'E(W)')} (no noise: {kind or 'vector/fixed'})"
        return (f"W' = {_copy_expr(scaling, 'E(W) + e')}, "
                f"e ~ N(0, {_std_expr(self.std, scaling, self.relative)})")


@dataclass(frozen=True)
class SpectralNoise:
    """The reference ResNet's noise: ``W' + t * (||W'||_2 / ||e||_2) * e`` with ``e ~ N(0, 1)``.

    Per matrix (dims 0 and 1); a weight with more dims (a convolution kernel) is perturbed separately at
    each kernel position, each slice by its own spectral norm. Hidden weights only, so the perturbation has
    spectral norm exactly ``t`` times the copied weight's.
    """

    t: float

    def __post_init__(self) -> None:
        _check_strength(self, "t", self.t)

    def apply(self, module: nn.Module, record: WideningRecord, generator: torch.Generator) -> None:
        with torch.no_grad():
            for p, s in _named_scalings(module, record):
                if weight_kind(s) != "hidden" or self.t == 0:
                    continue
                e = _randn(tuple(p.shape), p, generator)
                # (out, in, *kernel) -> (positions, out, in): one matrix per kernel position.
                w3 = p.reshape(p.shape[0], p.shape[1], -1).permute(2, 0, 1)
                e3 = e.reshape(p.shape[0], p.shape[1], -1).permute(2, 0, 1)
                ratio = torch.linalg.matrix_norm(w3, ord=2) / torch.linalg.matrix_norm(e3, ord=2)
                delta = (self.t * ratio)[:, None, None] * e3
                p.add_(delta.permute(1, 2, 0).reshape(p.shape))

    def describe(self, scaling: ParamScaling) -> str:
        if weight_kind(scaling) != "hidden":
            return f"W' = {_copy_expr(scaling, 'E(W)')} (no noise: {weight_kind(scaling) or 'vector/fixed'})"
        per = " per kernel position" if len(scaling.wide_shape) > 2 else ""
        return (f"W' = P + {_fmt(self.t)} * (||P||_2/||e||_2) * e{per}, P = {_copy_expr(scaling, 'E(W)')}, "
                "e ~ N(0, 1)")


def _width_fan_in_axes(s: ParamScaling) -> list[int]:
    return [a for a in s.fan_in_axes if s.axes[a] is not None and not s.axes[a].is_identity()]


def center_copies(e: torch.Tensor, s: ParamScaling) -> torch.Tensor:
    """Subtract from ``e`` its mean over each group of copies along every contracted width axis.

    Afterwards every group sums to zero along each of those axes, so a contraction with a replicated
    input ``E(x)`` cancels the perturbation exactly. Centering along a second axis keeps the first axis's
    group sums at zero (the mean of zero-sum rows sums to zero), so the order does not matter.
    """
    for a in _width_fan_in_axes(s):
        ax = s.axes[a]
        idx = ax.index(e.device)
        shape = list(e.shape)
        shape[a] = ax.narrow_size
        sums = torch.zeros(shape, dtype=e.dtype, device=e.device).index_add_(a, idx, e)
        counts = torch.bincount(idx, minlength=ax.narrow_size).to(e.dtype)
        view = [1] * e.ndim
        view[a] = -1
        e = e - (sums / counts.view(view)).index_select(a, idx)
    return e


@dataclass(frozen=True)
class SymmetricNoise:
    """Zero-sum perturbations over each group of copies (after HyperCloning's ``+e/-e``).

    ``e ~ N(0, std**2 / fan_in_wide)`` is drawn and centred within every group of copies along each
    contracted width axis (:func:`center_copies`), then added as ``W' = c (E(W) + e)``. The consuming op
    sums each group against equal replicated inputs, so the perturbation cancels and the widened function
    is exact at injection; the copies still differ, so they separate once training starts. Applies to
    every weight with a contracted width axis (hidden and readout weights); the centred noise has
    variance ``(1 - 1/k) std**2 / fan_in_wide`` for groups of ``k``. Exact up to rounding: the cancelling
    sum loses precision as ``std`` grows, so in float32 a large std moves the outputs measurably
    (examples/README.md, "Limits": 2e-4 at std 8 on a trained small GPT, 0.25 on an untrained one).
    With ``relative``, ``z ~ N(0, (std * rms(W))**2)`` instead (the module doc says why).
    """

    std: float
    relative: bool = False

    def __post_init__(self) -> None:
        _check_strength(self, "std", self.std)

    def apply(self, module: nn.Module, record: WideningRecord, generator: torch.Generator) -> None:
        with torch.no_grad():
            for p, s in _named_scalings(module, record):
                if weight_kind(s) is None or not _width_fan_in_axes(s) or self.std == 0:
                    continue
                e = _randn(tuple(p.shape), p, generator) * _noise_std(p, s, self.std, self.relative)
                p.add_(center_copies(e, s), alpha=float(s.copy_scale))

    def describe(self, scaling: ParamScaling) -> str:
        axes = _width_fan_in_axes(scaling)
        if weight_kind(scaling) is None or not axes:
            return f"W' = {_copy_expr(scaling, 'E(W)')} (no noise: no contracted width axis)"
        return (f"W' = {_copy_expr(scaling, 'E(W) + e')}, e = z - mean of z over each group of copies "
                f"along axis {', '.join(map(str, axes))}, "
                f"z ~ N(0, {_std_expr(self.std, scaling, self.relative)})")


def none() -> NoNoise:
    """No symmetry breaking (exact equivalence, e.g. for checks).

    Example:
        >>> none()
        NoNoise()
    """
    return NoNoise()


def gaussian(std: float) -> GaussianNoise:
    """Gaussian noise on hidden and input weights, std ``std / sqrt(fan_in_wide)`` inside the copy scale.

    Example:
        >>> wide = graphscale.widen(model, (x,), multiplier=2, noise=gaussian(0.5), seed=0)  # doctest: +SKIP
        >>> gaussian(0.5)
        GaussianNoise(std=0.5, relative=False)
    """
    return GaussianNoise(float(std))


def gaussian_relative(std: float) -> GaussianNoise:
    """Gaussian noise like :func:`gaussian`, with std ``std`` times each weight's own RMS.

    Example:
        >>> gaussian_relative(0.1)
        GaussianNoise(std=0.1, relative=True)
    """
    return GaussianNoise(float(std), relative=True)


def spectral(t: float) -> SpectralNoise:
    """Noise on hidden weights with spectral norm ``t`` times the copied weight's (per kernel position).

    Example:
        >>> spectral(0.1)
        SpectralNoise(t=0.1)
    """
    return SpectralNoise(float(t))


def symmetric(std: float) -> SymmetricNoise:
    """Zero-sum noise over each group of copies: the function is exact at injection, copies separate later.

    Example:
        >>> symmetric(0.5)
        SymmetricNoise(std=0.5, relative=False)
    """
    return SymmetricNoise(float(std))


def symmetric_relative(std: float) -> SymmetricNoise:
    """Zero-sum noise like :func:`symmetric`, with std ``std`` times each weight's own RMS.

    The knob to transfer from a proxy whose base was trained at another lr than the target's: a trained
    weight's scale follows its training, and the perturbation it tolerates follows its scale.

    Example:
        >>> noise = symmetric_relative(0.25)
        >>> wide = graphscale.widen(model, (x,), multiplier=2, noise=noise)  # doctest: +SKIP
        >>> symmetric_relative(0.25)
        SymmetricNoise(std=0.25, relative=True)
    """
    return SymmetricNoise(float(std), relative=True)


def noise_from_spec(spec: str | NoiseScheme | None) -> NoiseScheme:
    """Parse ``"none"``, ``"gaussian:0.5"``, ``"spectral:0.1"``, ``"symmetric:0.5"``, or a relative
    ``"gaussian_relative:0.1"`` / ``"symmetric_relative:0.25"`` (for a CLI flag).

    A scheme object passes through; ``None`` means no noise.

    Example:
        >>> noise_from_spec("gaussian:0.25")
        GaussianNoise(std=0.25, relative=False)
    """
    if spec is None:
        return NoNoise()
    if not isinstance(spec, str):
        if not isinstance(spec, NoiseScheme):
            raise TypeError(f"not a noise scheme (needs apply and describe): {spec!r}")
        return spec
    name, _, arg = spec.strip().partition(":")
    makers = {"gaussian": gaussian, "spectral": spectral, "symmetric": symmetric,
              "gaussian_relative": gaussian_relative, "symmetric_relative": symmetric_relative}
    if name == "none" and not arg:
        return NoNoise()
    if name not in makers or not arg:
        raise ValueError(
            f"noise spec must be 'none' or NAME:VALUE with NAME in {sorted(makers)}, got {spec!r}"
        )
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"noise spec {spec!r}: {arg!r} is not a number") from None
    return makers[name](value)
