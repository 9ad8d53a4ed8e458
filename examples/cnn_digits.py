"""Upscale a residual CNN with BatchNorm on digits (1x8x8 images) with graphscale vs a tuned scratch model.

Usage: ``python examples/cnn_digits.py [--quick] [--out DIR] [--weight-decay-grid 0,0.1,1,10] [--augment]
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

NAME = "cnn_digits"


class ResBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus identity, then ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class CNN(nn.Module):
    """Stem conv (1 -> width) + BN, ``blocks`` residual blocks at 8x8, global average pool, Linear readout."""

    def __init__(self, width: int, blocks: int = 2, n_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.readout = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.readout(h.mean(dim=(2, 3)))


def make_task(batch: int = 64, seed: int = 0, augment: bool = False) -> C.Task:
    """Digits reshaped to (N, 1, 8, 8) after per-pixel standardisation."""
    xtr, ytr, xva, yva = C.digits_data(seed, augment)
    xtr, xva = xtr.view(-1, 1, 8, 8), xva.view(-1, 1, 8, 8)
    ex = (xtr[:batch],)
    return C.Task(
        name=NAME, make_model=CNN, get_batch=C.minibatcher(xtr, ytr, batch), loss_fn=F.cross_entropy,
        train_eval=[(xtr[:512], ytr[:512])], val_eval=[(xva, yva)], example_inputs=ex,
        flops_per_step=lambda m: 6 * C.count_linear_conv_macs(m, ex) * batch,
    )


def settings(quick: bool) -> C.Settings:
    """Full settings (a few minutes on 2 cores) or --quick ones (seconds)."""
    if quick:
        return C.Settings(width=8, steps=40, base_steps=40, eval_every=20, warmup=5, final_window=1,
                          base_lr_points=2, base_n_lr_points=2, scratch_lr_points=2, post_lr_mults=(1.0,),
                          max_extend=0,
                          noises=(("gaussian_relative", 0.0), ("gaussian_relative", 0.5)),
                          absolute_noises=(("gaussian", 0.0), ("gaussian", 0.5)),
                          base_lr_center=3e-3, repeats=2)
    return C.Settings(width=16, steps=400, base_steps=400, proxy_steps=200, eval_every=20, warmup=20,
                      base_lr_center=3e-3, base_lr_points=3, scratch_lr_points=4,
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
