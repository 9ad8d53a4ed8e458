"""Streamed ``graphscale upscale`` on a big local checkpoint: time against a plain streamed copy, peak memory.

    python benchmarks/stream.py                      # 1.21B-parameter Llama, bf16, x2 with --heads grow
    python benchmarks/stream.py --size 170m          # the ~170M fp32 acceptance check (peak RSS bound)

Builds a Llama checkpoint with random weights in a temporary directory (``save_pretrained`` with
``--shard`` shards; deleted at the end unless ``--keep``), then alternates ``--repeats`` runs of

* ``upscale``: ``graphscale upscale SRC --multiplier 2 --heads grow --stream --out DST``, in a fresh process;
* ``copy``: the baseline, a fresh process that streams the same bytes with no analysis: reads every source
  tensor, ``repeat_interleave``s it 2x along every axis but the vocabulary's, and writes shards of the same
  size with the same I/O (``pwrite`` and one ``fsync`` per shard), one tensor after the other: the copy the
  issue's target is set against;
* ``copy-overlap``: the same copy with upscale's overlap (a writer thread writes each tensor while the next
  is read and widened, within the memory of one tensor's source and wide bytes): the fastest copy we know
  how to write, so that the ratio to it says what the analysis and checks cost.

The order of the three kinds rotates from one repeat to the next. Each run's time is the wall time of
its whole process (imports included) and its peak memory the process's ``VmHWM`` (peak resident set). It
prints the minimum time of each kind, upscale's ratio to each copy (target <= 1.5 to the plain copy), the
peak RSS of ``upscale`` against the largest wide tensor (also above the runtime: a process that only
imports what ``upscale`` imports; target <= 3) and against source + wide bytes, and writes the figures as
JSON to ``--json`` if given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SIZES = {  # Llama shapes: (hidden, intermediate, layers, heads, kv heads, vocab, dtype)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=16, vocab_size=32000, dtype="bfloat16", shard="500MB"),
    "170m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=8000, dtype="float32", shard="200MB"),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, dtype="float32", shard="100KB"),
}

_MAKE = r"""
import sys, json, torch, transformers
spec = json.loads(sys.argv[1]); out = sys.argv[2]
dtype = getattr(torch, spec.pop("dtype")); shard = spec.pop("shard")
config = transformers.LlamaConfig(max_position_embeddings=256, tie_word_embeddings=False,
                                  architectures=["LlamaForCausalLM"], **spec)
torch.manual_seed(0)
with torch.device("meta"):
    model = transformers.LlamaForCausalLM(config)
model = model.to_empty(device="cpu").to(dtype)
with torch.no_grad():
    for p in model.parameters():  # random weights, cheaply (uniform draws; norms around 1)
        p.uniform_(-0.05, 0.05)
        if p.dim() == 1:
            p.add_(1.0)
model.save_pretrained(out, max_shard_size=shard)
print(sum(p.numel() for p in model.parameters()))
"""

_UPSCALE = r"""
import sys
from graphscale.cli import main
status = main(sys.argv[1:])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("VmHWM_KB", hwm)
sys.exit(status)
"""

_RUNTIME = r"""
import transformers
import graphscale.cli, graphscale.hf_stream
transformers.LlamaForCausalLM  # the class's module, as upscale imports it
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("VmHWM_KB", hwm)
"""

_COPY = r"""
import collections, concurrent.futures, json, os, sys, time, torch
sys.path.insert(0, sys.argv[4])
from graphscale.hf_stream import read_header, read_tensor, _layout, _pwrite_all, _tensor_bytes
src, dst, shard, overlap = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[5] == "overlap"
vocab = json.load(open(os.path.join(src, "config.json")))["vocab_size"]
entries = {}
for f in sorted(os.listdir(src)):
    if f.endswith(".safetensors"):
        entries.update(read_header(os.path.join(src, f)))
os.makedirs(dst)
def wide(shape):
    return tuple(s if s == vocab else 2 * s for s in shape)
def wide_nbytes(k):
    return entries[k].nbytes * 2 ** sum(s != vocab for s in entries[k].shape)
shards, cur, size = [], [], 0
for k, e in entries.items():
    n = wide_nbytes(k)
    if cur and size + n > shard:
        shards.append(cur); cur, size = [], 0
    cur.append(k); size += n
shards.append(cur)
# as upscale's record splits its writing
spent = dict.fromkeys(("read and widen", "waiting for the writer", "pwrite", "fsync"), 0.0)
left, fds, work = {}, {}, []
for i, keys in enumerate(shards):
    prefix, offsets = _layout({k: (entries[k].dtype, wide(entries[k].shape)) for k in keys}, {"format": "pt"})
    fd = os.open(os.path.join(dst, f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"),
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    _pwrite_all(fd, prefix, 0)
    fds[i], left[i] = fd, len(keys)
    work += [(k, i, offsets[k]) for k in keys]
def write(i, offset, box):
    t0 = time.perf_counter()
    t = box.pop()
    _pwrite_all(fds[i], _tensor_bytes(t), offset)
    del t
    t1 = time.perf_counter()
    left[i] -= 1
    if not left[i]:
        os.fsync(fds[i])
        os.close(fds[i])
    spent["pwrite"] += t1 - t0
    spent["fsync"] += time.perf_counter() - t1
# overlap: a writer thread writes while the next tensor is read and widened, within the memory of one
# tensor's work (source + wide), as upscale does
budget = max(entries[k].nbytes + wide_nbytes(k) for k in entries)
queued = collections.deque()
with concurrent.futures.ThreadPoolExecutor(1) as writer:
    for k, i, offset in work:
        t0 = time.perf_counter()
        need = entries[k].nbytes + wide_nbytes(k)
        while queued and sum(n for _, n in queued) + need > budget:
            queued.popleft()[0].result()
        t1 = time.perf_counter()
        t = read_tensor(entries[k])
        for d, s in enumerate(t.shape):
            if s != vocab:
                t = t.repeat_interleave(2, dim=d)
        spent["waiting for the writer"] += t1 - t0
        spent["read and widen"] += time.perf_counter() - t1
        if overlap:
            queued.append((writer.submit(write, i, offset, [t]), wide_nbytes(k)))
        else:
            write(i, offset, [t])
        del t
    while queued:
        queued.popleft()[0].result()
print("SPLIT", json.dumps({k: round(v, 3) for k, v in spent.items()}))
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("VmHWM_KB", hwm)
"""


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    hwm = int(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("VmHWM_KB")))
    return wall, hwm * 1024, r.stdout


def _dir_bytes(d: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.name.endswith(suffix))


def _largest_tensor(d: Path) -> int:
    sys.path.insert(0, str(ROOT))
    from graphscale.hf_stream import read_header

    return max(e.nbytes for f in d.glob("*.safetensors") for e in read_header(f).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to build the checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds to wait before each run, so that every run starts with the memory the "
                         "last one freed given back (a VM that reports free pages to its host faults them in "
                         "again, slowly: a run that writes sooner after the last one exits writes faster)")
    args = ap.parse_args()
    spec = dict(SIZES[args.size])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               GRAPHSCALE_PEAK_RSS_PER_PHASE="1")  # upscale's record then says each phase's own peak
    work = Path(tempfile.mkdtemp(prefix="graphscale-stream-", dir=args.dir))
    try:
        src = work / "src"
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _MAKE, json.dumps(spec), str(src)], capture_output=True,
                           text=True, env=env)
        if r.returncode != 0:
            raise SystemExit(r.stderr[-4000:])
        n_params = int(r.stdout.split()[-1])
        src_bytes = _dir_bytes(src)
        shards = len(list(src.glob("*.safetensors")))
        print(f"source: Llama {args.size} ({n_params / 1e6:.0f}M parameters, {spec['dtype']}), "
              f"{shards} shards, {src_bytes / 1e9:.2f} GB, built in {time.perf_counter() - t:.0f} s",
              flush=True)
        from graphscale.hf_stream import _ST_DTYPES  # noqa: F401  (fails early if the package is missing)

        shard_bytes = {"500MB": 500_000_000, "200MB": 200_000_000, "100KB": 100_000}[spec["shard"]]
        runs: dict[str, list[tuple[float, int]]] = {"upscale": [], "copy": [], "copy-overlap": []}
        wide_bytes = largest = 0
        phases: dict[int, dict] = {}
        copy_splits: dict[str, dict[int, dict]] = {"copy": {}, "copy-overlap": {}}
        kinds = list(runs)
        for i in range(args.repeats):
            # rotated, so that each kind runs after each other kind alike (a run's writes are slower right
            # after a heavy writer, and the first writer after an idle spell is slowest)
            for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
                dst = work / f"{kind}-{i}"
                time.sleep(args.settle)
                if kind == "upscale":
                    cmd = [sys.executable, "-c", _UPSCALE, "upscale", str(src), "--multiplier", "2",
                           "--heads", "grow", "--stream", "--max-shard-size", spec["shard"],
                           "--out", str(dst)]
                else:
                    cmd = [sys.executable, "-c", _COPY, str(src), str(dst), str(shard_bytes), str(ROOT),
                           "overlap" if kind == "copy-overlap" else "plain"]
                wall, hwm, out = _run(cmd, env)
                if kind == "upscale":  # the peak mark is reset between phases: the run's peak is their max
                    info = json.loads((dst / "graphscale.json").read_text())["info"]["stream"]
                    hwm = max([hwm, *info.get("peak_rss_bytes", {}).values()])
                runs[kind].append((wall, hwm))
                if kind == "upscale":
                    wide_bytes, largest = _dir_bytes(dst), _largest_tensor(dst)
                    info = json.loads((dst / "graphscale.json").read_text())["info"]["stream"]
                    phases[i] = info
                    print(f"  phases (s): {info['seconds']}; writing (s): {info.get('write_seconds')}; peak "
                          "RSS per phase (GB): "
                          + str({k: round(v / 1e9, 2) for k, v in info.get("peak_rss_bytes", {}).items()}))
                    if i == 0:
                        print("\n".join("  " + line for line in out.splitlines()[:3]))
                else:
                    split = json.loads(next(line.split(" ", 1)[1] for line in out.splitlines()
                                            if line.startswith("SPLIT ")))
                    copy_splits[kind][i] = split
                    print(f"  {kind}'s writing (s): {split}")
                print(f"run {i} {kind:12s} {wall:7.1f} s  peak RSS {hwm / 1e9:.2f} GB", flush=True)
                shutil.rmtree(dst)
        best = {k: min(w for w, _ in v) for k, v in runs.items()}
        peak = max(h for _, h in runs["upscale"])
        # the runtime: a process that imports what upscale imports, and nothing else (min of 3)
        runtime = min(_run([sys.executable, "-c", _RUNTIME], env)[1] for _ in range(3))
        figures = {
            "size": args.size, "settle_s": args.settle, "parameters": n_params, "dtype": spec["dtype"],
            "source_bytes": src_bytes,
            "wide_bytes": wide_bytes, "largest_wide_tensor_bytes": largest, "runs": runs,
            "upscale_s": best["upscale"], "copy_s": best["copy"], "ratio": best["upscale"] / best["copy"],
            "copy_overlap_s": best["copy-overlap"],
            "ratio_to_copy_overlap": best["upscale"] / best["copy-overlap"],
            "upscale_peak_rss": peak, "copy_peak_rss": max(h for _, h in runs["copy"]),
            "copy_overlap_peak_rss": max(h for _, h in runs["copy-overlap"]),
            "peak_over_source_plus_wide": peak / (src_bytes + wide_bytes),
            "peak_over_largest_wide_tensor": peak / largest, "phases": phases,
            "copy_write_seconds": copy_splits, "runtime_rss": runtime,
            "peak_above_runtime_over_largest_wide_tensor": (peak - runtime) / largest,
        }
        print(f"upscale {best['upscale']:.1f} s vs copy {best['copy']:.1f} s (min of {args.repeats}): "
              f"ratio {figures['ratio']:.3f} (target <= 1.5); vs the copy with overlapped writes "
              f"{best['copy-overlap']:.1f} s: ratio {figures['ratio_to_copy_overlap']:.3f}")
        print(f"peak RSS upscale {peak / 1e9:.2f} GB = {figures['peak_over_source_plus_wide']:.3f} x (source "
              f"{src_bytes / 1e9:.2f} GB + wide {wide_bytes / 1e9:.2f} GB) = "
              f"{figures['peak_over_largest_wide_tensor']:.1f} x the largest wide tensor "
              f"({largest / 1e9:.3f} GB); above the runtime's {runtime / 1e9:.2f} GB (imports alone): "
              f"{figures['peak_above_runtime_over_largest_wide_tensor']:.2f} x the largest wide tensor "
              "(target <= 3); "
              f"copy {figures['copy_peak_rss'] / 1e9:.2f} GB, overlapped "
              f"{figures['copy_overlap_peak_rss'] / 1e9:.2f} GB")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
