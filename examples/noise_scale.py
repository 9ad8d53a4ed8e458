"""Does the noise a trained base tolerates follow its weights' scale? Absolute vs relative noise.

The proxy of ``gpt_shakespeare.py`` tunes a noise std on a width-16 base and transfers it to a width-32
base, and each base is trained at its own tuned lr. Training moves a weight's scale far from its init, and
the lr sets how far, so an absolute std (``symmetric``: ``std / sqrt(fan_in)``) may mean a different
perturbation on the two bases. This sweep trains that example's bases (its task, schedule and seed;
plain AdamW, kept at their best val evaluation, as the protocol trains them) at several lrs and widths,
widens each x2 with symmetric noise, absolute and relative (``symmetric_relative``: ``std * rms(W)``),
and trains it ``post_steps`` with μP AdamW at ``post_mult`` x its base lr. For each run it reports the
val loss above the same base's zero-noise run (the copies then never separate, so that run is the
widened base trained on at the same lr): at the first evaluation after widening (the "jump") and at the
end. Each absolute std is also expressed as the relative std it amounts to on that base (median over the
blocks' matrices of ``std / sqrt(fan_in_wide) / rms(W)``). If the tolerated perturbation follows the
weights' scale, the jumps line up against the relative std across bases, and not against the absolute.

Defaults: GPT cosine seed 1, the case where the absolute std picked on the proxy did not transfer.
Usage: ``python examples/noise_scale.py [--quick] [--out DIR] [--seed N] [--schedule constant]``
(full: ~3 min on 2 cores).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import gpt_shakespeare as G  # noqa: E402

NAME = "noise_scale"
K = 2


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=1, help="training seed (default 1)")
    p.add_argument("--schedule", choices=C.SCHEDULES, default="cosine", help="lr schedule (default cosine)")


def hidden_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """The transformer blocks' weight matrices: width on the fan-in, so every noise kind perturbs them."""
    return {n: p.detach() for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}


def rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the sweep; returns the results dict (also written to ``--out``/results.json)."""
    args = C.parse_args(argv, NAME, __doc__, add_args)
    C.require_graphscale()
    s = G.settings(args.quick)
    if args.quick:
        task = G.make_task(block_size=32, batch=16, eval_batches=1, train_eval_batches=1)
        bases, post_steps = ((8, 0.02), (16, 0.01)), 20
        noises = (("symmetric", 0.0), ("symmetric", 1.0), ("symmetric", 2.0), ("symmetric_relative", 0.5))
    else:  # gpt_shakespeare's task; its proxy base (16) and target base (32) at the lrs their grids pick
        task = G.make_task(block_size=32, batch=32, eval_batches=32, train_eval_batches=4)
        bases, post_steps = ((16, 0.032), (16, 0.016), (16, 0.008), (32, 0.008)), s.proxy_steps or s.steps
        noises = (("symmetric", 0.0), ("symmetric", 4.0), ("symmetric", 8.0), ("symmetric_relative", 1.0),
                  ("symmetric_relative", 2.0), ("symmetric_relative", 4.0))
    post_mult, seed, ex, progress = 0.5, args.seed, task.example_inputs, not args.no_progress
    t_start = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    for width, lr in bases:
        torch.manual_seed(seed)
        base = task.make_model(width)
        init_rms = {n: rms(p) for n, p in hidden_matrices(base).items()}
        base_curve = C.train(base, C.plain_optimizer(base, lr, task.weight_decay), task, s.base_steps,
                             label=f"base {width} lr{lr:g}", lr=lr, eval_every=s.eval_every, warmup=s.warmup,
                             schedule=args.schedule, seed=seed, progress=progress, keep_best=True,
                             patience=s.base_patience)
        trained = hidden_matrices(base)
        growth = statistics.median(rms(p) / init_rms[n] for n, p in trained.items())
        post_lr = post_mult * lr
        by_noise: dict[str, Any] = {}
        for kind, std in noises:
            wide = C.upscale(base, ex, K, std, kind, seed=seed)
            c = C.train(wide, C.mup_optimizer(wide, post_lr, task.weight_decay), task, post_steps,
                        label=f"{width}->{K * width} {kind} {std:g}", lr=post_lr, eval_every=s.eval_every,
                        warmup=s.warmup, schedule=args.schedule, seed=seed + 1, progress=progress)
            relative = std if kind.endswith("_relative") else statistics.median(
                std / math.sqrt(K * p.shape[1]) / rms(p) for p in trained.values())
            by_noise[f"{kind}:{std:g}"] = dict(kind=kind, std=std, relative_std=relative, steps=c.steps,
                                               val_loss=c.val)
        zero = by_noise[f"{noises[0][0]}:0"]["val_loss"]
        for run in by_noise.values():
            run["jump"] = run["val_loss"][1] - zero[1]
            run["final_vs_zero_noise"] = run["val_loss"][-1] - zero[-1]
        label = f"{width} lr{lr:g}"
        runs[label] = dict(width=width, lr=lr, best_val=min(base_curve.val), rms_growth=growth,
                           post_lr=post_lr, noise=by_noise)
        print(f"  base {label}: best val {min(base_curve.val):.3f}, weights {growth:.1f}x their init RMS")
    report = dict(task="gpt_shakespeare", seed=seed, schedule=args.schedule, k=K, post_mult=post_mult,
                  post_steps=post_steps, noises=[list(n) for n in noises], runs=runs,
                  seconds=round(time.perf_counter() - t_start))
    C.save_json(report, args.out / "results.json")
    plot(report, args.out / "noise_scale.png")
    keys = list(next(iter(runs.values()))["noise"])[1:]
    for field, what in (("jump", "at the first evaluation after widening"),
                        ("final_vs_zero_noise", f"after {post_steps} steps")):
        print(f"val above the zero-noise run {what} (relative std in brackets)")
        print(f"{'base':<14}{'rms/init':>9}" + "".join(f"{k:>26}" for k in keys))
        for label, r in runs.items():
            cells = "".join(f"{r['noise'][k][field]:>+18.3f} [{r['noise'][k]['relative_std']:5.2f}]"
                            for k in keys)
            print(f"{label:<14}{r['rms_growth']:>9.1f}{cells}")
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    """Val above the zero-noise run vs the relative std, at the first evaluation and at the end; one colour
    per base, absolute-noise runs hollow (placed at the relative std they amount to on that base)."""
    plt = C._plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, field, what in ((axes[0], "jump", "first evaluation after widening"),
                            (axes[1], "final_vs_zero_noise", f"after {report['post_steps']} steps")):
        for i, (label, r) in enumerate(report["runs"].items()):
            for j, run in enumerate(x for x in r["noise"].values() if x["std"] != 0):
                absolute = not run["kind"].endswith("_relative")
                ax.scatter(run["relative_std"], run[field], color=f"C{i}", marker="o" if absolute else "s",
                           facecolors="none" if absolute else f"C{i}",
                           label=f"{label} ({r['rms_growth']:.0f}x init RMS)" if j == 0 else None)
        ax.axhline(0.0, color="0.7", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("relative noise std (absolute stds converted: hollow)")
        ax.set_ylabel(f"val above the zero-noise run, {what}")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"GPT seed {report['seed']}, {report['schedule']}: "
                 "the noise a base tolerates vs its weights' scale")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
