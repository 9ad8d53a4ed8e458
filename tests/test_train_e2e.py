"""The train-time pieces on models widened by the engine (graphscale.widen), not by hand.

Each test trains the narrow model with a plain torch optimizer and its widening with graphscale's, on the
same batches, in float64, and requires the outputs to agree at every step; the controls show the same
harness fails with plain optimizers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import graphscale
from graphscale import zoo
from graphscale.train import (
    clip_grad_norm_,
    coord_check,
    gaussian,
    mup_optimizer,
    spectral,
    symmetric,
    transfer_optimizer_state,
)
from tests.helpers import single_thread

__all__ = ["single_thread"]

TOL = 1e-9


def _mlp():
    model, (x,) = zoo.mlp(widths=(12, 16, 20), d_in=6, d_out=3)
    model = model.double().train()
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(64, 6, generator=g, dtype=torch.float64)
    ys = torch.sin(xs @ torch.randn(6, 3, generator=g, dtype=torch.float64))
    return model, (x.double(),), (xs, ys), F.mse_loss


def _cnn():
    model, (x,) = zoo.resnet_cnn(channels=4, blocks=2, num_classes=3, image=6)
    model = model.double().train()  # BatchNorm in train mode: batch statistics over a widened channel axis
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(32, 1, 6, 6, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (32,), generator=g)
    return model, (x.double(),), (xs, ys), F.cross_entropy


def _gpt():
    model, (idx,) = zoo.gpt(vocab=17, block_size=8, n_layer=1, n_head=2, n_embd=16)
    model = model.double().train()
    g = torch.Generator().manual_seed(0)
    xs = torch.randint(0, 17, (16, 8), generator=g)
    ys = torch.roll(xs, -1, dims=1)

    def loss(out, y):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    return model, (idx,), (xs, ys), loss


MODELS = {"mlp": _mlp, "cnn_batchnorm": _cnn, "gpt": _gpt}


def _batches(data, steps: int, batch: int = 8, seed: int = 1):
    xs, ys = data
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (batch,), generator=g)
        yield xs[idx], ys[idx]


def _run(narrow, wide, n_opt, w_opt, data, loss_fn, steps: int, clip: float | None = None,
         wide_clip=clip_grad_norm_, seed: int = 1) -> float:
    worst = 0.0
    for xb, yb in _batches(data, steps, seed=seed):
        outs = []
        for model, opt in ((narrow, n_opt), (wide, w_opt)):
            opt.zero_grad()
            out = model(xb)
            outs.append(out.detach())
            loss_fn(out, yb).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(narrow.parameters(), clip)
            wide_clip(wide, clip)
        n_opt.step()
        w_opt.step()
        worst = max(worst, float(((outs[1] - outs[0]).abs() / (1 + outs[0].abs())).max()))
    return worst


OPTIMIZERS = [
    (torch.optim.SGD, dict(lr=0.02, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    (torch.optim.Adam, dict(lr=3e-3, eps=1e-3, amsgrad=True, weight_decay=1e-2)),
    (torch.optim.AdamW, dict(lr=3e-3, eps=1e-3, weight_decay=0.1)),
]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("cls, hp", OPTIMIZERS, ids=["sgd", "adam", "adamw"])
def test_widened_model_trains_exactly_like_narrow(name, cls, hp) -> None:
    narrow, inputs, data, loss_fn = MODELS[name]()
    wide = graphscale.widen(narrow, inputs, multiplier=2)
    wide.train()
    steps = 40 if name != "gpt" else 25
    worst = _run(narrow, wide, cls(narrow.parameters(), **hp), mup_optimizer(wide, cls, **hp), data, loss_fn,
                 steps, clip=0.5 if cls is torch.optim.AdamW else None)
    assert worst <= TOL, f"{name} {cls.__name__}: {worst:.3g}"


@pytest.mark.parametrize("name", list(MODELS))
def test_control_plain_optimizer_diverges(name) -> None:
    narrow, inputs, data, loss_fn = MODELS[name]()
    wide = graphscale.widen(narrow, inputs, multiplier=2)
    wide.train()
    hp = dict(lr=3e-3, eps=1e-3)
    worst = _run(narrow, wide, torch.optim.Adam(narrow.parameters(), **hp),
                 torch.optim.Adam(wide.parameters(), **hp), data, loss_fn, 25)
    assert worst > 1e-3


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_widen_mid_training_with_state_transfer(name) -> None:
    narrow, inputs, data, loss_fn = MODELS[name]()
    hp = dict(lr=3e-3, eps=1e-3)
    n_opt = torch.optim.Adam(narrow.parameters(), **hp)
    for xb, yb in _batches(data, 10, seed=5):
        n_opt.zero_grad()
        loss_fn(narrow(xb), yb).backward()
        n_opt.step()
    wide = graphscale.widen(narrow, inputs, multiplier=3)
    wide.train()
    w_opt = mup_optimizer(wide, torch.optim.Adam, **hp)
    transfer_optimizer_state(narrow, n_opt, wide, w_opt)
    assert _run(narrow, wide, n_opt, w_opt, data, loss_fn, 20) <= TOL


@pytest.mark.parametrize("name", list(MODELS))
def test_symmetric_noise_through_widen_is_exact_at_injection(name) -> None:
    narrow, inputs, data, loss_fn = MODELS[name]()
    narrow.eval()
    wide = graphscale.widen(narrow, inputs, multiplier=2, noise=symmetric(0.5), seed=0)
    clean = graphscale.widen(narrow, inputs, multiplier=2)
    wide.eval()
    x = data[0][:8]
    with torch.no_grad():
        assert float((wide(x) - narrow(x)).abs().max()) <= 1e-12
    moved = [n for (n, p), q in zip(wide.named_parameters(), clean.parameters()) if not torch.equal(p, q)]
    assert moved, "symmetric noise perturbed nothing"
    for scheme in (gaussian(0.5), spectral(0.2)):  # the other schemes do change the function
        noisy = graphscale.widen(narrow, inputs, multiplier=2, noise=scheme, seed=0).eval()
        with torch.no_grad():
            assert float((noisy(x) - narrow(x)).abs().max()) > 1e-6, scheme


def test_coord_check_with_the_engine(tmp_path) -> None:
    def make():
        model, _ = zoo.mlp(widths=(8, 8), d_in=6, d_out=3)
        return copy.deepcopy(model).double()

    res = coord_check(make, [1, 2, 4], lambda t: torch.randn(16, 6, dtype=torch.float64,
                                                             generator=torch.Generator().manual_seed(t)),
                      steps=3, hparams={"lr": 0.1}, out_dir=tmp_path)
    assert res.spread("mup") < 1e-9 < 1e-2 < res.spread("naive")
    assert (tmp_path / "coord_check.png").exists() and (tmp_path / "coord_check.json").exists()


# ------------------------------------------------------------------------- base= path (from scratch)


def _sequential_mlp(d_in: int, widths: tuple[int, ...], d_out: int, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    dims = [d_in, *widths]
    layers: list[torch.nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    layers.append(torch.nn.Linear(dims[-1], d_out))
    return torch.nn.Sequential(*layers).double()


@pytest.mark.parametrize("cls, hp", OPTIMIZERS, ids=["sgd", "adam", "adamw"])
def test_base_path_gives_the_widening_laws(cls, hp) -> None:
    """A plain model built at 3x width, loaded with the widened weights of a small one and optimised with
    ``mup_optimizer(big, cls, base=small)``, trains exactly like the small one: the record from
    ``relative_record`` carries the same factors as the widening's."""
    small = _sequential_mlp(4, (5, 6), 2, seed=0)
    x = torch.randn(3, 4, dtype=torch.float64)
    wide = graphscale.widen(small, (x,), multiplier=3)
    big = _sequential_mlp(4, (15, 18), 2, seed=1)
    big.load_state_dict(dict(wide.named_parameters()))
    data = (torch.randn(64, 4, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64))
    narrow = copy.deepcopy(small)
    worst = _run(narrow, big, cls(narrow.parameters(), **hp),
                 mup_optimizer(big, cls, base=small, example_inputs=(x,), **hp), data, F.mse_loss, 40)
    assert worst <= TOL
    # a base given as class multipliers yields the same groups
    by_module = mup_optimizer(big, cls, base=small, example_inputs=(x,), **hp)
    classes = graphscale.relative_record(big, (x,), small).multipliers
    by_dict = mup_optimizer(big, cls, base=dict(classes), example_inputs=(x,), **hp)
    assert ([g["graphscale"] for g in by_module.param_groups]
            == [g["graphscale"] for g in by_dict.param_groups])


def test_mup_init_relative_to_a_base_module() -> None:
    small = _sequential_mlp(64, (16, 16), 32, seed=0)
    big = _sequential_mlp(64, (64, 64), 32, seed=1)
    x = torch.randn(2, 64, dtype=torch.float64)

    def rms(t: torch.Tensor) -> float:
        return float(t.detach().pow(2).mean().sqrt())

    mup_init_ = graphscale.mup_init_
    mup_init_(big, (x,), base=small)
    assert abs(rms(big[0].weight) / rms(small[0].weight) - 1) < 1e-9  # input: base std
    assert abs(rms(big[2].weight) / rms(small[2].weight) - 0.5) < 1e-9  # hidden: m_in^-1/2
    assert abs(rms(big[4].weight) / rms(small[4].weight) - 0.25) < 1e-9  # readout: 1/m_in
    mup_init_(big, (x,), base=small, readout_zero=True)
    assert float(big[4].weight.detach().abs().max()) == 0.0
