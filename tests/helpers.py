"""Shared helpers of the test suite, importable as ``tests.helpers`` (pyproject sets pytest's
``pythonpath``, so no test needs an import fallback).

Hand-built widenings for the train-time tests: no engine involved, so these tests stand on their own.
``hand_widen`` widens an ``nn.Sequential`` MLP (Linear / Tanh / LayerNorm / ScaledLinear) by copying every
hidden unit ``k`` times adjacently and attaches a :class:`WideningRecord` written out by hand from
docs/math.md §1-2. ``ScaledLinear`` layers exercise the general law ``c != 1/m_in``: like standard
attention whose formula is fixed, the wide layer keeps an output multiplier ``alpha * sqrt(k_out)`` and
puts ``k_out**-0.5 / m_in`` into the weight. ``tests/test_train_helpers.py`` checks that the hand widening
is exact, so the other train tests can trust it.

Example:
    >>> narrow = make_mlp(3, [4], 2)
    >>> wide = hand_widen(narrow, [2])
    >>> tuple(wide[0].weight.shape), wide.graphscale.params["2.weight"].copy_scale
    ((8, 3), 0.5)
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from graphscale.record import AxisReplication, ParamScaling, WideningRecord


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tests run thousands of tiny ops: on a loaded 2-core machine torch's intra-op threads
    contend and make them 10x slower, so each test module runs single-threaded (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ScaledLinear(nn.Linear):
    """``alpha * linear(x)``: a layer whose output multiplier is part of its formula."""

    def __init__(self, d_in: int, d_out: int, alpha: float = 1.0, **kw) -> None:
        super().__init__(d_in, d_out, **kw)
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * F.linear(x, self.weight, self.bias)


def make_mlp(
    d_in: int, hidden: list[int], d_out: int, *, layernorm: bool = False, compensated: bool = False,
    seed: int = 0, dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """``d_in -> hidden... -> d_out`` with tanh; hidden->hidden layers are ScaledLinear if compensated."""
    torch.manual_seed(seed)
    dims = [d_in, *hidden, d_out]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        hidden_to_hidden = 0 < i < len(dims) - 2
        layers.append(ScaledLinear(a, b, alpha=1.0) if compensated and hidden_to_hidden else nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
            if layernorm:
                layers.append(nn.LayerNorm(b))
    model = nn.Sequential(*layers).to(dtype)
    if layernorm:  # non-trivial gains and shifts, so a wrong law on vectors shows
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)
    return model


def _role(k_in: int, k_out: int) -> str:
    if k_in > 1 and k_out > 1:
        return "hidden"
    if k_out > 1:
        return "input"
    if k_in > 1:
        return "output"
    return "fixed"


def hand_widen(narrow: nn.Sequential, mults: list[int]) -> nn.Sequential:
    """Widen ``narrow`` (from :func:`make_mlp`) with multiplier ``mults[i]`` on hidden layer ``i``.

    Returns a new module with ``.graphscale`` set; ``narrow`` is not modified.
    """
    linears = [m for m in narrow if isinstance(m, nn.Linear)]
    assert len(mults) == len(linears) - 1
    ks = [1, *mults, 1]  # multiplier of each activation between linears
    wide = copy.deepcopy(narrow)
    params: dict[str, ParamScaling] = {}
    li = -1
    for idx, mod in enumerate(narrow):
        wmod = wide[idx]
        if isinstance(mod, nn.Linear):
            li += 1
            k_in, k_out = ks[li], ks[li + 1]
            a, b = mod.in_features, mod.out_features
            comp = 1.0
            if isinstance(mod, ScaledLinear):
                comp = k_out ** -0.5
                wmod.alpha = mod.alpha * math.sqrt(k_out)
            ax_out = AxisReplication.atomic(b, k_out) if k_out > 1 else None
            ax_in = AxisReplication.atomic(a, k_in) if k_in > 1 else None
            w = ParamScaling(f"{idx}.weight", f"{idx}.weight", (b, a), (b * k_out, a * k_in), (ax_out, ax_in),
                             copy_scale=comp / k_in, total_mult=k_in * k_out, fan_in_mult=k_in,
                             fan_in_axes=(1,), role=_role(k_in, k_out))
            bias = ParamScaling(f"{idx}.bias", f"{idx}.bias", (b,), (b * k_out,), (ax_out,),
                                copy_scale=comp, total_mult=k_out, fan_in_mult=1,
                                role="vector" if k_out > 1 else "fixed")
            wmod.in_features, wmod.out_features = a * k_in, b * k_out
            for s in (w, bias):
                attr = s.name.split(".")[1]
                setattr(wmod, attr, nn.Parameter(s.widen(getattr(mod, attr).data)))
                params[s.name] = s
        elif isinstance(mod, nn.LayerNorm):
            k = ks[li + 1]
            (h,) = mod.normalized_shape
            wmod.normalized_shape = (h * k,)
            for pname in ("weight", "bias"):
                s = ParamScaling(f"{idx}.{pname}", f"{idx}.{pname}", (h,), (h * k,),
                                 (AxisReplication.atomic(h, k),),
                                 copy_scale=1.0, total_mult=k, fan_in_mult=1, role="vector")
                setattr(wmod, pname, nn.Parameter(s.widen(getattr(mod, pname).data)))
                params[s.name] = s
    wide.graphscale = WideningRecord(params, {f"h{i}": k for i, k in enumerate(mults)}, frontend="hand")
    return wide


def rewiden_into(narrow: nn.Sequential, wide: nn.Sequential) -> None:
    """Overwrite ``wide``'s parameters with the exact widening of ``narrow``'s current ones."""
    rec = wide.graphscale
    src = dict(narrow.named_parameters())
    with torch.no_grad():
        for name, p in wide.named_parameters():
            p.copy_(rec.params[name].widen(src[rec.params[name].source]))


# ------------------------------------------------------------------------------------ training harness

TOL = 1e-9
#: Raise for a deeper soak, e.g. GRAPHSCALE_TRAIN_EXAMPLES=300 (the default keeps the suite fast).
EXAMPLES = int(os.environ.get("GRAPHSCALE_TRAIN_EXAMPLES", "30"))


@st.composite
def optimizer_configs(draw) -> tuple[type, dict]:
    """An optimizer class and hyperparameters of every family graphscale scales."""
    fam = draw(st.sampled_from(["sgd", "adam", "adamw"]))
    if fam == "sgd":
        momentum = draw(st.sampled_from([0.0, 0.9]))
        nesterov = momentum > 0 and draw(st.booleans())
        # lr / (1 - momentum) is the effective step: keep it in the non-chaotic range, where float64
        # rounding is not amplified to 1e-9 by the narrow dynamics themselves (measured: a 1e-16 nudge
        # to one narrow weight grows to 5e-9 in 200 steps at lr 0.0625, momentum 0.9, with LayerNorm).
        lr = draw(st.floats(0.01, 0.1) if momentum == 0 else st.floats(0.002, 0.02))
        hp = dict(lr=lr, momentum=momentum, nesterov=nesterov,
                  dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.1])),
                  weight_decay=draw(st.sampled_from([0.0, 1e-2])))
        return torch.optim.SGD, hp
    hp = dict(lr=draw(st.floats(1e-3, 2e-2)), eps=draw(st.sampled_from([1e-3, 1e-6])),
              amsgrad=draw(st.booleans()))
    if fam == "adam":
        decoupled = draw(st.booleans())
        hp["weight_decay"] = draw(st.sampled_from([0.0, 1e-2, 0.1] if decoupled else [0.0, 1e-2]))
        if decoupled:
            hp["decoupled_weight_decay"] = True
        return torch.optim.Adam, hp
    hp["weight_decay"] = draw(st.sampled_from([0.1, 0.01]))
    return torch.optim.AdamW, hp


@st.composite
def architectures(draw) -> dict:
    """A small MLP. With LayerNorm the hidden widths start at 4: normalising 2 or 3 tanh units is
    nearly singular (variance close to 0), and that chaos amplifies float64 rounding to O(1) within 200
    steps in the narrow model alone -- a property of the dynamics, not of the widening."""
    layernorm = draw(st.booleans())
    return {
        "d_in": draw(st.integers(2, 4)),
        "hidden": draw(st.lists(st.integers(4 if layernorm else 2, 6), min_size=1, max_size=3)),
        "d_out": draw(st.integers(1, 3)),
        "layernorm": layernorm,
        "compensated": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }




def make_data(d_in: int, d_out: int, seed: int = 0, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    a = torch.randn(d_in, d_out, generator=g, dtype=torch.float64)
    return x, torch.sin(x @ a)


def batches(x: torch.Tensor, y: torch.Tensor, steps: int, batch: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        yield x[idx], y[idx]


def train_pair(
    narrow: nn.Module, wide: nn.Module, narrow_opt, wide_opt, data, steps: int, *,
    clip: float | None = None, wide_clip=None,
) -> tuple[float, list[tuple[float, float]]]:
    """Train both on the same batches; return the worst ``|out_w - out_n| / (1 + |out_n|)`` over all steps
    (outputs measured before each step and after the last) and the per-step (narrow, wide) clip norms."""
    worst, norms = 0.0, []
    x, y = data
    for xb, yb in batches(x, y, steps):
        outs = []
        for model, opt in ((narrow, narrow_opt), (wide, wide_opt)):
            opt.zero_grad()
            out = model(xb)
            outs.append(out.detach())
            F.mse_loss(out, yb).backward()
        if clip is not None:
            n_norm = torch.nn.utils.clip_grad_norm_(narrow.parameters(), clip)
            w_norm = wide_clip(wide, clip)
            norms.append((float(n_norm), float(w_norm)))
        narrow_opt.step()
        wide_opt.step()
        worst = max(worst, float(((outs[1] - outs[0]).abs() / (1 + outs[0].abs())).max()))
    with torch.no_grad():
        worst = max(worst, float(((wide(x) - narrow(x)).abs() / (1 + narrow(x).abs())).max()))
    return worst, norms


def rounding_sensitivity(build, cls, hp: dict, data, steps: int, clip: float | None = None) -> float:
    """How far the *narrow* run alone drifts when every weight is nudged by one ulp.

    Some draws (a LayerNorm over few units, a large effective step) are chaotic: float64 rounding grows
    to 1e-7 within 200 steps with no widening involved. Equivalence tests skip those draws (hypothesis
    ``assume``) instead of loosening the tolerance: a wrong μP law shows up as an O(lr) difference from
    the first step, in any regime.
    """
    a, b = build(), build()
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(1 + 2.0**-52)
    def torch_clip(m: nn.Module, c: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(m.parameters(), c)

    worst, _ = train_pair(a, b, cls(a.parameters(), **hp), cls(b.parameters(), **hp), data, steps,
                          clip=clip, wide_clip=torch_clip if clip is not None else None)
    return worst


class Fn(nn.Module):
    """A module whose forward is ``fn(self, *inputs)``, with ``modules`` as its submodules: one op under test
    wrapped in the least model capture can trace."""

    def __init__(self, fn, **modules: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        for name, m in modules.items():
            self.add_module(name, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


class Fn3(Fn):
    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.fn(self, a, b, c)


def walk_fn(fn, *xs: torch.Tensor, tracer: str = "fx", **modules: nn.Module):
    """The width walk of ``Fn(fn, **modules)`` on one input (or ``Fn3`` on three), with the built-in rules."""
    from graphscale.capture import capture
    from graphscale.infer.engine import walk_graph
    from graphscale.infer.rulebook import RuleBook

    book = RuleBook.load()
    cap = capture((Fn if len(xs) == 1 else Fn3)(fn, **modules), xs, tracer, book)
    return walk_graph(cap.gm, cap.flat_inputs, book)


def record_walk_modes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The mode of every width walk run from now on, in order: ``device`` (meta tensors),
    ``FakeTensorMode`` or ``nullcontext`` (real values)."""
    import graphscale.infer.engine as engine

    modes: list[str] = []
    walk = engine._walk

    def spy(gm: torch.fx.GraphModule, inputs: list, book: object, mode: object) -> object:
        modes.append(type(mode).__name__)
        return walk(gm, inputs, book, mode)

    monkeypatch.setattr(engine, "_walk", spy)
    return modes


def same_dim(w, a: int, b: int) -> bool:
    """Whether dimensions ``a`` and ``b`` of walk ``w`` are one."""
    return w.ds.find(a) == w.ds.find(b)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference over ``1 + max |want|``: relative for large outputs, absolute near 0."""
    return ((got - want).abs().max() / (1 + want.abs().max())).item()


def trains_alike(small: nn.Module, large: nn.Module, draw, steps: int = 5,
                 weight_decay: float = 0.1) -> float:
    """Worst :func:`rel_error` of ``large`` against ``small`` over ``steps`` AdamW steps on the batches
    ``draw(generator)`` makes (plain AdamW for ``small``, μP groups from its record for ``large``)."""
    import graphscale

    hp = dict(lr=1e-2, eps=1e-12, weight_decay=weight_decay)
    s_opt = torch.optim.AdamW(small.parameters(), **hp)
    l_opt = graphscale.mup_optimizer(large, torch.optim.AdamW, **hp)
    worst = 0.0
    for i in range(steps):
        xb = draw(torch.Generator().manual_seed(i))
        for model, opt in ((small, s_opt), (large, l_opt)):
            opt.zero_grad()
            model(xb).square().mean().backward()
            opt.step()
        with torch.no_grad():
            worst = max(worst, rel_error(large(xb), small(xb)))
    return worst


def split_heads(y: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """``(batch, time, heads * head_dim)`` -> ``(batch, heads, time, head_dim)``, the sizes written out as a
    model's own code writes them (the small attentions of the widen_into tests)."""
    return y.view(y.shape[0], y.shape[1], heads, head_dim).transpose(1, 2)


def merge_heads(a: torch.Tensor) -> torch.Tensor:
    """``(batch, heads, time, head_dim)`` -> ``(batch, time, heads * head_dim)`` (:func:`split_heads`
    undone)."""
    return a.transpose(1, 2).reshape(a.shape[0], a.shape[2], -1)
