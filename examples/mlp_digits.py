"""Upscale an MLP on scikit-learn digits with graphscale and compare with a tuned from-scratch model.

Usage: ``python examples/mlp_digits.py [--quick] [--out DIR] [--weight-decay-grid 0,0.1,1,10] [--augment]
[--seed N] [--reuse-base-lr] [--base-plateau] [--schedule cosine] [--proxy-steps N] [--absolute-noise]
[--repeats N] [--grid-seeds N] [--width N]
[--proxy-noises gaussian_relative:0.5,symmetric_relative:0.5]``.
See ``_common.py`` for the protocol.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "mlp_digits"


class MLP(nn.Module):
    """64 -> width -> width -> 10 with ReLU (plain PyTorch, fx-traceable)."""

    def __init__(self, width: int, d_in: int = 64, d_out: int = 10, depth: int = 2) -> None:
        super().__init__()
        dims = [d_in] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.readout = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.readout(x)


def make_task(batch: int = 64, seed: int = 0, augment: bool = False) -> C.Task:
    """Digits as 64 standardised features; minibatches of ``batch``; evaluation on the full val set and
    the first 512 training examples."""
    xtr, ytr, xva, yva = C.digits_data(seed, augment)
    ex = (xtr[:batch],)
    return C.Task(
        name=NAME, make_model=MLP, get_batch=C.minibatcher(xtr, ytr, batch), loss_fn=F.cross_entropy,
        train_eval=[(xtr[:512], ytr[:512])], val_eval=[(xva, yva)], example_inputs=ex,
        flops_per_step=lambda m: 6 * C.count_linear_conv_macs(m, ex) * batch,
    )


def settings(quick: bool) -> C.Settings:
    """Full settings (a few minutes on 2 cores) or --quick ones (seconds)."""
    if quick:
        return C.Settings(width=32, steps=60, base_steps=60, eval_every=20, warmup=5, final_window=1,
                          base_lr_points=2, base_n_lr_points=2, scratch_lr_points=2, post_lr_mults=(1.0,),
                          max_extend=0,
                          noises=(("gaussian_relative", 0.0), ("gaussian_relative", 0.5)),
                          absolute_noises=(("gaussian", 0.0), ("gaussian", 0.5)),
                          base_lr_center=3e-3, repeats=2)
    return C.Settings(width=64, steps=400, base_steps=400, proxy_steps=200, eval_every=20, warmup=20,
                      base_lr_center=1e-3, base_lr_points=3, scratch_lr_points=4,
                      post_lr_mults=(0.5, 1.0, 2.0),
                      noises=tuple(("gaussian_relative", s) for s in (0.0, 0.2, 0.5, 1.0)),
                      absolute_noises=tuple(("gaussian", s) for s in (0.0, 0.2, 0.5, 1.0)),
                      # one run's final val on the 360 val images is noisy: compare the recipes' means
                      repeats=4)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the experiment; returns the results dict (also written to ``--out``/results.json)."""
    args = C.parse_args(argv, NAME, __doc__, C.add_regularization_args)
    C.require_graphscale()
    s = C.apply_regularization(settings(args.quick), args, NAME)
    return C.run_upscaling_experiment(make_task(augment=args.augment), s, args.out,
                                      progress=not args.no_progress)


if __name__ == "__main__":
    main()
