"""μP-parametrized models built with Microsoft's ``mup`` (issue: the paper's own models), on small
re-creations of the reference code's three architectures (tests/mup_models.py): MLP with a
``MuReadout``, ResNet with a ``MuReadout`` head, GPT-2 with a ``MuSharedReadout``, attention at
``8/head_dim``, ``assert t <= block_size`` and the loss computed in ``forward``.

- ``widen_into(small, large, inputs)`` fills the user's large model exactly (float64 <= 1e-10), finding
  that its readout divides by its own width multiplier;
- the large model then trains equivalently under ``graphscale.mup_optimizer`` (float64, 50 steps,
  <= 1e-9 relative), also with the small optimizer's state carried over (no shared ``step`` tensor);
- the user's own ``mup.MuSGD`` is exact too; ``mup.MuAdamW`` is not (it leaves ``eps`` unscaled): the
  gap is measured and the record says so.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import graphscale

pytest.importorskip("mup")
import mup  # noqa: E402
import mup_models  # noqa: E402

TOL = 1e-9


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / (1 + b.abs().max())).item()


def _task(arch: str):
    """(builder, small width, large width, example inputs, batch(i) -> inputs, loss(model, inputs))."""
    if arch == "mlp":
        w = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

        def batch(i: int) -> tuple:
            return (torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(i)),)

        def loss(model, inputs):
            return F.mse_loss(model(*inputs), torch.tanh(inputs[0] @ w))

        return mup_models.mlp, 8, 24, batch(100), batch, loss
    if arch == "resnet":
        labels = torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(9))

        def batch(i: int) -> tuple:
            return (torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(i)),)

        def loss(model, inputs):
            return F.cross_entropy(model(*inputs), labels)

        return mup_models.resnet, 4, 8, batch(100), batch, loss

    def batch(i: int) -> tuple:
        seq = torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(i))
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()

    def loss(model, inputs):
        return model(*inputs)[1]  # the model's own loss, computed in forward

    return mup_models.gpt, 8, 16, batch(100), batch, loss


ARCHS = ["mlp", "resnet", "gpt"]


def _outputs(model, inputs) -> torch.Tensor:
    out = model(*inputs)
    return torch.cat([t.reshape(-1) for t in (out if isinstance(out, tuple) else (out,))])


def _train(small, large, s_opt, l_opt, batch, loss, steps: int) -> float:
    worst = 0.0
    for i in range(steps):
        inputs = batch(i)
        for model, opt in ((small, s_opt), (large, l_opt)):
            opt.zero_grad()
            loss(model, inputs).backward()
            opt.step()
        with torch.no_grad():
            worst = max(worst, _rel(_outputs(large, inputs), _outputs(small, inputs)))
    return worst


@pytest.mark.parametrize("arch", ARCHS)
def test_widen_into_fills_a_mup_model_exactly(arch: str) -> None:
    build, n_small, n_large, example, _, _ = _task(arch)
    small, large = build(n_small), build(n_large, seed=1)
    before = copy.deepcopy(small.state_dict())
    record = graphscale.widen_into(small, large, example)
    with torch.no_grad():
        assert _rel(_outputs(large, example), _outputs(small, example)) <= 1e-10
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())
    assert any("readout='own'" in n for n in record.notes)
    assert all(hasattr(p, "infshape") for p in large.parameters())  # the user's mup setup is kept


@pytest.mark.parametrize("carry_state", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_filled_mup_model_trains_equivalently_with_mup_optimizer(arch: str, carry_state: bool) -> None:
    build, n_small, n_large, example, batch, loss = _task(arch)
    small, large = build(n_small), build(n_large, seed=1)
    hp = dict(lr=3e-3, eps=1e-4, weight_decay=0.1)
    s_opt = torch.optim.AdamW(small.parameters(), **hp)
    if carry_state:  # the small model has trained a while: its optimizer memory is carried over
        for i in range(5):
            s_opt.zero_grad()
            loss(small, batch(1000 + i)).backward()
            s_opt.step()
    graphscale.widen_into(small, large, example)
    l_opt = graphscale.mup_optimizer(large, torch.optim.AdamW, **hp)
    if carry_state:
        graphscale.transfer_optimizer_state(small, s_opt, large, l_opt)
        steps_small = {id(st["step"]) for st in s_opt.state.values()}
        assert not steps_small & {id(st["step"]) for st in l_opt.state.values()}  # no shared step tensor
    assert _train(small, large, s_opt, l_opt, batch, loss, 50) <= TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_users_own_mu_sgd_is_exact_on_a_filled_model(arch: str) -> None:
    build, n_small, n_large, example, batch, loss = _task(arch)
    small, large = build(n_small), build(n_large, seed=1)
    graphscale.widen_into(small, large, example)
    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    worst = _train(small, large, mup.MuSGD(small.parameters(), **hp), mup.MuSGD(large.parameters(), **hp),
                   batch, loss, 50)
    assert worst <= TOL


def test_users_own_mu_adamw_is_off_by_its_unscaled_eps_and_the_record_says_so() -> None:
    build, n_small, n_large, example, batch, loss = _task("gpt")
    small, large = build(n_small), build(n_large, seed=1)
    record = graphscale.widen_into(small, large, example)
    note = next(n for n in record.notes if "MuAdam" in n)
    assert "eps" in note and "1/2" in note  # k = 2 for every width tensor of the GPT
    hp = dict(lr=3e-3, eps=1e-4, weight_decay=0.1)
    mu = _train(small, large, mup.MuAdamW(small.parameters(), **hp),
                mup.MuAdamW(large.parameters(), **hp), batch, loss, 50)
    assert mu > 1e-6  # measurably off: eps is not divided by k
    # the same MuAdamW with eps scaled as graphscale's law says is exact again
    small2, large2 = build(n_small), build(n_large, seed=1)
    graphscale.widen_into(small2, large2, example)
    scaled = _train(small2, large2, mup.MuAdamW(small2.parameters(), **hp),
                    mup.MuAdamW(large2.parameters(), **{**hp, "eps": hp["eps"] / 2}), batch, loss, 50)
    assert scaled <= TOL


def test_widen_into_reads_the_convention_of_a_plain_readout_too() -> None:
    """The same MLP whose large instance has a plain nn.Linear readout: the 1/k goes into the weights."""
    build, n_small, n_large, example, _, _ = _task("mlp")
    small = build(n_small)
    large = build(n_large, seed=1)
    plain = torch.nn.Linear(large.model[-1].in_features, 3).double()
    small_plain = copy.deepcopy(small)
    small_plain.model[-1] = torch.nn.Linear(small.model[-1].in_features, 3).double()
    with torch.no_grad():
        small_plain.model[-1].weight.copy_(small.model[-1].weight / small.model[-1].width_mult() * 2.0)
        small_plain.model[-1].bias.copy_(small.model[-1].bias)
    large.model[-1] = plain
    record = graphscale.widen_into(small_plain, large, example)
    assert any("readout='graphscale'" in n for n in record.notes)
    with torch.no_grad():
        assert _rel(large(*example), small_plain(*example)) <= 1e-10


def test_a_readout_no_candidate_fits_is_named_without_attention() -> None:
    build, n_small, n_large, example, _, _ = _task("mlp")
    small, large = build(n_small), build(n_large, seed=1)
    large.model[-1].output_mult = 3.0  # the large model computes a different function
    with pytest.raises(graphscale.errors.WidthConflictError) as e:
        graphscale.widen_into(small, large, example)
    msg = str(e.value)
    assert "model.4.weight" in msg and "readout graphscale" in msg and "readout own" in msg
    assert "attention" not in msg and "head_dim" not in msg


def test_export_traces_mup_models_without_infshape_on_fake_tensors() -> None:
    build, n_small, _, example, _, _ = _task("gpt")
    small = build(n_small)
    wide = graphscale.widen(small, example, multiplier=2, tracer="export")
    with torch.no_grad():
        assert _rel(_outputs(wide, example), _outputs(small, example)) <= 1e-12
    assert "width_mult" not in small.lm_head.__dict__  # the trace-time constant was removed again


def _reference_rule(v: torch.Tensor, wide_shape: tuple[int, ...], power: int) -> torch.Tensor:
    """The reference code's state transfer, restated: repeat each entry along every axis that grew, and
    scale by (narrow/wide size of a grown axis) ** power (1 for exp_avg, 2 for exp_avg_sq)."""
    out, ratio = v, 1.0
    for axis, (n, w) in enumerate(zip(v.shape, wide_shape)):
        if w != n:
            out = out.repeat_interleave(w // n, dim=axis)
            ratio = n / w
    return out * ratio ** power


@pytest.mark.parametrize("arch", ARCHS)
def test_transferred_adam_state_equals_the_reference_rule(arch: str) -> None:
    """Where the conventions coincide (every tensor of these mup models) exp_avg / exp_avg_sq are the
    reference's; step has the same value in a tensor of its own."""
    build, n_small, n_large, example, batch, loss = _task(arch)
    small, large = build(n_small), build(n_large, seed=1)
    s_opt = torch.optim.AdamW(small.parameters(), lr=3e-3)
    for i in range(3):
        s_opt.zero_grad()
        loss(small, batch(i)).backward()
        s_opt.step()
    graphscale.widen_into(small, large, example)
    l_opt = graphscale.mup_optimizer(large, torch.optim.AdamW, lr=3e-3)
    graphscale.transfer_optimizer_state(small, s_opt, large, l_opt)
    small_params = dict(small.named_parameters())
    for name, p in large.named_parameters():
        src = s_opt.state[small_params[name]]
        dst = l_opt.state[p]
        for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
            torch.testing.assert_close(dst[key], _reference_rule(src[key], tuple(p.shape), power),
                                       rtol=1e-14, atol=0, msg=f"{name} {key}")
        assert dst["step"] is not src["step"] and float(dst["step"]) == float(src["step"])
