"""Hyperparameter transfer across upscalings, measured as regret and tuning cost (issue #20's protocol,
examples/README.md "Protocol 2026-12-01", item 6).

μP bases of widths n/2, n and 2n (relative to n/2: one lr for all) are trained with the WSD schedule and
each widened x2 by graphscale. The post-upscale (lr, noise) grid is run at every upscaling; the choice made
on the proxy n/2 -> n (on val, per seed) is transferred unchanged to n -> 2n and 2n -> 4n, and

* **regret** = test loss of the transferred choice minus the test loss of the val-best point of the full
  grid at the target (nats; mean and 95 % interval over seeds);
* **tuning-cost ratio** = FLOPs of the full grid at the target / (FLOPs of the full grid on the proxy +
  the proxy base's training);
* **optimum's move** = the vertex of a parabola in log2(lr) through the val-argmin and its neighbours
  (val minimised over noise first), at the target minus on the proxy, per seed, mean and interval;

and the same for the SP naive control (``repeat_interleave`` copy, plain AdamW, lr grid only).

Usage: ``python examples/transfer.py --task mlp|gpt [--quick] [--seeds 0,1,2,3] [--out DIR]``; seeds are
saved as they finish (``<out>/seeds/seed<N>.json``) and ``results.json`` / ``transfer.png`` aggregate
every saved seed with the same settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _protocol as P  # noqa: E402
import hp_transfer as H  # noqa: E402

NAME = "transfer"


@dataclass(frozen=True)
class Settings:
    """One task's transfer sweep: base widths (the first is the proxy's), steps and grids."""

    task: str
    base_widths: tuple[int, ...]
    base_steps: int
    base_lr: float
    post_steps: int
    lrs: tuple[float, ...]
    noises: tuple[tuple[str, float], ...]
    naive_noise: float
    warmup: int
    decay_frac: float = 0.2
    data: dict[str, Any] = field(default_factory=dict)


def settings(task: str, quick: bool) -> Settings:
    """The default (or ``quick``) settings of ``task``."""
    if task == "mlp":
        if quick:
            return Settings("mlp", (8, 16, 32), base_steps=40, base_lr=2e-3, post_steps=20,
                            lrs=(1e-3, 4e-3, 1.6e-2), noises=(("gaussian_relative", 0.0),
                                                              ("gaussian_relative", 0.2)),
                            naive_noise=0.2, warmup=3)
        return Settings("mlp", (32, 64, 128), base_steps=300, base_lr=1e-3, post_steps=200,
                        lrs=(5e-4, 1e-3, 2e-3, 4e-3, 8e-3),
                        noises=tuple(("gaussian_relative", s) for s in (0.0, 0.2, 1.0)), naive_noise=0.2,
                        warmup=10)
    if task == "gpt":
        if quick:
            return Settings("gpt", (4, 8, 16), base_steps=20, base_lr=8e-3, post_steps=10,
                            lrs=(8e-3, 3.2e-2), noises=(("symmetric_relative", 0.0),), naive_noise=0.03,
                            warmup=2, data=dict(eval_batches=1, batch=8, block_size=16))
        return Settings("gpt", (8, 16, 32), base_steps=200, base_lr=8e-3, post_steps=100,
                        lrs=(8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1),
                        noises=(("symmetric_relative", 0.0), ("symmetric_relative", 1.0)), naive_noise=0.03,
                        warmup=10, data=dict(n_layer=2, n_head=2, batch=16, block_size=32, eval_batches=8))
    raise SystemExit(f"--task {task!r}: use mlp or gpt")


def run_seed(s: Settings, seed: int, progress: bool = True) -> dict[str, Any]:
    """Every base, upscaling and grid point for one seed: val and test per (lr, noise) and per naive lr."""
    t0 = time.perf_counter()
    data = P.mlp_data(seed, **s.data) if s.task == "mlp" else P.gpt_data(seed, **s.data)
    n0 = s.base_widths[0]
    say = print if progress else (lambda *a, **k: None)
    out: dict[str, Any] = {}
    for w in s.base_widths:
        label = f"{w}->{2 * w}"
        if w == n0:  # the smallest base is its own μP base: plain AdamW
            base = P.fresh(data, w, seed)
            opt = C.plain_optimizer(base, s.base_lr, 0.0)
        else:
            base, rec = C.mup_scratch_model(data.make_model, w, n0, data.example_inputs, seed)
            opt = C.mup_optimizer(base, s.base_lr, 0.0, record=rec)
        b = P.run_wsd(base, opt, data, [s.base_steps], warmup=s.warmup, decay_frac=s.decay_frac, seed=seed,
                      keep=True)
        base = b["models"][s.base_steps]
        wide_rec = C.relative_record_for(data.make_model, 2 * w, n0, data.example_inputs)
        gs: dict[str, dict[str, float]] = {}
        for lr in s.lrs:
            for kind, std in s.noises:
                wide = C.upscale(base, data.example_inputs, 2, std, kind, seed=seed)
                r = P.run_wsd(wide, C.mup_optimizer(wide, lr, 0.0, record=wide_rec), data, [s.post_steps],
                              warmup=s.warmup, decay_frac=s.decay_frac, seed=seed + 7919)
                gs[f"{lr:g} {kind}:{std:g}"] = r["budgets"][s.post_steps]
        naive: dict[str, dict[str, float]] = {}
        for lr in s.lrs:
            wide = P.naive_copy(base, P.fresh(data, 2 * w, seed + 1), 2, s.naive_noise, seed)
            r = P.run_wsd(wide, C.plain_optimizer(wide, lr, 0.0), data, [s.post_steps], warmup=s.warmup,
                          decay_frac=s.decay_frac, seed=seed + 7919)
            naive[f"{lr:g}"] = r["budgets"][s.post_steps]
        f_base = data.flops_per_step(data.make_model(w))
        f_wide = data.flops_per_step(data.make_model(2 * w))
        out[label] = dict(base_val=b["budgets"][s.base_steps]["val"], graphscale=gs, naive=naive,
                          flops=dict(base_training=s.base_steps * f_base, run=s.post_steps * f_wide))
        best = min(gs, key=lambda k: gs[k]["val"])
        say(f"[{NAME}/{s.task} seed {seed}] {label}: graphscale best {best} val {gs[best]['val']:.4f}; "
            f"naive best {min(naive, key=lambda k: naive[k]['val'])}")
    return dict(seed=seed, settings=dataclasses.asdict(s), split=data.split, widths=out,
                seconds=time.perf_counter() - t0)


def _profile(grid: dict[str, dict[str, float]], lrs: Sequence[float]) -> dict[float, float]:
    """Val loss per lr, minimised over the other knobs (the noise) at that lr."""
    return {lr: min(v["val"] for k, v in grid.items() if k.split()[0] == f"{lr:g}") for lr in lrs}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Regret, tuning-cost ratio and the fitted optimum's move per target, both methods, over seeds."""
    st = runs[0]["settings"]
    lrs = tuple(st["lrs"])
    labels = list(runs[0]["widths"])
    proxy, targets = labels[0], labels[1:]
    out: dict[str, Any] = dict(task=st["task"], settings=st, seeds=[r["seed"] for r in runs], proxy=proxy,
                               targets={}, splits={str(r["seed"]): r["split"] for r in runs},
                               seconds_per_seed=[round(r["seconds"], 1) for r in runs])
    for method in ("graphscale", "naive"):
        chosen = [min(r["widths"][proxy][method], key=lambda k, r=r: r["widths"][proxy][method][k]["val"])
                  for r in runs]
        fit_proxy = [H.fitted_optimum(_profile(r["widths"][proxy][method], lrs)) for r in runs]
        out[f"{method}_proxy_choice_per_seed"] = chosen
        for t in targets:
            regret, val_regret, moves, best_keys = [], [], [], []
            for r, key, fp in zip(runs, chosen, fit_proxy):
                grid = r["widths"][t][method]
                best = min(grid, key=lambda k, grid=grid: grid[k]["val"])
                best_keys.append(best)
                regret.append(grid[key]["test"] - grid[best]["test"])
                val_regret.append(grid[key]["val"] - grid[best]["val"])
                ft = H.fitted_optimum(_profile(grid, lrs))
                moves.append(None if ft is None or fp is None else math.log2(ft / fp))
            fin = [m for m in moves if m is not None]
            fl = runs[0]["widths"]
            ratio = len(fl[t][method]) * fl[t]["flops"]["run"] / (
                len(fl[proxy][method]) * fl[proxy]["flops"]["run"] + fl[proxy]["flops"]["base_training"])
            m, h = P.mean_ci(regret)
            vm, vh = P.mean_ci(val_regret)
            mm, mh = P.mean_ci(fin) if fin else (float("nan"), float("nan"))
            tests = [r["widths"][t][method][k]["test"] for r, k in zip(runs, best_keys)]
            out["targets"].setdefault(t, {})[method] = dict(
                regret_test_mean=m, regret_test_ci95=h, regret_test_per_seed=regret,
                regret_val_mean=vm, regret_val_ci95=vh, regret_val_per_seed=val_regret,
                target_best_per_seed=best_keys,
                target_best_test=P.mean_ci(tests), tuning_cost_ratio=ratio,
                optimum_move_log2_mean=mm, optimum_move_log2_ci95=mh, optimum_move_seeds=len(fin),
                optimum_move_per_seed=moves)
    # loss vs lr per width and method (mean test of the val-best noise at each lr), for the plot
    curves: dict[str, Any] = {}
    for label in labels:
        for method in ("graphscale", "naive"):
            per_lr = []
            for lr in lrs:
                tests = []
                for r in runs:
                    grid = {k: v for k, v in r["widths"][label][method].items() if k.split()[0] == f"{lr:g}"}
                    tests.append(grid[min(grid, key=lambda k, grid=grid: grid[k]["val"])]["test"])
                per_lr.append(P.mean_ci(tests))
            curves.setdefault(label, {})[method] = per_lr
    out["test_vs_lr"] = curves
    return out


def plot(summary: dict[str, Any], path: Path) -> None:
    """Test loss vs post-upscale lr per upscaling (95 % intervals), graphscale and the naive SP control."""
    plt = C._plt()
    lrs = summary["settings"]["lrs"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, method in zip(axes, ("graphscale", "naive")):
        for i, (label, c) in enumerate(summary["test_vs_lr"].items()):
            ys = [m for m, _ in c[method]]
            es = [h for _, h in c[method]]
            ax.errorbar(lrs, ys, yerr=es, marker="o", ms=4, capsize=3, color=f"C{i}",
                        label=label + (" (proxy)" if label == summary["proxy"] else ""))
        ax.set_xscale("log")
        ax.set_xlabel("post-upscale peak lr")
        name = "graphscale + μP AdamW" if method == "graphscale" else "naive + SP"
        ax.set_title(f"{summary['task']}: {name}",
                     fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test loss (best noise by val), mean, 95% CI")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def aggregate(out: Path, s: Settings) -> dict[str, Any] | None:
    """Summarize every seed file under ``out/seeds`` run with settings ``s`` (others are ignored)."""
    return P.aggregate_seeds(out, s, summarize, plot, "transfer.png")


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run the seeds given (skipping ones saved with these settings) and write the summary."""
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--task", choices=("mlp", "gpt"), required=True)
        p.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds (split, init, batches)")
        p.add_argument("--rerun", action="store_true", help="rerun seeds already saved")
        p.add_argument("--summarize-only", action="store_true", help="only aggregate the saved seeds")

    args = C.parse_args(argv, NAME, __doc__, add_args)
    s = settings(args.task, args.quick)
    out = args.out if args.out != C.RESULTS_DIR / NAME else C.RESULTS_DIR / NAME / args.task / (
        "quick" if args.quick else "")
    if not args.summarize_only:
        C.require_graphscale()
        want = json.loads(json.dumps(dataclasses.asdict(s)))
        for seed in (int(x) for x in args.seeds.split(",")):
            f = out / "seeds" / f"seed{seed}.json"
            if f.exists() and not args.rerun and json.loads(f.read_text())["settings"] == want:
                continue
            P.save(run_seed(s, seed, progress=not args.no_progress), f)
    return aggregate(out, s)


if __name__ == "__main__":
    main()
