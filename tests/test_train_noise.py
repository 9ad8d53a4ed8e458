"""Noise schemes: who gets noise, with what statistics, and symmetric noise's exactness at injection."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphscale
from graphscale.record import AxisReplication, ParamScaling, WideningRecord
from graphscale.train import mup_optimizer
from graphscale.train.noise import (
    GaussianNoise,
    NoiseScheme,
    center_copies,
    fan_in_wide,
    gaussian,
    gaussian_relative,
    noise_from_spec,
    none,
    spectral,
    symmetric,
    symmetric_relative,
    weight_kind,
)
from tests.helpers import hand_widen, make_mlp, single_thread

__all__ = ["single_thread"]


def _wide(k: int = 2, d_in: int = 64, n: int = 32, compensated: bool = False) -> tuple[nn.Module, nn.Module]:
    narrow = make_mlp(d_in, [n, n, n], 10, compensated=compensated, seed=0)
    return narrow, hand_widen(narrow, [k, k, k])


def _injected(before: nn.Module, after: nn.Module) -> dict[str, torch.Tensor]:
    """The ``e`` of ``W' = c (E(W) + e)`` for every tensor."""
    rec = after.graphscale
    b = dict(before.named_parameters())
    return {n: (p.detach() - b[n].detach()) / rec.params[n].copy_scale for n, p in after.named_parameters()}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_roles_decide_who_gets_noise() -> None:
    _, wide = _wide()
    rec = wide.graphscale
    kinds = {n: weight_kind(s) for n, s in rec.params.items()}
    assert kinds["0.weight"] == "input" and kinds["2.weight"] == "hidden" and kinds["6.weight"] == "output"
    assert kinds["0.bias"] is None and kinds["6.bias"] is None
    assert fan_in_wide(rec.params["0.weight"]) == 64 and fan_in_wide(rec.params["2.weight"]) == 64


@pytest.mark.parametrize("compensated", [False, True])
def test_gaussian_std_matches_its_formula(compensated: bool) -> None:
    std = 0.7
    _, wide = _wide(compensated=compensated)
    before = copy.deepcopy(wide)
    gaussian(std).apply(wide, wide.graphscale, _gen())
    e = _injected(before, wide)
    for name, s in wide.graphscale.params.items():
        if name in ("0.weight", "2.weight", "4.weight"):  # input, hidden, hidden: 4096 entries each
            want = std / math.sqrt(fan_in_wide(s))
            assert e[name].numel() >= 4096
            assert abs(float(e[name].std()) / want - 1) < 0.1, name
            assert abs(float(e[name].mean())) < 4 * want / math.sqrt(e[name].numel())
        else:  # biases and the readout are untouched, bit for bit
            assert torch.equal(e[name], torch.zeros_like(e[name])), name
    hidden = gaussian(std).describe(wide.graphscale.params["2.weight"])
    assert hidden == ("W' = 0.3536*(E(W) + e), e ~ N(0, (0.7)^2/64)" if compensated
                      else "W' = (E(W) + e)/2, e ~ N(0, (0.7)^2/64)")
    assert gaussian(std).describe(wide.graphscale.params["0.weight"]) == "W' = E(W) + e, e ~ N(0, (0.7)^2/64)"
    assert "no noise" in gaussian(std).describe(wide.graphscale.params["6.weight"])


def test_gaussian_is_seeded() -> None:
    _, w1 = _wide()
    w2, w3 = copy.deepcopy(w1), copy.deepcopy(w1)
    gaussian(0.5).apply(w1, w1.graphscale, _gen(1))
    gaussian(0.5).apply(w2, w2.graphscale, _gen(1))
    gaussian(0.5).apply(w3, w3.graphscale, _gen(2))
    assert torch.equal(w1[2].weight, w2[2].weight) and not torch.equal(w1[2].weight, w3[2].weight)


def _wide_conv(n: int = 8, k: int = 2) -> nn.Module:
    """A two-conv stack widened by hand: conv0 (3 -> n*k, input) and conv1 (n*k -> n*k, hidden, 3x3)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, n * k, 3), nn.ReLU(), nn.Conv2d(n * k, n * k, 3)).double()
    ax = AxisReplication.atomic(n, k)
    params = {
        "0.weight": ParamScaling("0.weight", "0.weight", (n, 3, 3, 3), (n * k, 3, 3, 3),
                                 (ax, None, None, None),
                                 1.0, k, 1, (1,), role="input"),
        "0.bias": ParamScaling("0.bias", "0.bias", (n,), (n * k,), (ax,), 1.0, k, 1, role="vector"),
        "2.weight": ParamScaling("2.weight", "2.weight", (n, n, 3, 3), (n * k, n * k, 3, 3),
                                 (ax, ax, None, None),
                                 1.0 / k, k * k, k, (1,), role="hidden"),
        "2.bias": ParamScaling("2.bias", "2.bias", (n,), (n * k,), (ax,), 1.0, k, 1, role="vector"),
    }
    m.graphscale = WideningRecord(params, {"c": k})
    return m


def test_spectral_noise_has_relative_spectral_norm_t_per_kernel_position() -> None:
    t = 0.3
    wide = _wide_conv()
    before = copy.deepcopy(wide)
    spectral(t).apply(wide, wide.graphscale, _gen())
    w0, w1 = before[2].weight.detach(), wide[2].weight.detach()
    for i in range(3):
        for j in range(3):
            ratio = torch.linalg.matrix_norm(w1[:, :, i, j] - w0[:, :, i, j], 2) / torch.linalg.matrix_norm(
                w0[:, :, i, j], 2)
            assert abs(float(ratio) - t) < 1e-10
    assert torch.equal(before[0].weight, wide[0].weight)  # input conv: spectral is for hidden weights only
    assert torch.equal(before[2].bias, wide[2].bias)
    assert fan_in_wide(wide.graphscale.params["2.weight"]) == 16 * 9  # channels times kernel window
    assert "per kernel position" in spectral(t).describe(wide.graphscale.params["2.weight"])


def test_spectral_noise_on_mlp_matrices() -> None:
    _, wide = _wide()
    before = copy.deepcopy(wide)
    spectral(0.05).apply(wide, wide.graphscale, _gen())
    d = wide[2].weight.detach() - before[2].weight.detach()
    assert abs(float(torch.linalg.matrix_norm(d, 2) / torch.linalg.matrix_norm(before[2].weight.detach(), 2))
               - 0.05) < 1e-10
    assert torch.equal(before[0].weight, wide[0].weight) and torch.equal(before[6].weight, wide[6].weight)


def test_gaussian_std_on_conv_uses_kernel_fan_in() -> None:
    wide = _wide_conv(n=16)
    before = copy.deepcopy(wide)
    gaussian(1.0).apply(wide, wide.graphscale, _gen())
    e = _injected(before, wide)["2.weight"]  # 32*32*9 entries
    assert abs(float(e.std()) * math.sqrt(32 * 9) - 1) < 0.1


@pytest.mark.parametrize("scheme", [symmetric(0.5), symmetric_relative(0.5)], ids=["absolute", "relative"])
@pytest.mark.parametrize("k", [2, 3])
def test_symmetric_noise_is_exact_at_injection_and_copies_separate(k: int, scheme: NoiseScheme) -> None:
    narrow, wide = _wide(k=k, d_in=5, n=6, compensated=True)
    before = copy.deepcopy(wide)
    scheme.apply(wide, wide.graphscale, _gen())
    x = torch.randn(32, 5, dtype=torch.float64, generator=_gen(3))
    assert float((wide(x) - narrow(x)).detach().abs().max()) <= 1e-12
    e = _injected(before, wide)
    for name in ("2.weight", "4.weight", "6.weight"):  # hidden, hidden (compensated), readout
        assert float(e[name].abs().max()) > 1e-3, name
        # zero sum over each group of k copies along the fan-in axis
        assert float(e[name].view(e[name].shape[0], -1, k).sum(-1).abs().max()) < 1e-14
    assert torch.equal(e["0.weight"], torch.zeros_like(e["0.weight"]))  # input weight: no contracted width

    def first_hidden(m: nn.Module) -> torch.Tensor:
        return m[1](m[0](x)).detach().view(len(x), -1, k)

    h = first_hidden(wide)
    assert float((h - h[..., :1]).abs().max()) < 1e-14  # copies identical at injection (up to rounding)
    opt = mup_optimizer(wide, torch.optim.SGD, lr=0.1)
    F.mse_loss(wide(x), torch.zeros(32, 10, dtype=torch.float64)).backward()
    opt.step()
    h = first_hidden(wide)
    assert float((h - h[..., :1]).abs().max()) > 1e-6  # ... and different after one step


def test_without_noise_copies_never_separate() -> None:
    """The control for the test above: with none() the copies stay identical after a step."""
    _, wide = _wide(k=2, d_in=5, n=6)
    none().apply(wide, wide.graphscale, _gen())
    x = torch.randn(32, 5, dtype=torch.float64, generator=_gen(3))
    opt = mup_optimizer(wide, torch.optim.SGD, lr=0.1)
    F.mse_loss(wide(x), torch.zeros(32, 10, dtype=torch.float64)).backward()
    opt.step()
    h = wide[1](wide[0](x)).detach().view(len(x), -1, 2)
    assert float((h - h[..., :1]).abs().max()) < 1e-14


def test_gaussian_noise_changes_the_function() -> None:
    """Unlike symmetric noise, gaussian noise is not exact at injection (so the symmetric test can fail)."""
    narrow, wide = _wide(k=2, d_in=5, n=6)
    gaussian(0.5).apply(wide, wide.graphscale, _gen())
    x = torch.randn(32, 5, dtype=torch.float64, generator=_gen(3))
    assert float((wide(x) - narrow(x)).detach().abs().max()) > 1e-4


def test_center_copies_handles_uneven_segments() -> None:
    # heads x head_dim | plain, like a fused qkv: groups of copies are not simply adjacent blocks overall
    ax = AxisReplication(("sum", (("prod", (("atom", 2, 1), ("atom", 3, 2))), ("atom", 4, 2))))
    s = ParamScaling("w", "w", (5, 10), (5, 20), (None, ax), 0.5, 2, 2, (1,), role="output")
    e = center_copies(torch.randn(5, 20, dtype=torch.float64), s)
    idx = ax.index()
    sums = torch.zeros(5, 10, dtype=torch.float64).index_add_(1, idx, e)
    assert float(sums.abs().max()) < 1e-14


def _scaled(module: nn.Module, factor: float) -> nn.Module:
    """A copy of a widened module with every parameter times ``factor`` (a base trained to another scale)."""
    out = copy.deepcopy(module)
    with torch.no_grad():
        for p in out.parameters():
            p.mul_(factor)
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_relative_noise_std_is_std_times_the_weights_rms(k: int) -> None:
    std = 0.3
    narrow, wide = _wide(k=k)
    for scheme, spread in ((gaussian_relative(std), 1.0), (symmetric_relative(std), math.sqrt(1 - 1 / k))):
        w = copy.deepcopy(wide)
        scheme.apply(w, w.graphscale, _gen())
        e = _injected(wide, w)
        # gaussian: input and hidden weights; symmetric: hidden and readout (those with a contracted width)
        names = ("0.weight", "2.weight", "4.weight") if isinstance(scheme, GaussianNoise) else (
            "2.weight", "4.weight", "6.weight")
        for name in names:
            rms = float(narrow.get_parameter(name).detach().pow(2).mean().sqrt())
            assert abs(float(e[name].std()) / (spread * std * rms) - 1) < 0.1, (scheme, name)
    assert "(0.3*rms(W))^2" in symmetric_relative(std).describe(wide.graphscale.params["2.weight"])
    assert "(0.3*rms(W))^2" in gaussian_relative(std).describe(wide.graphscale.params["0.weight"])


@pytest.mark.parametrize("relative", [False, True])
def test_relative_noise_follows_the_weights_scale_and_absolute_noise_does_not(relative: bool) -> None:
    """Scaling the base by 5 scales a relative perturbation by 5 (same draw); an absolute one stays put."""
    _, wide = _wide()
    big = _scaled(wide, 5.0)
    scheme = symmetric(0.5) if not relative else symmetric_relative(0.5)
    w1, w5 = copy.deepcopy(wide), copy.deepcopy(big)
    scheme.apply(w1, w1.graphscale, _gen())
    scheme.apply(w5, w5.graphscale, _gen())
    e1, e5 = _injected(wide, w1), _injected(big, w5)
    for name in ("2.weight", "4.weight", "6.weight"):
        assert float(e1[name].abs().max()) > 1e-3
        want = 5.0 * e1[name] if relative else e1[name]
        assert torch.allclose(e5[name], want, rtol=1e-9, atol=1e-12), name


def test_relative_noise_leaves_an_all_zero_weight_alone() -> None:
    _, wide = _wide()
    with torch.no_grad():
        wide[2].weight.zero_()
    before = copy.deepcopy(wide)
    symmetric_relative(0.5).apply(wide, wide.graphscale, _gen())
    assert torch.equal(wide[2].weight, before[2].weight) and not torch.equal(wide[4].weight, before[4].weight)


def test_noise_from_spec_and_protocol() -> None:
    assert noise_from_spec("gaussian:0.5") == GaussianNoise(0.5)
    assert noise_from_spec("symmetric_relative:0.25") == symmetric_relative(0.25)
    assert noise_from_spec("gaussian_relative:0.1") == GaussianNoise(0.1, relative=True)
    assert noise_from_spec("none") == none() and noise_from_spec(None) == none()
    assert noise_from_spec("symmetric:1e-2") == symmetric(0.01)
    for bad in ("gaussian", "laplace:1", "spectral:x"):
        with pytest.raises(ValueError):
            noise_from_spec(bad)
    for scheme in (none(), gaussian(1), spectral(1), symmetric(1), symmetric_relative(1)):
        assert isinstance(scheme, NoiseScheme)
        with pytest.raises(AttributeError):
            scheme.std = 2  # type: ignore[misc]  # frozen


def test_noise_refuses_a_record_missing_tensors() -> None:
    _, wide = _wide()
    del wide.graphscale.params["2.weight"]
    with pytest.raises(ValueError, match=r"2\.weight"):
        gaussian(0.1).apply(wide, wide.graphscale, _gen())


@pytest.mark.parametrize("make", [graphscale.noise.gaussian, graphscale.noise.gaussian_relative,
                                  graphscale.noise.spectral, graphscale.noise.symmetric,
                                  graphscale.noise.symmetric_relative])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -0.5])
def test_non_finite_or_negative_strength_is_refused_at_construction(make, bad) -> None:
    with pytest.raises(graphscale.GraphscaleError, match="finite number >= 0"):
        make(bad)
    assert make(0.0) is not None and make(0.25) is not None  # the valid range still builds
