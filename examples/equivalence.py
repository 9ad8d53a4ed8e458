"""Control (d) against (b) in float32 and in float64: does the zero-noise upscaled model track the small
model continued (dynamic equivalence, docs/math.md), and is any gap rounding?

The frontier (``frontier.py``) runs (d), the model upscaled with zero noise and trained with graphscale's
μP AdamW, beside (b), the small model continued with plain AdamW, at the same steps, lr and batches. In
exact arithmetic the two compute the same function at every step. In float32 their losses differ by
<= 1e-6 at small learning rates and by up to 3e-2 nats at the grid's top (``--mid``, seed 0). This
script reruns that comparison for one seed at chosen learning rates in float32 and in float64, from a
small model trained the frontier's way in each dtype: if the gap is the amplification of float32 rounding
by training, it shrinks by orders of magnitude in float64; if widening or the optimizer were wrong, it
would not. The control (b') is (b) from the small model's weights each moved by one rounding step: how
far training at that lr carries a rounding-level difference by itself.

Usage: ``python examples/equivalence.py --task gpt --mid [--seed 0] [--lrs 0.016,0.032]`` (``--quick``:
the tiny GPT, seconds). Writes ``results/equivalence/<task>/<mode>/seed<N>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _protocol as P  # noqa: E402
import frontier as F  # noqa: E402

NAME = "equivalence"
KEYS = ("stable_val", "val", "test")


def compare(s: F.Settings, seed: int, small_lr: float, lrs: Sequence[float], dtype: torch.dtype
            ) -> dict[str, Any]:
    """(b), (d) and the control (b') at every budget of ``s`` and every lr of ``lrs``, in ``dtype``: their
    losses and the differences (d) - (b) and (b') - (b)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        data = F.make_data(s, seed)
        model = P.fresh(data, s.n, seed)
        small = P.run_wsd(model, C.plain_optimizer(model, small_lr, 0.0), data, [s.small_steps],
                          warmup=s.warmup, decay_frac=s.decay_frac, seed=seed, keep=True)
        base = small["models"][s.small_steps]
        post_seed = seed + 7919  # the frontier's: every post-small arm draws the same batches
        out: dict[str, Any] = {}
        for lr in lrs:
            continued = copy.deepcopy(base)
            b = P.run_wsd(continued, C.plain_optimizer(continued, lr, 0.0), data, s.budgets,
                          warmup=s.warmup, decay_frac=s.decay_frac, seed=post_seed)
            # the control: (b) again from weights one rounding step away (each times 1 +- eps), to show
            # how far training at this lr carries a rounding-level difference by itself
            nudged = perturbed(base, seed)
            b2 = P.run_wsd(nudged, C.plain_optimizer(nudged, lr, 0.0), data, s.budgets,
                           warmup=s.warmup, decay_frac=s.decay_frac, seed=post_seed)
            upscaled = C.upscale(base, data.example_inputs, s.k, 0.0, s.noise[0], seed=seed)
            if next(upscaled.parameters()).dtype != dtype:
                raise SystemExit(f"the upscaled model is {next(upscaled.parameters()).dtype}, not {dtype}")
            d = P.run_wsd(upscaled, C.mup_optimizer(upscaled, lr, 0.0), data, s.budgets,
                          warmup=s.warmup, decay_frac=s.decay_frac, seed=post_seed)
            out[f"{lr:g}"] = {
                str(bud): dict(continued=b["budgets"][bud], zero_noise=d["budgets"][bud],
                               continued_nudged=b2["budgets"][bud],
                               gap={k: d["budgets"][bud][k] - b["budgets"][bud][k] for k in KEYS},
                               nudged_gap={k: b2["budgets"][bud][k] - b["budgets"][bud][k] for k in KEYS})
                for bud in s.budgets}
        return dict(small_val=small["budgets"][s.small_steps]["val"], lrs=out)
    finally:
        torch.set_default_dtype(before)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with every weight times ``1 + s * eps`` (``s`` a random sign, ``eps`` the dtype's
    machine epsilon): the same function up to one rounding step per weight.

    >>> m = torch.nn.Linear(2, 2)
    >>> d = (perturbed(m, 0).weight - m.weight) / m.weight
    >>> bool((d.abs() <= torch.finfo(d.dtype).eps).all()), bool((d != 0).any())
    (True, True)
    """
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed + 104729)
    with torch.no_grad():
        for p in out.parameters():
            sign = torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1
            p.mul_(1 + sign * torch.finfo(p.dtype).eps)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison in float32 and float64, print the largest gaps and save them."""
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--task", choices=("mlp", "gpt"), default="gpt")
        p.add_argument("--mid", action="store_true", help="the frontier's --mid GPT (64 -> 128, 4 layers)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--lrs", default=None, help="comma-separated post-upscale lrs (default: the grid's "
                                                   "top two)")
        p.add_argument("--small-lr", type=float, default=None,
                       help="the small model's lr (default: the frontier's choice for this seed, read from "
                            "its saved seed file, else the grid's lowest)")

    args = C.parse_args(argv, NAME, __doc__, add_args)
    mode = "quick" if args.quick else "mid" if args.mid else "default"
    s = F.settings(args.task, mode)
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else list(s.lrs[-2:])
    small_lr = args.small_lr
    seed_file = C.RESULTS_DIR / "frontier" / args.task / ("" if mode == "default" else mode) / "seeds" / \
        f"seed{args.seed}.json"
    if small_lr is None:
        small_lr = json.loads(seed_file.read_text())["small_lr"] if seed_file.exists() else s.lrs[0]
    C.require_graphscale()
    t0 = time.perf_counter()
    result: dict[str, Any] = dict(task=args.task, mode=mode, seed=args.seed, small_lr=small_lr, lrs=lrs,
                                  settings=json.loads(json.dumps(s.__dict__, default=list)), dtypes={})
    for dtype in (torch.float32, torch.float64):
        result["dtypes"][str(dtype).split(".")[1]] = compare(s, args.seed, small_lr, lrs, dtype)
    result["seconds"] = time.perf_counter() - t0
    print(f"(d) zero-noise upscaled - (b) small continued, {args.task} {mode}, seed {args.seed} "
          f"(small lr {small_lr:g}); loss differences in nats:")
    print("and, as a control, (b') - (b): (b) from weights one rounding step away (`perturbed`).")
    cols = [(dt, gap, k) for dt in result["dtypes"] for gap in ("gap", "nudged_gap") for k in ("val", "test")]
    label = {"gap": "(d) - (b)", "nudged_gap": "(b') - (b)"}
    print("| lr | budget | " + " | ".join(f"{dt} {label[g]} {k}" for dt, g, k in cols) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in cols) + " |")
    for lr in (f"{x:g}" for x in lrs):
        for bud in (str(b) for b in s.budgets):
            cells = [f"{result['dtypes'][dt]['lrs'][lr][bud][g][k]:.1e}" for dt, g, k in cols]
            print(f"| {lr} | {bud} | " + " | ".join(cells) + " |")
    out = args.out if args.out != C.RESULTS_DIR / NAME else C.RESULTS_DIR / NAME / args.task / mode
    P.save(result, out / f"seed{args.seed}.json")
    return result


if __name__ == "__main__":
    main()
