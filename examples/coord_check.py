"""Coord check: activation scales of a GPT widened x1..x8, trained a few steps, μP rules vs naive copying.

Every graph node's output RMS is recorded (through an fx Interpreter) after each training step for the
built-in GPT widened to several multipliers. Under graphscale's derived rules (μP optimizer, zero noise)
the curves are flat in width; copying with a plain optimizer makes them drift.

    python examples/coord_check.py [--quick] [--out DIR]

Writes ``coord_check.json`` and ``coord_check.png`` to ``examples/results/coord_check/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import graphscale
from graphscale import zoo


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer widths and steps (seconds)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "coord_check"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    widths = [1, 2, 4] if args.quick else [1, 2, 4, 8]
    steps = 3 if args.quick else 5
    vocab, seq = 65, 16

    def make_model() -> torch.nn.Module:
        model, _ = zoo.gpt(vocab=vocab, block_size=seq, n_layer=2, n_head=4, n_embd=32)
        return model

    def batch(t: int) -> tuple[torch.Tensor]:
        return (torch.randint(0, vocab, (8, seq), generator=torch.Generator().manual_seed(t)),)

    def loss_fn(logits: torch.Tensor, t: int) -> torch.Tensor:
        targets = torch.roll(batch(t)[0], -1, dims=1)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    res = graphscale.coord_check(make_model, widths, batch, steps=steps, loss_fn=loss_fn,
                                 optimizer_cls=torch.optim.Adam, hparams={"lr": 1e-2, "eps": 1e-8},
                                 out_dir=args.out, name="coord_check")
    summary = {"widths": widths, "steps": steps, "spread_mup": res.spread("mup"),
               "spread_naive": res.spread("naive"), "out": args.out}
    print(f"activation-RMS spread across widths: μP rules {summary['spread_mup']:.3g}, "
          f"naive copying {summary['spread_naive']:.3g}; plot in {args.out}/coord_check.png")
    return summary


if __name__ == "__main__":
    main()
