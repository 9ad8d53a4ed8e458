"""graphscale benchmarks: analysis time vs model size, widening time and memory vs a copy baseline.

Every figure is a ratio against a baseline measured in the same run (these machines drift up to 3x), and
each memory figure comes from a fresh subprocess (peak RSS), so one measurement cannot inflate another.

    python benchmarks/run.py            # full: 124M GPT-2 (fx and HF export), layers 2..16, widening
    python benchmarks/run.py --quick    # small sizes, seconds

Writes ``benchmarks/results/bench.json`` and ``bench.md`` (a Markdown table), and prints both.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _gpt(n_layer: int, n_embd: int, vocab: int, block: int, n_head: int) -> tuple[torch.nn.Module, tuple]:
    from graphscale import zoo

    return zoo.gpt(vocab=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def _time(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def analyze_scaling(quick: bool) -> list[dict]:
    """analyze() time vs layer count (graph size grows linearly with layers)."""
    import graphscale

    rows = []
    d = 128 if quick else 256
    for layers in [1, 2, 4] if quick else [2, 4, 8, 16]:
        model, inputs = _gpt(layers, d, 512, 64, 4)
        graphscale.analyze(model, inputs)  # warm-up (imports, rule loading)
        seconds = _time(lambda m=model, i=inputs: graphscale.analyze(m, i), repeat=2)
        plan = graphscale.analyze(model, inputs)
        nodes = len(plan.captured.gm.graph.nodes)
        rows.append(
            {
                "layers": layers,
                "d": d,
                "graph_nodes": nodes,
                "analyze_s": seconds,
                "ms_per_node": 1000 * seconds / nodes,
            }
        )
    return rows


def analyze_124m(quick: bool) -> list[dict]:
    import graphscale
    from graphscale import zoo

    rows = []
    if quick:
        cfgs = [("gpt fx (d=256, 4 layers)", lambda: _gpt(4, 256, 1024, 128, 4))]
    else:
        cfgs = [("gpt2-124M fx (hand-written)", lambda: _gpt(12, 768, 50257, 1024, 12))]
        try:
            import transformers  # noqa: F401

            cfgs.append(
                (
                    "gpt2-124M export (HF GPT2LMHeadModel)",
                    lambda: zoo.hf_gpt2(n_embd=768, n_head=12, n_layer=12, vocab=50257, n_positions=1024),
                )
            )
        except ImportError:
            pass
    for label, build in cfgs:
        model, inputs = build()
        params = sum(p.numel() for p in model.parameters())
        ids = inputs[0]
        inputs = (torch.randint(0, 1000, (1, 128)),) if ids.dtype == torch.long else inputs
        forward = _time(lambda m=model, i=inputs: m(*i))
        seconds = _time(lambda m=model, i=inputs: graphscale.analyze(m, i))
        plan = graphscale.analyze(model, inputs)
        rows.append(
            {
                "model": label,
                "params": params,
                "frontend": plan.frontend,
                "graph_nodes": len(plan.captured.gm.graph.nodes),
                "analyze_s": seconds,
                "forward_s": forward,
                "analyze_over_forward": seconds / forward,
            }
        )
    return rows


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _widen_child(mode: str, quick: bool) -> dict:
    """Runs in a subprocess: build the model, then widen it (graphscale) or copy it (baseline)."""
    import graphscale

    torch.set_num_threads(2)
    model, _ = _gpt(4, 256, 4096, 128, 4) if quick else _gpt(12, 768, 50257, 1024, 12)
    inputs = (torch.randint(0, 1000, (1, 64)),)
    source_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    gc.collect()
    rss0 = _current_rss()  # resident now (not the peak so far, which model construction may have set)
    t = time.perf_counter()
    if mode == "graphscale":
        wide = graphscale.widen(model, inputs, multiplier=2)
        tensors = dict(wide.state_dict())
    else:
        # Baseline: the same wide tensors, allocated and filled with repeat_interleave along every axis
        # that widening grows (known from a plan made outside the timed region in a real tool; here the
        # shapes are GPT-2's, so grow every axis whose size is a multiple of n_embd, except vocab/pos).
        tensors = {}
        d = model.transformer.wte.weight.shape[1]
        with torch.no_grad():
            for name, p in model.state_dict().items():
                out = p
                for axis, size in enumerate(p.shape):
                    if (
                        size % d == 0
                        and size != model.transformer.wte.weight.shape[0]
                        and "attn.bias" not in name
                    ):
                        out = out.repeat_interleave(2, dim=axis)
                tensors[name] = out
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    wide_bytes = sum(v.numel() * v.element_size() for k, v in tensors.items())
    return {
        "mode": mode,
        "seconds": seconds,
        "peak_rss_bytes": peak,
        "rss_before_bytes": rss0,
        "source_bytes": source_bytes,
        "wide_bytes": wide_bytes,
    }


def widen_vs_baseline(quick: bool) -> dict:
    out = {}
    for mode in ("baseline", "graphscale"):
        cmd = [sys.executable, __file__, "--child", mode] + (["--quick"] if quick else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    g, b = out["graphscale"], out["baseline"]
    # peak RSS includes the interpreter and torch; subtract what the process held before widening, then
    # add back the source model, which both must hold
    extra = g["peak_rss_bytes"] - g["rss_before_bytes"]
    out["time_ratio"] = g["seconds"] / b["seconds"]
    out["peak_over_source_plus_wide"] = (extra + g["source_bytes"]) / (g["source_bytes"] + g["wide_bytes"])
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--child", choices=["graphscale", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_widen_child(args.child, args.quick)))
        return {}
    torch.set_num_threads(2)
    results = {
        "torch": torch.__version__,
        "quick": args.quick,
        "analyze_vs_layers": analyze_scaling(args.quick),
        "analyze_124m": analyze_124m(args.quick),
        "widen_x2": widen_vs_baseline(args.quick),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    md = to_markdown(results)
    (out / "bench.md").write_text(md)
    print(json.dumps(results, indent=2))
    print(md)
    return results


def to_markdown(r: dict) -> str:
    lines = [
        "### analyze() time vs layer count",
        "",
        "| layers | d | graph nodes | analyze (s) | ms/node |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in r["analyze_vs_layers"]:
        lines.append(
            f"| {row['layers']} | {row['d']} | {row['graph_nodes']} | {row['analyze_s']:.3f} | "
            f"{row['ms_per_node']:.2f} |"
        )
    lines += [
        "",
        "### analyze() on GPT-2-size models",
        "",
        "| model | params | frontend | nodes | analyze (s) | forward (s) | analyze / forward |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in r["analyze_124m"]:
        lines.append(
            f"| {row['model']} | {row['params'] / 1e6:.1f}M | {row['frontend']} | {row['graph_nodes']} | "
            f"{row['analyze_s']:.2f} | {row['forward_s']:.2f} | {row['analyze_over_forward']:.1f} |"
        )
    w = r["widen_x2"]
    g, b = w["graphscale"], w["baseline"]
    lines += [
        "",
        "### widen x2 (fp32) vs copy baseline (allocate + repeat_interleave), same run",
        "",
        "| | seconds | peak extra RSS (GB) |",
        "|---|---:|---:|",
        f"| baseline | {b['seconds']:.2f} | {(b['peak_rss_bytes'] - b['rss_before_bytes']) / 1e9:.2f} |",
        f"| graphscale.widen (analysis included) | {g['seconds']:.2f} | "
        f"{(g['peak_rss_bytes'] - g['rss_before_bytes']) / 1e9:.2f} |",
        "",
        f"time ratio {w['time_ratio']:.2f} (target <= 1.5); peak / (source + wide) "
        f"{w['peak_over_source_plus_wide']:.2f} (target <= 1.1); source {g['source_bytes'] / 1e9:.2f} GB, "
        f"wide {g['wide_bytes'] / 1e9:.2f} GB",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
