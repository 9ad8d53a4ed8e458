"""Upscale a Hugging Face model directory: read config + safetensors, write a wider directory that
``AutoModel*.from_pretrained`` loads, computing the same function, with the μP record beside the weights.

:func:`upscale` (and ``graphscale upscale SRC_DIR --multiplier 2 --out DST_DIR``):

1. reads ``SRC_DIR/config.json`` (a config with an ``auto_map`` is refused: no code from the directory ever
   runs; transformers is called with ``trust_remote_code=False`` and ``local_files_only=True``) and the
   safetensors weights (``model.safetensors`` or shards listed in ``model.safetensors.index.json``), into the
   class that ``config.architectures`` names, checking that no key is missing, unexpected or mismatched;
2. analyzes the narrow model and derives every tensor's wide shape;
3. rewrites the config: head counts (``num_attention_heads``, ``num_key_value_heads``, ``n_head``, ...) grow
   by k with ``heads="grow"`` and stay with ``heads="fixed"``, where a ``head_dim`` field grows instead
   (unless the plan grows the heads because head_dim cannot grow: a partial rotary's fixed part);
   every other integer field is scaled by k exactly when building the model with it scaled moves parameter
   axes to their wide sizes (``hidden_size``, ``intermediate_size``, ``moe_intermediate_size``, ...). The
   model built from the new config must have every widened shape, else it is refused naming the fields;
4. fills the model built from the new config with :func:`graphscale.widen_into` (scales folded into the
   weights: the query's ``k**-0.5`` for standard attention with heads fixed, a tied readout's ``1/k``,
   fused q|k|v), optionally adds noise, writes it with ``save_pretrained`` into a temporary directory beside
   ``out``, reloads that directory with ``from_pretrained`` and checks its outputs against the source
   (float64: relative error <= 1e-10), then renames the directory to ``out``.

With ``stream=True`` (``--stream``; the default above ``STREAM_ABOVE`` = 1 GiB of source weights) steps 1-4
run on a one-layer proxy of the class only, and every tensor is then read, widened by its proxy tensor's
recipe and written one at a time (:mod:`graphscale.hf_stream`, which says what it verifies): the same
files, without holding the model in memory.

``out`` also receives every other file of ``SRC_DIR`` (tokenizer, generation config, README, ...) and
``graphscale.json``: the widening record (per tensor its source, copy scale c, multiplier M, fan-in
multiplier, plus the source config in ``record.info["source_config"]``), so that in a new process
``graphscale.mup_optimizer(model, torch.optim.AdamW, lr=..., record=out)`` rebuilds the μP param groups.

Example:
    >>> import graphscale.hf                                                    # doctest: +SKIP
    >>> graphscale.hf.upscale("tiny-llama", multiplier=2, out="tiny-llama-x2")  # doctest: +SKIP
    PosixPath('tiny-llama-x2')
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from graphscale.errors import GraphscaleError, MultiplierError, UnsavedBufferWarning, WidthConflictError
from graphscale.on_use import OnUse
from graphscale.record import RECORD_FILE, WideningRecord, save_record
from graphscale.tolerance import FLOAT32_INSIDE_TOLERANCE, TOLERANCE, float32_reductions

__all__ = ["HFUpscaleError", "upscale"]

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# weights in other formats are never read (pickle runs code) nor copied (they hold the narrow weights)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_NOT_COPIED = {"config.json", INDEX_FILE, "pytorch_model.bin.index.json", RECORD_FILE}
HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads", "n_head", "num_heads", "n_heads", "num_kv_heads",
               "multi_query_group_num", "encoder_attention_heads", "decoder_attention_heads")
HEAD_DIM_FIELDS = ("head_dim", "kv_channels", "attention_head_dim", "d_kv")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
# source weights above this many bytes are widened tensor by tensor (graphscale/hf_stream.py) by default
STREAM_ABOVE = 2**30
# the relative output error allowed (max |wide - narrow| / max |narrow|): what each dtype's rounding allows
# the class's own attention and expert code in plain torch ops, in the checkpoint's dtype (sdpa may fuse;
# the grouped-matmul experts are a custom autograd.Function that the engine refuses, the eager experts loop
# over the experts hit, which torch.export cannot trace; batched_mm gathers each token's expert weights)
_TRACER = "export"  # HF forwards branch on Python values that torch.fx cannot trace; export handles them
_IMPL = {"attn_implementation": "eager", "experts_implementation": "batched_mm"}


class HFUpscaleError(GraphscaleError, ValueError):
    """A Hugging Face directory that cannot be upscaled exactly (the message says why and what works)."""


def upscale(src: str | os.PathLike[str], multiplier: int = 2, out: str | os.PathLike[str] | None = None, *,
            heads: Literal["fixed", "grow"] = "fixed", noise: Any = None, seed: int = 0,
            dtype: str | torch.dtype | None = None, force: bool = False,
            max_shard_size: str | int = "5GB", seq_len: int = 8, stream: bool | None = None,
            progress: bool | None = None) -> Path:
    """Widen the Hugging Face model directory ``src`` by ``multiplier`` into the new directory ``out``.

    ``heads``: ``"fixed"`` keeps the head counts and widens ``head_dim``; ``"grow"`` copies heads.
    ``noise``: a scheme from :mod:`graphscale.noise` or a spec string (``"gaussian:0.1"``), drawn from a
    generator seeded with ``seed`` (the same seed writes the same files). ``dtype``: the dtype the model
    is loaded, widened and written in (default: the checkpoint's). ``force`` replaces an existing ``out``.
    ``max_shard_size`` is passed to ``save_pretrained``. ``src`` is never modified; ``out`` may not be
    ``src`` nor lie inside it (nor contain it); the write is atomic (a temporary directory beside ``out``,
    renamed at the end). Returns ``out``. See the module doc for every step.

    ``stream``: ``True`` widens tensor by tensor without loading the model (memory bounded by a few wide
    tensors and one narrow layer, see :mod:`graphscale.hf_stream` for what it verifies), ``False`` loads,
    fills and reloads the whole model, ``None`` (the default) streams when the source weights exceed
    ``STREAM_ABOVE`` bytes (1 GiB). ``progress`` shows a progress bar with bytes/s on stderr while
    streaming (``None``: only when stderr is a terminal). Both paths write the same bytes.

    Example:
        >>> upscale("tiny-gpt2", multiplier=2, out="tiny-gpt2-x2", heads="grow")  # doctest: +SKIP
        PosixPath('tiny-gpt2-x2')
    """
    if out is None:
        raise HFUpscaleError("upscale needs out= (the directory to write)")
    if isinstance(multiplier, bool) or not isinstance(multiplier, int) or multiplier < 1:
        raise HFUpscaleError(f"multiplier must be an integer >= 1, got {multiplier!r}")
    if heads not in ("fixed", "grow"):
        raise HFUpscaleError(f"heads must be 'fixed' or 'grow', got {heads!r}")
    src_dir, out_dir = _check_paths(src, out, force)
    noise_scheme = _noise(noise)
    weight_files = _weight_files(src_dir)
    from graphscale.zoo import refuse_remote_code, transformers_module

    tf = transformers_module()

    refuse_remote_code(src_dir / "config.json")
    config = tf.AutoConfig.from_pretrained(str(src_dir), trust_remote_code=False, local_files_only=True)
    kind, auto = _model_class(tf, config)  # the config is written as read, but for the width fields
    torch_dtype = _resolve_dtype(dtype, weight_files)
    if stream is None:
        stream = _source_bytes(weight_files) > STREAM_ABOVE
    if stream:
        from graphscale.hf_stream import stream_upscale

        return stream_upscale(tf, auto, kind, config, src_dir, out_dir, weight_files, multiplier=multiplier,
                              heads=heads, noise=noise_scheme, seed=seed, dtype=torch_dtype, force=force,
                              max_shard_size=max_shard_size, seq_len=seq_len, progress=progress)
    small = _load_source(auto, src_dir, config, torch_dtype)
    w = _widen_loaded(tf, auto, kind, config, small, multiplier, heads, torch_dtype, seq_len)
    large, large_w, record, inputs, causal, tol = w.large, w.large_w, w.record, w.inputs, w.causal, w.tol
    if noise_scheme is not None:
        noise_scheme.apply(large_w, record, torch.Generator().manual_seed(seed))
        record.notes.append(f"noise: {noise_scheme!r} (seed {seed})")
    with torch.no_grad():
        filled = large_w(*inputs)
    record = _hf_record(record, config, w.changed, src_dir, heads)
    if w.float32_ops:
        record.notes.append(f"the class computes parts in float32 ({', '.join(w.float32_ops[:4])}): outputs "
                            f"checked to relative {tol:g}, not float64's {TOLERANCE[torch.float64]:g}")
    want = w.want

    _remove_stale_dirs(out_dir.parent)
    tmp = _temp_dir(out_dir)
    try:
        large.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        _copy_other_files(src_dir, tmp)
        errors = _check_reload(auto, tmp, inputs, causal, torch_dtype, filled,
                               want if noise_scheme is None else None, tol, large, heads)
        record.info["check"] = {"relative_error": errors, "tolerance": tol, "dtype": str(torch_dtype)}
        save_record(record, tmp)
        _replace_dir(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@dataclass
class _Widened:
    """What :func:`_widen_loaded` made: the filled large model and everything the checks need."""

    large: Any
    large_w: Any
    record: WideningRecord
    plan: Any
    sizes: Any
    new_config: Any
    changed: dict[str, tuple[int, int]]
    inputs: tuple
    causal: bool
    tol: float
    float32_ops: list[str]
    want: torch.Tensor


def _widen_loaded(tf: Any, auto: Any, kind: str, config: Any, small: Any, multiplier: int, heads: str,
                  torch_dtype: torch.dtype, seq_len: int, on_use: OnUse | None = None) -> _Widened:
    """Analyze the loaded ``small``, rewrite its config and fill the class built from it with
    :func:`graphscale.widen_into` (no noise). The streamed path runs this on a model of fewer layers, with
    ``on_use``: the large model's parameters are then made only while an op reads them (widen_into's doc),
    and its forward runs inside ``with on_use:``."""
    causal = kind == "causal"
    ids = torch.randint(0, config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    inputs = (ids,)
    from graphscale.zoo import HFWrapper

    small_w = HFWrapper(small, causal).eval()

    import graphscale
    from graphscale.widen import build_record

    try:
        plan = graphscale.analyze(small_w, inputs, heads=heads, tracer=_TRACER)
        mults = plan.multipliers(multiplier)
        sizes = plan.sizes(mults)
        expected = build_record(plan, sizes, mults)
    except (MultiplierError, WidthConflictError) as e:
        raise _with_heads_hint(e, heads) from e
    unused = plan.unused_tensors()  # the larger model keeps its own (widen_into leaves them alone)
    target = {_strip(n): s.wide_shape for n, s in expected.params.items() if n not in unused}
    new_config, changed = _rewrite_config(tf, auto, config, target, multiplier, _config_heads(plan, heads),
                                          {_strip(n) for n in unused})

    large = _build(auto, new_config, torch_dtype)  # widen_into fills it: no random init first
    large_w = HFWrapper(large, causal).eval()
    tol = TOLERANCE[torch_dtype]
    float32_ops = float32_reductions(plan, sizes) if torch_dtype == torch.float64 else []
    if float32_ops:  # e.g. Llama's RMSNorm: the class itself rounds to float32 whatever the weights' dtype
        tol = FLOAT32_INSIDE_TOLERANCE
    try:
        # large is built here only to be filled: no transactional copy of it. A buffer no checkpoint
        # carries is checked where it matters, on the written directory reloaded (_check_reload)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnsavedBufferWarning)
            record = graphscale.widen_into(small_w, large_w, inputs, attention="auto", rtol=tol, plan=plan,
                                           transactional=False, on_use=on_use)
    except (MultiplierError, WidthConflictError) as e:
        raise _with_heads_hint(e, heads) from e
    _add_tied_names(record, large_w)
    # what the output does not depend on, widen_into leaves to large: the class's own init, not empty memory
    _initialize_rest(large, {id(t) for n, t in _named(large_w).items() if n in record.params})
    with torch.no_grad():
        want = small_w(*inputs)
    return _Widened(large, large_w, record, plan, sizes, new_config, changed, inputs, causal, tol,
                    float32_ops, want)


# ---------------------------------------------------------------------------------------------------------
# inputs and outputs


def _config_heads(plan: Any, heads: str) -> str:
    """The head policy the config must follow: with heads="fixed", the plan grows the heads of an attention
    whose head_dim cannot grow (a partial rotary's fixed part); the config then scales the head counts.
    One config field cannot say both, so attentions that disagree are refused."""
    grown, kept = plan.classification.heads_grown, plan.classification.head_dim_grown
    if heads != "fixed" or not grown:
        return heads
    if kept:
        raise HFUpscaleError(
            f"heads='fixed' grows head_dim at {kept[0]} but the heads at {grown[0]} (its head_dim has a part "
            "that cannot grow): one config cannot describe both; use --heads grow")
    return "grow"


def _with_heads_hint(e: GraphscaleError, heads: str) -> GraphscaleError:
    if heads != "fixed":
        return e
    return type(e)(f"{e} (with heads='fixed', which widens head_dim; --heads grow keeps head_dim and copies "
                   "heads instead)")


def _check_paths(src: str | os.PathLike[str], out: str | os.PathLike[str], force: bool) -> tuple[Path, Path]:
    src_dir = Path(src)
    if not src_dir.is_dir():
        raise HFUpscaleError(f"{src_dir} is not a directory (expected a Hugging Face model directory)")
    if not (src_dir / "config.json").is_file():
        raise HFUpscaleError(f"{src_dir} has no config.json")
    src_real, out_real = src_dir.resolve(), Path(out).resolve()
    if out_real == src_real:
        raise HFUpscaleError(f"--out {out} is the source directory {src}: write the wide model elsewhere")
    if out_real.is_relative_to(src_real):
        raise HFUpscaleError(f"--out {out} lies inside the source directory {src}: write it elsewhere")
    if src_real.is_relative_to(out_real):
        raise HFUpscaleError(f"--out {out} contains the source directory {src}: replacing it would delete "
                             "the source; write it elsewhere")
    if Path(out).exists() or Path(out).is_symlink():
        if not Path(out).is_dir() or Path(out).is_symlink():
            raise HFUpscaleError(f"--out {out} exists and is not a directory; remove it or choose another "
                                 "path")
        if not force:
            raise HFUpscaleError(f"--out {out} exists; pass --force (force=True) to replace it")
    parent = out_real.parent
    if not parent.is_dir():
        raise HFUpscaleError(f"cannot write --out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise HFUpscaleError(f"cannot write --out {out}: directory {parent} is not writable")
    return src_dir, Path(out)


def _weight_files(src: Path) -> list[Path]:
    """The safetensors files of ``src``: the shards its index lists, or ``model.safetensors``."""
    index = src / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({str(f) for f in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise HFUpscaleError(f"{index} is not a readable safetensors index "
                                 f"({type(e).__name__}: {e})") from e
        for f in files:
            if Path(f).name != f:
                raise HFUpscaleError(f"{index} names the shard {f!r}, outside the directory")
            if not (src / f).is_file():
                raise HFUpscaleError(f"{index} lists the shard {f}, which {src} does not have")
        return [src / f for f in files]
    if (src / WEIGHTS_FILE).is_file():
        return [src / WEIGHTS_FILE]
    others = sorted(p.name for p in src.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    raise HFUpscaleError(f"{src} has neither {WEIGHTS_FILE} nor {INDEX_FILE}"
                         + (f" (it has {', '.join(others)}: graphscale reads safetensors only, since pickled "
                            "weights can run code; convert them with save_pretrained)" if others else ""))


def _source_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def _model_class(tf: Any, config: Any) -> tuple[str, Any]:
    from graphscale.zoo import architecture_kind

    kind = architecture_kind(config)
    if kind == "causal":
        return kind, tf.AutoModelForCausalLM
    if kind == "masked":
        return kind, tf.AutoModelForMaskedLM
    archs = " ".join(getattr(config, "architectures", None) or [])
    raise HFUpscaleError(
        f"config.json architectures {archs or 'missing'}: upscale supports causal LMs (...ForCausalLM, "
        "...LMHeadModel) and masked LMs (...ForMaskedLM), whose outputs (logits over the vocabulary) keep "
        "their size; a bare encoder's output is its hidden state, which widening changes")


def _resolve_dtype(dtype: str | torch.dtype | None, files: list[Path]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in TOLERANCE:
            raise HFUpscaleError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
        return dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise HFUpscaleError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            name = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
                    "F16": torch.float16}.get(t.get_dtype())
            if name is not None:
                return name
    raise HFUpscaleError(f"{files[0]} holds no float64/float32/bfloat16/float16 tensor; pass --dtype")


def _load_source(auto: Any, src: Path, config: Any, dtype: torch.dtype) -> Any:
    try:
        model, info = auto.from_pretrained(str(src), config=config, dtype=dtype, **_IMPL,
                                           trust_remote_code=False, local_files_only=True,
                                           use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        detail = " ".join(str(e).split())[:400]
        raise HFUpscaleError(f"cannot load {src} with {auto.__name__}: {detail}") from e
    _check_loading_info(info, src)
    return model.eval()


def _check_loading_info(info: dict[str, Any], where: Path) -> None:
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                                        "error_msgs") and v}
    if problems:
        detail = "; ".join(f"{k}: {', '.join(map(str, sorted(v, key=str)))[:300]}"
                           for k, v in problems.items())
        raise HFUpscaleError(f"{where} does not load cleanly into its class ({detail})")


def _noise(noise: Any) -> Any:
    if noise is None or not isinstance(noise, str):
        return noise
    from graphscale.cli import parse_noise

    return parse_noise(noise)


def _copy_other_files(src: Path, dst: Path) -> None:
    """Copy everything but the config, the weights and a record: tokenizer, generation config, README..."""
    for p in sorted(src.iterdir()):
        if p.name in _NOT_COPIED or p.suffix in _WEIGHT_SUFFIXES or p.name.startswith(".") or p.is_dir():
            continue
        shutil.copyfile(p, dst / p.name)


def _temp_dir(out: Path) -> Path:
    """A fresh name beside ``out`` in the CLI's temporary-file pattern (pid and host), so that a later run
    can tell a killed run's leftovers from a live one's."""
    from graphscale.cli.files import temp_prefix

    return out.parent / f"{temp_prefix(out)}{secrets.token_hex(4)}.tmp"


def _remove_stale_dirs(directory: Path) -> None:
    """Delete temporary directories that a killed upscale (SIGKILL, power loss) left beside its output."""
    from graphscale.cli.files import note, remove_stale_temps

    for p in remove_stale_temps(directory, directories=True):
        note(f"removed {p}, a partial directory left by a graphscale run that was killed")


def _replace_dir(tmp: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force:  # created by someone else while this ran
            raise HFUpscaleError(f"--out {out} appeared while upscaling; pass --force to replace it")
        old = _temp_dir(out)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------------------
# the config


def _strip(name: str) -> str:
    return name.removeprefix("model.")  # the HFWrapper's attribute


def _named(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` under every name (tied tensors appear under each)."""
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


def _build(auto: Any, config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The class built from ``config`` with its weights **not initialized** (``torch.empty``): every one is
    overwritten next (loaded, or filled by widen_into), so a random init would be time thrown away (a third
    of a streamed run's fixed cost at 1B). What ``__init__`` computes otherwise (buffers such as rotary
    frequencies) is computed as usual, and tied weights are tied. Pass what was written to
    :func:`_initialize_rest`, which gives anything else the class's own initialization, as
    ``from_pretrained`` does for missing keys."""
    from transformers.initialization import no_init_weights

    with torch.random.fork_rng(), no_init_weights():  # leave the caller's RNG as it was
        model = auto.from_config(config, dtype=dtype, **_IMPL, trust_remote_code=False)
    model.tie_weights()  # no_init_weights skips init_weights, which ties
    return model.eval()


def _initialize_rest(model: torch.nn.Module, written: set[int]) -> None:
    """Initialize, as the class's own ``initialize_weights`` does, the tensors of ``model`` (built by
    :func:`_build`) whose ``id`` is not in ``written``, as ``from_pretrained`` does for missing keys: the
    written tensors and the modules holding only written tensors are flagged ``_is_hf_initialized``, which
    transformers' init skips. Refused if the init wrote a written tensor anyway (its version counter moved;
    a write through ``.data`` does not move it, but then the outputs differ and the output checks that
    follow every use here refuse)."""

    def own(m: torch.nn.Module) -> list[torch.Tensor]:
        return [*m.parameters(recurse=False), *m.buffers(recurse=False)]

    if all(id(t) in written for m in model.modules() for t in own(m)):
        return
    tensors = {id(t): t for m in model.modules() for t in own(m)}
    before = {i: (t.data_ptr(), t._version) for i, t in tensors.items() if i in written}
    done = [m for m in model.modules() if all(id(t) in written for t in [*m.parameters(), *m.buffers()])]
    flagged: list[Any] = done + [tensors[i] for i in before]
    for obj in flagged:
        obj._is_hf_initialized = True
    try:
        with torch.random.fork_rng(), torch.no_grad():
            model.initialize_weights()
    finally:
        for obj in [*model.modules(), *tensors.values()]:
            if "_is_hf_initialized" in getattr(obj, "__dict__", {}):
                del obj._is_hf_initialized
    moved = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
             if id(t) in before and before[id(t)] != (t.data_ptr(), t._version)]
    if moved:
        raise HFUpscaleError(f"{type(model).__name__}'s own weight initialization overwrote {moved[:3]}, "
                             "which graphscale had set; please report this (the class ignores transformers' "
                             "_is_hf_initialized flags)")


def _meta_model(auto: Any, config: Any) -> torch.nn.Module:
    """The class built from ``config`` on the meta device: its shapes and ties, no memory."""
    with torch.device("meta"):
        return auto.from_config(config, **_IMPL, trust_remote_code=False)


def _shapes(auto: Any, config: Any) -> dict[str, tuple[int, ...]]:
    """Every parameter and buffer shape of the class built from ``config`` (on the meta device: no memory),
    under every name (tied weights appear under each of their names)."""
    return {n: tuple(t.shape) for n, t in _named(_meta_model(auto, config)).items()}


def _tied_names(module: torch.nn.Module) -> list[list[str]]:
    """Groups of names that ``module`` binds to one tensor (a tied readout and its embedding), each in
    ``named_parameters`` order."""
    groups: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def _with(config: Any, fields: dict[str, Any]) -> Any:
    import copy

    new = copy.deepcopy(config)
    for k, v in fields.items():
        setattr(new, k, v)
    return new


def _rewrite_config(tf: Any, auto: Any, config: Any, target: dict[str, tuple[int, ...]], k: int,
                    heads: str, ignored: set[str]) -> tuple[Any, dict[str, tuple[int, int]]]:
    """The config whose model has exactly the ``target`` shapes, and the fields changed (old, new)."""
    # the plan may know a tied tensor by one of its names only
    for group in _tied_names(_meta_model(auto, config)):
        known = [target[n] for n in sorted(group) if n in target]
        for n in group:
            if known and n not in target:
                target[n] = known[0]
    data = config.to_dict()
    ints = {f: v for f, v in data.items() if isinstance(v, int) and not isinstance(v, bool)}
    policy: dict[str, int] = {}
    grown = HEAD_FIELDS if heads == "grow" else HEAD_DIM_FIELDS
    for f in grown:
        if f in ints and ints[f] > 0:
            policy[f] = ints[f] * k
    base_config = _with(config, policy)
    try:
        base = _shapes(auto, base_config)
    except Exception as e:  # the class's own checks (divisibility, ...)
        raise HFUpscaleError(f"heads={heads!r}: the class refuses {policy} ({e}); try the other --heads "
                             "policy") from e
    candidates = [f for f, v in ints.items() if v > 1 and f not in HEAD_FIELDS and f not in HEAD_DIM_FIELDS
                  and not f.endswith("_token_id")]
    wanted: dict[str, frozenset] = {}
    for f in candidates:
        try:
            shapes = _shapes(auto, _with(base_config, {f: ints[f] * k}))
        except Exception:  # e.g. hidden not divisible by heads: not a field this widening scales alone
            continue
        if set(shapes) != set(base) or any(len(shapes[n]) != len(base[n]) for n in base):
            continue  # a layer or expert count: changes which tensors exist
        # the (tensor, axis) pairs that scaling f moves (tensors the widening keeps unused do not count)
        effect = frozenset((n, a) for n in base if n in target for a in range(len(base[n]))
                           if base[n][a] != shapes[n][a])
        if effect and all(n in target and a < len(target[n]) and shapes[n][a] == target[n][a]
                          and base[n][a] != target[n][a] for n, a in effect):
            wanted[f] = effect
    same = [(a, b) for a in wanted for b in wanted if a < b and wanted[a] == wanted[b]]
    if same:
        raise HFUpscaleError(
            "config fields " + ", ".join(f"{a} and {b}" for a, b in same) + " each widen the same tensor "
            "axes; which one the class reads is ambiguous, so graphscale cannot rewrite the config")
    fields = policy | {f: ints[f] * k for f in wanted}
    new_config = _with(config, fields)
    got = _shapes(auto, new_config)
    wrong = [f"{n}: {got.get(n)} (widened: {t})" for n, t in target.items() if got.get(n) != t]
    extra = sorted(set(got) - set(target) - ignored)
    if wrong or extra:
        raise HFUpscaleError(
            f"no consistent config: scaling {sorted(fields) or 'no field'} by {k} gives "
            + "; ".join(wrong[:6]) + (f"; tensors the widening has no rule for: {extra[:6]}" if extra else "")
            + f" (heads={heads!r}; the config's integer fields: {sorted(ints)})")
    return new_config, {f: (ints[f], v) for f, v in fields.items()}


# ---------------------------------------------------------------------------------------------------------
# record and checks


def _add_tied_names(record: WideningRecord, module: torch.nn.Module) -> None:
    """Give every name of a tied tensor (BERT's word embeddings = its MLM decoder) the record's entry, so
    that whichever name ``named_parameters`` keeps after ``from_pretrained`` is found."""
    for names in _tied_names(module):
        known = [n for n in names if n in record.params]
        for n in names:
            if known and n not in record.params:
                record.params[n] = replace(record.params[known[0]], name=n)


def _hf_record(record: WideningRecord, config: Any, changed: dict[str, tuple[int, int]], src: Path,
               heads: str) -> WideningRecord:
    """The record under the model's own parameter names (without the wrapper's ``model.``)."""
    params = {_strip(n): replace(s, name=_strip(s.name), source=_strip(s.source))
              for n, s in record.params.items()}
    info = dict(record.info) | {
        "source_config": config.to_dict(), "source_dir": str(src), "heads": heads,
        "config_changes": {f: list(v) for f, v in changed.items()},
    }
    # the wrapper's prefix only: at the start of a name, so "model.model.layers.0" keeps its own "model."
    notes = [re.sub(r"(?<![\w.])model\.", "", n) for n in record.notes]
    return replace(record, params=params, notes=notes, info=json.loads(json.dumps(info, default=str)))


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def _check_reload(auto: Any, directory: Path, inputs: tuple, causal: bool, dtype: torch.dtype,
                  filled: torch.Tensor, want: torch.Tensor | None, tol: float,
                  large: Any, heads: str) -> dict[str, float]:
    """Load the written directory as a user will, and check it computes what was filled (and the source)."""
    from graphscale.zoo import HFWrapper

    model, info = auto.from_pretrained(str(directory), dtype=dtype, **_IMPL,
                                       trust_remote_code=False, local_files_only=True, use_safetensors=True,
                                       output_loading_info=True)
    _check_loading_info(info, directory)
    with torch.no_grad():
        got = HFWrapper(model.eval(), causal)(*inputs)
    errors = {"the filled model": _max_rel(got, filled)}
    if want is not None:
        errors["the source"] = _max_rel(got, want)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    if not bad:
        return errors
    saved = set(model.state_dict())
    derived = [n for n, b in large.named_buffers() if n not in saved
               and not torch.equal(b, dict(model.named_buffers())[n].to(b.dtype))]
    # --heads grow keeps head_dim, so only --heads fixed can be the cause the hint names
    hint = ("(with --heads fixed, a rotary embedding's frequencies follow head_dim); use --heads grow, which "
            "keeps head_dim" if heads == "fixed" else "; graphscale cannot write this class's widened "
            "model as a checkpoint: widen it in Python (graphscale.widen) instead")
    reason = (f"buffers {derived} are computed by {type(model).__name__} from the config and not stored in "
              f"the checkpoint, and the widened model needs other values {hint}"
              if derived else "the reloaded model computes another function")
    raise HFUpscaleError("the written model does not reproduce it (relative error "
                         + ", ".join(f"{k}: {v:.3g}" for k, v in bad.items())
                         + f", allowed {tol:g}): {reason}")
