"""Write the issue-#20 evidence tables into README.md and examples/README.md from the committed results JSON
(``results/frontier/<task>/results.json``, ``results/transfer/<task>/results.json``), so no figure in them
is typed by hand. The tables go between ``<!-- evidence20:begin -->`` and ``<!-- evidence20:end -->``.

Usage: ``python examples/report20.py [--check]`` (``--check``: fail if a README is not what the results
give).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent
RESULTS = EXAMPLES / "results"
BEGIN, END = "<!-- evidence20:begin -->", "<!-- evidence20:end -->"
ARM_HEAD = [("upscaled", "upscaled"), ("scratch", "(a) scratch 2n"), ("continued", "(b) small continued"),
            ("scratch_eq", "(c) scratch 2n + small's FLOPs"), ("zero_noise", "(d) upscaled, zero noise"),
            ("naive", "(e) naive copy + SP")]
TASK_NAME = dict(gpt="GPT on Shakespeare", mlp="MLP on digits (one-pixel shifts)")


def pm(m: float, h: float, digits: int = 3) -> str:
    """``m ± h`` (``m`` alone where the interval is undefined).

    >>> pm(1.23456, 0.0123)
    '1.235 ± 0.012'
    """
    if m is None or not math.isfinite(m):
        return "diverged"
    return f"{m:.{digits}f}" if h is None or not math.isfinite(h) else f"{m:.{digits}f} ± {h:.{digits}f}"


def frontier_table(r: dict[str, Any], task: str, flag: str = "") -> str:
    """The frontier table of one task (run with ``flag``, e.g. ``--mid``): every arm's test loss (mean ±
    95 % interval over seeds) per budget."""
    s = r["settings"]
    w = r["widths"]
    lines = [f"**{TASK_NAME[task]}, {w['small']} -> {w['wide']}** "
             f"(`python examples/frontier.py --task {task}{' ' + flag if flag else ''}`; "
             f"seeds {', '.join(map(str, r['seeds']))}; small model {s['small_steps']} steps, its test loss "
             f"{pm(*r['small_test'])}; lr grid {', '.join(f'{x:g}' for x in s['lrs'])}; "
             f"{sum(r['seconds_per_seed']):.0f} s of wall time in all on the shared machine):", "",
             "| budget (2n steps) | total FLOPs incl. small model and tuning | "
             + " | ".join(h for _, h in ARM_HEAD) + " | upscaled - best of (b), (c) | verdict |",
             "| --- " * (len(ARM_HEAD) + 4) + "|"]
    for row in r["table"]:
        a = row["arms"]
        cells = []
        for arm, _ in ARM_HEAD:
            c = pm(a[arm]["test_mean"], a[arm]["test_ci95"])
            if arm == "scratch":
                c += f" (at {a[arm]['compute_tuned']:.2g})"
            lrs = a[arm]["lr_per_seed"]
            top, low = sum(x == max(s["lrs"]) for x in lrs), sum(x == min(s["lrs"]) for x in lrs)
            if top or low:  # the optimum may lie past the grid: the loss there is an upper bound
                c += " [lr on the grid's " + ", ".join(f"{e} edge: {k}/{len(lrs)}" for e, k in
                                                       (("top", top), ("low", low)) if k) + "]"
            cells.append(c)
        best = row["best_equal_compute_control"]
        d = row["upscaled_minus"][best]
        lines.append(f"| {row['budget']} | {a['upscaled']['compute_tuned']:.2g} | " + " | ".join(cells)
                     + f" | {pm(d['mean'], d['ci95'])} vs ({'b' if best == 'continued' else 'c'}) | "
                     f"{row['verdict']} |")
    verdicts = [row["verdict"] for row in r["table"]]
    n = len(verdicts)
    count = {v: sum(x.startswith(v) for x in verdicts) for v in ("upscaled better", "tie", "control better")}
    lines += ["", "Verdict: upscaled beats the best equal-compute control ((b) or (c)) at "
              f"{count['upscaled better']} of {n} budgets, ties at {count['tie']}, "
              f"loses at {count['control better']}."]
    gap = r["zero_noise_vs_continued_max_gap"]
    cross = "; ".join(f"{'below' if c['upscaled_better_after'] else 'above'} {c['control']} from "
                      f"{c['compute']:.2g} FLOPs" for c in r["crossings"]) or "none between the budgets"
    lines += ["", "(d) against (b) at the same steps, lr and batches: largest |difference| of val/test loss "
              f"{gap:.2g} nats over every seed, lr and budget. Crossings of upscaled's mean with a "
              "control's: "
              f"{cross}. Test losses in nats; the lr of each arm, budget and seed is chosen on val."]
    return "\n".join(lines)


def transfer_table(r: dict[str, Any], task: str) -> str:
    """The transfer table of one task: regret, tuning-cost ratio and the fitted optimum's move."""
    s = r["settings"]
    lines = [f"**{TASK_NAME[task]}: tuned on the proxy {r['proxy']}** (`python examples/transfer.py --task "
             f"{task}`; seeds {', '.join(map(str, r['seeds']))}; {s['post_steps']} post-upscale steps; "
             "lr grid "
             f"{', '.join(f'{x:g}' for x in s['lrs'])}; noise "
             f"{', '.join(f'{k}:{v:g}' for k, v in s['noises'])}; "
             f"{sum(r['seconds_per_seed']):.0f} s of wall time in all):", "",
             "| target | method | regret, test (nats) | regret, val | best test at the target | "
             "tuning-cost ratio (target grid / proxy grid + proxy base) | optimum's move (log2 lr, "
             "fitted) |", "| --- " * 7 + "|"]
    for t, by in r["targets"].items():
        for method, name in (("graphscale", "graphscale + μP AdamW"), ("naive", "(e) naive copy + SP")):
            m = by[method]
            move = (pm(m["optimum_move_log2_mean"], m["optimum_move_log2_ci95"], 2)
                    + f" ({m['optimum_move_seeds']} of {len(r['seeds'])} seeds)"
                    if m["optimum_move_seeds"] else "no interior vertex")
            lines.append(f"| {t} | {name} | {pm(m['regret_test_mean'], m['regret_test_ci95'])} | "
                         f"{pm(m['regret_val_mean'], m['regret_val_ci95'])} | {pm(*m['target_best_test'])} | "
                         f"{m['tuning_cost_ratio']:.1f}x | {move} |")
    top = f"{max(s['lrs']):g}"
    for method, name in (("graphscale", "graphscale"), ("naive", "the naive SP control")):
        picks = r[f"{method}_proxy_choice_per_seed"] + [k for by in r["targets"].values()
                                                         for k in by[method]["target_best_per_seed"]]
        on_top = sum(k.split()[0] == top for k in picks)
        if on_top:
            lines.append(f"\n{name}: {on_top} of {len(picks)} val-best choices (proxy and targets, all "
                         "seeds) "
                         f"sit on the lr grid's top edge ({top}): there a regret near 0 says only that proxy "
                         "and target both want an lr at or past the edge, not where their optima are.")
        held = [t for t, by in r["targets"].items()
                if by[method]["regret_test_mean"] - by[method]["regret_test_ci95"] <= 0]
        lines.append(f"\n{name}: the regret's 95 % interval includes 0 at {len(held)} of "
                     f"{len(r['targets'])} targets ({', '.join(held) or 'none'}).")
    return "\n".join(lines)


def section(results: Path = RESULTS) -> str:
    """The whole generated block (every task whose results exist)."""
    parts = []
    for task, mode in (("gpt", "mid"), ("gpt", ""), ("mlp", "")):  # the largest size first
        f = results / "frontier" / task / mode / "results.json"
        if f.exists():
            parts.append(frontier_table(json.loads(f.read_text()), task, f"--{mode}" if mode else ""))
            where, alt = (f"{task}/{mode}/", f"{task} {mode}") if mode else (f"{task}/", task)
            parts.append(f"![frontier {alt}](examples/results/frontier/{where}frontier.png)")
    for task in ("mlp", "gpt"):
        f = results / "transfer" / task / "results.json"
        if f.exists():
            parts.append(transfer_table(json.loads(f.read_text()), task))
            parts.append(f"![transfer {task}](examples/results/transfer/{task}/transfer.png)")
    missing = [f"`python examples/{kind}.py --task {task}`" for kind in ("frontier", "transfer")
               for task in ("gpt", "mlp") if not (results / kind / task / "results.json").exists()]
    if missing:
        parts.append("No committed results yet (not finished this session): " + ", ".join(missing) + ".")
    return "\n\n".join(parts)


def splice(text: str, block: str, images_prefix: str = "") -> str:
    """``text`` with the part between the markers replaced by ``block``."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"the README has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    if images_prefix != "examples/":
        block = block.replace("](examples/", f"]({images_prefix}")
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite (or with ``--check`` verify) both READMEs' generated blocks."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    block = section()
    stale = []
    for path, prefix in ((EXAMPLES.parent / "README.md", "examples/"), (EXAMPLES / "README.md", "")):
        old = path.read_text()
        new = splice(old, block, prefix)
        if new != old:
            stale.append(str(path))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print("not generated from the results: " + ", ".join(stale) + " (run python examples/report20.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
