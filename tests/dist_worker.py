"""Worker for tests/test_distributed.py: one rank of a 2-process gloo run (spawned, CPU, float64).

For each wrapper (DDP, FSDP2's ``fully_shard``), each rank builds the same narrow GPT, trains it a few
steps, widens it, wraps the wide model, builds ``mup_optimizer`` over the wrapper, carries the narrow
optimizer state into it (``transfer_optimizer_state``), then trains on its half of every batch with
the base-equivalent ``clip_grad_norm_``. Each rank also trains the narrow model alone on the whole
batches (the reference). Rank 0 writes, per wrapper, the largest relative difference between every
wide parameter (collapsed, divided by its copy scale) and its narrow source, the losses and the
clipping norms, as JSON.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import graphscale
from graphscale import zoo
from graphscale.train import clip_grad_norm_, mup_optimizer, transfer_optimizer_state

BATCH, SEQ, VOCAB = 4, 8, 11
HPARAMS = {"lr": 3e-3, "weight_decay": 0.1}
MAX_NORM = 0.5  # below the gradient norms seen, so clipping acts and its norm must be right


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def loss_of(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(ids).reshape(-1, VOCAB), targets.reshape(-1))


def full(t: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (an FSDP2 parameter is a sharded DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run(rank: int, world: int, store_path: str, hows: list[str], steps: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        results = {how: compare(rank, world, how, steps) for how in hows}
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def compare(rank: int, world: int, how: str, steps: int) -> dict:
    """Train the widened model wrapped by ``how`` on this rank's half batches beside the narrow model."""
    narrow, _ = zoo.gpt(vocab=VOCAB, block_size=SEQ, n_layer=1, n_head=2, n_embd=16)
    narrow.train()
    narrow_opt = torch.optim.AdamW(narrow.parameters(), **HPARAMS)
    for step in range(3):  # a warm start mid-training: the optimizer has state to carry
        narrow_opt.zero_grad()
        loss_of(narrow, *batch(-1 - step)).backward()
        narrow_opt.step()
    start = {n: p.detach().clone() for n, p in narrow.named_parameters()}
    wide = graphscale.widen(narrow, (batch(0)[0],), multiplier=2)
    record = wide.graphscale
    if how == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(wide)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(wide, mesh=init_device_mesh("cpu", (world,)))
    opt = mup_optimizer(model, torch.optim.AdamW, **HPARAMS)
    transfer_optimizer_state(narrow, narrow_opt, model, opt)

    half = BATCH // world
    wide_losses, narrow_losses, norms = [], [], []
    for step in range(steps):
        ids, targets = batch(step)
        opt.zero_grad()
        mine = slice(rank * half, (rank + 1) * half)
        loss = loss_of(model, ids[mine], targets[mine])
        loss.backward()
        norm = float(clip_grad_norm_(model, MAX_NORM))
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # the whole batch's loss: the mean of the equal halves' means
        wide_losses.append(float(mean) / world)
        # the reference: the narrow model alone, whole batch, torch's own clipping
        narrow_opt.zero_grad()
        ref = loss_of(narrow, ids, targets)
        ref.backward()
        norms.append((norm, float(torch.nn.utils.clip_grad_norm_(narrow.parameters(), MAX_NORM))))
        narrow_opt.step()
        narrow_losses.append(float(ref.detach()))
    small = dict(narrow.named_parameters(remove_duplicate=False))
    worst = moved = 0.0
    for name, p in model.named_parameters():
        s = record.params[name.removeprefix("module.")]
        got = s.collapse(full(p.detach())) / s.copy_scale
        want = small[s.source].detach()
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    for name, p in narrow.named_parameters():
        moved = max(moved, float((p.detach() - start[name]).abs().max()))
    return {"worst": worst, "moved": moved, "wide_losses": wide_losses, "narrow_losses": narrow_losses,
            "norms": norms, "sharded": all(hasattr(p, "full_tensor") for p in model.parameters())}


if __name__ == "__main__":  # python tests/dist_worker.py ddp,fsdp STEPS OUT.json
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        hows, steps, out = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3]
        mp.spawn(run, args=(2, f"{tmp}/store", hows, steps, out), nprocs=2)
    print(open(sys.argv[3]).read())
