"""Hyperparameter transfer across upscalings: sweep the post-upscale lr (grid spacing 2x) and the noise std
for n->2n, 2n->4n and 4n->8n, and check whether the best grid point stays put.

For each base width and seed the narrow model is trained once (μP relative to the smallest base width, one
lr for all widths); then
* graphscale: ``widen`` (copy + rescale + noise) and ``mup_optimizer`` (μP, relative to the smallest width),
  one run per lr of the grid (at a fixed noise std) and per noise std (at the grid's center lr);
* control ("naive"): the narrow weights copied by hand with ``torch.repeat_interleave`` into a freshly
  built wide model *without* the rescaling compensations, the same amount of hand-made noise, and plain
  AdamW (standard parametrization: one lr for every tensor).

The loss at each grid point is averaged over the seeds (default 0, 1, 2) before the argmin is taken:
neighbouring lrs differ by less than one seed's noise.

Usage: ``python examples/hp_transfer.py [--quick] [--out DIR] [--tasks gpt,mlp] [--post-steps N]
[--lrs 2e-3,4e-3,...] [--seeds 0,1,2]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import gpt_shakespeare  # noqa: E402
import mlp_digits  # noqa: E402

NAME = "hp_transfer"


@dataclass
class SweepSettings:
    """One task's sweep."""

    base_widths: tuple[int, ...]
    base_steps: int
    base_lr: float
    post_steps: int
    lrs: tuple[float, ...]
    noise_std: float  # used for the lr sweeps (graphscale and naive)
    noise_stds: tuple[float, ...]  # noise sweep at the center lr (graphscale)
    eval_every: int
    warmup: int
    k: int = 2
    seed: int = 0
    # True: the bases are μP relative to the smallest base width (mup_init_ + μP AdamW) and the upscaled
    # models keep μP relative to that width, so one lr is meant to fit every width (μTransfer).
    # False: every base is a plain AdamW model and the post-upscale lr is relative to its own source.
    mup_bases: bool = True


def naive_upscale(narrow: nn.Module, wide: nn.Module, k: int, noise_std: float, seed: int) -> nn.Module:
    """Copy ``narrow`` into ``wide`` by hand: ``repeat_interleave`` along every axis that grew, no rescale.

    Weights with two or more axes that grew in size also get ``N(0, noise_std^2 / fan_in)`` noise so the
    copies can separate. ``wide`` must be a freshly built model of the same class at ``k`` times the width.
    """
    gen = torch.Generator().manual_seed(seed)
    src = narrow.state_dict()
    with torch.no_grad():
        for name, t in wide.state_dict().items():
            v = src[name]
            for dim in range(v.dim()):
                if t.shape[dim] != v.shape[dim]:
                    assert t.shape[dim] == k * v.shape[dim], f"{name}: axis {dim} did not grow by {k}"
                    v = v.repeat_interleave(k, dim=dim)
            if noise_std > 0 and v.is_floating_point() and v.dim() >= 2 and v.shape != src[name].shape:
                v = v + noise_std / math.sqrt(v.shape[1]) * torch.randn(v.shape, generator=gen)
            t.copy_(v)
    return wide


def sweep_one_seed(task: C.Task, s: SweepSettings, progress: bool) -> dict[str, dict[str, Any]]:
    """Train the bases and run every post-upscale sweep at seed ``s.seed``; per width label, the losses
    keyed by lr (or noise std)."""
    widths: dict[str, dict[str, Any]] = {}
    center = s.lrs[len(s.lrs) // 2]
    for n in s.base_widths:
        label = f"{n}->{s.k * n}"
        print(f"[{NAME}/{task.name}] seed {s.seed}, base width {n}: train, then upscale {label}")
        n0 = s.base_widths[0]
        # every base is μP relative to the smallest width, so one lr fits all (else each is its own base)
        base, base_opt = C.mup_family_member(task, n, n0 if s.mup_bases else n, s.base_lr, s.seed)
        bc = C.train(base, base_opt, task, s.base_steps, label=f"base {n}", lr=s.base_lr,
                     eval_every=s.base_steps, warmup=s.warmup, seed=s.seed, progress=progress)
        # post-upscale μP optimizer: relative to the smallest width as well (mup_bases), else to the source
        wide_rec = C.relative_record_for(task.make_model, s.k * n, n0, task.example_inputs) if s.mup_bases \
            else None

        def run(lr: float, std: float, naive: bool, n: int = n, base: nn.Module = base, label: str = label,
                wide_rec: Any = wide_rec) -> tuple[float, float]:
            if naive:
                torch.manual_seed(s.seed)
                wide = naive_upscale(base, task.make_model(s.k * n), s.k, std, s.seed)
                opt = C.plain_optimizer(wide, lr, task.weight_decay)
            else:
                wide = C.upscale(base, task.example_inputs, s.k, std, seed=s.seed)
                opt = C.mup_optimizer(wide, lr, task.weight_decay, record=wide_rec)
            name = f"{'naive' if naive else 'μP'} {label} lr{lr:.2g} s{std:g}"
            c = C.train(wide, opt, task, s.post_steps, label=name, lr=lr, eval_every=s.eval_every,
                        warmup=s.warmup, seed=s.seed + 1, progress=progress)
            train_loss = c.train[-1] if math.isfinite(c.train[-1]) else float("inf")
            return C.score(c, last=2), train_loss

        gs_both = {lr: run(lr, s.noise_std, False) for lr in s.lrs}
        noise = {std: (gs_both[center] if std == s.noise_std else run(center, std, False))[0]
                 for std in s.noise_stds}
        naive_both = {lr: run(lr, s.noise_std, True) for lr in s.lrs}
        widths[label] = dict(
            base_initial_val=bc.val[0],
            base_final_val=bc.final_val,
            graphscale_lr={lr: v[0] for lr, v in gs_both.items()},
            graphscale_noise=noise,
            naive_lr={lr: v[0] for lr, v in naive_both.items()},
            graphscale_train_lr={lr: v[1] for lr, v in gs_both.items()},
            naive_train_lr={lr: v[1] for lr, v in naive_both.items()},
        )
    return widths


LOSS_KEYS = ("graphscale_lr", "graphscale_noise", "naive_lr", "graphscale_train_lr", "naive_train_lr")


def _argmin(losses: dict[float, float]) -> float:
    return min(losses, key=losses.__getitem__)


def fitted_optimum(losses: dict[float, float]) -> float | None:
    """The lr at the vertex of the parabola in log(lr) through the grid's argmin and its two neighbours.

    On a 2x grid, two neighbouring lrs often score within one seed's noise of each other, and which one is
    the argmin is a coin flip; the vertex moves continuously with the losses. It always lies within half
    a grid step of the argmin. None where the argmin is on the grid's edge (the optimum may lie beyond it)
    or a neighbour's loss is not finite. Assumes an evenly spaced grid in log(lr).

    >>> round(fitted_optimum({1.0: 3.0, 2.0: 1.0, 4.0: 2.0}), 3)  # the vertex leans towards lr 4
    2.245
    """
    xs = sorted(losses)
    i = xs.index(_argmin(losses))
    if i in (0, len(xs) - 1):
        return None
    y0, y1, y2 = losses[xs[i - 1]], losses[xs[i]], losses[xs[i + 1]]
    if not all(math.isfinite(y) for y in (y0, y1, y2)):
        return None
    h = math.log(xs[i + 1] / xs[i])
    curvature = y0 - 2 * y1 + y2
    offset = 0.0 if curvature <= 0 else h * (y0 - y2) / (2 * curvature)
    return xs[i] * math.exp(offset)


def _spread_in_grid_steps(lrs: Sequence[float | None], grid: Sequence[float]) -> float | None:
    """max/min of ``lrs`` in units of the grid's (2x) spacing; None if any is None."""
    if any(x is None for x in lrs):
        return None
    return math.log(max(lrs) / min(lrs)) / math.log(grid[1] / grid[0])


def sweep_task(task: C.Task, s: SweepSettings, progress: bool, seeds: Sequence[int] = (0,)
               ) -> dict[str, Any]:
    """Run the sweeps of one task for every seed; the losses per lr are averaged over the seeds before
    the argmins are taken (neighbouring lrs differ by less than one seed's noise), and each seed's own
    argmins are reported beside them."""
    runs = {seed: sweep_one_seed(task, dataclasses.replace(s, seed=seed), progress) for seed in seeds}
    settings = {key: v for key, v in s.__dict__.items() if key != "seed"}
    out: dict[str, Any] = dict(task=task.name, settings={**settings, "seeds": list(seeds)}, widths={})
    for label in runs[seeds[0]]:
        per_seed = [runs[seed][label] for seed in seeds]
        mean = {key: {x: sum(r[key][x] for r in per_seed) / len(per_seed) for x in per_seed[0][key]}
                for key in LOSS_KEYS}
        out["widths"][label] = dict(
            base_initial_val=sum(r["base_initial_val"] for r in per_seed) / len(per_seed),
            base_final_val=sum(r["base_final_val"] for r in per_seed) / len(per_seed),
            **{key: {f"{x:.4g}": v for x, v in mean[key].items()} for key in LOSS_KEYS},
            graphscale_best_lr=_argmin(mean["graphscale_lr"]),
            naive_best_lr=_argmin(mean["naive_lr"]),
            graphscale_best_noise=_argmin(mean["graphscale_noise"]),
            graphscale_fitted_best_lr=fitted_optimum(mean["graphscale_lr"]),
            naive_fitted_best_lr=fitted_optimum(mean["naive_lr"]),
            graphscale_best_lr_by_train=_argmin(mean["graphscale_train_lr"]),
            naive_best_lr_by_train=_argmin(mean["naive_train_lr"]),
            graphscale_best_lr_per_seed=[_argmin(r["graphscale_lr"]) for r in per_seed],
            naive_best_lr_per_seed=[_argmin(r["naive_lr"]) for r in per_seed],
            per_seed={str(seed): {key: {f"{x:.4g}": v for x, v in r[key].items()}
                                  for key in ("graphscale_lr", "naive_lr")}
                      for seed, r in zip(seeds, per_seed)},
        )
    w = out["widths"].values()
    best = [d["graphscale_best_lr"] for d in w]
    nbest = [d["naive_best_lr"] for d in w]
    out["graphscale_argmin_stable"] = len(set(best)) == 1
    out["graphscale_argmin_shift_grid_points"] = max(_grid_index(b, s.lrs) for b in best) - min(
        _grid_index(b, s.lrs) for b in best)
    out["naive_argmin_stable"] = len(set(nbest)) == 1
    out["naive_argmin_shift_grid_points"] = max(_grid_index(b, s.lrs) for b in nbest) - min(
        _grid_index(b, s.lrs) for b in nbest)
    # the argmin's shift counts whole grid points, and a tie between two neighbours can flip it; the
    # fitted optimum's spread says how far the optimum really moved (in grid steps)
    out["graphscale_fitted_shift_grid_steps"] = _spread_in_grid_steps(
        [d["graphscale_fitted_best_lr"] for d in w], s.lrs)
    out["naive_fitted_shift_grid_steps"] = _spread_in_grid_steps(
        [d["naive_fitted_best_lr"] for d in w], s.lrs)
    out["graphscale_argmin_by_train_stable"] = len({d["graphscale_best_lr_by_train"] for d in w}) == 1
    out["naive_argmin_by_train_stable"] = len({d["naive_best_lr_by_train"] for d in w}) == 1
    out["noise_argmin_stable"] = len({d["graphscale_best_noise"] for d in w}) == 1
    # an argmin on the grid's edge says only that the optimum is there or beyond: "stable" is then moot
    edges = (min(s.lrs), max(s.lrs))
    out["graphscale_argmin_on_grid_edge"] = any(b in edges for b in best)
    out["naive_argmin_on_grid_edge"] = any(b in edges for b in nbest)
    return out


def _grid_index(lr: float, grid: Sequence[float]) -> int:
    return min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / lr)))


def _fmt_steps(x: float | None) -> str:
    return "n/a (an argmin on the grid's edge)" if x is None else f"{x:.2f}"


def plot(result: dict[str, Any], path: Path) -> None:
    """Loss vs lr per width (graphscale and naive) and loss vs noise std per width."""
    plt = C._plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (label, d) in enumerate(result["widths"].items()):
        for ax, key in ((axes[0], "graphscale_lr"), (axes[1], "naive_lr")):
            xs = [float(x) for x in d[key]]
            ys = [v if v is not None and math.isfinite(v) else float("nan") for v in d[key].values()]
            ax.plot(xs, ys, "o-", color=f"C{i}", label=label)
            j = min(range(len(ys)), key=lambda j: ys[j] if math.isfinite(ys[j]) else float("inf"))
            ax.plot([xs[j]], [ys[j]], "*", color=f"C{i}", ms=14)
        xs = [float(x) for x in d["graphscale_noise"]]
        axes[2].plot(xs, list(d["graphscale_noise"].values()), "o-", color=f"C{i}", label=label)
    axes[0].set_title(f"{result['task']}: graphscale widen + μP AdamW")
    axes[1].set_title(f"{result['task']}: naive copy + plain AdamW (control)")
    lrs = result["settings"]["lrs"]
    axes[2].set_title(f"{result['task']}: graphscale, noise std at lr {lrs[len(lrs) // 2]:.2g}")
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("post-upscale learning rate")
    axes[2].set_xlabel("noise std")
    finite = [v for d in result["widths"].values() for v in d["graphscale_lr"].values()
              if v is not None and math.isfinite(v)]
    for ax in axes:
        ax.set_ylabel("val loss after post-upscale training")
        ax.legend(fontsize=8)
    if finite:
        lo, hi = min(finite), max(finite)
        axes[0].set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def gpt_settings(quick: bool) -> tuple[C.Task, SweepSettings]:
    """A small GPT (2 layers, 2 heads, context 32): the sweep is 42 post-upscale runs per seed."""
    if quick:
        task = gpt_shakespeare.make_task(batch=8, block_size=16, n_head=2, eval_batches=1)
        return task, SweepSettings(base_widths=(8, 16), base_steps=30, base_lr=1e-2, post_steps=10,
                                   lrs=(2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2), noise_std=0.5, noise_stds=(0.5,),
                                   eval_every=5, warmup=3)
    # 16 x 64 val windows: with 2 x 64 one model's val loss moves by ~0.03 between draws of the windows,
    # more than the differences between neighbouring lrs. 300 post-upscale steps: after 100, the mean
    # loss spanned only 0.006 nats over a 16x lr range, below one seed's noise, so neither method's
    # optimum could be located (results/hp_transfer/post100)
    task = gpt_shakespeare.make_task(batch=32, block_size=32, n_head=2, eval_batches=16, train_eval_batches=2)
    return task, SweepSettings(base_widths=(8, 16, 32), base_steps=300, base_lr=8e-3, post_steps=300,
                               lrs=(4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1), noise_std=0.05,
                               noise_stds=(0.0, 0.05, 0.2), eval_every=25, warmup=10)


def mlp_settings(quick: bool) -> tuple[C.Task, SweepSettings]:
    """The digits MLP of ``mlp_digits.py``."""
    task = mlp_digits.make_task()
    if quick:
        return task, SweepSettings(base_widths=(16, 32), base_steps=40, base_lr=3e-3, post_steps=20,
                                   lrs=(7.5e-4, 1.5e-3, 3e-3, 6e-3, 1.2e-2), noise_std=0.5, noise_stds=(0.5,),
                                   eval_every=10, warmup=3)
    return task, SweepSettings(base_widths=(32, 64, 128), base_steps=300, base_lr=1e-3, post_steps=200,
                               lrs=(2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3), noise_std=0.2,
                               noise_stds=(0.0, 0.2, 0.5, 1.0), eval_every=25, warmup=10)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the sweeps; writes ``results.json`` and one ``<task>_lr.png`` per task to ``--out``."""
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tasks", default="gpt,mlp", help="comma-separated subset of gpt,mlp")
        p.add_argument("--post-steps", type=int, default=None,
                       help="post-upscale steps of every sweep run (default: GPT 300, MLP 200)")
        p.add_argument("--seeds", default=None, metavar="SEED,SEED,...",
                       help="training seeds (default 0,1,2; --quick: 0); the loss at each lr is averaged "
                            "over them before the argmin (each seed's argmin is reported too)")
        p.add_argument("--lrs", default=None, metavar="LR,LR,...",
                       help="the lr grid of every task instead of its own (the noise sweep runs at its "
                            "middle lr)")

    args = C.parse_args(argv, NAME, __doc__, add_args)
    C.require_graphscale()
    t0 = time.perf_counter()
    report: dict[str, Any] = dict(tasks={})
    builders = dict(gpt=gpt_settings, mlp=mlp_settings)
    for name in args.tasks.split(","):
        task, s = builders[name](args.quick)
        if args.post_steps is not None:
            s = dataclasses.replace(s, post_steps=args.post_steps)
        if args.lrs:
            s = dataclasses.replace(s, lrs=tuple(float(x) for x in args.lrs.split(",")))
        seeds = tuple(int(x) for x in (args.seeds or ("0" if args.quick else "0,1,2")).split(","))
        r = sweep_task(task, s, progress=not args.no_progress, seeds=seeds)
        report["tasks"][name] = r
        args.out.mkdir(parents=True, exist_ok=True)
        plot(r, args.out / f"{name}_lr.png")
        per = list(r["widths"].values())
        print(f"  {name}: graphscale best lr per width {[d['graphscale_best_lr'] for d in per]}"
              f" (stable: {r['graphscale_argmin_stable']}, on the grid's edge:"
              f" {r['graphscale_argmin_on_grid_edge']}); naive {[d['naive_best_lr'] for d in per]}"
              f" (stable: {r['naive_argmin_stable']});"
              f" best noise {[d['graphscale_best_noise'] for d in per]}")
        print(f"  {name}: fitted optimum moves {_fmt_steps(r['graphscale_fitted_shift_grid_steps'])}"
              f" grid steps (graphscale) and {_fmt_steps(r['naive_fitted_shift_grid_steps'])} (naive)"
              " across the widths")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    C.save_json(report, args.out / "results.json")
    return report


if __name__ == "__main__":
    main()
