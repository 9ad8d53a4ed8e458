"""Shared pieces of the graphscale examples: data loaders, training loop, the upscaling protocol, plots.

Every script (``mlp_digits.py``, ``cnn_digits.py``, ``gpt_shakespeare.py``, ``hp_transfer.py``) describes
its task as a :class:`Task` (how to build a model of a given width, draw a batch, and count FLOPs) and
hands it to :func:`run_upscaling_experiment`, which runs the same protocol for all three:

1. tune the base learning rate on a grid at width n/2 (the proxy's small model);
2. proxy upscaling n/2 -> n: train the n/2 model, then sweep the post-upscale lr (as a multiple of the
   base lr) and noise std on a grid (each point trained ``proxy_steps``; an optimum on the edge of the
   lr multiples, or of its noise kind's stds, extends that axis);
3. target upscaling n -> kn: train the width-n model with its own lr tuned on a grid at width n (it stands
   for an existing, well-trained family member; ``tune_base_at_width=False`` reuses the n/2 lr instead,
   which is not a μP transfer since both bases are plain AdamW), widen it with graphscale using the
   proxy's best (lr multiple, noise) *unchanged*, and keep training;
4. baseline: a from-scratch μP model at width kn whose lr is tuned on a grid at the target width;
5. report losses, steps to reach the scratch model's final val loss, and FLOPs (with the base model's);
   with ``Settings.repeats`` > 1, also both chosen recipes rerun with fresh seeds, compared on their means.

With ``Settings.grid_seeds`` > 1 the two grids that pick a recipe (the proxy's lr x noise grid and
scratch's lr grid) score each point on the mean final val of that many seeds instead of one.

"Final" losses are the mean of the last ``Settings.final_window`` evaluations everywhere (grid scores
included), and crossings read the same trailing mean: a constant-lr run fluctuates between evaluations.
Every run uses the same lr schedule (``Settings.schedule``): linear warmup, then constant or a cosine
decay over that run's own steps.

All graphscale calls live in the "graphscale adapters" section below, so the rest runs on plain torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:  # tqdm is a graphscale dependency; degrade to a plain range if it is missing.
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    def tqdm(it: Any, **_: Any) -> Any:  # type: ignore[no-redef]
        return it

EXAMPLES_DIR = Path(__file__).resolve().parent
RESULTS_DIR = EXAMPLES_DIR / "results"
API = ("widen", "mup_optimizer", "mup_init_", "relative_record", "noise")  # what the examples need
LR_GRID_FACTOR = 2.0
NOISE_GRID_FACTOR = 2.0  # the proxy's noise std grid grows by this factor past an edge optimum


# ----------------------------------------------------------------------------------------------------
# graphscale adapters: the only place the examples touch graphscale.
# ----------------------------------------------------------------------------------------------------

def graphscale_available() -> bool:
    """True when the graphscale API used by the examples (widen, mup_optimizer, noise) is importable."""
    try:
        import graphscale
    except ImportError:
        return False
    return all(hasattr(graphscale, n) for n in API)


_PLANS: dict[int, tuple[nn.Module, Any]] = {}


def upscale(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], k: int, noise_std: float,
            noise_kind: str = "gaussian", seed: int = 0) -> nn.Module:
    """Widen ``model`` by ``k`` with graphscale (exact copy + rescale) and inject width-scaled noise.

    The analysis (trace, width inference, scaling laws) is cached per source module, so a grid of
    upscalings of one trained model pays for it once; graphscale never modifies the source.
    """
    import graphscale

    # graphscale's own spec parser: a kind it does not know fails here, naming the kinds it has
    noise = graphscale.noise.noise_from_spec(f"{noise_kind}:{noise_std!r}") if noise_std > 0 else None
    kw: dict[str, Any] = {}
    if hasattr(graphscale, "analyze"):
        cached = _PLANS.get(id(model))
        if cached is None or cached[0] is not model:
            cached = _PLANS[id(model)] = (model, graphscale.analyze(model, example_inputs))
        kw["plan"] = cached[1]
    return graphscale.widen(model, example_inputs, multiplier=k, noise=noise, seed=seed, **kw)


_RECORDS: dict[tuple[str, int, int], Any] = {}


def _scratch_record(model: nn.Module, base: nn.Module, example_inputs: tuple[torch.Tensor, ...], key: tuple
                    ) -> Any:
    """The μP record of ``model`` relative to ``base`` (computed once per architecture and widths)."""
    import graphscale

    if key not in _RECORDS:
        _RECORDS[key] = graphscale.relative_record(model, example_inputs, base)
    return _RECORDS[key]


def relative_record_for(make: Callable[[int], nn.Module], width: int, base_width: int,
                        example_inputs: tuple[torch.Tensor, ...]) -> Any:
    """The μP record of a model of ``width`` relative to one of ``base_width`` (by parameter name)."""
    model, base = make(width), make(base_width)
    return _scratch_record(model, base, example_inputs, (type(model).__name__, width, base_width))


def mup_optimizer(model: nn.Module, lr: float, weight_decay: float, *, record: Any = None
                  ) -> torch.optim.Optimizer:
    """μP AdamW relative to the narrow source (a widened model) or to the base of ``record`` (scratch)."""
    import graphscale

    kw: dict[str, Any] = dict(lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), eps=1e-8)
    if record is None:
        return graphscale.mup_optimizer(model, torch.optim.AdamW, **kw)
    return graphscale.mup_optimizer(model, torch.optim.AdamW, record=record, **kw)


def mup_scratch_model(make: Callable[[int], nn.Module], width: int, base_width: int,
                      example_inputs: tuple[torch.Tensor, ...], seed: int) -> tuple[nn.Module, Any]:
    """A from-scratch model at ``width``, μP-initialised relative to a fresh model of ``base_width``;
    returns it with its record (for :func:`mup_optimizer`)."""
    import graphscale

    torch.manual_seed(seed)
    base = make(base_width)
    model = make(width)
    record = _scratch_record(model, base, example_inputs, (type(model).__name__, width, base_width))
    graphscale.mup_init_(model, example_inputs, base=base, record=record)
    return model, record


def mup_family_member(task: Task, width: int, smallest: int, lr: float, seed: int
                      ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh member of a μP family relative to width ``smallest``, with its optimizer: the smallest is
    its own μP base (plain AdamW), any other gets ``mup_init_`` + μP AdamW relative to it, so one lr fits
    every width."""
    if width == smallest:
        torch.manual_seed(seed)
        model = task.make_model(width)
        return model, plain_optimizer(model, lr, task.weight_decay)
    model, record = mup_scratch_model(task.make_model, width, smallest, task.example_inputs, seed)
    return model, mup_optimizer(model, lr, task.weight_decay, record=record)


def plain_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with one lr for every tensor (standard parametrization; also μP for a model that is its own
    base width)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95),
                             eps=1e-8)


# ----------------------------------------------------------------------------------------------------
# Tasks, training and evaluation
# ----------------------------------------------------------------------------------------------------

@dataclass
class Task:
    """One learning problem: models by width, batches, fixed evaluation sets and a FLOP counter."""

    name: str
    make_model: Callable[[int], nn.Module]
    get_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_eval: list[tuple[torch.Tensor, torch.Tensor]]
    val_eval: list[tuple[torch.Tensor, torch.Tensor]]
    example_inputs: tuple[torch.Tensor, ...]
    flops_per_step: Callable[[nn.Module], float]
    weight_decay: float = 0.0


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss over fixed batches. The model stays in train mode (BatchNorm uses batch statistics),
    matching the statistics it is trained with; GPT and MLP have no train/eval difference."""
    total, count = 0.0, 0
    for x, y in batches:
        total += float(task.loss_fn(model(x), y)) * len(x)
        count += len(x)
    return total / count


@dataclass
class Curve:
    """A training run's record: eval points (step, train loss, val loss) and its FLOPs per step."""

    label: str
    lr: float
    steps: list[int] = field(default_factory=list)
    train: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    flops_per_step: float = 0.0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_val(self) -> float:
        return self.val[-1]

    @property
    def final_train(self) -> float:
        return self.train[-1]

    def as_dict(self) -> dict[str, Any]:
        return dict(label=self.label, lr=self.lr, steps=self.steps, train_loss=self.train, val_loss=self.val,
                    flops_per_step=self.flops_per_step, seconds=round(self.seconds, 2),
                    final_train_loss=self.final_train, final_val_loss=self.final_val, **self.extra)


COSINE_FLOOR = 0.1  # the cosine schedule ends at this fraction of the peak lr (as nanoGPT does)
SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, steps: int, warmup: int, schedule: str = "constant") -> float:
    """The lr multiplier after ``step`` updates: linear warmup over ``warmup`` steps, then 1 ("constant")
    or a cosine from 1 to ``COSINE_FLOOR`` at ``steps`` ("cosine").

    >>> lr_factor(9, 100, 10), lr_factor(100, 100, 10, "cosine")
    (1.0, 0.1)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}: use one of {SCHEDULES}")
    if warmup and step + 1 < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or steps <= warmup:
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup) / (steps - warmup)))
    return COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))


def train(model: nn.Module, opt: torch.optim.Optimizer, task: Task, steps: int, *, label: str, lr: float,
          eval_every: int, warmup: int = 0, seed: int = 0, progress: bool = True, keep_best: bool = False,
          patience: int = 0, eval_from: int = 0, schedule: str = "constant") -> Curve:
    """Train for ``steps`` AdamW steps (lr schedule: :func:`lr_factor`), evaluating every ``eval_every``.

    Step 0 is evaluated before any update; the curve's last point is ``steps`` unless training stopped
    early. With ``keep_best`` the model ends with the weights of its best evaluation (training "to its
    plateau", i.e. early stopping), and ``curve.extra["best_step"]`` says which step that was; with
    ``patience > 0`` as well, training stops once ``patience`` evaluations in a row have not improved on
    the best val loss (``curve.extra["steps_trained"]`` is always the number of updates made).
    Evaluations before step ``eval_from`` (other than step 0) are skipped, for grid runs scored on their
    last few evaluations only.
    """
    gen = torch.Generator().manual_seed(seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, steps, warmup, schedule))
    curve = Curve(label=label, lr=lr, flops_per_step=task.flops_per_step(model))
    t0 = time.perf_counter()

    def record(step: int) -> None:
        curve.steps.append(step)
        curve.train.append(evaluate(model, task, task.train_eval))
        curve.val.append(evaluate(model, task, task.val_eval))

    best: tuple[float, int, dict[str, torch.Tensor] | None] = (float("inf"), 0, None)
    stale = 0  # evaluations since the last new best

    def remember(step: int) -> None:
        nonlocal best, stale
        if keep_best and curve.val[-1] < best[0]:
            best = (curve.val[-1], step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            stale = 0
        else:
            stale += 1

    model.train()
    record(0)
    remember(0)
    bar = tqdm(range(1, steps + 1), desc=label, leave=False, disable=not progress, mininterval=1.0)
    trained = 0
    for step in bar:
        trained = step
        x, y = task.get_batch(gen)
        loss = task.loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not math.isfinite(loss.item()):
            record(step)
            break
        if (step % eval_every == 0 and step >= eval_from) or step == steps:
            record(step)
            remember(step)
            bar.set_postfix(val=f"{curve.val[-1]:.4f}")
            if keep_best and patience > 0 and stale >= patience:
                if step != steps:
                    print(f"  [{label}] plateau: no better val in {patience} evaluations, stopped at step "
                          f"{step} (best at {best[1]})")
                break
    if keep_best and best[2] is not None:
        model.load_state_dict(best[2])
        curve.extra["best_step"] = best[1]
    curve.extra["steps_trained"] = trained
    curve.seconds = time.perf_counter() - t0
    return curve


def score(curve: Curve, last: int = 1) -> float:
    """What a grid search minimises: the mean of the last ``last`` val evaluations (inf if diverged)."""
    vals = curve.val[-last:]
    out = sum(vals) / len(vals)
    return out if math.isfinite(out) else float("inf")


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start): a constant-lr curve
    fluctuates from one evaluation to the next, so final losses and crossings are read off this."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
            for i in range(len(values))]


def lr_grid(center: float, points: int) -> list[float]:
    """``points`` learning rates spaced by ``LR_GRID_FACTOR`` around ``center`` (center included)."""
    lo = -(points // 2)
    return [center * LR_GRID_FACTOR ** i for i in range(lo, lo + points)]


def steps_to_reach(curve: Curve, target: float, window: int = 1) -> int | None:
    """First evaluated step at which the val loss (trailing mean over ``window`` evaluations) is <=
    ``target`` (None if never)."""
    for s, v in zip(curve.steps, trailing_mean(curve.val, window)):
        if v <= target:
            return s
    return None


def count_linear_conv_macs(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> float:
    """Multiply-accumulates per example of every Linear/Conv in one forward (hook-based, batch-averaged).

    Training FLOPs per example are estimated as 6 * MACs (forward 2, backward 4), the analogue of
    6 * params * tokens for a transformer.
    """
    total = [0.0]

    def hook(mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Linear):
            total[0] += mod.weight.numel() * (out.numel() // out.shape[-1])
        elif isinstance(mod, nn.Conv2d):
            total[0] += mod.weight.numel() * out.shape[-1] * out.shape[-2] * out.shape[0]

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return total[0] / example_inputs[0].shape[0]


def n_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------------------------------
# The upscaling protocol shared by the three experiments
# ----------------------------------------------------------------------------------------------------

@dataclass
class Settings:
    """Knobs of one run of the protocol (full and --quick settings are set by each script)."""

    width: int  # n: the base width that is upscaled to k * n
    k: int = 2
    steps: int = 1000  # scratch budget at width k*n; the upscaled model also gets this many post-upscale
    base_steps: int = 1000  # steps (at most) for the width-n (and n/2 proxy) base models
    # plateau stopping of those two bases: stop after this many evaluations without a better val loss (0:
    # train all base_steps); either way the base is widened at its best val evaluation
    base_patience: int = 0
    base_lr_steps: int | None = None  # steps per point of the base lr grid at n/2 (None: base_steps)
    # True: the width-n base gets its own lr grid at width n (an existing family member, trained well at
    # its width); the post-upscale lr is the proxy's multiple of *this* lr. Only the chosen run's FLOPs
    # count. False: reuse the n/2 lr, which in standard parametrization is often too high at width n.
    tune_base_at_width: bool = True
    # lr schedule of every run (bases, proxy, upscaled, scratch): linear warmup, then "constant" or
    # "cosine" (decay to COSINE_FLOOR x the peak lr over the run's own steps)
    schedule: str = "constant"
    # decay schedules only: the upscaled model also trains with its schedule compressed to these fractions
    # of the budget (one run each from the same widened base), because a decayed run's loss half way says
    # little about what a run of half the length reaches; the shortest horizon whose final val reaches
    # scratch's is then the "steps to reach" that counts
    horizon_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    # post-upscale steps per proxy grid point (n/2 -> n); None: ``steps``, the target's horizon
    proxy_steps: int | None = None
    eval_every: int = 50
    warmup: int = 50
    base_lr_center: float = 3e-3
    base_lr_points: int = 3
    # the width-n base's lr grid (tune_base_at_width): lr_grid's points around the n/2 lr, 4 spanning /4 ..
    # x2, because in standard parametrization the best lr falls with width, and on a noisy 3-point grid
    # centred on the n/2 lr one lucky point can end the search above the optimum
    base_n_lr_points: int = 4
    scratch_lr_points: int = 4
    post_lr_mults: tuple[float, ...] = (0.5, 1.0, 2.0)  # post-upscale lr = mult * base lr
    # (graphscale.noise kind, std); the *_relative kinds scale each weight's noise by its own RMS, so the
    # std the proxy finds still means the same perturbation on a target base trained at another lr
    noises: tuple[tuple[str, float], ...] = (("gaussian_relative", 0.0), ("gaussian_relative", 0.2),
                                             ("gaussian_relative", 0.5))
    # the absolute-noise grid every run had before the relative kinds (--absolute-noise reproduces those)
    absolute_noises: tuple[tuple[str, float], ...] | None = None
    # how many times an lr grid (or the proxy's noise grid) may grow past an edge optimum: a search goes on
    # until its optimum is interior, and this cap only stops one whose loss never turns; a grid still
    # on an edge when it stops is named in results.json's grid_optima_on_edge
    max_extend: int = 6
    # the proxy's noise grid grows past an edge optimum too (std x2 or /2, within the best noise kind), like
    # the lr grids: a proxy whose best std is its largest has not found the noise it is meant to transfer.
    # False (--fixed-noise-grid): the fixed noise grid, as every run before this setting existed had it
    extend_noise_grid: bool = True
    # "final" losses (grid scores, the comparison, its target) are the mean of the last final_window
    # evaluations, and "steps to reach" reads the same trailing mean: for a small fixed val set (digits),
    # where single evaluations of a constant-lr run fluctuate by more than the differences measured. A
    # trailing mean lags a curve that is still falling, so a task with a large val set should use 1.
    final_window: int = 3
    # from-scratch baselines: "mup" (μP init + μP AdamW relative to width n) and/or "sp" (the model's own
    # init + plain AdamW); each gets its own lr grid and the best final val loss over all is "scratch".
    scratch_parametrizations: tuple[str, ...] = ("mup",)
    # AdamW decoupled weight decay grid (None: the task's single weight_decay, no tuning). With a grid,
    # each wd is tuned like the lr, for every run: the base (lr, wd) at n/2, the post-upscale wd on the
    # proxy (jointly with lr and noise; transferred unchanged to the target), scratch's (lr, wd) at kn.
    weight_decays: tuple[float, ...] | None = None
    # the two chosen recipes are each run this many times in all (1: once), the reruns with fresh seeds
    # for what is random once the arms part: the upscaled model's noise draw and batches (from the same
    # trained base), scratch's init and batches. Where one run's final val is noisy (digits), the scratch
    # run its grid picked is partly its grid's luckiest draw, picked and reported on the same val set; the
    # reruns' means compare the recipes without that bias.
    repeats: int = 1
    # the two grids that choose a recipe, the proxy's (lr multiple, noise) and scratch's lr, score each
    # point on the mean final val over this many seeds (1: one run per point). A one-run grid on a noisy
    # val set picks partly on luck (a poor recipe can win one draw); the mean picks on the recipe. The
    # base grids stay one run each: they pick a trained model, which is then used as it is.
    grid_seeds: int = 1
    seed: int = 0


REPEAT_SEED_STRIDE = 1000  # Settings.repeats: rerun r of a --seed S run uses seed S + 1000 r
# Settings.grid_seeds: grid run j of a --seed S run uses seed S + 100 j, so j < 10 never meets a rerun's
GRID_SEED_STRIDE = 100
MAX_GRID_SEEDS = REPEAT_SEED_STRIDE // GRID_SEED_STRIDE
# --base-plateau ("train the small model ... to its plateau", the other setting): the width-n and
# n/2 bases may train up to PLATEAU_FACTOR x the scratch budget and stop after PLATEAU_PATIENCE evaluations
# without a better val loss
PLATEAU_FACTOR = 3
PLATEAU_PATIENCE = 6


def mean(xs: Sequence[float]) -> float:
    """The arithmetic mean (as ``sum / len``, so committed JSON reproduces bit for bit).

    >>> mean([1.0, 2.0, 4.0])
    2.3333333333333335
    """
    return sum(xs) / len(xs)


def tune_lr(task: Task, make_run: Callable[[float], Curve], grid: list[float], label: str,
            max_extend: int = 6, last: int = 1, on_edge: list[str] | None = None,
            key: Callable[[Curve], float] | None = None) -> tuple[float, list[Curve]]:
    """Grid search over ``grid`` scored on the mean of the last ``last`` evaluations (or on ``key`` of
    each run's curve); if the best lr sits on an edge, extend that edge (at most ``max_extend`` times) so
    the reported optimum is interior where possible. A search that stops with its optimum still on an edge
    appends ``label`` to ``on_edge``."""
    curves = {lr: make_run(lr) for lr in grid}
    key_of = key if key is not None else (lambda c: score(c, last))

    def next_lr() -> tuple[float, float | None]:
        lrs = sorted(curves)
        best = min(lrs, key=lambda lr: key_of(curves[lr]))
        if best == lrs[0]:
            return best, best / LR_GRID_FACTOR
        return best, (best * LR_GRID_FACTOR if best == lrs[-1] else None)

    for _ in range(max_extend):
        best, new = next_lr()
        if new is None:
            break
        print(f"  [{label}] best lr {best:.3g} on grid edge; extending to {new:.3g}")
        curves[new] = make_run(new)
    best, new = next_lr()
    if new is not None:
        print(f"  [{label}] best lr {best:.3g} is still on the grid edge after {max_extend} extensions")
        if on_edge is not None:
            on_edge.append(label)
    return best, [curves[lr] for lr in sorted(curves)]


ProxyPoint = tuple[float, str, float, float]  # (post-upscale lr multiple, noise kind, noise std, wd)


def proxy_edge_points(scores: dict[ProxyPoint, float]) -> dict[str, ProxyPoint]:
    """Per axis ("lr", "noise") whose optimum sits on its grid's edge, the next point past that edge.

    The lr multiples form one grid; the noise grid is the best kind's stds (a kind with at least two, and
    never below 0). The other knobs stay at their best.

    >>> scores = {(1.0, "gaussian", 0.0, 0.0): 0.9, (1.0, "gaussian", 0.5, 0.0): 0.8,
    ...           (0.5, "gaussian", 0.5, 0.0): 0.85, (2.0, "gaussian", 0.5, 0.0): 0.95}
    >>> proxy_edge_points(scores)
    {'noise': (1.0, 'gaussian', 1.0, 0.0)}
    """
    mult, kind, std, wd = min(scores, key=scores.__getitem__)
    mults = sorted({m for m, *_ in scores})
    stds = sorted({sd for _, kd, sd, _ in scores if kd == kind})
    edges: dict[str, ProxyPoint] = {}
    if len(mults) >= 2 and mult in (mults[0], mults[-1]):
        edges["lr"] = (mult / LR_GRID_FACTOR if mult == mults[0] else mult * LR_GRID_FACTOR, kind, std, wd)
    if len(stds) >= 2 and (std == stds[-1] or (std == stds[0] and std > 0)):
        edges["noise"] = (mult, kind, std * NOISE_GRID_FACTOR if std == stds[-1] else std / NOISE_GRID_FACTOR,
                          wd)
    return edges


def proxy_grid_extension(scores: dict[ProxyPoint, float], extensions: dict[str, int], max_extend: int,
                         extend_noise: bool = True) -> tuple[str, ProxyPoint] | None:
    """The proxy grid's next point, or None when its optimum is interior (or the extensions are spent).

    An optimum on the edge of the lr multiples is extended first ("lr"), then one on the edge of its noise
    kind's stds ("noise"), as :func:`proxy_edge_points` finds them. ``extensions`` counts what each axis
    has added so far; an axis stops at ``max_extend``.

    >>> scores = {(1.0, "gaussian", 0.0, 0.0): 0.9, (1.0, "gaussian", 0.5, 0.0): 0.8,
    ...           (0.5, "gaussian", 0.5, 0.0): 0.85, (2.0, "gaussian", 0.5, 0.0): 0.95}
    >>> proxy_grid_extension(scores, {"lr": 0, "noise": 0}, max_extend=2)
    ('noise', (1.0, 'gaussian', 1.0, 0.0))
    """
    edges = proxy_edge_points(scores)
    for axis in ("lr", "noise") if extend_noise else ("lr",):
        if axis in edges and extensions[axis] < max_extend:
            return axis, edges[axis]
    return None


def _proxy_point(point: ProxyPoint, axis: str) -> str:
    return f"post-upscale lr x{point[0]:g}" if axis == "lr" else f"noise {point[1]} {point[2]:g}"


def run_upscaling_experiment(task: Task, s: Settings, out: Path, progress: bool = True) -> dict[str, Any]:
    """Run the protocol in the module doc, write ``results.json`` and plots to ``out``; return the dict."""
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    n, k = s.width, s.k
    half = n // k
    ex = task.example_inputs
    report: dict[str, Any] = dict(task=task.name, settings=s.__dict__.copy(), widths=dict(proxy_base=half,
                                  base=n, wide=k * n))
    report["settings"]["post_lr_mults"] = list(s.post_lr_mults)
    report["settings"]["noises"] = [list(x) for x in s.noises]
    proxy_steps = s.steps if s.proxy_steps is None else s.proxy_steps
    window = s.final_window

    def final(curve: Curve) -> float:  # the protocol's "final" loss of a run (also what grids minimise)
        return score(curve, window)

    def fresh(width: int, seed: int = s.seed) -> nn.Module:
        torch.manual_seed(seed)
        return task.make_model(width)

    # Settings.grid_seeds: the seeds of a recipe grid point's further runs (its first run uses s.seed)
    grid_seeds = [s.seed + GRID_SEED_STRIDE * j for j in range(1, s.grid_seeds)]

    # 1. base lr, tuned at width n/2 with plain AdamW (a model is its own μP base) and reused at n.
    print(f"[{task.name}] 1/5 tuning base lr at width {half}")

    wds = (task.weight_decay,) if s.weight_decays is None else tuple(s.weight_decays)
    on_edge: list[str] = []  # grids whose optimum is still on an edge when their search stops

    def base_run(lr: float, wd: float, width: int = half) -> Curve:
        m = fresh(width)
        steps = s.base_steps if s.base_lr_steps is None else s.base_lr_steps
        c = train(m, plain_optimizer(m, lr, wd), task, steps, label=f"base{width} wd{wd:g}",
                  lr=lr, eval_every=s.eval_every, warmup=s.warmup, schedule=s.schedule, seed=s.seed,
                  progress=progress)
        c.extra["weight_decay"] = wd
        return c

    base_curves: list[Curve] = []
    for wd in wds:
        _, curves = tune_lr(task, lambda lr, wd=wd: base_run(lr, wd), lr_grid(s.base_lr_center,
                            s.base_lr_points), f"base lr (wd {wd:g})", s.max_extend, window, on_edge)
        base_curves += curves
    best_base = min(base_curves, key=final)
    base_lr, base_wd = best_base.lr, best_base.extra["weight_decay"]
    report["base_lr"] = base_lr
    report["base_weight_decay"] = base_wd
    report["base_lr_grid"] = {(f"{c.lr:.4g}" if s.weight_decays is None else
                               f"{c.lr:.4g},wd={c.extra['weight_decay']:g}"): final(c) for c in base_curves}

    # 2. proxy upscaling n/2 -> n: sweep post-upscale lr and noise on the n/2 model trained with base_lr.
    print(f"[{task.name}] 2/5 proxy upscaling {half} -> {n}: lr x noise grid")
    proxy_base = fresh(half)
    proxy_base_curve = train(proxy_base, plain_optimizer(proxy_base, base_lr, base_wd), task,
                             s.base_steps, label=f"proxy base {half}", lr=base_lr, eval_every=s.eval_every,
                             warmup=s.warmup, schedule=s.schedule, seed=s.seed, progress=progress,
                             keep_best=True, patience=s.base_patience)
    report["proxy_base"] = dict(best_step=proxy_base_curve.extra["best_step"],
                                steps_trained=proxy_base_curve.extra["steps_trained"],
                                best_val=min(proxy_base_curve.val))
    def train_upscaled(source: nn.Module, lr: float, kind: str, std: float, wd: float, steps: int, label: str,
                       scored_only: bool = True, seed: int = s.seed) -> tuple[nn.Module, Curve]:
        """Widen ``source`` x k with (kind, std) noise and train it with μP AdamW. ``scored_only`` (grid
        runs) skips the evaluations before the last ``window``; a full run instead also records how far
        the noise moved the outputs (the exact widening alone moves them by rounding only). ``seed``
        draws the noise (and, plus one, the batches)."""
        wide = upscale(source, ex, k, std, kind, seed=seed)
        gap = None
        if not scored_only:
            with torch.no_grad():
                gap = float((wide(*ex) - source(*ex)).abs().max())
        c = train(wide, mup_optimizer(wide, lr, wd), task, steps, label=label, lr=lr, eval_every=s.eval_every,
                  warmup=s.warmup, schedule=s.schedule, seed=seed + 1, progress=progress,
                  eval_from=steps - (window - 1) * s.eval_every if scored_only else 0)
        if gap is not None:
            c.extra["max_output_change_at_upscale"] = gap
        return wide, c

    scores: dict[ProxyPoint, float] = {}
    proxy_runs: dict[ProxyPoint, list[float]] = {}  # each point's final val per grid seed

    def proxy_run(mult: float, kind: str, std: float, wd: float) -> None:
        lr = mult * base_lr
        point = (mult, kind, std, wd)
        proxy_runs[point] = [final(train_upscaled(proxy_base, lr, kind, std, wd, proxy_steps,
                                                  f"proxy lr{lr:.2g} {kind}{std} wd{wd:g}"
                                                  + (f" seed {g}" if g != s.seed else ""), seed=g)[1])
                             for g in [s.seed, *grid_seeds]]
        scores[point] = mean(proxy_runs[point])

    for mult in s.post_lr_mults:
        for kind, std in s.noises:
            for wd in wds:
                proxy_run(mult, kind, std, wd)
    # like the other lr grids, an optimum on the edge of the lr multiples extends the grid, and then one on
    # the edge of its noise kind's stds extends those (each with the other knobs at their best only: a
    # coordinate step, to keep the proxy cheap); each axis grows at most max_extend times
    extensions = {"lr": 0, "noise": 0}
    while (step := proxy_grid_extension(scores, extensions, s.max_extend, s.extend_noise_grid)) is not None:
        axis, point = step
        extensions[axis] += 1
        best = min(scores, key=scores.__getitem__)
        print(f"  [proxy] best {_proxy_point(best, axis)} on grid edge;"
              f" extending to {_proxy_point(point, axis)}")
        proxy_run(*point)
    if not any(math.isfinite(v) for v in scores.values()):
        raise RuntimeError("every proxy run diverged")
    for axis in proxy_edge_points(scores):
        print(f"  [proxy] best {axis} is still on its grid edge after {extensions[axis]} extensions")
        on_edge.append(f"proxy {axis}")
    post_mult, noise_kind, noise_std, post_wd = min(scores, key=scores.__getitem__)
    post_lr = post_mult * base_lr

    def proxy_key(point: ProxyPoint) -> str:
        m, kd, sd, w = point
        return f"lr_mult={m:g},noise={kd}:{sd:g}" + ("" if s.weight_decays is None else f",wd={w:g}")

    report["proxy_grid_final_val"] = {proxy_key(pt): v for pt, v in scores.items()}  # the grid seeds' mean
    if grid_seeds:
        report["proxy_grid_final_val_by_seed"] = {proxy_key(pt): v for pt, v in proxy_runs.items()}
    report["transferred"] = dict(post_lr=post_lr, post_lr_mult=post_mult, noise_std=noise_std,
                                 noise_kind=noise_kind, weight_decay=post_wd)
    print(f"  proxy best: post-upscale lr {post_lr:.3g} (x{post_mult:g}), noise {noise_kind} {noise_std:g},"
          f" wd {post_wd:g}")

    # 3. target upscaling n -> kn with the transferred knobs.
    print(f"[{task.name}] 3/5 base model at width {n}, then upscaling {n} -> {k * n}")
    trained: dict[float, tuple[nn.Module, Curve]] = {}

    def base_n_run(lr: float) -> Curve:
        m = fresh(n)
        label = f"base {n}" + (f" lr{lr:.2g}" if s.tune_base_at_width else "")
        c = train(m, plain_optimizer(m, lr, base_wd), task, s.base_steps, label=label, lr=lr,
                  eval_every=s.eval_every, warmup=s.warmup, schedule=s.schedule, seed=s.seed,
                  progress=progress, keep_best=True, patience=s.base_patience)
        trained[lr] = (m, c)
        return c

    if s.tune_base_at_width:
        base_n_lr, curves = tune_lr(task, base_n_run, lr_grid(base_lr, s.base_n_lr_points),
                                    f"base lr at {n}", s.max_extend, window, on_edge)
        report["base_n_lr_grid"] = {f"{c.lr:.4g}": final(c) for c in curves}
        post_lr = post_mult * base_n_lr
        report["transferred"]["post_lr"] = post_lr
        print(f"  width-{n} base lr {base_n_lr:.3g}; post-upscale lr x{post_mult:g} of it: {post_lr:.3g}")
    else:
        base_n_lr = base_lr
        base_n_run(base_lr)
    report["base_n_lr"] = base_n_lr
    base, base_curve = trained[base_n_lr]
    base_used = base_curve.extra["best_step"]  # the base model is upscaled at its best val point
    base_trained = base_curve.extra["steps_trained"]  # ... but every step it trained is paid for
    wide, up_curve = train_upscaled(base, post_lr, noise_kind, noise_std, post_wd, s.steps,
                                    f"upscaled {n}->{k * n}", scored_only=False)

    # 4. scratch baseline at kn, lr tuned on a grid at the target width.
    print(f"[{task.name}] 4/5 scratch at width {k * n}: lr grid")

    def scratch_run(lr: float, param: str, wd: float, seed: int = s.seed) -> Curve:
        if param == "mup":
            m, rec = mup_scratch_model(task.make_model, k * n, n, ex, seed)
            opt = mup_optimizer(m, lr, wd, record=rec)
        else:
            m = fresh(k * n, seed)
            opt = plain_optimizer(m, lr, wd)
        c = train(m, opt, task, s.steps, label=f"scratch {param} {k * n} lr{lr:.2g} wd{wd:g}", lr=lr,
                  eval_every=s.eval_every, warmup=s.warmup, schedule=s.schedule, seed=seed + 1,
                  progress=progress)
        c.extra["parametrization"] = param
        c.extra["weight_decay"] = wd
        return c

    def scratch_point(lr: float, param: str, wd: float) -> Curve:
        """A grid point: the run with s.seed (kept as the point's curve), and with grid_seeds > 1 the
        further seeds' final vals beside it, which the grid's score averages."""
        c = scratch_run(lr, param, wd)
        if grid_seeds:
            c.extra["grid_seed_final_vals"] = [final(c)] + [final(scratch_run(lr, param, wd, seed=g))
                                                            for g in grid_seeds]
        return c

    def scratch_score(c: Curve) -> float:  # what scratch's grid minimises: the grid seeds' mean
        return mean(c.extra["grid_seed_final_vals"]) if grid_seeds else final(c)

    scratch_curves: list[Curve] = []
    for param in s.scratch_parametrizations:
        for wd in wds:
            grid = lr_grid(base_lr, s.scratch_lr_points)
            _, curves = tune_lr(task, lambda lr, p=param, wd=wd: scratch_point(lr, p, wd), grid,
                                f"scratch {param} wd {wd:g}", s.max_extend, window, on_edge, scratch_score)
            scratch_curves += curves
    scratch = min(scratch_curves, key=scratch_score)
    scratch_lr = scratch.lr

    # 5. metrics.
    print(f"[{task.name}] 5/5 metrics and plots")
    target = final(scratch)
    reach = steps_to_reach(up_curve, target, window)
    by_horizon: dict[int, float] = {}
    if s.schedule != "constant":
        for frac in s.horizon_fractions:
            h = round(frac * s.steps)
            by_horizon[h] = final(train_upscaled(base, post_lr, noise_kind, noise_std, post_wd, h,
                                                 f"upscaled, {h}-step run")[1])
        by_horizon[s.steps] = final(up_curve)
    shortest = min((h for h, v in by_horizon.items() if v <= target), default=None)
    # reruns of both chosen recipes (repeat 0 is the run above); REPEAT_SEED_STRIDE keeps their seeds clear of
    # every seed a --seed run uses (seed, seed + 1)
    seeds = [s.seed + REPEAT_SEED_STRIDE * r for r in range(1, s.repeats)]
    up_repeats = [final(up_curve)] + [final(train_upscaled(
        base, post_lr, noise_kind, noise_std, post_wd, s.steps, f"upscaled, rerun seed {r}", seed=r)[1])
        for r in seeds]
    scratch_repeats = [target] + [final(scratch_run(scratch_lr, scratch.extra["parametrization"],
                                                     scratch.extra["weight_decay"], seed=r)) for r in seeds]
    base_flops = base_curve.flops_per_step * base_trained  # in full, the steps after its best included
    scratch_flops = scratch.flops_per_step * s.steps

    def upscaled_flops(post_steps: int | None) -> float | None:  # base training included
        return None if post_steps is None else base_flops + up_curve.flops_per_step * post_steps

    up_flops_at = upscaled_flops(reach)
    shortest_flops = upscaled_flops(shortest)
    report.update(
        scratch_lr=scratch_lr,
        scratch_lr_grid={f"{c.extra['parametrization']}:{c.lr:.4g}" + (
            "" if s.weight_decays is None else f",wd={c.extra['weight_decay']:g}"): scratch_score(c)
            for c in scratch_curves},
        scratch_weight_decay=scratch.extra["weight_decay"],
        scratch_parametrization=scratch.extra["parametrization"],
        base=base_curve.as_dict(),
        upscaled=up_curve.as_dict(),
        scratch=scratch.as_dict(),
        scratch_grid=[c.as_dict() for c in scratch_curves],
        params=dict(base=n_params(base), wide=n_params(wide)),
        grid_optima_on_edge=on_edge,
        comparison=dict(
            final_window=window,
            scratch_final_val=target,
            upscaled_final_val=final(up_curve),
            scratch_final_train=trailing_mean(scratch.train, window)[-1],
            upscaled_final_train=trailing_mean(up_curve.train, window)[-1],
            scratch_last_val=scratch.final_val,
            upscaled_last_val=up_curve.final_val,
            upscaled_val_at_equal_steps_le_scratch=final(up_curve) <= target,
            upscaled_steps_to_scratch_final_val=reach,
            # the same crossing against scratch's single last evaluation (= the above when final_window=1)
            upscaled_steps_to_scratch_last_val=steps_to_reach(up_curve, scratch.final_val),
            upscaled_steps_fraction=None if reach is None else reach / s.steps,
            scratch_flops=scratch_flops,
            base_training_flops=base_flops,
            base_steps_used=base_used,
            base_steps_trained=base_trained,
            upscaled_total_flops_to_reach=up_flops_at,
            upscaled_flops_fraction=None if up_flops_at is None else up_flops_at / scratch_flops,
            upscaled_total_flops_full=upscaled_flops(s.steps),
            # decay schedules: final val of the upscaled model trained with each shorter schedule, and the
            # shortest one that reaches scratch's final val (with its FLOPs, base included)
            upscaled_final_val_by_horizon={str(h): v for h, v in sorted(by_horizon.items())},
            upscaled_shortest_horizon_to_scratch_final_val=shortest,
            upscaled_shortest_horizon_fraction=None if shortest is None else shortest / s.steps,
            upscaled_shortest_horizon_flops_fraction=None if shortest_flops is None else (
                shortest_flops / scratch_flops),
            # Settings.repeats: each chosen recipe's final val over its runs (the first is the run above)
            repeat_seeds=[s.seed, *seeds],
            upscaled_final_val_repeats=up_repeats,
            scratch_final_val_repeats=scratch_repeats,
            upscaled_final_val_mean=mean(up_repeats),
            scratch_final_val_mean=mean(scratch_repeats),
            upscaled_mean_le_scratch_mean=mean(up_repeats) <= mean(scratch_repeats),
        ),
        seconds=round(time.perf_counter() - t_start, 1),
    )
    save_json(report, out / "results.json")
    plot_upscaling(report, out)
    print_summary(report)
    return report


def print_summary(report: dict[str, Any]) -> None:
    """One-screen summary of an upscaling experiment."""
    c = report["comparison"]
    w = report["widths"]
    print(f"\n== {report['task']}: base {w['base']} -> upscaled {w['wide']} vs scratch {w['wide']} ==")
    t = report["transferred"]
    print(f"  base lr {report['base_lr']:.3g}; transferred post-upscale lr {t['post_lr']:.3g},"
          f" noise {t['noise_kind']} {t['noise_std']:g}; scratch lr {report['scratch_lr']:.3g}"
          f" ({report['scratch_parametrization']})"
          + (f"; grids scored on {report['settings']['grid_seeds']} seeds" if report["settings"].get(
              "grid_seeds", 1) > 1 else ""))
    if report["settings"].get("weight_decays") is not None:
        print(f"  weight decay: base {report['base_weight_decay']:g}, transferred post-upscale"
              f" {t['weight_decay']:g}, scratch {report['scratch_weight_decay']:g}")
    print(f"  final val  : upscaled {c['upscaled_final_val']:.4f}   scratch {c['scratch_final_val']:.4f}")
    print(f"  final train: upscaled {c['upscaled_final_train']:.4f}   scratch {c['scratch_final_train']:.4f}")
    frac = c["upscaled_steps_fraction"]
    ff = c["upscaled_flops_fraction"]
    print(f"  steps to scratch's final val: {c['upscaled_steps_to_scratch_final_val']}"
          f" ({'never' if frac is None else f'{frac:.0%} of scratch'});"
          f" FLOPs incl. base: {'n/a' if ff is None else f'{ff:.0%} of scratch'}")
    if c.get("upscaled_final_val_by_horizon"):
        h = c["upscaled_shortest_horizon_to_scratch_final_val"]
        hf = c["upscaled_shortest_horizon_flops_fraction"]
        print(f"  final val by schedule length: {c['upscaled_final_val_by_horizon']}; shortest reaching"
              f" scratch's final val: {'none' if h is None else f'{h} steps, {hf:.0%} of scratch FLOPs'}")
    if len(c.get("repeat_seeds", [])) > 1:
        def runs(xs: Sequence[float]) -> str:
            return ", ".join(f"{x:.4f}" for x in xs)
        print(f"  {len(c['repeat_seeds'])} runs of each recipe (seeds {c['repeat_seeds']}): final val mean"
              f" upscaled {c['upscaled_final_val_mean']:.4f} ({runs(c['upscaled_final_val_repeats'])}),"
              f" scratch {c['scratch_final_val_mean']:.4f} ({runs(c['scratch_final_val_repeats'])})")
    print(f"  took {report['seconds']} s\n")


# ----------------------------------------------------------------------------------------------------
# Output: JSON, plots, CLI
# ----------------------------------------------------------------------------------------------------

def save_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON (non-finite floats become null so the file stays valid JSON)."""
    def clean(o: Any) -> Any:
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed: never a half-written results file
    tmp.write_text(json.dumps(clean(obj), indent=1, allow_nan=False))
    tmp.replace(path)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_upscaling(report: dict[str, Any], out: Path) -> None:
    """Val loss vs steps and vs FLOPs (base model's training included) for base, upscaled and scratch."""
    plt = _plt()
    base, up, sc = report["base"], report["upscaled"], report["scratch"]
    base_flops = base["flops_per_step"] * base.get("steps_trained", base["steps"][-1])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot(up["steps"], up["val_loss"], label=f"upscaled (lr {up['lr']:.2g})")
    ax.plot(sc["steps"], sc["val_loss"], label=f"scratch ({sc.get('parametrization')}), lr {sc['lr']:.2g}")
    for c in report["scratch_grid"]:
        if c is not sc and (c["lr"], c.get("parametrization")) != (sc["lr"], sc.get("parametrization")):
            ax.plot(c["steps"], c["val_loss"], color="gray", alpha=0.3, lw=0.8)
    ax.axhline(report["comparison"]["scratch_final_val"], color="k", ls=":", lw=0.8)
    ax.set_xlabel("steps at the wide width (post-upscale for upscaled)")
    ax.set_ylabel("val loss")
    ax.set_title(f"{report['task']}: val loss vs steps")
    ax = axes[1]
    ax.plot([s * base["flops_per_step"] for s in base["steps"]], base["val_loss"], label=f"base width "
            f"{report['widths']['base']}", color="C2")
    ax.plot([base_flops + s * up["flops_per_step"] for s in up["steps"]], up["val_loss"], label="upscaled "
            "(incl. base training)", color="C0")
    ax.plot([s * sc["flops_per_step"] for s in sc["steps"]], sc["val_loss"], label="scratch", color="C1")
    ax.axhline(report["comparison"]["scratch_final_val"], color="k", ls=":", lw=0.8)
    ax.set_xlabel("training FLOPs (estimate)")
    ax.set_title("val loss vs FLOPs")
    for ax in axes:
        ax.legend(fontsize=8)
        lo = min(min(up["val_loss"]), min(sc["val_loss"]))
        hi = max(sc["val_loss"][min(2, len(sc["val_loss"]) - 1)], up["val_loss"][0])
        if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=90)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None, name: str, doc: str | None,
               add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """``[--quick] [--out DIR] [--threads N] [--no-progress]`` for every example, plus ``add_args``'s."""
    p = argparse.ArgumentParser(description=doc)
    if add_args is not None:
        add_args(p)
    p.add_argument("--quick", action="store_true", help="tiny settings (< 1 minute), for smoke tests")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / name, help="where results.json and plots go")
    p.add_argument("--threads", type=int, default=int(os.environ.get("GRAPHSCALE_EXAMPLES_THREADS", 2)))
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """``--reuse-base-lr``, ``--base-plateau``, ``--schedule``, ``--fixed-noise-grid``, ``--proxy-steps``,
    ``--max-extend``, ``--absolute-noise``, ``--repeats`` and ``--grid-seeds`` (options of the protocol
    every upscaling example shares)."""
    p.add_argument("--reuse-base-lr", action="store_true",
                   help="train the width-n base at the lr tuned at n/2 instead of tuning it at width n (the "
                        "protocol before base tuning became the default); results go to <out>/reuse_base_lr "
                        "unless --out is given")
    p.add_argument("--base-plateau", action="store_true",
                   help=f"train the width-n and n/2 bases to their plateau: up to {PLATEAU_FACTOR}x the "
                        f"scratch budget, stopping after {PLATEAU_PATIENCE} evaluations without a better val "
                        "loss (the n/2 base lr grid keeps the scratch budget, so the proxy's lr and the "
                        "grids centred on it stay those of the default run; the width-n base's own lr grid "
                        "trains each point to its plateau); results go to "
                        "<out>/base_plateau unless --out is given")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant",
                   help="lr schedule of every run after warmup: constant, or cosine decay to "
                        f"{COSINE_FLOOR:g}x over the run's own steps (the control for the lower post-upscale "
                        "lr acting like a decay); a cosine run's results go to <out>/cosine unless --out is "
                        "given")
    p.add_argument("--fixed-noise-grid", action="store_true",
                   help="do not extend the proxy's noise grid past an edge optimum (the protocol of the "
                        "results that predate the extension); results go to <out>/fixed_noise_grid unless "
                        "--out is given")
    p.add_argument("--proxy-steps", type=int, default=None,
                   help="post-upscale steps of each proxy grid run (default: the script's); the scratch "
                        "budget trains the proxy for the horizon its lr and noise are used for; results go "
                        "to <out>/proxy_full_horizon (or <out>/proxy_steps<N>) unless --out is given")
    p.add_argument("--max-extend", type=int, default=None, metavar="N",
                   help="how many times each grid may grow past an edge optimum (default: the script's, 6 "
                        "in the full runs; 2 reproduces the results that predate that default); results go "
                        "to <out>/max_extend<N> unless --out is given")
    p.add_argument("--absolute-noise", action="store_true",
                   help="the proxy's noise grid in absolute stds (std/sqrt(fan_in)), as every run had "
                        "before the default became relative to each weight's RMS; results go to "
                        "<out>/absolute_noise unless --out is given")
    p.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="run each chosen recipe (upscaled, scratch) N times in all, the reruns with fresh "
                        "seeds, and compare their means (default: the script's, 4 for the digits, 1 for the "
                        "GPT); results go to <out>/repeats<N> unless --out is given or N is the default")
    p.add_argument("--grid-seeds", type=int, default=None, metavar="N",
                   help="score each point of the two grids that pick a recipe (the proxy's lr x noise, "
                        f"scratch's lr) on the mean final val of N seeds (1 to {MAX_GRID_SEEDS}; default: "
                        "the script's, 1); results go to <out>/grid_seeds<N> unless --out is given or N is "
                        "the default")


def apply_protocol_args(s: Settings, args: argparse.Namespace, name: str, variant: Sequence[str] = ()
                        ) -> Settings:
    """Settings with ``add_protocol_args``'s options applied. A default ``--out`` moves to a subfolder
    per option (protocol options nest, the script's ``variant`` parts join with "_"), so no run
    overwrites another's results."""
    from dataclasses import replace

    proxy_noises = getattr(args, "proxy_noises", None)  # a digits option only
    if args.out == RESULTS_DIR / name:
        out = RESULTS_DIR / name
        if args.reuse_base_lr:
            out /= "reuse_base_lr"
        if args.base_plateau:
            out /= "base_plateau"
        if args.schedule != "constant":
            out /= args.schedule
        if args.proxy_steps is not None:
            out /= "proxy_full_horizon" if args.proxy_steps == s.steps else f"proxy_steps{args.proxy_steps}"
        if args.fixed_noise_grid:
            out /= "fixed_noise_grid"
        if args.max_extend is not None:
            out /= f"max_extend{args.max_extend}"
        if args.absolute_noise:
            out /= "absolute_noise"
        if proxy_noises:  # e.g. proxy_noises_gaussian_relative0_symmetric_relative1
            out /= "proxy_noises_" + proxy_noises.replace(":", "").replace(",", "_")
        if args.repeats is not None and args.repeats != s.repeats:
            out /= f"repeats{args.repeats}"
        if args.grid_seeds is not None and args.grid_seeds != s.grid_seeds:
            out /= f"grid_seeds{args.grid_seeds}"
        if getattr(args, "width", None) not in (None, s.width):  # a digits option
            out /= f"width{args.width}"
        args.out = out / "_".join(variant) if variant else out
    changes: dict[str, Any] = dict(tune_base_at_width=not args.reuse_base_lr, schedule=args.schedule,
                                   extend_noise_grid=not args.fixed_noise_grid)
    if args.base_plateau:  # the bases train longer; the n/2 lr grid, which centres the others, does not
        changes.update(base_steps=PLATEAU_FACTOR * s.steps, base_patience=PLATEAU_PATIENCE,
                       base_lr_steps=s.base_steps if s.base_lr_steps is None else s.base_lr_steps)
    if args.proxy_steps is not None:
        changes["proxy_steps"] = args.proxy_steps
    if args.max_extend is not None:
        changes["max_extend"] = args.max_extend
    if args.repeats is not None:
        if args.repeats < 1:
            raise SystemExit(f"{name}: --repeats counts the chosen run itself, so it must be >= 1"
                             f" (got {args.repeats})")
        changes["repeats"] = args.repeats
    if args.grid_seeds is not None:
        if not 1 <= args.grid_seeds <= MAX_GRID_SEEDS:
            raise SystemExit(f"{name}: --grid-seeds counts the runs per grid point, from 1 to"
                             f" {MAX_GRID_SEEDS} (its seeds must stay clear of --repeats' reruns);"
                             f" got {args.grid_seeds}")
        changes["grid_seeds"] = args.grid_seeds
    if args.absolute_noise:
        if s.absolute_noises is None:
            raise SystemExit(f"{name}: --absolute-noise: this script has no absolute noise grid")
        if proxy_noises:
            raise SystemExit(f"{name}: give --proxy-noises or --absolute-noise, not both")
        changes["noises"] = s.absolute_noises
    return replace(s, **changes)


def add_regularization_args(p: argparse.ArgumentParser) -> None:
    """``--seed``, ``--augment``, ``--weight-decay-grid``, ``--proxy-noises`` and ``--width`` (the
    MLP/CNN digits options), plus the protocol options."""
    add_protocol_args(p)
    p.add_argument("--weight-decay-grid", default=None, metavar="WD,WD,...",
                   help="AdamW decoupled weight decay grid, tuned for every run like the lr (base at n/2, "
                        "post-upscale on the proxy, scratch at the target), e.g. 0,0.1,1,10; results go to "
                        "<out>/weight_decay unless --out is given")
    p.add_argument("--seed", type=int, default=0,
                   help="training seed (initialisation, batches, noise; the data split stays fixed); a "
                        "non-zero seed's results go to <out>/seed<N> unless --out is given")
    p.add_argument("--augment", action="store_true",
                   help="train every model on the training images and their translations by one pixel "
                        "(9x the data); results go to <out>/augment unless --out is given")
    p.add_argument("--proxy-noises", default=None, metavar="KIND:STD,...",
                   help="proxy noise grid instead of the script's, e.g. "
                        "gaussian_relative:0,gaussian_relative:0.5,symmetric_relative:0.5 (any "
                        "graphscale.noise kind); results go to <out>/proxy_noises_<the grid without ':' "
                        "and ','> unless --out is given")
    p.add_argument("--width", type=int, default=None, metavar="N",
                   help="base width n instead of the script's (the proxy upscales n/2 -> n, the target "
                        "n -> 2n, scratch trains at 2n); results go to <out>/width<N> unless --out is "
                        "given or N is the default")


def apply_regularization(s: Settings, args: argparse.Namespace, name: str) -> Settings:
    """Settings with the ``add_regularization_args`` options applied (and the default ``--out`` moved,
    see :func:`apply_protocol_args`)."""
    from dataclasses import replace

    changes: dict[str, Any] = {}
    variant = []  # the default --out gets a subfolder per option, so runs never overwrite each other
    if args.augment:
        variant.append("augment")
    if args.weight_decay_grid:
        changes["weight_decays"] = tuple(float(x) for x in args.weight_decay_grid.split(","))
        variant.append("weight_decay")
    if args.seed:
        changes["seed"] = args.seed
        variant.append(f"seed{args.seed}")
    if args.proxy_noises:
        changes["noises"] = tuple((kind, float(std)) for kind, std in
                                  (x.split(":") for x in args.proxy_noises.split(",")))
    if args.width is not None and (args.width < 2 * s.k or args.width % s.k):
        raise SystemExit(f"{name}: --width {args.width}: the proxy's base has width n/{s.k}, so n must be"
                         f" a multiple of {s.k} and at least {2 * s.k}")
    s = apply_protocol_args(replace(s, **changes), args, name, variant)  # nests width<N> by the script's n
    return s if args.width is None else replace(s, width=args.width)


def require_graphscale() -> None:
    """Fail with a clear message when graphscale's API is not there yet."""
    if not graphscale_available():
        raise SystemExit(f"graphscale's API ({', '.join(API)}) is not available: install graphscale "
                         "(pip install -e .) from a version that has it")


def digits_data(seed: int = 0, augment: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (offline): a fixed stratified 80/20 split, standardised with train stats.

    Returns ``x_train, y_train, x_val, y_val`` with x of shape (N, 64), float32. With ``augment``,
    ``x_train`` holds every training image in its 9 translations by up to one pixel (the vacated border
    is background, 0), in blocks of N: index ``j * N + i`` is image i shifted the j-th way, j = 0 unshifted
    (so ``x_train[:N]`` is the plain training set either way).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xva, ytr, yva = train_test_split(d.data, d.target, test_size=0.2, random_state=seed,
                                          stratify=d.target)
    mu, std = xtr.mean(0), xtr.std(0)  # train statistics (``mu``: the module's ``mean`` is a function)
    std[std == 0] = 1.0
    f = lambda a: torch.tensor((a - mu) / std, dtype=torch.float32)  # noqa: E731
    y_train = torch.tensor(ytr)
    if augment:
        padded = torch.nn.functional.pad(torch.tensor(xtr).view(-1, 8, 8), (1, 1, 1, 1))
        offsets = [(1, 1)] + [(a, b) for a in range(3) for b in range(3) if (a, b) != (1, 1)]
        shifted = [padded[:, a:a + 8, b:b + 8].reshape(-1, 64) for a, b in offsets]
        return f(torch.cat(shifted).numpy()), y_train.repeat(9), f(xva), torch.tensor(yva)
    return f(xtr), y_train, f(xva), torch.tensor(yva)


def minibatcher(x: torch.Tensor, y: torch.Tensor, batch: int
                ) -> Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    """Random minibatches (with replacement across batches) drawn with the caller's generator."""
    def get(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(x), (batch,), generator=gen)
        return x[idx], y[idx]

    return get
