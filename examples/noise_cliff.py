"""Where symmetric noise stops being tolerated, at several widths: does the cliff move with width?

The GPT of ``hp_transfer.py`` (2 layers, 2 heads, context 32) is trained as a μP family relative to its
smallest width (one lr for every width), each base is widened x2 by graphscale with symmetric noise of
each std, and trained a few steps with μP AdamW at that same lr. Symmetric noise leaves the function
exact at widening (up to float32 rounding, which grows with the std), so the val loss at step 0 is the
base's; the "jump" is how far the val loss rises above it in the post-upscale run. If graphscale's
1/sqrt(fan_in) noise scaling transfers, the std at which the jump appears is the same at every width.

Usage: ``python examples/noise_cliff.py [--quick] [--out DIR]`` (full: ~40 s on 2 cores).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import hp_transfer  # noqa: E402

NAME = "noise_cliff"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the sweep; returns the results dict (also written to ``--out``/results.json)."""
    args = C.parse_args(argv, NAME, __doc__)
    C.require_graphscale()
    task, _ = hp_transfer.gpt_settings(args.quick)  # the same GPT and data as the hp-transfer sweep
    if args.quick:
        widths, stds, base_steps, post_steps, eval_every = (8, 16), (1.0, 4.0), 20, 10, 5
    else:
        widths, stds, base_steps, post_steps, eval_every = (16, 32, 64), (2.0, 4.0, 8.0, 16.0), 300, 100, 25
    lr, k, seed, n0, ex = 8e-3, 2, 0, widths[0], task.example_inputs
    t_start = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    for n in widths:
        base, opt = C.mup_family_member(task, n, n0, lr, seed)
        C.train(base, opt, task, base_steps, label=f"base {n}", lr=lr, eval_every=base_steps, warmup=10,
                seed=seed, progress=not args.no_progress)
        wide_rec = C.relative_record_for(task.make_model, k * n, n0, ex)
        for std in stds:
            wide = C.upscale(base, ex, k, std, "symmetric", seed=seed)
            c = C.train(wide, C.mup_optimizer(wide, lr, task.weight_decay, record=wide_rec), task, post_steps,
                        label=f"{n}->{k * n} symmetric {std:g}", lr=lr, eval_every=eval_every, warmup=10,
                        seed=seed + 1, progress=not args.no_progress)
            jump = max(c.val[1:]) - c.val[0]
            runs.setdefault(f"{n}->{k * n}", {})[f"{std:g}"] = dict(steps=c.steps, val_loss=c.val, jump=jump)
            print(f"  {n}->{k * n} symmetric std {std:g}: val {c.val[0]:.3f} at widening, "
                  f"largest rise {jump:+.3f}, {c.val[-1]:.3f} after {post_steps} steps")
    report = dict(task="gpt (hp_transfer's)", lr=lr, k=k, seed=seed, base_steps=base_steps,
                  post_steps=post_steps, stds=list(stds), runs=runs,
                  seconds=round(time.perf_counter() - t_start))
    C.save_json(report, args.out / "results.json")
    print("largest val rise after widening (rows: upscaling, columns: symmetric std)")
    print("upscaling  " + "".join(f"{s:>9g}" for s in stds))
    for label, by_std in runs.items():
        print(f"{label:<11}" + "".join(f"{by_std[f'{s:g}']['jump']:>+9.3f}" for s in stds))
    return report


if __name__ == "__main__":
    main()
