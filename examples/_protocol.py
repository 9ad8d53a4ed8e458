"""The issue-#20 protocol shared by ``frontier.py`` and ``transfer.py`` (see examples/README.md, "Protocol
2026-12-01"): seeded train/val/test splits, one warmup-stable-decay (WSD) schedule for every arm with decay
branches off one stable run, the arms' model builders, FLOP accounting and 95 % intervals over seeds.

Selection (an lr, a noise) always reads the **val** split; every reported loss is on the **test** split.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as C
import gpt_shakespeare as G
import mlp_digits as M
import torch
import torch.nn.functional as F
from torch import nn

# two-sided 95 % Student t quantiles by degrees of freedom (n - 1 seeds)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95 % t-interval over the seeds (half-width nan for a single value).

    >>> m, h = mean_ci([1.0, 2.0, 3.0, 4.0]); round(m, 3), round(h, 3)
    (2.5, 2.054)
    """
    xs = [float(x) for x in xs]
    m = sum(xs) / len(xs)
    if len(xs) < 2 or not math.isfinite(m):
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, _T95.get(len(xs) - 1, 1.96) * sd / math.sqrt(len(xs))


# ------------------------------------------------------------------------------------------------
# Data: seeded three-way splits
# ------------------------------------------------------------------------------------------------

@dataclass
class Data:
    """A task for one seed: models by width, training batches, fixed val and test sets, FLOPs per step."""

    name: str
    make_model: Callable[[int], nn.Module]
    get_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    val: list[tuple[torch.Tensor, torch.Tensor]]
    test: list[tuple[torch.Tensor, torch.Tensor]]
    example_inputs: tuple[torch.Tensor, ...]
    flops_per_step: Callable[[nn.Module], float]
    split: dict[str, Any]


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, which: str) -> float:
    """Mean loss over ``data.val`` or ``data.test`` (inf where it is not finite)."""
    total, count = 0.0, 0
    for x, y in getattr(data, which):
        total += float(data.loss_fn(model(x), y)) * len(x)
        count += len(x)
    out = total / count
    return out if math.isfinite(out) else float("inf")


Tensors6 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def digits_split(seed: int, augment: bool = True) -> Tensors6:
    """scikit-learn digits split 60/20/20 (train/val/test, stratified, ``random_state=seed``), standardised
    with train statistics; with ``augment`` the training images also appear in their 8 one-pixel shifts."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xrest, ytr, yrest = train_test_split(d.data, d.target, test_size=0.4, random_state=seed,
                                              stratify=d.target)
    xva, xte, yva, yte = train_test_split(xrest, yrest, test_size=0.5, random_state=seed, stratify=yrest)
    if augment:
        padded = F.pad(torch.tensor(xtr).view(-1, 8, 8), (1, 1, 1, 1))
        shifts = [(a, b) for a in range(3) for b in range(3)]
        xtr = torch.cat([padded[:, a:a + 8, b:b + 8].reshape(-1, 64) for a, b in shifts]).numpy()
        ytr = torch.tensor(ytr).repeat(len(shifts)).numpy()
    mu, sd = xtr.mean(0), xtr.std(0)
    sd[sd == 0] = 1.0
    f = lambda a: torch.tensor((a - mu) / sd, dtype=torch.float32)  # noqa: E731
    t = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return f(xtr), t(ytr), f(xva), t(yva), f(xte), t(yte)


def mlp_data(seed: int, batch: int = 64, augment: bool = True) -> Data:
    """Digits MLP (64 -> n -> n -> 10) on the seed's split; FLOPs = 6 x Linear MACs x batch."""
    xtr, ytr, xva, yva, xte, yte = digits_split(seed, augment)
    ex = (xtr[:batch],)
    return Data(name="mlp_digits", make_model=M.MLP, get_batch=C.minibatcher(xtr, ytr, batch),
                loss_fn=F.cross_entropy, val=[(xva, yva)], test=[(xte, yte)], example_inputs=ex,
                flops_per_step=lambda m: 6 * C.count_linear_conv_macs(m, ex) * batch,
                split=dict(train=len(xtr), val=len(xva), test=len(xte), augment=augment,
                           random_state=seed))


def play_split(seed: int, n_val: int = 3, n_test: int = 3) -> tuple[list[int], list[int], list[int]]:
    """Disjoint play indices (train, val, test): a permutation of the plays drawn from ``seed``.

    >>> tr, va, te = play_split(0); len(va), len(te), len(set(tr) | set(va) | set(te)) == len(tr) + 6
    (3, 3, True)
    """
    n = len(G.play_files())
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed)).tolist()
    return sorted(perm[n_val + n_test:]), sorted(perm[:n_val]), sorted(perm[n_val:n_val + n_test])


def gpt_data(seed: int, n_layer: int = 2, n_head: int = 2, block_size: int = 32, batch: int = 16,
             eval_batches: int = 8) -> Data:
    """Character GPT on the plays: train/val/test are disjoint plays drawn by ``seed``; val and test are
    ``eval_batches`` x 64 fixed windows of their plays. FLOPs = 6 x params x tokens per step."""
    texts = [G.clean_markdown(Path(f).read_text(encoding="utf-8")) for f in G.play_files()]
    vocab = sorted(set("".join(texts)))
    stoi = {ch: i for i, ch in enumerate(vocab)}
    tr, va, te = play_split(seed)

    def ids(idx: list[int]) -> torch.Tensor:
        return torch.tensor([stoi[c] for c in "\n".join(texts[i] for i in idx)], dtype=torch.long)

    train_ids, val_ids, test_ids = ids(tr), ids(va), ids(te)

    def windows(d: torch.Tensor, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(d) - block_size - 1, (n,), generator=gen)
        chunk = torch.stack([d[s:s + block_size + 1] for s in starts.tolist()])
        return chunk[:, :-1], chunk[:, 1:]

    g = torch.Generator().manual_seed(seed + 1234)
    val = [windows(val_ids, g, 64) for _ in range(eval_batches)]
    test = [windows(test_ids, g, 64) for _ in range(eval_batches)]

    def make(width: int) -> nn.Module:
        return G.GPT(width, len(vocab), n_layer=n_layer, n_head=n_head, block_size=block_size)

    return Data(name="gpt_shakespeare", make_model=make, get_batch=lambda gen: windows(train_ids, gen, batch),
                loss_fn=G.lm_loss, val=val, test=test, example_inputs=(val[0][0][:4],),
                flops_per_step=lambda m: 6.0 * C.n_params(m) * batch * block_size,
                split=dict(train_plays=tr, val_plays=va, test_plays=te, train_chars=len(train_ids),
                           val_chars=eval_batches * 64 * block_size, n_layer=n_layer, n_head=n_head,
                           block_size=block_size, batch=batch))


# ------------------------------------------------------------------------------------------------
# The schedule: warmup-stable-decay, decays branched off one stable run
# ------------------------------------------------------------------------------------------------

def decay_steps(budget: int, decay_frac: float) -> int:
    """Steps of the linear decay to 0 that ends a WSD run of ``budget`` steps.

    >>> decay_steps(400, 0.2)
    80
    """
    return max(1, round(decay_frac * budget))


def run_wsd(model: nn.Module, opt: torch.optim.Optimizer, data: Data, budgets: Sequence[int], *, warmup: int,
            decay_frac: float, seed: int, keep: bool = False) -> dict[str, Any]:
    """Train one WSD run per budget, sharing the stable phase: a linear warmup over ``warmup`` steps, the
    peak lr (each param group's lr in ``opt``) until step ``B - decay_steps(B)``, then a linear decay to 0
    at step B. The decay of each budget is branched off the stable run (model and optimizer copied), on
    the batches the stable run would have drawn next, so each budget's result is exactly the WSD run of
    that length. Returns per budget the val and test loss at its end and the val loss where its decay
    began; with ``keep`` also the trained models (``"models"``)."""
    budgets = sorted(set(int(b) for b in budgets))
    starts = {b: b - decay_steps(b, decay_frac) for b in budgets}
    if warmup >= min(starts.values()):
        raise ValueError(f"warmup {warmup} must end before the first decay starts ({min(starts.values())})")
    peaks = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = dict(budgets={}, models={})
    t0 = time.perf_counter()

    def step(m: nn.Module, o: torch.optim.Optimizer, g: torch.Generator, factor: float) -> bool:
        for group, peak in zip(o.param_groups, peaks):
            group["lr"] = peak * factor
        x, y = data.get_batch(g)
        loss = data.loss_fn(m(x), y)
        o.zero_grad(set_to_none=True)
        loss.backward()
        o.step()
        return math.isfinite(loss.item())

    model.train()
    done, ok = 0, True
    for b in budgets:  # the stable run advances to each budget's branch point in turn
        while ok and done < starts[b]:
            ok = step(model, opt, gen, min(1.0, (done + 1) / warmup) if warmup else 1.0)
            done += 1
        rec: dict[str, float] = dict(stable_val=evaluate(model, data, "val") if ok else float("inf"))
        if ok:
            m, o = copy.deepcopy((model, opt))
            g = torch.Generator().manual_seed(seed)
            g.set_state(gen.get_state())
            n, fine = decay_steps(b, decay_frac), True
            for i in range(n):
                fine = fine and step(m, o, g, (n - 1 - i) / n)
            rec.update(val=evaluate(m, data, "val") if fine else float("inf"),
                       test=evaluate(m, data, "test") if fine else float("inf"))
            if keep:
                out["models"][b] = m
        else:
            rec.update(val=float("inf"), test=float("inf"))
        out["budgets"][b] = rec
    out["seconds"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------------
# The arms' starting points
# ------------------------------------------------------------------------------------------------

def naive_copy(narrow: nn.Module, wide: nn.Module, k: int, std: float, seed: int) -> nn.Module:
    """Control (e): ``narrow`` copied into the fresh ``wide`` with ``repeat_interleave`` along every axis
    that grew, without any rescaling (the function changes), and Gaussian noise of ``std`` x RMS(W) on
    every matrix that grew (relative, like graphscale's ``gaussian_relative``)."""
    gen = torch.Generator().manual_seed(seed)
    src = narrow.state_dict()
    with torch.no_grad():
        for name, t in wide.state_dict().items():
            v = src[name]
            for dim in range(v.dim()):
                if t.shape[dim] != v.shape[dim]:
                    if t.shape[dim] != k * v.shape[dim]:
                        raise ValueError(f"{name}: axis {dim} grew from {v.shape[dim]} to {t.shape[dim]}, "
                                         f"not x{k}")
                    v = v.repeat_interleave(k, dim=dim)
            if std > 0 and v.is_floating_point() and v.dim() >= 2 and v.shape != src[name].shape:
                v = v + std * v.pow(2).mean().sqrt() * torch.randn(v.shape, generator=gen)
            t.copy_(v)
    return wide


def fresh(data: Data, width: int, seed: int) -> nn.Module:
    """A freshly initialised model of ``width`` (the model's own init: standard parametrization)."""
    torch.manual_seed(seed)
    return data.make_model(width)


def save(obj: Any, path: Path) -> None:
    """Write results JSON (non-finite floats as null)."""
    C.save_json(obj, path)


def aggregate_seeds(out: Path, settings: Any, summarize: Callable[[list[dict]], dict],
                    plot: Callable[[dict, Path], None], figure: str) -> dict[str, Any] | None:
    """Summarize every seed file under ``out/seeds`` run with the dataclass ``settings`` (files of other
    settings are ignored), write ``out/results.json`` and the figure ``out/<figure>``; None if no seed."""
    want = json.loads(json.dumps(dataclasses.asdict(settings)))
    runs = [r for f in sorted((out / "seeds").glob("seed*.json"))
            if (r := json.loads(f.read_text()))["settings"] == want]
    if not runs:
        return None
    runs.sort(key=lambda r: r["seed"])
    summary = summarize(runs)
    save(summary, out / "results.json")
    plot(summary, out / figure)
    return summary
