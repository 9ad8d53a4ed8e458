"""Streamed ``graphscale upscale``: widen a Hugging Face checkpoint tensor by tensor, never loading the model.

:func:`graphscale.hf.upscale` calls :func:`stream_upscale` with ``stream=True`` (or by default when the source
weights exceed ``graphscale.hf.STREAM_ABOVE`` bytes). It writes the same files as the in-memory path
(shards, index, ``config.json``, ``generation_config.json``: bitwise, tested on tiny models), with memory
bounded by a few wide tensors plus the narrow one-layer proxy, whatever the depth (see **Memory**).

**Where each tensor's recipe comes from.** Widening a tensor is ``c * E(W)`` (replicate each width index
of every axis, times the copy scale ``c``), plus the factors :func:`graphscale.widen_into` folds into
weights: the query rows' ``k**-0.5`` for standard attention with a wider head (rows of a fused q|k|v),
a tied readout's ``1/k`` moved into the final norm, the readout convention of the class. All of these are
properties of the graph around a tensor, which is the same in every layer of a stack of identical layers.
So the in-memory path itself (analyze, config rewrite, :func:`~graphscale.widen_into`, its output check)
runs on a **proxy**: the same class and config with one layer and the vocabulary cut to a few tokens
(vocabulary axes are never widened), loaded with the checkpoint's own embeddings (their first rows), layer
0 and final tensors. Every tensor of layer ``i`` takes the recipe of the proxy's layer-0 tensor of the same
name; the run is refused (use ``stream=False``) when the layers do not all have the same tensor names and
shapes, when a vocabulary-sized axis would be widened, or when a checkpoint key is not one of the class's
tensors. Keys are read and written through transformers' own renamings, as ``from_pretrained`` and
``save_pretrained`` apply them (GPT-NeoX's ``embed_out`` is the class's ``lm_head``); a key that a converter
merges with others or splits (Mixtral's per-expert tensors) is refused.

**What is verified in streamed mode** (before the temporary directory is renamed to ``out``):

1. the proxy (real layer 0, embeddings and head) widened in memory computes the source proxy's logits
   within the dtype's tolerance (as the in-memory path checks the whole model);
2. every streamed tensor that the proxy holds (embeddings, layer 0, final norm, head) is bitwise equal to
   what :func:`~graphscale.widen_into` filled into the proxy, so the recipes are taken over correctly
   (the two are compared by the SHA-256 digest of their bytes, made one after the other);
3. a second one-layer model made of the checkpoint's **last** layer (plus embeddings and head), read back
   from the written files, computes the source's logits for that layer within the tolerance (skipped with
   noise, which changes the function);
4. every written shard is read back by ``safetensors`` and holds exactly the planned keys, shapes and
   dtypes, and the wide config builds (on the meta device) a model with exactly those shapes.

Not verified: the function of the full-depth wide model, and the values of layers 1 .. L-2 beyond being
written by the same per-tensor recipe as layers 0 and L-1 (a full check needs the memory streaming avoids;
run ``stream=False`` where it fits).

**Memory.** No phase holds a wide layer. The wide proxy's parameters are never all in memory:
:func:`~graphscale.widen_into` hands them to an :class:`~graphscale.on_use.OnUse`, which makes each (as
the fill writes it) only while an op of the proxy's forward reads it and drops it when an op reads
another, for every candidate convention widen_into tries and for check 1; check 2 makes one at a time.
The two models of check 3 read each parameter from its file the same way. What stays is the narrow
one-layer proxy (``1/k**2`` of a wide layer) until check 2 is done. Writing overlaps the disk with widening: a
writer thread writes each wide tensor while the next ones are read and widened, but only as long as the
wide tensors waiting to be written plus the next tensor's work (source, cast, wide) fit in the largest
single tensor's work, so writing never holds more than writing one tensor at a time would at its peak.
After each tensor, freed heap goes back to the system (glibc's ``malloc_trim``), so the resident memory
follows the live tensors rather than glibc's thresholds.

Files are read with ``pread`` and written with ``pwrite`` (no ``mmap``: mapped pages count as the process's
memory), in the safetensors layout that ``save_pretrained`` writes (same sharding, header, tensor order),
into a temporary directory beside ``out`` that is renamed at the end; a killed run leaves only that
directory, which the next run removes.

Example:
    >>> import graphscale.hf                                                  # doctest: +SKIP
    >>> graphscale.hf.upscale("llama-1b", 2, out="llama-1b-x2", stream=True)  # doctest: +SKIP
    PosixPath('llama-1b-x2')
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from graphscale import hf
from graphscale.hf import HFUpscaleError
from graphscale.on_use import OnUse
from graphscale.record import ParamScaling, WideningRecord, save_record

__all__ = ["TensorEntry", "read_header", "read_tensor", "stream_upscale", "write_safetensors"]

# safetensors dtype names, in the order the safetensors writer sorts tensors (descending): the layout
# save_pretrained writes, so a streamed shard is byte-identical to it
_ST_ORDER = ["U64", "I64", "F64", "U32", "F32", "I32", "BF16", "F16", "U16", "I16", "I8", "U8", "BOOL"]
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100_000_000  # safetensors' own limit
_IO_CHUNK = 1 << 30  # one pread/pwrite moves at most ~2 GiB on Linux


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are (absolute offset), its dtype and shape."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorEntry]:
    """The tensors of the safetensors file ``path`` (name -> :class:`TensorEntry`), from its header only.

    Example:
        >>> import tempfile, safetensors.torch
        >>> f = Path(tempfile.mkdtemp()) / "a.safetensors"
        >>> safetensors.torch.save_file({"w": torch.ones(2, 3)}, f)
        >>> e = read_header(f)["w"]; (e.dtype, e.shape, e.nbytes)
        (torch.float32, (2, 3), 24)
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < n <= _MAX_HEADER:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
        size = path.stat().st_size
        out: dict[str, TensorEntry] = {}
        for name, d in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(d["dtype"])
            if dtype is None:
                raise HFUpscaleError(f"{path}: tensor {name} has dtype {d['dtype']}, which graphscale does "
                                     f"not read (expected one of {', '.join(_ST_DTYPES)})")
            begin, end = (int(x) for x in d["data_offsets"])
            shape = tuple(int(x) for x in d["shape"])
            numel = 1
            for x in shape:
                numel *= x
            if end - begin != numel * dtype.itemsize or 8 + n + end > size or begin < 0:
                raise ValueError(f"tensor {name}: offsets {begin}:{end} do not fit its shape or the file")
            out[name] = TensorEntry(path, dtype, shape, 8 + n + begin, end - begin)
        return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise HFUpscaleError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e


def read_tensor(entry: TensorEntry, rows: int | None = None) -> torch.Tensor:
    """Read one tensor (only its first ``rows`` rows along axis 0 if given) with ``pread``: no ``mmap``, so
    nothing but the returned tensor stays in the process's memory.

    Example:
        >>> import tempfile, safetensors.torch
        >>> f = Path(tempfile.mkdtemp()) / "a.safetensors"
        >>> safetensors.torch.save_file({"w": torch.arange(6.).reshape(3, 2)}, f)
        >>> read_tensor(read_header(f)["w"], rows=2)
        tensor([[0., 1.],
                [2., 3.]])
    """
    shape = entry.shape if rows is None else (rows, *entry.shape[1:])
    out = torch.empty(shape, dtype=entry.dtype)
    buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
    if buf is None:
        return out
    fd = os.open(entry.file, os.O_RDONLY)
    try:
        done = 0
        while done < len(buf):
            got = os.preadv(fd, [buf[done:done + _IO_CHUNK]], entry.offset + done)
            if got <= 0:
                raise HFUpscaleError(f"{entry.file}: unexpected end of file reading a tensor")
            done += got
    finally:
        os.close(fd)
    return out


def _layout(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
            metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The header bytes and each tensor's offset (from the start of the file) of a safetensors file holding
    ``tensors``, exactly as ``safetensors.torch.save_file`` lays it out (sorted by dtype, then name;
    header padded with spaces to 8 bytes)."""
    order = sorted(tensors, key=lambda n: (_ST_ORDER.index(_ST_NAMES[tensors[n][0]]), n))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    pos, starts = 0, {}
    for name in order:
        dtype, shape = tensors[name]
        numel = 1
        for x in shape:
            numel *= x
        nbytes = numel * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        starts[name] = pos
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, {n: len(prefix) + s for n, s in starts.items()}


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + _IO_CHUNK], offset + done)


def _tensor_bytes(t: torch.Tensor) -> Any:
    t = t.contiguous()
    return t.view(-1).view(torch.uint8).numpy() if t.numel() else b""


def write_safetensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as ``safetensors.torch.save_file`` does (the same bytes), one tensor at a time.

    Example:
        >>> import tempfile, hashlib, safetensors.torch
        >>> d = Path(tempfile.mkdtemp()); sd = {"b": torch.ones(3), "a": torch.zeros(2, dtype=torch.int64)}
        >>> safetensors.torch.save_file(sd, d / "x", metadata={"format": "pt"})
        >>> write_safetensors(d / "y", sd, metadata={"format": "pt"})
        >>> (d / "x").read_bytes() == (d / "y").read_bytes()
        True
    """
    prefix, offsets = _layout({n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, metadata or {})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        _pwrite_all(fd, prefix, 0)
        for name, t in tensors.items():
            _pwrite_all(fd, _tensor_bytes(t), offsets[name])
    finally:
        os.close(fd)


def _release_memory() -> None:
    """Free what reference cycles hold (fx graphs) and hand freed heap back to the system (glibc), so that
    the streaming phase starts from the runtime's size, not from the proxy's."""
    import gc

    gc.collect()
    _trim()


def _trim() -> None:
    """Hand the heap's free memory back to the system (glibc's ``malloc_trim``). glibc serves a tensor below
    its mmap threshold (which grows up to 32 MB as large blocks are freed) from the heap and keeps it once
    freed; run after each tensor, the resident memory then follows the tensors alive, not the history of
    their sizes."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: freed memory is reused by later allocations instead
        return None


def _peak_rss(reset: bool = False) -> int | None:
    """This process's peak resident memory so far (``VmHWM``, bytes), then, with ``reset``, start a new peak
    from the current size (Linux: ``5`` written to ``/proc/self/clear_refs``), so that each phase of a run
    reports its own peak (set ``GRAPHSCALE_PEAK_RSS_PER_PHASE=1``; otherwise each figure is the peak so
    far). None where ``/proc`` does not say."""
    try:
        with open("/proc/self/status") as f:
            hwm = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), None)
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return hwm
    except (OSError, ValueError):
        return None


class _Progress:
    """``upscale  1.2/8.8 GB  14%  310 MB/s  eta 25s`` on stderr, redrawn at most 5 times a second."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done = total, enabled, 0
        self.start = self.last = time.monotonic()

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and (now - self.last >= 0.2 or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            sys.stderr.write(f"\rupscale {self.done / 1e9:7.2f}/{self.total / 1e9:.2f} GB "
                             f"{100 * self.done / max(self.total, 1):3.0f}%  {rate / 1e6:6.0f} MB/s  "
                             f"eta {eta:4.0f}s ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---------------------------------------------------------------------------------------------------------
# the proxy: the same class at one layer and a cut vocabulary


@dataclass
class _Layers:
    """The checkpoint's layer stacks: the module lists of ``count`` layers (their dotted paths)."""

    count: int
    paths: list[str]

    def split(self, name: str) -> tuple[str, int, str] | None:
        """``(stack path, layer index, rest)`` for a name inside a layer, else None."""
        for p in self.paths:
            m = re.match(re.escape(p) + r"\.(\d+)\.(.+)$", name)
            if m:
                return p, int(m.group(1)), m.group(2)
        return None

    def to_proxy(self, name: str) -> str:
        """The proxy's name for ``name``: every layer becomes the proxy's only layer, 0."""
        s = self.split(name)
        return name if s is None else f"{s[0]}.0.{s[2]}"

    def to_real(self, proxy_name: str, layer: int) -> str:
        s = self.split(proxy_name)
        return proxy_name if s is None else f"{s[0]}.{layer}.{s[2]}"


def _proxy_config(config: Any, layers: _Layers, layer: int, vocab: int) -> Any:
    """``config`` at one layer (the list fields with one entry per layer keep ``layer``'s) and ``vocab``
    tokens."""
    fields: dict[str, Any] = {"num_hidden_layers": 1}
    for k, v in config.to_dict().items():
        if isinstance(v, list) and len(v) == layers.count and layers.count > 1:
            fields[k] = [v[layer]]
    if getattr(config, "vocab_size", None) is not None:
        fields["vocab_size"] = vocab
    return hf._with(config, fields)


def _proxy_vocab(config: Any) -> int:
    """A few tokens, more than any special token id the config names (the class may check them)."""
    ids = [v for k, v in config.to_dict().items() if k.endswith("_token_id") and isinstance(v, int)]
    ids += [x for k, v in config.to_dict().items() if k.endswith("_token_id") and isinstance(v, list)
            for x in v if isinstance(x, int)]
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    return min(vocab, max(64, max(ids, default=0) + 1)) if vocab else 0


def _layer_stacks(meta: torch.nn.Module, config: Any) -> _Layers:
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        raise HFUpscaleError("streamed upscale needs the config's num_hidden_layers (the proxy is built at "
                             "one layer); use stream=False (--no-stream)")
    paths = [n for n, m in meta.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    return _Layers(count, paths)


@dataclass(frozen=True)
class _Reader:
    """A proxy's stored tensors, read from ``store`` (checkpoint names): those of the proxy's layer 0 from
    layer ``layer``, the first ``rows`` rows of a cut vocabulary axis, floating point cast to ``dtype``."""

    store: dict[str, TensorEntry]
    layers: _Layers
    layer: int
    rows: dict[str, int]
    dtype: torch.dtype

    def entry(self, pname: str) -> TensorEntry | None:
        """Where ``pname`` is stored; None for a tensor that is not (a non-persistent buffer the class
        computes, or a tied name)."""
        return self.store.get(self.layers.to_real(pname, self.layer))

    def __call__(self, pname: str) -> torch.Tensor:
        e = self.entry(pname)
        assert e is not None, pname
        t = read_tensor(e, rows=self.rows.get(pname))
        return t.to(self.dtype) if t.is_floating_point() else t


def _load_proxy(auto: Any, pconfig: Any, dtype: torch.dtype, read: _Reader, on_use: OnUse | None = None
                ) -> torch.nn.Module:
    """The class built from ``pconfig`` with every stored tensor read by ``read``; with ``on_use``, each
    floating-point parameter is read only while an op reads it (run the model inside ``with on_use:``), so
    that the model holds one parameter at a time besides its buffers."""
    model = hf._build(auto, pconfig, dtype)  # every stored tensor is read next: no random init first
    seen: set[int] = set()
    with torch.no_grad():
        for name, t in hf._named(model).items():
            if id(t) in seen or read.entry(name) is None:
                continue
            seen.add(id(t))
            if on_use is not None and isinstance(t, torch.nn.Parameter) and t.is_floating_point():
                on_use.add(t, functools.partial(read, name))
            else:
                t.copy_(read(name))
    hf._initialize_rest(model, seen)  # what is not stored (non-persistent buffers): as the class makes it
    _trim()  # the tensors read and copied: their memory is not the model's
    return model


# ---------------------------------------------------------------------------------------------------------
# the streamed upscale


@dataclass
class _Item:
    """One checkpoint key: where it is read, how it is widened, where it is written."""

    key: str
    src: TensorEntry
    scaling: ParamScaling  # the final recipe (record, noise): copy_scale with every fold
    widen_scale: float  # the copy scale widening multiplies by (before the query fold, as widen_into does)
    widen_shift: float  # and the shift it adds then (ParamScaling.shift before the query fold)
    # (axis, lo, hi, m, power, s): rows lo:hi times m**power (a gain s + w: plus (m**power - 1) s)
    query: list[tuple[int, int, int, int, float, float]]
    is_param: bool
    proxy_name: str | None  # the proxy tensor with the same recipe and values (layer 0, non-layer tensors)
    dtype: torch.dtype


def stream_upscale(tf: Any, auto: Any, kind: str, config: Any, src_dir: Path, out_dir: Path,
                   weight_files: list[Path], *, multiplier: int, heads: str, noise: Any, seed: int,
                   dtype: torch.dtype, force: bool, max_shard_size: str | int, seq_len: int = 8,
                   progress: bool | None = None) -> Path:
    """Widen ``src_dir`` into ``out_dir`` tensor by tensor (called by :func:`graphscale.hf.upscale` with its
    checked arguments; see the module doc for the recipes and what is verified). Returns ``out_dir``.

    Example:
        >>> graphscale.hf.upscale("src", 2, out="dst", stream=True)  # doctest: +SKIP
        PosixPath('dst')
    """
    clock = [time.perf_counter()]
    seconds: dict[str, float] = {}

    peak: dict[str, int] = {}

    def phase(name: str) -> None:  # wall time and peak memory per phase, kept in the record (info["stream"])
        now = time.perf_counter()
        seconds[name] = round(now - clock[0], 3)
        clock[0] = now
        # resetting the peak would change what the caller's own VmHWM says: only when asked (benchmarks)
        hwm = _peak_rss(reset=os.environ.get("GRAPHSCALE_PEAK_RSS_PER_PHASE") == "1")
        if hwm is not None:
            peak[name] = hwm

    entries: dict[str, TensorEntry] = {}
    for f in weight_files:
        for k, e in read_header(f).items():
            if k in entries:
                raise HFUpscaleError(f"{src_dir}: tensor {k} is stored in both {entries[k].file.name} and "
                                     f"{f.name}")
            entries[k] = e
    meta = hf._meta_model(auto, config)
    entries = _class_names(meta, entries, src_dir)
    named = hf._named(meta)
    layers = _layer_stacks(meta, config)
    _check_keys(entries, named, meta, src_dir)
    _check_homogeneous(named, layers)

    vocab = _proxy_vocab(config)
    first_proxy = _proxy_config(config, layers, 0, vocab)
    pmeta = hf._meta_model(auto, first_proxy)
    pnamed = {n: tuple(t.shape) for n, t in hf._named(pmeta).items()}
    rows = _cut_axes(pnamed, named, layers, config, vocab)

    small = _load_proxy(auto, first_proxy, dtype, _Reader(entries, layers, 0, rows, dtype))
    # the wide proxy holds no layer: each of its parameters is made (from the narrow proxy, as widen_into
    # fills it) only while an op reads it, and dropped when an op reads another
    on_use = OnUse(release=_trim)
    w = hf._widen_loaded(tf, auto, kind, first_proxy, small, multiplier, heads, dtype, seq_len, on_use)
    del small
    wide_fields = {f: new for f, (_, new) in w.changed.items()}
    if {"num_hidden_layers", "vocab_size"} & set(wide_fields):
        raise HFUpscaleError(f"the widening changes {sorted(wide_fields)}, which the streamed proxy sets; "
                             "use stream=False (--no-stream)")
    new_config = hf._with(config, wide_fields)
    with torch.device("meta"):
        wide_meta = auto.from_config(new_config, dtype=dtype, **hf._IMPL, trust_remote_code=False)
    wide_named = hf._named(wide_meta)
    items = _items(entries, named, wide_named, meta, layers, w, rows, dtype)

    record = _full_record(w.record, named, layers)
    record = hf._hf_record(record, config, w.changed, src_dir, heads)
    record.notes.append(f"streamed: recipes from a one-layer proxy (vocabulary cut to {vocab}), see "
                        "graphscale.hf_stream")
    if noise is not None:
        record.notes.append(f"noise: {noise!r} (seed {seed})")
    if w.float32_ops:
        record.notes.append(f"the class computes parts in float32 ({', '.join(w.float32_ops[:4])}): outputs "
                            f"checked to relative {w.tol:g}, not float64's {hf.TOLERANCE[torch.float64]:g}")
    # check 1 by the same measure as check 3 (widen_into's own, |d| / (1 + |want|), is another)
    with torch.no_grad(), on_use:
        proxy_error = hf._max_rel(w.large_w(*w.inputs), w.want)
    if not proxy_error <= w.tol:
        raise HFUpscaleError(f"the one-layer proxy widened in memory misses the source by {proxy_error:.3g} "
                             f"(allowed {w.tol:g}); use stream=False (--no-stream)")
    # check 2 now: the write phase then holds no proxy tensor (the narrow model, the plan with its copies in
    # reference cycles)
    _check_against_proxy(items, hf._named(w.large), rows, on_use)
    tol, inputs, causal = w.tol, w.inputs, w.causal
    del w, on_use
    _release_memory()
    phase("proxy")

    hf._remove_stale_dirs(out_dir.parent)
    tmp = hf._temp_dir(out_dir)
    try:
        tmp.mkdir()
        _write_non_weights(wide_meta, tmp)
        write_split: dict[str, float] = {}
        shards = _write_weights(tmp, items, wide_meta, max_shard_size, noise, seed,
                                _Progress(sum(_wide_nbytes(i) for i in items),
                                          sys.stderr.isatty() if progress is None else progress), write_split)
        _trim()  # writing makes no reference cycles (the proxy's fx graphs did): trimming the heap is enough
        phase("write")
        hf._copy_other_files(src_dir, tmp)
        _check_written(tmp, shards, items, wide_named)
        errors = {"the proxy (layer 0) in memory": proxy_error}
        if layers.count > 1 and noise is None:
            errors[f"layer {layers.count - 1} read back"] = _check_last_layer(
                auto, config, new_config, wide_meta, layers, vocab, rows, entries, tmp, dtype, inputs, causal)
        bad = {k: v for k, v in errors.items() if not v <= tol}
        if bad:
            raise HFUpscaleError("the written model does not reproduce the source (relative error "
                                 + ", ".join(f"{k}: {v:.3g}" for k, v in bad.items())
                                 + f", allowed {tol:g})")
        record.info["check"] = {"relative_error": errors, "tolerance": tol, "dtype": str(dtype),
                                "streamed": True}
        phase("check")
        record.info["stream"] = {"seconds": seconds, "write_seconds": write_split, "peak_rss_bytes": peak,
                                 "proxy_vocab": vocab, "layers": layers.count}
        save_record(record, tmp)
        hf._replace_dir(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _conversions(meta: torch.nn.Module) -> tuple[list[Any], list[Any]]:
    """transformers' key transforms for the class of ``meta`` (what ``from_pretrained`` applies on load):
    its pure renamings and its converters (merges and splits of tensors); none of either where this
    transformers has no such mapping (checkpoint keys must then be the class's names)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    transforms = get_model_conversion_mapping(meta)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def _class_names(meta: torch.nn.Module, entries: dict[str, TensorEntry], where: Path
                 ) -> dict[str, TensorEntry]:
    """``entries`` under the class's names, renamed as ``from_pretrained`` renames checkpoint keys (GPT-NeoX's
    ``embed_out`` is its ``lm_head``). A key that a converter merges with others or splits is refused: a
    streamed upscale moves one tensor at a time."""
    renamings, converters = _conversions(meta)
    if not renamings and not converters:
        return entries
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    state = meta.state_dict()
    prefix = getattr(meta, "base_model_prefix", None)
    out: dict[str, TensorEntry] = {}
    for key in sorted(entries, key=dot_natural_key):  # from_pretrained's order (some renamings keep state)
        name, converter = rename_source_key(key, renamings, converters, prefix, state)
        if name not in state and key in state:  # as from_pretrained: then only the prefix may change
            name, converter = rename_source_key(key, [], [], prefix, state)
        if converter is not None:
            raise HFUpscaleError(f"{where}: {key} is converted on load ({converter!r} merges or splits it "
                                 "with other tensors into the class's layout), which a streamed upscale "
                                 "cannot do tensor by tensor; use stream=False (--no-stream)")
        if name in out:
            raise HFUpscaleError(f"{where}: two tensors load as {name}; use stream=False (--no-stream)")
        out[name] = entries[key]
    return out


def _saved_names(wide_meta: torch.nn.Module, plan: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each of ``plan``'s names (the class's) -> the name ``save_pretrained`` writes it under, in the order
    it writes them: it reverts the load-time renamings (GPT-NeoX's ``lm_head`` is saved as ``embed_out``)
    and then sorts. Asked of transformers itself, on meta tensors."""
    renamings, converters = _conversions(wide_meta)
    if not renamings and not converters:
        return {k: k for k in plan}
    from transformers.core_model_loading import revert_weight_conversion

    reverted = revert_weight_conversion(wide_meta, dict(plan))
    name_of = {id(t): k for k, t in plan.items()}
    out: dict[str, str] = {}
    for saved, t in reverted.items():
        key = name_of.get(id(t))
        if key is None or key in out:  # a new tensor (merged, split) or one tensor under two names
            raise HFUpscaleError(f"save_pretrained would write {saved} by converting tensors (merging or "
                                 "splitting), which a streamed upscale cannot do; use stream=False "
                                 "(--no-stream)")
        out[key] = saved
    if sorted(out) != sorted(plan):
        raise HFUpscaleError("save_pretrained would not write every tensor under a name of its own; use "
                             "stream=False (--no-stream)")
    return out


def _check_keys(entries: dict[str, TensorEntry], named: dict[str, torch.Tensor], meta: torch.nn.Module,
                src: Path) -> None:
    """Every checkpoint key is one of the class's tensors with its shape, and every stored tensor is there."""
    unknown = sorted(k for k in entries if k not in named)
    wrong = sorted(f"{k}: {entries[k].shape} (the class: {tuple(named[k].shape)})" for k in entries
                   if k in named and entries[k].shape != tuple(named[k].shape))
    stored = {id(t): n for n, t in meta.state_dict(keep_vars=True).items()}
    present = {id(named[k]) for k in entries if k in named}
    missing = sorted(n for i, n in stored.items() if i not in present)
    if unknown or wrong or missing:
        found = (("unexpected keys", unknown), ("mismatched", wrong), ("missing keys", missing))
        detail = "; ".join(f"{what}: {', '.join(v[:5])}" for what, v in found if v)
        raise HFUpscaleError(f"{src} does not map onto its class key by key ({detail}); streamed upscale "
                             "reads the checkpoint's tensors by the class's names: use stream=False "
                             "(--no-stream)")


def _check_homogeneous(named: dict[str, torch.Tensor], layers: _Layers) -> None:
    """Every layer of a stack has the same tensor names and shapes as layer 0 (the proxy's recipes hold)."""
    per: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}
    for n, t in named.items():
        s = layers.split(n)
        if s is not None:
            per.setdefault((s[0], s[1]), {})[s[2]] = tuple(t.shape)
    for (path, i), tensors in sorted(per.items()):
        first = per.get((path, 0))
        if tensors != first:
            diff = sorted(set(tensors.items()) ^ set((first or {}).items()))[:4]
            raise HFUpscaleError(f"{path}.{i} differs from {path}.0 ({diff}): streamed upscale takes every "
                                 "layer's recipe from one layer; use stream=False (--no-stream)")


def _cut_axes(pnamed: dict[str, tuple[int, ...]], named: dict[str, torch.Tensor], layers: _Layers,
              config: Any, vocab: int) -> dict[str, int]:
    """Proxy tensors whose first axis is the cut vocabulary: name -> rows to read. Any other difference
    between the proxy and the class is refused."""
    full = int(getattr(config, "vocab_size", 0) or 0)
    rows: dict[str, int] = {}
    for pname, shape in pnamed.items():
        real = layers.to_real(pname, 0)
        if real not in named:
            raise HFUpscaleError(f"the one-layer proxy has {pname}, which the class has not; use "
                                 "stream=False (--no-stream)")
        rshape = tuple(named[real].shape)
        if shape == rshape:
            continue
        if (len(shape) == len(rshape) and shape[0] == vocab and rshape[0] == full
                and shape[1:] == rshape[1:]):
            rows[pname] = vocab
            continue
        raise HFUpscaleError(f"{real} has shape {rshape}, {shape} in the one-layer proxy with {vocab} "
                             "tokens: only a leading vocabulary axis may differ; use stream=False "
                             "(--no-stream)")
    return rows


def _items(entries: dict[str, TensorEntry], named: dict[str, torch.Tensor],
           wide_named: dict[str, torch.Tensor], meta: torch.nn.Module, layers: _Layers, w: Any,
           rows: dict[str, int], dtype: torch.dtype) -> list[_Item]:
    """The recipe of every checkpoint key, in the class's parameter order (noise draws in that order), then
    its buffers."""
    recipes = w.record.params
    query: dict[str, list[tuple[int, int, int, int, float, float]]] = {}
    before: dict[str, tuple[float, float]] = {}
    for name, axis, lo, hi, m, c, power, *rest in w.record.info.get("query_scales", []):
        offset, shift = (*rest, 0.0, 0.0)[:2]  # records written before gains s + w had neither
        query.setdefault(hf._strip(name), []).append((axis, lo, hi, m, power, offset))
        before.setdefault(hf._strip(name), (c, shift))
    param_ids = {id(p) for p in meta.parameters()}
    key_of = {id(named[k]): k for k in entries}
    order = [n for n, _ in meta.named_parameters()] + [n for n, _ in meta.named_buffers()]
    items: list[_Item] = []
    for n in order:
        key = key_of.pop(id(named[n]), None)
        if key is None:
            continue
        pname = layers.to_proxy(key)
        s = recipes.get("model." + pname)
        if s is None:
            raise HFUpscaleError(f"{key}: the widening has no recipe for it (a stored tensor the traced "
                                 "forward does not use); use stream=False (--no-stream)")
        e = entries[key]
        axes = s.axes
        if pname in rows and axes[0] is not None:
            raise HFUpscaleError(f"{key}: its vocabulary axis would be widened; use stream=False "
                                 "(--no-stream)")
        wide_shape = tuple(e.shape[a] if axes[a] is None else s.wide_shape[a] for a in range(len(axes)))
        if wide_shape != tuple(wide_named[key].shape):
            raise HFUpscaleError(f"{key}: widened to {wide_shape}, but the wide config's class has "
                                 f"{tuple(wide_named[key].shape)}; use stream=False (--no-stream)")
        scaling = replace(s, name=key, source=layers.to_real(hf._strip(s.source), _layer(layers, key)),
                          narrow_shape=e.shape, wide_shape=wide_shape)
        split = layers.split(key)
        items.append(_Item(key, e, scaling, *before.get(pname, (s.copy_scale, s.shift)), query.get(pname, []),
                           id(named[key]) in param_ids, pname if split is None or split[1] == 0 else None,
                           dtype if e.dtype.is_floating_point else e.dtype))
    return items


def _layer(layers: _Layers, name: str) -> int:
    s = layers.split(name)
    return 0 if s is None else s[1]


def _full_record(proxy: WideningRecord, named: dict[str, torch.Tensor], layers: _Layers) -> WideningRecord:
    """The proxy's record under every name of the full class (layer i's tensors get layer 0's rules)."""
    params = {}
    for n in named:
        s = proxy.params.get("model." + layers.to_proxy(n))
        if s is None:
            continue
        i = _layer(layers, n)
        shape = tuple(named[n].shape)
        wide = tuple(shape[a] if s.axes[a] is None else s.wide_shape[a] for a in range(len(shape)))
        params["model." + n] = replace(s, name="model." + n,
                                       source="model." + layers.to_real(hf._strip(s.source), i),
                                       narrow_shape=shape, wide_shape=wide)
    info = {k: v for k, v in proxy.info.items() if k != "query_scales"}  # proxy names; the rule is per tensor
    # a layer's width classes (its heads, its MLP) exist once per layer of the full model
    mults: dict[str, int] = {}
    per_layer: list[tuple[str, int]] = []
    for name, k in proxy.multipliers.items():
        if layers.split(hf._strip(name)) is None:
            mults[name] = k
        else:
            per_layer.append((name, k))
    for i in range(layers.count):
        for name, k in per_layer:
            mults["model." + layers.to_real(hf._strip(name), i)] = k
    return replace(proxy, params=params, multipliers=mults, notes=list(proxy.notes), info=info)


def _wide_nbytes(item: _Item) -> int:
    return math.prod(item.scaling.wide_shape) * item.dtype.itemsize


def _widen_one(item: _Item, rows: int | None = None) -> torch.Tensor:
    """The wide tensor of one key, by the operations widen_into's fill performs (so, bitwise, its values);
    with ``rows``, only its first rows along a leading axis that is not widened (a cut vocabulary)."""
    t = read_tensor(item.src, rows=rows)
    if t.is_floating_point():
        t = t.to(item.dtype)
    scaling = replace(item.scaling, copy_scale=item.widen_scale, shift=item.widen_shift)
    if rows is not None:
        scaling = replace(scaling, narrow_shape=tuple(t.shape), wide_shape=(rows, *scaling.wide_shape[1:]))
    wide = scaling.widen(t)
    del t
    for axis, lo, hi, m, power, offset in item.query:
        rows = wide.narrow(axis, lo, hi - lo).mul_(m ** power)
        if offset:
            rows.add_((m ** power - 1) * offset)
    return wide


def _write_non_weights(wide_meta: Any, tmp: Path) -> None:
    """``config.json`` and ``generation_config.json``, as ``save_pretrained`` writes them for the wide
    model."""
    cfg = wide_meta.config
    cfg.dtype = str(wide_meta.dtype).split(".")[1]
    cfg.architectures = [type(wide_meta).__name__]
    cfg.save_pretrained(str(tmp))
    if wide_meta.can_generate():
        wide_meta.generation_config.save_pretrained(str(tmp))


def _work_nbytes(item: _Item) -> int:
    """The bytes widening ``item`` holds at once: its source tensor, its cast (if the dtype changes) and its
    wide tensor."""
    cast = math.prod(item.src.shape) * item.dtype.itemsize if item.src.dtype != item.dtype else 0
    return item.src.nbytes + cast + _wide_nbytes(item)


def _write_weights(tmp: Path, items: list[_Item], wide_meta: Any, max_shard_size: str | int, noise: Any,
                   seed: int, progress: _Progress, split_seconds: dict[str, float] | None = None
                   ) -> dict[str, dict[str, str]]:
    """Write every wide tensor into shards laid out as save_pretrained would, under the names it writes
    (:func:`_saved_names`); returns file -> {name written: the class's name}.

    A writer thread writes each wide tensor (``pwrite``, then frees it; ``fsync`` and close a shard once it is
    complete) while this thread reads and widens the next ones, so that widening overlaps the disk. Memory
    stays that of writing one tensor at a time: the next tensor is widened only while the wide tensors
    waiting to be written plus its own work (:func:`_work_nbytes`) fit in the largest single tensor's work;
    otherwise this thread waits for the writer first. ``split_seconds`` receives, for this thread, the wall
    time spent reading and widening (and adding noise) and waiting for the writer, and for the writer, the
    time spent in ``pwrite``, freeing and ``fsync``."""
    from huggingface_hub import split_torch_state_dict_into_shards

    by_key = {i.key: i for i in items}
    state_order = [k for k in wide_meta.state_dict() if k in by_key]
    with torch.device("meta"):
        plan_sd = {k: torch.empty(by_key[k].scaling.wide_shape, dtype=by_key[k].dtype) for k in state_order}
    saved_as = _saved_names(wide_meta, plan_sd)
    class_key = {v: k for k, v in saved_as.items()}
    split = split_torch_state_dict_into_shards({saved_as[k]: plan_sd[k] for k in saved_as},
                                               filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    fds: dict[str, int] = {}
    where: dict[str, tuple[str, int]] = {}
    shards: dict[str, dict[str, str]] = {}  # file -> its names as written -> the class's names
    try:
        for fname, names in split.filename_to_tensors.items():
            keys = [class_key[n] for n in names]
            prefix, offsets = _layout({saved_as[k]: (by_key[k].dtype, by_key[k].scaling.wide_shape)
                                       for k in keys}, {"format": "pt"})
            fd = os.open(tmp / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            fds[fname] = fd
            _pwrite_all(fd, prefix, 0)
            where.update({k: (fname, offsets[saved_as[k]]) for k in keys})
            shards[fname] = {saved_as[k]: k for k in keys}
        gen = torch.Generator().manual_seed(seed) if noise is not None else None
        left = {fname: len(names) for fname, names in shards.items()}  # tensors still to write per shard
        if noise is None:
            # each shard front to back, as its bytes lie (safetensors sorts a file's tensors by name), so
            # that writes, and the reads of a source sharded alike, go forward through each file. Noise
            # draws in the class's order, so it keeps that order
            shard_rank = {fname: i for i, fname in enumerate(shards)}
            items = sorted(items, key=lambda i: (shard_rank[where[i.key][0]], where[i.key][1]))
        spent = dict.fromkeys(("read and widen", "waiting for the writer", "pwrite", "free", "fsync"), 0.0)

        def write(item: _Item, box: list[torch.Tensor]) -> None:  # runs in the writer thread
            t0 = time.perf_counter()
            fname, offset = where[item.key]
            wide = box.pop()
            _pwrite_all(fds[fname], _tensor_bytes(wide), offset)
            t1 = time.perf_counter()
            progress.update(_wide_nbytes(item))
            del wide
            _trim()  # the next tensor starts from the runtime's memory, whatever glibc kept of this one
            t2 = time.perf_counter()
            left[fname] -= 1
            if not left[fname]:  # a shard is complete: flush it now, so the disk works while we compute
                os.fsync(fds[fname])
                os.close(fds.pop(fname))
            spent["pwrite"] += t1 - t0
            spent["free"] += t2 - t1
            spent["fsync"] += time.perf_counter() - t2

        budget = max((_work_nbytes(i) for i in items), default=0)
        queued: collections.deque[tuple[concurrent.futures.Future[None], int]] = collections.deque()
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="graphscale-write") as writer:
            for item in items:
                t0, need = time.perf_counter(), _work_nbytes(item)
                while queued and sum(n for _, n in queued) + need > budget:
                    queued.popleft()[0].result()  # re-raises the writer's error here
                t1 = time.perf_counter()
                wide = _widen_one(item)
                if noise is not None and item.is_param and wide.is_floating_point():
                    holder = torch.nn.Module()
                    holder.p = torch.nn.Parameter(wide, requires_grad=False)
                    noise.apply(holder, WideningRecord({"p": replace(item.scaling, name="p")}, {}), gen)
                    del holder
                queued.append((writer.submit(write, item, [wide]), _wide_nbytes(item)))
                del wide  # the writer holds the only reference, and drops it once written
                spent["waiting for the writer"] += t1 - t0
                spent["read and widen"] += time.perf_counter() - t1
            t0 = time.perf_counter()
            while queued:
                queued.popleft()[0].result()
            spent["waiting for the writer"] += time.perf_counter() - t0
        if split_seconds is not None:
            split_seconds.update({k: round(v, 3) for k, v in spent.items()})
    finally:
        for fd in fds.values():
            os.close(fd)
        progress.close()
    if split.is_sharded:
        index = {"metadata": {"total_parameters": wide_meta.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        with open(tmp / hf.INDEX_FILE, "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return shards


def _check_against_proxy(items: list[_Item], proxy: dict[str, torch.Tensor], rows: dict[str, int],
                         on_use: OnUse) -> None:
    """Check 2 of the doc: every key the proxy holds (layer 0, the tensors outside the layers) comes out of
    its streamed recipe bitwise as widen_into filled it into the proxy (a cut vocabulary axis: its first
    rows, read alone). A parameter of the proxy is made by ``on_use`` after the streamed value is gone: the
    two are compared by the SHA-256 digest of their bytes, so that one wide tensor exists at a time (two
    would raise the peak above the memory bound on a small model, where the narrow proxy weighs most)."""
    for item in items:
        filled = proxy.get(item.proxy_name) if item.proxy_name is not None else None
        if filled is None:
            continue
        got = _widen_one(item, rows.get(item.proxy_name))
        if filled in on_use:
            digest = _digest(got)
            del got
            _trim()
            same = digest == _digest(on_use.value(filled))
        else:
            same = got.shape == filled.shape and torch.equal(got, filled.detach().to(got.dtype))
            del got
        _trim()
        if not same:
            raise HFUpscaleError(f"{item.key}: the streamed recipe gives other values than widen_into on the "
                                 "one-layer proxy; use stream=False (--no-stream) and report this")


def _digest(t: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], bytes]:
    """``t``'s dtype, shape and the SHA-256 digest of its bytes: equal for bitwise equal tensors."""
    return t.dtype, tuple(t.shape), hashlib.sha256(_tensor_bytes(t)).digest()


def _check_written(tmp: Path, shards: dict[str, dict[str, str]], items: list[_Item],
                   wide_named: dict[str, torch.Tensor]) -> None:
    """Each shard opens with safetensors and holds exactly the planned keys, shapes and dtypes (check 4)."""
    from safetensors import safe_open

    by_key = {i.key: i for i in items}
    for fname, names in shards.items():
        with safe_open(str(tmp / fname), framework="pt") as f:
            if sorted(f.keys()) != sorted(names):
                raise HFUpscaleError(f"{fname} was written with other keys than planned")
            for name, k in names.items():
                sl = f.get_slice(name)
                if tuple(sl.get_shape()) != by_key[k].scaling.wide_shape \
                        or by_key[k].scaling.wide_shape != tuple(wide_named[k].shape) \
                        or _ST_DTYPES[sl.get_dtype()] != by_key[k].dtype:
                    raise HFUpscaleError(f"{fname}: {k} was written with another shape or dtype than planned")


def _check_last_layer(auto: Any, config: Any, new_config: Any, wide_meta: torch.nn.Module, layers: _Layers,
                      vocab: int, rows: dict[str, int], entries: dict[str, TensorEntry], tmp: Path,
                      dtype: torch.dtype, inputs: tuple, causal: bool) -> float:
    """Check 3: a one-layer model of the source's last layer against the same read back from ``tmp``
    (``wide_meta``: the wide class on the meta device, whose renamings read the written keys)."""
    from graphscale.zoo import HFWrapper

    last = layers.count - 1
    written: dict[str, TensorEntry] = {}
    for f in sorted(tmp.glob("*.safetensors")):
        written.update(read_header(f))
    written = _class_names(wide_meta, written, tmp)  # as from_pretrained reads them

    # each model holds one parameter at a time (read from its file while an op reads it), not a layer
    narrow_use, wide_use = OnUse(release=_trim), OnUse(release=_trim)
    narrow = _load_proxy(auto, _proxy_config(config, layers, last, vocab), dtype,
                         _Reader(entries, layers, last, rows, dtype), narrow_use)
    with torch.no_grad(), narrow_use:
        want = HFWrapper(narrow, causal).eval()(*inputs)
    del narrow
    wide = _load_proxy(auto, _proxy_config(new_config, layers, last, vocab), dtype,
                       _Reader(written, layers, last, rows, dtype), wide_use)
    with torch.no_grad(), wide_use:
        got = HFWrapper(wide, causal).eval()(*inputs)
    return hf._max_rel(got, want)
