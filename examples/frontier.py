"""Loss vs total compute for upscaling and its controls (issue #20's protocol, examples/README.md
"Protocol 2026-12-01").

Given a small model of width n (trained with a WSD schedule, its lr tuned on the grid), every arm trains a
model for budgets B_1 < B_2 < B_3 of width-kn steps (or the same FLOPs), each with its peak lr tuned per
budget on the same 2x grid (selected on val, reported on test), one WSD schedule (fixed decay fraction)
for all:

* ``upscaled``: graphscale ``widen`` n -> kn with noise, μP AdamW relative to the small model;
* (a) ``scratch``: width kn from scratch (standard parametrization, plain AdamW), budget B;
* (b) ``continued``: the small model continued (fresh AdamW, its own tuned lr) for the same extra FLOPs;
* (c) ``scratch_eq``: width kn from scratch given the small model's FLOPs on top (equal total compute);
* (d) ``zero_noise``: upscaled without noise; by dynamic equivalence it must track (b) at equal steps,
  which is checked against ``continued`` runs of the same steps, lr and batches;
* (e) ``naive``: the small model copied by ``repeat_interleave`` without rescaling, plain AdamW (SP).

Total compute counts the small model's training and every tuning run (each arm runs the whole lr grid).

Usage: ``python examples/frontier.py --task mlp|gpt [--quick | --mid | --full] [--seeds 0,1,2,3]
[--out DIR]``.
Each seed is saved as it finishes (``<out>/seeds/seed<N>.json``); the summary (``results.json``,
``frontier.png``) aggregates every seed file in the folder with the same settings.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _protocol as P  # noqa: E402

NAME = "frontier"
ARMS = ("upscaled", "scratch", "continued", "scratch_eq", "zero_noise", "naive")
CONTROL = {"scratch": "a", "continued": "b", "scratch_eq": "c", "zero_noise": "d", "naive": "e"}


@dataclass(frozen=True)
class Settings:
    """One frontier experiment (a task, its widths, budgets and grids)."""

    task: str
    n: int
    small_steps: int
    budgets: tuple[int, ...]
    lrs: tuple[float, ...]
    warmup: int
    noise: tuple[str, float]
    naive_noise: float
    k: int = 2
    decay_frac: float = 0.2
    data: dict[str, Any] = field(default_factory=dict)


def settings(task: str, mode: str) -> Settings:
    """The settings of ``task`` ("mlp" or "gpt") in ``mode`` ("quick", "default", "mid" (GPT only) or
    "full")."""
    if task == "mlp":
        if mode == "quick":
            return Settings("mlp", n=16, small_steps=60, budgets=(20, 40), lrs=(2e-3, 8e-3), warmup=4,
                            noise=("gaussian_relative", 0.2), naive_noise=0.2)
        if mode == "full":
            return Settings("mlp", n=128, small_steps=1000, budgets=(125, 250, 500, 1000),
                            lrs=(2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3), warmup=20,
                            noise=("gaussian_relative", 0.2), naive_noise=0.2)
        return Settings("mlp", n=64, small_steps=300, budgets=(60, 120, 240),
                        lrs=(5e-4, 1e-3, 2e-3, 4e-3, 8e-3), warmup=10,
                        noise=("gaussian_relative", 0.2), naive_noise=0.2)
    if task == "gpt":
        if mode == "quick":
            return Settings("gpt", n=8, small_steps=40, budgets=(20, 40), lrs=(4e-3, 1.6e-2), warmup=4,
                            noise=("symmetric_relative", 1.0), naive_noise=0.03,
                            data=dict(eval_batches=1, batch=8, block_size=16))
        if mode == "mid":  # the largest 2 cores afford in one session (protocol log, 2026-12-02)
            return Settings("gpt", n=64, small_steps=400, budgets=(100, 200, 400),
                            lrs=(2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2), warmup=20,
                            noise=("symmetric_relative", 1.0), naive_noise=0.03,
                            data=dict(n_layer=4, n_head=4, batch=16, block_size=64, eval_batches=8))
        if mode == "full":  # the size: 128 -> 256, 4 layers
            return Settings("gpt", n=128, small_steps=2000, budgets=(500, 1000, 2000),
                            lrs=(1e-3, 2e-3, 4e-3, 8e-3), warmup=40,
                            noise=("symmetric_relative", 1.0), naive_noise=0.03,
                            data=dict(n_layer=4, n_head=4, batch=32, block_size=64, eval_batches=16))
        return Settings("gpt", n=16, small_steps=200, budgets=(50, 100, 200), lrs=(2e-3, 4e-3, 8e-3, 1.6e-2),
                        warmup=10, noise=("symmetric_relative", 1.0), naive_noise=0.03,
                        data=dict(n_layer=2, n_head=2, batch=16, block_size=32, eval_batches=8))
    raise SystemExit(f"--task {task!r}: use mlp or gpt")


def make_data(s: Settings, seed: int) -> P.Data:
    """The seed's data split for the task."""
    return P.mlp_data(seed, **s.data) if s.task == "mlp" else P.gpt_data(seed, **s.data)


def arm_budgets(s: Settings, small_flops: float, f_n: float, f_kn: float) -> dict[str, list[int]]:
    """Steps each arm trains, per frontier budget B (in the order of ``s.budgets``): (b) the FLOPs of B
    width-kn steps at width n, (c) B plus the small model's FLOPs in width-kn steps.

    >>> s = settings("mlp", "quick")
    >>> arm_budgets(s, small_flops=600.0, f_n=10.0, f_kn=30.0)["continued"]
    [60, 120]
    >>> arm_budgets(s, small_flops=600.0, f_n=10.0, f_kn=30.0)["scratch_eq"]
    [40, 60]
    """
    eq = round(small_flops / f_kn)
    return dict(upscaled=list(s.budgets), zero_noise=list(s.budgets), naive=list(s.budgets),
                scratch=list(s.budgets), scratch_eq=[b + eq for b in s.budgets],
                continued=[round(b * f_kn / f_n) for b in s.budgets])


def run_seed(s: Settings, seed: int, progress: bool = True) -> dict[str, Any]:
    """Every arm at every lr of the grid for one seed; losses per arm, budget and lr (val and test)."""
    t0 = time.perf_counter()
    data = make_data(s, seed)
    kn = s.k * s.n
    f_n = data.flops_per_step(data.make_model(s.n))
    f_kn = data.flops_per_step(data.make_model(kn))
    say = print if progress else (lambda *a, **k: None)
    # the small model: WSD over small_steps, lr tuned on the grid (val), its trained weights kept
    small: dict[float, dict[str, Any]] = {}
    for lr in s.lrs:
        model = P.fresh(data, s.n, seed)
        small[lr] = P.run_wsd(model, C.plain_optimizer(model, lr, 0.0), data, [s.small_steps],
                              warmup=s.warmup, decay_frac=s.decay_frac, seed=seed, keep=True)
        say(f"[{NAME}/{s.task} seed {seed}] small lr {lr:g}: "
            f"val {small[lr]['budgets'][s.small_steps]['val']:.4f}")
    small_lr = min(s.lrs, key=lambda lr: small[lr]["budgets"][s.small_steps]["val"])
    base = small[small_lr]["models"][s.small_steps]
    small_flops = s.small_steps * f_n
    budgets = arm_budgets(s, small_flops, f_n, f_kn)
    # (d) against (b): continued runs also at the width-kn budgets, same steps, lr and batches as (d)
    runs_for = dict(budgets, continued=sorted(set(budgets["continued"]) | set(s.budgets)),
                    scratch=sorted(set(budgets["scratch"]) | set(budgets["scratch_eq"])))
    del runs_for["scratch_eq"]
    post_seed = seed + 7919  # every post-small arm draws the same batches

    def start(arm: str, lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        if arm == "scratch":
            m = P.fresh(data, kn, seed + 1)
            return m, C.plain_optimizer(m, lr, 0.0)
        if arm == "continued":
            m = copy.deepcopy(base)
            return m, C.plain_optimizer(m, lr, 0.0)
        if arm == "naive":
            m = P.naive_copy(base, P.fresh(data, kn, seed + 1), s.k, s.naive_noise, seed)
            return m, C.plain_optimizer(m, lr, 0.0)
        kind, std = s.noise if arm == "upscaled" else (s.noise[0], 0.0)
        m = C.upscale(base, data.example_inputs, s.k, std, kind, seed=seed)
        return m, C.mup_optimizer(m, lr, 0.0)

    losses: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    seconds: dict[str, float] = {}
    for arm, steps in runs_for.items():
        losses[arm] = {}
        seconds[arm] = 0.0
        for lr in s.lrs:
            m, opt = start(arm, lr)
            r = P.run_wsd(m, opt, data, steps, warmup=s.warmup, decay_frac=s.decay_frac, seed=post_seed)
            seconds[arm] += r["seconds"]
            for b, rec in r["budgets"].items():
                losses[arm].setdefault(str(b), {})[f"{lr:g}"] = rec
            last = r["budgets"][max(steps)]
            say(f"[{NAME}/{s.task} seed {seed}] {arm} lr {lr:g}: val at {max(steps)} {last['val']:.4f}")
    losses["scratch_eq"] = {str(b): losses["scratch"][str(b)] for b in budgets["scratch_eq"]}
    # the dynamic-equivalence check: (d) and (b) at the same steps, lr and batches
    gaps = [abs(losses["zero_noise"][str(b)][f"{lr:g}"][key] - losses["continued"][str(b)][f"{lr:g}"][key])
            for b in s.budgets for lr in s.lrs for key in ("stable_val", "val", "test")
            if math.isfinite(losses["zero_noise"][str(b)][f"{lr:g}"][key])]
    return dict(seed=seed, settings=dataclasses.asdict(s), split=data.split, small_lr=small_lr,
                small_val={f"{lr:g}": small[lr]["budgets"][s.small_steps]["val"] for lr in s.lrs},
                small_test=small[small_lr]["budgets"][s.small_steps]["test"],
                flops_per_step=dict(n=f_n, kn=f_kn), small_flops=small_flops, arm_steps=budgets,
                losses=losses, zero_noise_vs_continued_max_gap=max(gaps) if gaps else None,
                seconds=dict(arms=seconds, total=time.perf_counter() - t0))


def select(per_lr: dict[str, dict[str, float]]) -> tuple[str, float, float]:
    """(lr, val, test) of the lr with the lowest val loss at one arm and budget."""
    lr = min(per_lr, key=lambda k: per_lr[k]["val"])
    return lr, per_lr[lr]["val"], per_lr[lr]["test"]


def compute(s: Settings, arm: str, steps: int, f_n: float, f_kn: float, tuned: bool) -> float:
    """Total training FLOPs of an arm's result at ``steps``: the small model's training (for the arms
    that start from it) plus the arm's own; with ``tuned`` every run of both lr grids is counted."""
    g = len(s.lrs) if tuned else 1
    small = s.small_steps * f_n
    if arm in ("scratch", "scratch_eq"):
        return g * steps * f_kn
    if arm == "continued":
        return g * (small + steps * f_n)
    return g * (small + steps * f_kn)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means and 95 % intervals over seeds per arm and budget (test loss of the val-selected lr),
    the paired differences of upscaled against each control, crossings and the (d)-(b) check."""
    s = Settings(**{**runs[0]["settings"], "budgets": tuple(runs[0]["settings"]["budgets"]),
                    "lrs": tuple(runs[0]["settings"]["lrs"]), "noise": tuple(runs[0]["settings"]["noise"])})
    f_n, f_kn = runs[0]["flops_per_step"]["n"], runs[0]["flops_per_step"]["kn"]
    table = []
    for i, b in enumerate(s.budgets):
        row: dict[str, Any] = dict(budget=b, arms={})
        per_seed: dict[str, list[float]] = {}
        for arm in ARMS:
            steps = runs[0]["arm_steps"][arm][i]
            picks = [select(r["losses"][arm][str(steps)]) for r in runs]
            tests = [p[2] for p in picks]
            per_seed[arm] = tests
            m, h = P.mean_ci(tests)
            row["arms"][arm] = dict(steps=steps, test_mean=m, test_ci95=h, test_per_seed=tests,
                                    lr_per_seed=[float(p[0]) for p in picks],
                                    lr_on_grid_edge=sum(float(p[0]) in (min(s.lrs), max(s.lrs))
                                                        for p in picks),
                                    compute_tuned=compute(s, arm, steps, f_n, f_kn, True),
                                    compute_final_run=compute(s, arm, steps, f_n, f_kn, False))
        diffs = {}
        for arm in ("scratch", "continued", "scratch_eq", "zero_noise", "naive"):
            m, h = P.mean_ci([u - c for u, c in zip(per_seed["upscaled"], per_seed[arm])])
            diffs[arm] = dict(mean=m, ci95=h)
        # the best equal-total-compute control (b or c) by mean; the verdict needs the interval to exclude 0
        best = min(("continued", "scratch_eq"), key=lambda a: row["arms"][a]["test_mean"])
        d = diffs[best]
        verdict = ("upscaled better" if d["mean"] + d["ci95"] < 0 else
                   "control better" if d["mean"] - d["ci95"] > 0 else "tie (interval includes 0)")
        row.update(upscaled_minus=diffs, best_equal_compute_control=best, verdict=verdict)
        table.append(row)
    gaps = [r["zero_noise_vs_continued_max_gap"] for r in runs
            if r["zero_noise_vs_continued_max_gap"] is not None]
    return dict(task=s.task, settings=dataclasses.asdict(s), seeds=[r["seed"] for r in runs],
                widths=dict(small=s.n, wide=s.k * s.n), flops_per_step=dict(n=f_n, kn=f_kn),
                small_lr_per_seed=[r["small_lr"] for r in runs],
                small_test=P.mean_ci([r["small_test"] for r in runs]),
                table=table, crossings=crossings(table),
                zero_noise_vs_continued_max_gap=max(gaps) if gaps else None,
                seconds_per_seed=[round(r["seconds"]["total"], 1) for r in runs],
                splits={str(r["seed"]): r["split"] for r in runs})


def crossings(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where the upscaled arm's mean test loss crosses a control's along total (tuned) compute. Each
    curve is linear in log compute between its evaluated budgets; "scratch" is the scratch frontier, the
    points of (a) and (c) together. A crossing between two of upscaled's budgets is where the difference
    changes sign (linear interpolation: it locates the crossing only to within the budgets' spacing)."""
    out = []
    for arm, members in (("scratch", ("scratch", "scratch_eq")), ("continued", ("continued",)),
                         ("naive", ("naive",))):
        curve = sorted((r["arms"][a]["compute_tuned"], r["arms"][a]["test_mean"]) for r in table
                       for a in members)
        pts = []
        for r in table:
            x = r["arms"]["upscaled"]["compute_tuned"]
            y = _interp(curve, x)
            if y is not None and math.isfinite(y) and math.isfinite(r["arms"]["upscaled"]["test_mean"]):
                pts.append((math.log(x), r["arms"]["upscaled"]["test_mean"] - y))
        for (x0, d0), (x1, d1) in zip(pts, pts[1:]):
            if (d0 < 0) != (d1 < 0):
                x = x0 + (x1 - x0) * d0 / (d0 - d1)
                out.append(dict(control=arm, compute=math.exp(x), upscaled_better_after=d1 < 0))
    return out


def _interp(curve: list[tuple[float, float]], x: float) -> float | None:
    """A curve's value at compute ``x``, linear in log compute between its points (None outside them).

    >>> _interp([(1.0, 3.0), (4.0, 1.0)], 2.0)
    2.0
    """
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * math.log(x / x0) / math.log(x1 / x0)
    return None


def plot(summary: dict[str, Any], path: Path) -> None:
    """Test loss (means, 95 % intervals) vs total compute incl. the small model and tuning, every arm;
    crossings of upscaled with the controls marked."""
    plt = C._plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = dict(upscaled="upscaled (graphscale)", scratch="(a) scratch", continued="(b) small continued",
                 scratch_eq="(c) scratch + small's FLOPs", zero_noise="(d) upscaled, zero noise",
                 naive="(e) naive copy, SP")
    for i, arm in enumerate(ARMS):
        xs = [r["arms"][arm]["compute_tuned"] for r in summary["table"]]
        ys = [r["arms"][arm]["test_mean"] for r in summary["table"]]
        es = [r["arms"][arm]["test_ci95"] for r in summary["table"]]
        ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, label=names[arm], color=f"C{i}",
                    ls="--" if arm == "zero_noise" else "-")
    small = summary["small_test"][0]
    ax.axhline(small, color="gray", ls=":", lw=0.8, label="small model alone")
    for c in summary["crossings"]:
        ax.axvline(c["compute"], color="k", ls=":", lw=0.8)
        ax.annotate(f"x {c['control']}", (c["compute"], small), fontsize=7, rotation=90)
    ax.set_xscale("log")
    ax.set_xlabel("total training FLOPs (small model + every tuning run)")
    ax.set_ylabel("test loss (nats), mean of seeds, 95% CI")
    w = summary["widths"]
    ax.set_title(f"{summary['task']}: {w['small']} -> {w['wide']}, seeds {summary['seeds']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def aggregate(out: Path, s: Settings) -> dict[str, Any] | None:
    """Summarize every seed file under ``out/seeds`` run with settings ``s`` (others are ignored)."""
    return P.aggregate_seeds(out, s, summarize, plot, "frontier.png")


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run the seeds given (skipping ones already saved with these settings) and write the summary."""
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--task", choices=("mlp", "gpt"), required=True)
        p.add_argument("--full", action="store_true", help="the larger sizes (up to an hour per task)")
        p.add_argument("--mid", action="store_true",
                       help="GPT 64 -> 128, 4 layers: the largest this 2-core machine affords (~1 hour)")
        p.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds (split, init, batches)")
        p.add_argument("--rerun", action="store_true", help="rerun seeds already saved")
        p.add_argument("--summarize-only", action="store_true", help="only aggregate the saved seeds")

    args = C.parse_args(argv, NAME, __doc__, add_args)
    mode = "quick" if args.quick else "full" if args.full else "mid" if args.mid else "default"
    if mode == "mid" and args.task != "gpt":
        raise SystemExit("--mid is a GPT size; the MLP has --full")
    s = settings(args.task, mode)
    out = args.out if args.out != C.RESULTS_DIR / NAME else C.RESULTS_DIR / NAME / args.task / (
        "" if mode == "default" else mode)
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
