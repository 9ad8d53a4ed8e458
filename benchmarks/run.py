"""graphscale benchmarks: analyze time, and widen time and memory against a plain copy, each measured fairly.

Every timed figure is the minimum (and median) over N runs, each in a fresh process, alternating between
the two things compared, so a ratio comes from one run of this script on the same (possibly noisy)
machine. Each process first imports, builds the model and makes one call on a tiny model (one-time
initialisation: rule files, lazy imports), then times only the measured call, in wall-clock and CPU time.

- ``widen`` x2 of a 124M GPT-2 (hand-written, fx, fp32), analysis included, against the **copy
  baseline**: the same wide tensors made the best plain way, one allocation and one broadcast write of
  ``c * narrow`` per tensor (``repeat_interleave`` / ``index_select`` where an axis is not plain
  repetition), with the indices and scales worked out before the timer starts. Both processes checksum
  their tensors afterwards: the figures compare two ways of producing the same bytes.
- ``analyze`` of the same model (fx), and of Hugging Face's ``GPT2LMHeadModel`` (torch.export).
- ``analyze`` time against layer count (one process, min of repeats), and a cProfile of one widening.

    python benchmarks/run.py                 # full: 124M, N=5 (about 10 minutes on 2 busy cores)
    python benchmarks/run.py --quick         # small sizes, N=3, a minute
    python benchmarks/run.py --readme        # print README's "Benchmarks" table from the last results

Writes ``benchmarks/results/bench.json`` and ``bench.md``, and prints both. README's table is
``--readme``'s output, pasted (tests/test_benchmark.py checks they agree).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.util
import io
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if importlib.util.find_spec("graphscale") is None:  # run from a checkout without installing (PYTHONPATH=
    sys.path.insert(0, str(ROOT))                   # another checkout measures that one)

FULL = {"n_layer": 12, "n_embd": 768, "vocab": 50257, "block_size": 1024, "n_head": 12}
QUICK = {"n_layer": 4, "n_embd": 256, "vocab": 4096, "block_size": 128, "n_head": 4}
TINY = {"n_layer": 1, "n_embd": 32, "vocab": 64, "block_size": 16, "n_head": 2}
SEQ = 64  # tokens of the example input (1 x SEQ)
TARGETS = {"widen_ratio": 1.5, "analyze_s": 0.3, "peak_over_source_plus_wide": 1.1}


def build(cfg: dict[str, int]) -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """The hand-written GPT-2 of ``graphscale.zoo`` at ``cfg``, and a (1, SEQ) token input (seeded)."""
    from graphscale import zoo

    model, _ = zoo.gpt(vocab=cfg["vocab"], block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                       n_head=cfg["n_head"], n_embd=cfg["n_embd"])
    ids = torch.randint(0, cfg["vocab"], (1, min(SEQ, cfg["block_size"])),
                        generator=torch.Generator().manual_seed(0))
    return model, (ids,)


def build_hf(quick: bool) -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    from graphscale import zoo

    if quick:
        model, _ = zoo.hf_gpt2(n_embd=128, n_head=4, n_layer=2, vocab=1000, n_positions=128)
    else:
        model, _ = zoo.hf_gpt2(n_embd=768, n_head=12, n_layer=12, vocab=50257, n_positions=1024)
    return model, (torch.randint(0, 1000, (1, SEQ), generator=torch.Generator().manual_seed(0)),)


# -- the copy baseline -------------------------------------------------------------------------------------


def copy_spec(model: torch.nn.Module, inputs: tuple, multiplier: int = 2) -> list[dict[str, Any]]:
    """What the baseline needs, worked out before its timer starts: per stored tensor, its wide shape, per
    axis ``None`` (fixed), an int ``k`` (plain adjacent repetition) or the narrow index of every wide
    position, and the scale ``c`` (1 for integer tensors, which widening does not scale).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> [(s["name"], s["axes"], s["scale"]) for s in copy_spec(model, (torch.randn(1, 2),))][1:3]
        [('0.bias', [2], 1.0), ('1.weight', [None, 2], 0.5)]
    """
    import graphscale
    from graphscale.widen import build_record

    plan = graphscale.analyze(model, inputs)
    mults = plan.multipliers(multiplier)
    record = build_record(plan, plan.sizes(mults), mults)
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    out = []
    for name, s in record.params.items():
        if plan.canonical(name) != name or name not in state:
            continue  # a tied name shares its canonical tensor; both sides make it once
        axes: list[int | list[int] | None] = []
        for a in s.axes:
            if a is None or a.is_identity():
                axes.append(None)
            else:
                k = a.plain_multiplier()
                axes.append(k if k else a.index().tolist())
        scale = float(s.copy_scale) if state[name].is_floating_point() else 1.0
        out.append({"name": name, "wide_shape": list(s.wide_shape), "axes": axes, "scale": scale})
    return out


def prepare_baseline(model: torch.nn.Module, spec: list[dict[str, Any]]) -> list[tuple]:
    """Tensors and index tensors for :func:`baseline_copy` (outside the timed region)."""
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    out = []
    for s in spec:
        axes = [a if a is None or isinstance(a, int) else torch.tensor(a, dtype=torch.long)
                for a in s["axes"]]
        out.append((s["name"], state[s["name"]].detach(), tuple(s["wide_shape"]), axes, s["scale"]))
    return out


def baseline_copy(prepared: list[tuple]) -> dict[str, torch.Tensor]:
    """The best plain way to make the wide tensors: for a tensor whose every axis is plain repetition, one
    allocation and one broadcast write of ``c * narrow``; otherwise scale the narrow tensor, then
    ``index_select`` / ``repeat_interleave`` per widened axis.

    Example:
        >>> t = torch.tensor([[1.0, 2.0]])
        >>> baseline_copy([("w", t, (1, 4), [None, 2], 0.5)])["w"].tolist()
        [[0.5, 0.5, 1.0, 1.0]]
    """
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, narrow, wide_shape, axes, scale in prepared:
            ks = [1 if a is None else a for a in axes]
            if all(isinstance(k, int) for k in ks) and any(k > 1 for k in ks):
                view, expand = [], []
                for size, k in zip(narrow.shape, ks):
                    view += [size, 1]
                    expand += [size, k]
                t = torch.empty(wide_shape, dtype=narrow.dtype)
                src = narrow.reshape(view).expand(expand)
                if scale != 1.0:
                    torch.mul(src, scale, out=t.view(expand))
                else:
                    t.view(expand).copy_(src)
            else:
                t = narrow * scale if scale != 1.0 else narrow
                for dim, a in enumerate(axes):
                    if isinstance(a, int):
                        t = t.repeat_interleave(a, dim=dim)
                    elif a is not None:
                        t = t.index_select(dim, a)
                if t is narrow:
                    t = narrow.clone()
            out[name] = t
    return out


def baseline_naive(prepared: list[tuple]) -> dict[str, torch.Tensor]:
    """For reference: ``repeat_interleave`` / ``index_select`` per widened axis, then scale (a pass each)."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, narrow, _, axes, scale in prepared:
            t = narrow
            for dim, a in enumerate(axes):
                if isinstance(a, int):
                    t = t.repeat_interleave(a, dim=dim)
                elif a is not None:
                    t = t.index_select(dim, a)
            out[name] = t * scale if scale != 1.0 else (t.clone() if t is narrow else t)
    return out


# -- child processes (one measured call each) ----------------------------------------------------------------


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _timed(fn: Any) -> tuple[Any, float, float]:
    gc.collect()
    t, c = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - t, time.process_time() - c


def _checksums(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """Per tensor: shape and float64 sum (equal sums of equal-shaped tensors from the two sides)."""
    return {n: [list(t.shape), float(t.sum(dtype=torch.float64))] for n, t in sorted(tensors.items())}


def child(mode: str, quick: bool, spec_path: str | None) -> dict[str, Any]:
    """Runs in a fresh process: set up (imports, model, a tiny warm-up call), then time one call."""
    import graphscale

    torch.set_num_threads(2)
    cfg = QUICK if quick else FULL
    tiny, tiny_inputs = build(TINY)
    out: dict[str, Any] = {"mode": mode}
    if mode == "analyze-hf":
        model, inputs = build_hf(quick)
    else:
        model, inputs = build(cfg)
    if mode in ("widen", "analyze", "analyze-hf", "widen-plan", "profile"):
        _, out["tiny_first_call_s"], _ = _timed(lambda: graphscale.widen(tiny, tiny_inputs, multiplier=2))
    spec = json.loads(Path(spec_path).read_text()) if spec_path else []
    if mode == "baseline":
        prepared = prepare_baseline(model, spec)
        baseline_copy(prepare_baseline(tiny, copy_spec(tiny, tiny_inputs)))  # the same warm-up
    source_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    gc.collect()
    rss0 = _current_rss()
    if mode == "baseline":
        tensors, seconds, cpu = _timed(lambda: baseline_copy(prepared))
    elif mode == "widen":
        wide, seconds, cpu = _timed(lambda: graphscale.widen(model, inputs, multiplier=2))
        named = dict(wide.named_parameters(remove_duplicate=False)) | dict(wide.named_buffers())
        tensors = {s["name"]: named[s["name"]] for s in spec if s["name"] in named}
    elif mode == "widen-plan":  # the tensors and the graph, given a plan made before the timer
        plan = graphscale.analyze(model, inputs)
        rss0 = _current_rss()
        wide, seconds, cpu = _timed(lambda: graphscale.widen(model, inputs, multiplier=2, plan=plan))
        tensors = {}
    elif mode in ("analyze", "analyze-hf"):
        plan, seconds, cpu = _timed(lambda: graphscale.analyze(model, inputs))
        out["graph_nodes"] = len(plan.captured.gm.graph.nodes)
        out["frontend"] = plan.frontend
        with torch.no_grad():
            _, out["forward_s"], _ = _timed(lambda: model(*inputs))
        tensors = {}
    elif mode == "profile":
        prof = cProfile.Profile()
        prof.enable()
        wide = graphscale.widen(model, inputs, multiplier=2)
        prof.disable()
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("cumulative").print_stats(r"graphscale|copy\.py|fx/|fake_tensor", 30)
        stats.sort_stats("tottime").print_stats(15)
        return {"mode": mode, "profile": _trim_profile(text.getvalue())}
    else:
        raise ValueError(mode)
    out.update(seconds=seconds, cpu_s=cpu, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
               * 1024, rss_before_bytes=rss0, source_bytes=source_bytes,
               params=sum(p.numel() for p in model.parameters()))
    if tensors:
        out["wide_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
        out["checksums"] = _checksums(tensors)
        del tensors
    if mode == "baseline":  # after the peak was read: it holds intermediate copies
        gc.collect()
        _, out["naive_s"], out["naive_cpu_s"] = _timed(lambda: baseline_naive(prepared))
    return out


def _trim_profile(text: str) -> list[str]:
    """pstats output without its preamble lines and blank runs, paths shortened to the package."""
    keep = []
    for line in text.splitlines():
        line = line.replace(str(ROOT) + "/", "").replace(os.path.dirname(torch.__file__), "torch")
        line = line.replace(os.path.dirname(os.__file__) + "/", "")
        if line.strip() and not line.strip().startswith(("Ordered by", "List reduced", "function calls")):
            keep.append(line.rstrip())
    return keep


def _run_child(mode: str, quick: bool, spec_path: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode] + (["--quick"] if quick else [])
    if spec_path:
        cmd += ["--spec", spec_path]
    for attempt in range(3):  # a shared machine's free memory comes and goes: widen refuses, retry
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if res.returncode == 0:
            return json.loads(res.stdout.strip().splitlines()[-1])
        if "MultiplierError" not in res.stderr or attempt == 2:
            break
        print(f"  {mode}: not enough free memory now, retrying in 30 s", file=sys.stderr)
        time.sleep(30)
    raise RuntimeError(f"child {mode} failed:\n{res.stderr[-3000:]}")


def _stats(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    values = [r[key] for r in runs]
    return {"n": len(values), "min": min(values), "median": statistics.median(values), "all": values}


# -- the parent: alternate children, then the in-process tables ----------------------------------------------


def widen_vs_baseline(quick: bool, runs: int, with_plan: bool = True) -> dict[str, Any]:
    """N alternating fresh processes each of the baseline and of graphscale.widen; ratio of the minima."""
    model, inputs = build(QUICK if quick else FULL)
    spec = copy_spec(model, inputs)
    del model
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        modes = ["baseline", "widen", "widen-plan"] if with_plan else ["baseline", "widen"]
        got: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for i in range(runs):
            for mode in modes if i % 2 == 0 else modes[::-1]:
                got[mode].append(_run_child(mode, quick, f.name))
                print(f"  run {i + 1}/{runs} {mode}: {got[mode][-1]['seconds']:.3f} s wall, "
                      f"{got[mode][-1]['cpu_s']:.3f} s CPU", file=sys.stderr)
    finally:
        os.unlink(f.name)
    b, g, p = got["baseline"], got["widen"], got.get("widen-plan")
    same = all(r["checksums"] == b[0]["checksums"] for r in b + g)
    out = {
        "baseline": _stats(b, "seconds"), "baseline_cpu": _stats(b, "cpu_s"),
        "baseline_naive": _stats(b, "naive_s"),
        "widen": _stats(g, "seconds"), "widen_cpu": _stats(g, "cpu_s"),
        "widen_given_plan": _stats(p, "seconds") if p else None,
        "same_tensors": same, "tensors": len(b[0]["checksums"]),
        "source_bytes": g[0]["source_bytes"], "wide_bytes": g[0]["wide_bytes"], "params": g[0]["params"],
        "tiny_first_call_s": _stats(g, "tiny_first_call_s"),
    }
    out["ratio"] = out["widen"]["min"] / out["baseline"]["min"]
    out["ratio_cpu"] = out["widen_cpu"]["min"] / out["baseline_cpu"]["min"]
    out["ratio_median"] = out["widen"]["median"] / out["baseline"]["median"]
    # peak RSS includes the interpreter and torch: subtract what the process held before the call, add
    # back the source model, which both must hold
    extra = min(r["peak_rss_bytes"] - r["rss_before_bytes"] for r in g)
    out["widen_extra_rss_bytes"] = extra
    out["baseline_extra_rss_bytes"] = min(r["peak_rss_bytes"] - r["rss_before_bytes"] for r in b)
    both = out["source_bytes"] + out["wide_bytes"]
    out["peak_over_source_plus_wide"] = (extra + out["source_bytes"]) / both
    if not same:
        raise RuntimeError("the baseline and graphscale.widen made different tensors: the comparison is void")
    return out


def analyze_124m(quick: bool, runs: int, hf: bool = True) -> list[dict[str, Any]]:
    rows = []
    modes = ["analyze", "analyze-hf"] if hf else ["analyze"]
    try:
        import transformers  # noqa: F401
    except ImportError:
        modes = ["analyze"]
    got: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for i in range(runs):
        for mode in modes if i % 2 == 0 else modes[::-1]:
            got[mode].append(_run_child(mode, quick))
            print(f"  run {i + 1}/{runs} {mode}: {got[mode][-1]['seconds']:.3f} s wall", file=sys.stderr)
    labels = {"analyze": "GPT-2 124M, hand-written (fx)" if not quick else "GPT d=256, 4 layers (fx)",
              "analyze-hf": "HF GPT2LMHeadModel 124M (export)" if not quick else "HF GPT2 d=128 (export)"}
    for mode, rs in got.items():
        rows.append({"model": labels[mode], "params": rs[0]["params"], "frontend": rs[0]["frontend"],
                     "graph_nodes": rs[0]["graph_nodes"], "analyze": _stats(rs, "seconds"),
                     "analyze_cpu": _stats(rs, "cpu_s"), "forward": _stats(rs, "forward_s")})
    return rows


def analyze_scaling(quick: bool) -> list[dict[str, Any]]:
    """analyze() time against layer count, in this process (min of 3 after a warm-up)."""
    import graphscale

    rows = []
    d = 128 if quick else 256
    for layers in [1, 2, 4] if quick else [2, 4, 8, 16]:
        model, inputs = build({"n_layer": layers, "n_embd": d, "vocab": 512, "block_size": 64, "n_head": 4})
        graphscale.analyze(model, inputs)
        best = min(_timed(lambda m=model, i=inputs: graphscale.analyze(m, i))[1] for _ in range(3))
        nodes = len(graphscale.analyze(model, inputs).captured.gm.graph.nodes)
        rows.append({"layers": layers, "d": d, "graph_nodes": nodes, "analyze_s": best,
                     "ms_per_node": 1000 * best / nodes})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a minute)")
    ap.add_argument("--runs", type=int, default=None, help="fresh processes per measurement (default 5, "
                    "3 with --quick)")
    ap.add_argument("--readme", action="store_true", help="print README's table from --out's bench.json")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile of one widening")
    ap.add_argument("--no-hf", action="store_true", help="skip analyze of HF GPT2LMHeadModel (export)")
    ap.add_argument("--no-plan", action="store_true", help="skip widen(..., plan=plan) (no analysis)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.quick, args.spec)))
        return {}
    out = Path(args.out)
    if args.readme:
        print(readme_table(json.loads((out / "bench.json").read_text())), end="")
        return {}
    runs = args.runs or (3 if args.quick else 5)
    torch.set_num_threads(2)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    results: dict[str, Any] = {"torch": torch.__version__, "quick": args.quick, "runs": runs,
                               "cpus": os.cpu_count()}
    print("widen vs copy baseline ...", file=sys.stderr)
    results["widen_x2"] = widen_vs_baseline(args.quick, runs, with_plan=not args.no_plan)
    print("analyze at 124M ...", file=sys.stderr)
    results["analyze_124m"] = analyze_124m(args.quick, runs, hf=not args.no_hf)
    print("analyze vs layers ...", file=sys.stderr)
    results["analyze_vs_layers"] = analyze_scaling(args.quick)
    if not args.no_profile:
        results["profile"] = _run_child("profile", args.quick)["profile"]
    results["load_average"] = [load0, os.getloadavg()[0]]
    results["minutes"] = (time.perf_counter() - t0) / 60
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    md = to_markdown(results)
    (out / "bench.md").write_text(md)
    print(md)
    return results


def _s(st: dict[str, Any], cpu: dict[str, Any] | None = None) -> str:
    extra = f"; CPU {cpu['min']:.2f} s" if cpu else ""
    return f"{st['min']:.2f} s (median {st['median']:.2f}, N={st['n']}{extra})"


def to_markdown(r: dict[str, Any]) -> str:
    w = r["widen_x2"]
    lines = [
        f"Every time: minimum and median over N fresh processes, alternating; torch {r['torch']}, "
        f"{r['cpus']} CPUs, load average {r['load_average'][0]:.1f} at the start and "
        f"{r['load_average'][1]:.1f} at the end{' (--quick sizes)' if r['quick'] else ''}.",
        "",
        "### widen x2 (fp32, analysis included) vs the copy baseline",
        "",
        "| | wall min (s) | wall median (s) | CPU min (s) | N |",
        "|---|---:|---:|---:|---:|",
        f"| copy baseline (one broadcast write of c * narrow per tensor) | {w['baseline']['min']:.3f} | "
        f"{w['baseline']['median']:.3f} | {w['baseline_cpu']['min']:.3f} | {w['baseline']['n']} |",
        f"| naive copy (repeat_interleave per axis, then scale) | {w['baseline_naive']['min']:.3f} | "
        f"{w['baseline_naive']['median']:.3f} | | {w['baseline_naive']['n']} |",
        f"| `graphscale.widen(model, inputs, 2)` | {w['widen']['min']:.3f} | {w['widen']['median']:.3f} | "
        f"{w['widen_cpu']['min']:.3f} | {w['widen']['n']} |",
        *([f"| `graphscale.widen(..., plan=plan)` (no analysis) | {w['widen_given_plan']['min']:.3f} | "
           f"{w['widen_given_plan']['median']:.3f} | | {w['widen_given_plan']['n']} |"]
          if w["widen_given_plan"] else []),
        "",
        f"ratio of minima {w['ratio']:.2f} (wall; target <= {TARGETS['widen_ratio']}), {w['ratio_cpu']:.2f} "
        f"(CPU), ratio of medians {w['ratio_median']:.2f}. Same tensors on both sides: {w['same_tensors']} "
        f"({w['tensors']} tensors, float64 sums). {w['params'] / 1e6:.1f}M parameters, source "
        f"{w['source_bytes'] / 1e9:.2f} GB, wide {w['wide_bytes'] / 1e9:.2f} GB; peak extra RSS of widen "
        f"{w['widen_extra_rss_bytes'] / 1e9:.2f} GB (baseline {w['baseline_extra_rss_bytes'] / 1e9:.2f}), "
        f"peak / (source + wide) {w['peak_over_source_plus_wide']:.2f} (target <= "
        f"{TARGETS['peak_over_source_plus_wide']}).",
        "",
        "### analyze()",
        "",
        "| model | params | frontend | nodes | analyze min (s) | median (s) | CPU min (s) | forward | N |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["analyze_124m"]:
        lines.append(
            f"| {row['model']} | {row['params'] / 1e6:.1f}M | {row['frontend']} | {row['graph_nodes']} | "
            f"{row['analyze']['min']:.3f} | {row['analyze']['median']:.3f} | "
            f"{row['analyze_cpu']['min']:.3f} | "
            f"{row['forward']['min']:.3f} | {row['analyze']['n']} |")
    lines += [
        "",
        "### analyze() time vs layer count (one process, min of 3)",
        "",
        "| layers | d | graph nodes | analyze (s) | ms/node |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in r["analyze_vs_layers"]:
        lines.append(f"| {row['layers']} | {row['d']} | {row['graph_nodes']} | {row['analyze_s']:.3f} | "
                     f"{row['ms_per_node']:.2f} |")
    if r.get("profile"):
        lines += ["", "### Where widen's time goes (cProfile of one widening, analysis included)", "", "```",
                  *r["profile"], "```"]
    return "\n".join(lines) + "\n"


def readme_table(r: dict[str, Any]) -> str:
    """README's "Benchmarks" table, from bench.json (``--readme`` prints it)."""
    w = r["widen_x2"]
    fx_row, *rest = r["analyze_124m"]
    per_node = ", ".join(f"{row['ms_per_node']:.1f}" for row in r["analyze_vs_layers"])
    layers = ", ".join(str(row["layers"]) for row in r["analyze_vs_layers"])
    lines = [
        "| what | measured (min over N fresh processes; median) | target |",
        "| --- | --- | --- |",
        f"| `analyze`, {fx_row['model']}, {fx_row['graph_nodes']} nodes | "
        f"{_s(fx_row['analyze'], fx_row['analyze_cpu'])} | "
        f"<= {TARGETS['analyze_s']} s |",
    ]
    for row in rest:
        lines.append(f"| `analyze`, {row['model']}, {row['graph_nodes']} nodes | "
                     f"{_s(row['analyze'], row['analyze_cpu'])} | |")
    lines += [
        f"| `analyze` vs layer count (d={r['analyze_vs_layers'][0]['d']}; {layers} layers) | {per_node} ms "
        "per graph node | linear in graph size |",
        f"| `widen` x2 of the 124M GPT-2, fp32, analysis included | {_s(w['widen'], w['widen_cpu'])} | |",
        f"| copy baseline: the same tensors, one broadcast write each | "
        f"{_s(w['baseline'], w['baseline_cpu'])} | |",
        f"| widen / copy (ratio of minima; CPU time; medians) | **{w['ratio']:.2f}x**; "
        f"{w['ratio_cpu']:.2f}x; "
        f"{w['ratio_median']:.2f}x | <= {TARGETS['widen_ratio']}x |",
        *([f"| `widen(..., plan=plan)`, no analysis | {_s(w['widen_given_plan'])} | |"]
          if w["widen_given_plan"] else []),
        f"| peak memory of the widening | {w['peak_over_source_plus_wide']:.2f} x (source + wide), source "
        f"{w['source_bytes'] / 1e9:.2f} GB, wide {w['wide_bytes'] / 1e9:.2f} GB | <= "
        f"{TARGETS['peak_over_source_plus_wide']}x |",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
