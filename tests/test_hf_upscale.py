"""graphscale.hf.upscale / `graphscale upscale`: Hugging Face directories in, Hugging Face directories out.

Each family gets a tiny, sharded, randomly initialised float64 source directory written with
``save_pretrained(max_shard_size=...)``. The upscaled directory must load with ``from_pretrained`` with no
missing, unexpected or mismatched keys, compute the source's logits, and carry a record that rebuilds the
μP optimizer in a fresh process.

Tolerances: GPT-2, GPT-NeoX and BERT compute everything in the weights' dtype: float64, relative <= 1e-10.
Llama and Qwen2 (RMSNorm) compute their norm's variance in float32 whatever the weights' dtype, so the
wide model's mean over twice as many (copied) values rounds differently: relative <= 1e-6 there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from graphscale.cli import main  # noqa: E402
from graphscale.errors import GraphscaleError  # noqa: E402
from graphscale.hf import HFUpscaleError, upscale  # noqa: E402

VOCAB = 128
SHARD = "40KB"  # several shards for every family at these sizes


def _config(family: str):
    tf = transformers
    common = {"vocab_size": VOCAB, "num_hidden_layers": 2, "max_position_embeddings": 32}
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                             architectures=["GPT2LMHeadModel"])
    if family == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                              num_key_value_heads=2, architectures=["LlamaForCausalLM"], **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                              num_key_value_heads=2, architectures=["Qwen2ForCausalLM"], **common)
    if family == "neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, rotary_pct=0.25,
                                architectures=["GPTNeoXForCausalLM"], **common)
    if family == "mixtral":
        return tf.MixtralConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                architectures=["MixtralForCausalLM"], **common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, sliding_window=16,
                                   architectures=["Gemma3ForCausalLM"], **common)
    if family == "bert":
        return tf.BertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             architectures=["BertForMaskedLM"], **common)
    raise AssertionError(family)


def _auto(family: str):
    return transformers.AutoModelForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM


def _make_source(family: str, directory: Path, shard: str = SHARD) -> Path:
    torch.manual_seed(0)
    model = _auto(family).from_config(_config(family), dtype=torch.float64)
    with torch.no_grad():  # default inits leave biases and norms at 0/1: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory, max_shard_size=shard)
    (directory / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (directory / "special_tokens_map.json").write_text("{}")
    assert (directory / "model.safetensors.index.json").is_file() == (shard == SHARD)  # sharded or one file
    return directory


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _load(family: str, directory: Path):
    model, info = _auto(family).from_pretrained(directory, dtype=torch.float64, output_loading_info=True,
                                                attn_implementation="eager")
    return model.eval(), info


# family -> (heads policy, relative tolerance)
EXACT = {
    "gpt2": ("fixed", 1e-10),
    "bert": ("fixed", 1e-10),
    "neox": ("grow", 1e-10),    # heads fixed grows heads too: test_partial_rotary_upscales_with_...
    "llama": ("grow", 1e-6),    # RMSNorm in float32; heads fixed is refused (rotary follows head_dim)
    "qwen2": ("grow", 1e-6),
}


@pytest.fixture(scope="module")
def upscaled(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family, (heads, _) in EXACT.items():
        src = _make_source(family, root / family)
        before = _digest(src)
        dst = upscale(src, multiplier=2, out=root / f"{family}-x2", heads=heads, max_shard_size=SHARD)
        assert _digest(src) == before, f"{family}: the source directory changed"
        out[family] = (src, dst)
    return out


@pytest.mark.parametrize("family", sorted(EXACT))
def test_upscaled_directory_loads_cleanly_and_computes_the_source_logits(upscaled, family):
    src, dst = upscaled[family]
    heads, tol = EXACT[family]
    small, _ = _load(family, src)
    large, info = _load(family, dst)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert len(list(dst.glob("model-*.safetensors"))) > 1 and (dst / "model.safetensors.index.json").is_file()
    assert (dst / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    assert (dst / "special_tokens_map.json").is_file()
    assert sum(p.numel() for p in large.parameters()) > 2 * sum(p.numel() for p in small.parameters())
    cfg_small, cfg_large = small.config, large.config
    assert cfg_large.hidden_size == 2 * cfg_small.hidden_size
    heads_ratio = 2 if heads == "grow" else 1
    assert cfg_large.num_attention_heads == heads_ratio * cfg_small.num_attention_heads
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))
    want, got = _logits(small, ids), _logits(large, ids)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= tol, f"{family}: relative logit error {rel:.3g} > {tol:g}"
    record = json.loads((dst / "graphscale.json").read_text())
    before, after = (json.loads((d / "config.json").read_text()) for d in (src, dst))
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == set(record["info"]["config_changes"]), changed  # nothing but the width fields
    source_config = record["info"]["source_config"]
    assert source_config["model_type"] == cfg_small.model_type
    assert source_config.get("hidden_size", source_config.get("n_embd")) == cfg_small.hidden_size
    fields = {"source", "copy_scale", "total_mult", "fan_in_mult"}
    assert all(fields <= set(p) for p in record["params"].values())


def test_intermediate_size_and_kv_heads_are_rewritten(upscaled):
    src, dst = upscaled["llama"]
    changes = json.loads((dst / "graphscale.json").read_text())["info"]["config_changes"]
    assert changes == {"hidden_size": [32, 64], "intermediate_size": [64, 128], "num_attention_heads": [4, 8],
                       "num_key_value_heads": [2, 4]}, changes


_FRESH = r"""
import sys, torch, transformers, graphscale
for family, dst in zip(sys.argv[1::2], sys.argv[2::2]):
    auto = transformers.AutoModelForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(dst, dtype=torch.float64)
    opt = graphscale.mup_optimizer(model, torch.optim.AdamW, lr=1e-2, record=dst)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    # heads fixed: the query's k**-0.5 is on part of GPT-2's c_attn only, whose rows are stepped as blocks
    # of their own (test_fold_training); every other parameter is in a group as it is
    blockwise = {id(p) for p, _, _ in getattr(opt, "graphscale_blocks", ())}
    assert (family == "gpt2") == bool(blockwise), family
    n_blocks = len(getattr(opt, "graphscale_blocks", ()))
    assert sum(len(g["params"]) for g in opt.param_groups) == \
        len(list(model.parameters())) - len(blockwise) + n_blocks, family
    assert len(lrs) > 1 and min(lrs) < 1e-2, (family, lrs)  # hidden weights get lr/k under μP Adam
    print(family, lrs)
"""


def test_mup_optimizer_from_the_record_in_a_fresh_process(upscaled):
    args = [x for family, (_, dst) in sorted(upscaled.items()) for x in (family, str(dst))]
    run = subprocess.run([sys.executable, "-c", _FRESH, *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert all(f in run.stdout for f in EXACT)


def test_noise_is_reproducible_from_the_seed(tmp_path, capsys):
    src = _make_source("bert", tmp_path / "src", shard="10MB")  # a single model.safetensors this time
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4), ("streamed", 3)):
        argv = ["upscale", str(src), "--multiplier", "2", "--out", str(tmp_path / name), "--noise",
                "gaussian:0.1", "--seed", str(seed), "--max-shard-size", SHARD]
        argv += ["--stream", "--progress"] if name == "streamed" else ["--no-stream"]
        assert main(argv) == 0
        runs[name] = _digest(tmp_path / name)
    captured = capsys.readouterr()
    assert "noise:" in captured.out
    assert "MB/s" in captured.err  # the progress bar, asked for with --progress
    assert runs["a"] == runs["b"]
    # streamed: the same noise draws, tensor by tensor, in the class's parameter order
    _same_files(tmp_path / "a", tmp_path / "streamed")
    weights = [f for f in runs["a"] if f.endswith(".safetensors")]
    assert weights and any(runs["a"][f] != runs["c"][f] for f in weights)


def test_refuses_out_equal_to_or_inside_src(tmp_path):
    src = _make_source("gpt2", tmp_path / "src")
    before = _digest(src)
    for out in (src, src / "wide", tmp_path):
        with pytest.raises(HFUpscaleError, match="source directory"):
            upscale(src, 2, out=out, force=True)
    assert _digest(src) == before


def test_refuses_existing_out_without_force(tmp_path, capsys):
    src = _make_source("gpt2", tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["upscale", str(src), "--out", str(dst)]) == 2
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    from graphscale.cli.files import _host

    stale = tmp_path / f".dst.graphscale-999999999-{_host()}.abcd.tmp"  # a killed run's (pid 999999999)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert main(["upscale", str(src), "--out", str(dst), "--force", "--max-shard-size", SHARD]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "graphscale.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_refuses_auto_map(tmp_path):
    src = _make_source("gpt2", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (src / "config.json").write_text(json.dumps(config))
    (src / "evil.py").write_text("raise SystemExit('code from the directory ran')\n")
    with pytest.raises(GraphscaleError, match="auto_map"):
        upscale(src, 2, out=tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_refusals_name_heads_grow(tmp_path):
    """Heads fixed widens head_dim; Llama's rotary frequencies follow head_dim from the config, which no
    weight can fold. Refused naming --heads grow, and nothing written."""
    src = _make_source("llama", tmp_path / "llama")
    with pytest.raises(GraphscaleError, match="inv_freq.*--heads grow"):
        upscale(src, 2, out=tmp_path / "llama-x2", heads="fixed")
    assert not (tmp_path / "llama-x2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]



def test_reload_refusal_names_heads_grow_only_where_it_would_help(tmp_path):
    """The reload check names --heads grow when a config-derived buffer (inv_freq) differs with heads
    fixed; with heads grow already chosen that hint would send the user in a circle, so it names
    graphscale.widen instead. The check itself refuses in both cases."""
    from graphscale.hf import _check_reload

    src = _make_source("llama", tmp_path / "llama")
    model, _ = _load("llama", src)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    large = copy.deepcopy(model)
    large.model.rotary_emb.inv_freq.mul_(1.5)  # what the checkpoint cannot carry (non-persistent)
    filled = _logits(large, ids)
    for heads, hint, not_hint in (("fixed", "use --heads grow", "graphscale.widen"),
                                  ("grow", "graphscale.widen", "use --heads grow")):
        with pytest.raises(GraphscaleError, match="inv_freq") as e:
            _check_reload(_auto("llama"), src, (ids,), True, torch.float64, filled, None, 1e-10, large, heads)
        assert hint in str(e.value) and not_hint not in str(e.value), str(e.value)

def test_partial_rotary_upscales_with_the_default_heads(tmp_path):
    """GPT-NeoX's head_dim 8 = rotary 2 | pass 6 cannot grow by one multiplier (the size-1 frequency axis
    stays fixed), so the default heads="fixed" grows its heads: the config's head count doubles, and the
    written directory computes the source's logits. Before, a MultiplierError."""
    src = _make_source("neox", tmp_path / "neox")
    dst = upscale(src, 2, out=tmp_path / "neox-x2")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["num_attention_heads"] == 8 and cfg["hidden_size"] == 64
    record = json.loads((dst / "graphscale.json").read_text())
    assert record["info"]["check"]["relative_error"]["the source"] <= 1e-10
    assert any("heads grow instead" in n for n in record["notes"]), record["notes"]


def test_mixtral_upscales_with_experts_and_top_k_fixed(tmp_path):
    """Mixtral's router picks experts with torch.topk over a fixed expert axis (docs/math.md, "Routing"):
    the upscaled sharded directory loads cleanly, keeps the expert count and top-k, widens the residual
    stream and each expert's hidden width, and computes the source's logits (router softmax and RMSNorm
    in float32: relative <= 1e-6). The experts load as batched_mm (grouped_mm has no float64 kernel)."""
    src = _make_source("mixtral", tmp_path / "src")
    before = _digest(src)
    dst = upscale(src, 2, out=tmp_path / "dst", heads="grow", max_shard_size=SHARD)
    assert _digest(src) == before
    models = []
    for d in (src, dst):
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.float64, output_loading_info=True, attn_implementation="eager",
            experts_implementation="batched_mm")
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        models.append(model.eval())
    small, large = models
    assert len(list(dst.glob("model-*.safetensors"))) > 1
    changes = json.loads((dst / "graphscale.json").read_text())["info"]["config_changes"]
    assert changes == {"hidden_size": [32, 64], "intermediate_size": [64, 128], "num_attention_heads": [4, 8],
                       "num_key_value_heads": [2, 4]}, changes  # experts and top-k unchanged
    assert large.config.num_local_experts == 4 and large.config.num_experts_per_tok == 2
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))
    want, got = _logits(small, ids), _logits(large, ids)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-6, f"relative logit error {rel:.3g}"


def test_gemma3_upscales_in_memory_and_streamed_alike(tmp_path):
    """Gemma 3: embed_scale = sqrt(hidden) is a buffer no checkpoint carries, so the larger model keeps its
    own sqrt(64) and the tied embedding takes sqrt(32/64); the readout's 1/2 over that goes into the final
    norm, whose gain is 1 + w: a copy scale 1/sqrt(2) and a shift 1/sqrt(2) - 1 (ParamScaling.shift).
    Before, every Gemma was refused here: the reload found embed_scale back at sqrt(64)."""
    src = _make_source("gemma3", tmp_path / "src")
    mem = upscale(src, 2, out=tmp_path / "mem", heads="grow", max_shard_size=SHARD, stream=False)
    streamed = upscale(src, 2, out=tmp_path / "streamed", heads="grow", max_shard_size=SHARD, stream=True)
    _same_files(mem, streamed)
    params = json.loads((mem / "graphscale.json").read_text())["params"]
    assert params["model.embed_tokens.weight"]["copy_scale"] == pytest.approx(2 ** -0.5, rel=1e-6)
    assert params["model.norm.weight"]["shift"] == pytest.approx(2 ** -0.5 - 1, rel=1e-6)
    small, large = (_load("gemma3", d)[0] for d in (src, mem))
    assert float(large.model.embed_tokens.embed_scale) == pytest.approx(64 ** 0.5)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    want, got = _logits(small, ids), _logits(large, ids)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-6  # RMSNorm in float32


def test_no_consistent_config_is_refused_naming_the_fields():
    """A widening no config field can express (here: the input embedding's vocabulary axis doubled but not
    the readout's, which vocab_size sets together) is refused, naming the tensor and the fields."""
    from graphscale import hf

    config = _config("llama")
    auto = transformers.AutoModelForCausalLM
    target = hf._shapes(auto, config)
    target["model.embed_tokens.weight"] = (2 * VOCAB, 32)
    with pytest.raises(HFUpscaleError, match=r"no consistent config.*embed_tokens\.weight.*vocab_size"):
        hf._rewrite_config(transformers, auto, config, target, 2, "fixed", set())


# ---------------------------------------------------------------------------------------------------------
# streamed upscale (graphscale/hf_stream.py): the same files as the in-memory path, tensor by tensor


def _same_files(a: Path, b: Path) -> None:
    """``b`` has exactly ``a``'s files with the same bytes, but the record, whose params and multipliers
    must be equal (its notes and check figures say how each was made)."""
    da, db = _digest(a), _digest(b)
    assert set(da) == set(db), set(da) ^ set(db)
    differ = sorted(f for f in da if da[f] != db[f] and f != "graphscale.json")
    assert not differ, f"streamed files differ from the in-memory path's: {differ}"
    ra, rb = (json.loads((d / "graphscale.json").read_text()) for d in (a, b))
    assert ra["params"] == rb["params"]
    assert ra["multipliers"] == rb["multipliers"]
    assert rb["info"]["check"]["streamed"] is True


def test_streamed_llama_writes_the_in_memory_bytes(upscaled, tmp_path, monkeypatch):
    """Llama (GQA, heads grow, RMSNorm): every shard, the index and the configs are bitwise the in-memory
    path's. Streaming is chosen here by size (the default, with the threshold at 0 bytes)."""
    from graphscale import hf

    src, dst = upscaled["llama"]
    monkeypatch.setattr(hf, "STREAM_ABOVE", 0)
    out = upscale(src, multiplier=2, out=tmp_path / "llama-x2", heads="grow", max_shard_size=SHARD)
    _same_files(dst, out)
    record = json.loads((out / "graphscale.json").read_text())
    assert set(record["info"]["check"]["relative_error"]) == {"the proxy (layer 0) in memory",
                                                              "layer 1 read back"}


def test_streamed_models_hold_one_wide_tensor_at_a_time(upscaled, tmp_path, monkeypatch):
    """What bounds the streamed path's memory by a few wide tensors, not by a wide layer (README: peak RSS
    of upscale): the one-layer wide proxy that widen_into fills and checks 1 and 2 read, and both
    models of the last-layer check, hold no layer. Every parameter of theirs is made by an OnUse only while
    an op reads it, one op's parameters at a time (Llama: one parameter per op), and after widen_into the
    wide proxy's parameters hold one element each. The files are still bitwise the in-memory path's."""
    from graphscale import hf
    from graphscale.on_use import OnUse

    src, dst = upscaled["llama"]
    made: list[OnUse] = []
    wide_proxy: list[torch.nn.Module] = []
    init, widen_loaded = OnUse.__init__, hf._widen_loaded

    def spy_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    def spy_widen(*args, **kwargs):
        w = widen_loaded(*args, **kwargs)
        wide_proxy.append(w.large)
        return w

    # a streamed tensor (written, or compared in check 2) is gone before any parameter is made: check 2
    # compares the two by digest, not side by side
    from graphscale import hf_stream

    streamed: list[weakref.ref] = []
    overlaps: list[int] = []
    widen_one, value = hf_stream._widen_one, OnUse.value

    def spy_widen_one(*args, **kwargs):
        t = widen_one(*args, **kwargs)
        streamed.append(weakref.ref(t))
        return t

    def spy_value(self, param):
        overlaps.extend(i for i, r in enumerate(streamed) if r() is not None)
        return value(self, param)

    monkeypatch.setattr(OnUse, "__init__", spy_init)
    monkeypatch.setattr(OnUse, "value", spy_value)
    monkeypatch.setattr(hf_stream, "_widen_one", spy_widen_one)
    monkeypatch.setattr(hf, "_widen_loaded", spy_widen)
    out = upscale(src, 2, out=tmp_path / "llama-x2", heads="grow", stream=True, max_shard_size=SHARD)
    _same_files(dst, out)
    assert streamed and not overlaps
    assert len(made) == 3  # the wide proxy; the last layer's narrow and wide models (check 3)
    for on_use in made:
        assert on_use.made > 0 and 0 < on_use.peak_bytes <= on_use.largest_bytes
    (large,) = wide_proxy
    params = list(large.parameters())
    assert params and all(p.untyped_storage().nbytes() == p.element_size() for p in params)
    layer = sum(p.nbytes for p in large.model.layers[0].parameters())
    assert made[0].largest_bytes < layer  # one op's tensors are less than a layer's


def test_streamed_writing_overlaps_within_one_tensors_memory(upscaled, tmp_path, monkeypatch):
    """The writer thread writes while the next tensors are widened (with a slow disk, widening runs ahead of
    it), but a tensor is widened only while the wide tensors waiting to be written plus its own work
    (source, cast, wide bytes) fit in the largest single tensor's work: writing holds no more memory than
    writing one tensor at a time would. The files are still bitwise the in-memory path's."""
    import time

    from graphscale import hf_stream

    src, dst = upscaled["llama"]
    alive: list[tuple[weakref.ref, int]] = []  # wide tensors of the write phase, with their bytes
    held: list[tuple[int, int]] = []  # at each tensor widened: the waiting wide tensors' bytes, its work
    works: list[int] = []
    widen_one, pwrite_all = hf_stream._widen_one, hf_stream._pwrite_all
    write_weights = hf_stream._write_weights

    def spy_write_weights(tmp, items, *args, **kwargs):
        works.extend(hf_stream._work_nbytes(i) for i in items)
        return write_weights(tmp, items, *args, **kwargs)

    def spy_widen_one(item, rows=None):
        if works and rows is None:  # the write phase (check 2's calls come before it)
            waiting = sum(n for r, n in alive if r() is not None)
            held.append((waiting, hf_stream._work_nbytes(item)))
            t = widen_one(item, rows)
            alive.append((weakref.ref(t), t.nbytes))
            return t
        return widen_one(item, rows)

    def slow_pwrite_all(fd, data, offset):
        time.sleep(0.02)
        pwrite_all(fd, data, offset)

    monkeypatch.setattr(hf_stream, "_write_weights", spy_write_weights)
    monkeypatch.setattr(hf_stream, "_widen_one", spy_widen_one)
    monkeypatch.setattr(hf_stream, "_pwrite_all", slow_pwrite_all)
    out = upscale(src, 2, out=tmp_path / "llama-x2", heads="grow", stream=True, max_shard_size=SHARD)
    _same_files(dst, out)
    assert len(held) == len(works)
    assert max(waiting + work for waiting, work in held) <= max(works)
    assert any(waiting > 0 for waiting, _ in held)  # it does overlap: widened while another waits
    record = json.loads((out / "graphscale.json").read_text())
    assert set(record["info"]["stream"]["write_seconds"]) == {"read and widen", "waiting for the writer",
                                                               "pwrite", "free", "fsync"}


_KILLED = r"""
import sys, time
from pathlib import Path
import graphscale.hf_stream as hs

marker, argv = Path(sys.argv[1]), sys.argv[2:]
widen_one, calls = hs._widen_one, []

def slow(item, rows=None):  # two tensors written, then wait to be killed mid-write
    if any(p.name.startswith(".out.graphscale-") for p in marker.parent.iterdir()):  # not check 2's calls
        calls.append(item)
    if len(calls) == 3:
        marker.write_text("writing")
        time.sleep(300)
    return widen_one(item, rows)

hs._widen_one = slow
from graphscale.cli import main
sys.exit(main(argv))
"""


def test_streamed_run_killed_mid_write_leaves_no_corrupt_out_and_restarts(upscaled, tmp_path, monkeypatch,
                                                                            capsys):
    """SIGKILL (a child process) and SIGTERM (this process, through the CLI's handler) while the shards are
    half written: DST_DIR is never touched (an existing one keeps its files), SIGTERM removes the temporary
    directory and exits 143, SIGKILL leaves it, and the next run removes it and writes the same bytes as
    the in-memory path (GPT-2: heads fixed, the query's 2**-0.5 folded into fused q|k|v rows, tied
    readout)."""
    import os
    import signal
    import time

    from graphscale import hf_stream

    src, dst = upscaled["gpt2"]
    killed, termed = tmp_path / "KILL", tmp_path / "TERM"
    killed.mkdir()
    termed.mkdir()
    out = killed / "out"
    out.mkdir()  # an existing DST_DIR replaced with --force must survive the kill
    (out / "keep.txt").write_text("old")
    argv = ["upscale", str(src), "--out", str(out), "--stream", "--force", "--max-shard-size", SHARD]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    child = subprocess.Popen([sys.executable, "-c", _KILLED, str(killed / "marker"), *argv], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        widen_one, calls = hf_stream._widen_one, []

        def terminate(item, rows=None):  # two tensors written, then SIGTERM to this process
            if any(p.name.startswith(".out.graphscale-") for p in termed.iterdir()):  # the write phase
                calls.append(item)
            if len(calls) == 3:
                temps = [p for p in termed.iterdir() if p.name.startswith(".out.graphscale-")]
                assert len(temps) == 1 and any(p.suffix == ".safetensors" for p in temps[0].iterdir())
                os.kill(os.getpid(), signal.SIGTERM)
            return widen_one(item, rows)

        monkeypatch.setattr(hf_stream, "_widen_one", terminate)
        assert main(["upscale", str(src), "--out", str(termed / "out"), "--stream", "--max-shard-size",
                     SHARD]) == 143
        assert "SIGTERM" in capsys.readouterr().err
        assert len(calls) == 3 and list(termed.iterdir()) == []  # no DST_DIR, no temporary directory
        monkeypatch.undo()

        deadline = time.monotonic() + 600
        while not (killed / "marker").exists():
            assert child.poll() is None, child.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the child never started writing"
            time.sleep(0.2)
        temps = [p for p in killed.iterdir() if p.name.startswith(".out.graphscale-")]
        assert len(temps) == 1 and any(p.suffix == ".safetensors" for p in temps[0].iterdir())  # mid-write
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert len([p for p in killed.iterdir() if p.name.startswith(".out.graphscale-")]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    rerun = upscale(src, multiplier=2, out=out, force=True, stream=True, max_shard_size=SHARD)
    assert not [p for p in killed.iterdir() if p.name.startswith(".")]  # the killed run's directory removed
    _same_files(dst, rerun)


@pytest.mark.parametrize("key", ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"])
def test_streamed_refuses_a_recipe_that_differs_from_the_proxy(upscaled, tmp_path, monkeypatch, key):
    """Check 2: a tensor the one-layer proxy holds (an embedding, read only its first rows since the proxy's
    vocabulary is cut, or a layer-0 weight) whose streamed recipe is off by one rounding step of its copy
    scale is refused before anything is written, naming the tensor."""
    from dataclasses import replace

    from graphscale import hf_stream

    src, _ = upscaled["llama"]
    items = hf_stream._items

    def off_by_one_step(*args, **kwargs):
        out = items(*args, **kwargs)
        return [replace(i, widen_scale=math.nextafter(i.widen_scale, 2.0)) if i.key == key else i
                for i in out]

    monkeypatch.setattr(hf_stream, "_items", off_by_one_step)
    with pytest.raises(HFUpscaleError, match=re.escape(key) + ".*other values than widen_into"):
        upscale(src, 2, out=tmp_path / "dst", heads="grow", stream=True, max_shard_size=SHARD)
    assert not (tmp_path / "dst").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_streamed_neox_reads_and_writes_renamed_keys_as_transformers_does(upscaled, tmp_path):
    """GPT-NeoX stores its readout as embed_out.weight, which transformers renames to lm_head on load and
    back on save: the streamed path reads and writes through the same renamings, so its files are bitwise
    the in-memory path's (keys, order, shards, index)."""
    src, dst = upscaled["neox"]
    assert "embed_out.weight" in json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    out = upscale(src, 2, out=tmp_path / "neox-x2", heads="grow", stream=True, max_shard_size=SHARD)
    _same_files(dst, out)


def test_streamed_refuses_a_checkpoint_that_loads_by_merging_tensors(tmp_path):
    """Mixtral's checkpoint keeps one tensor per expert, which transformers merges into the class's fused
    expert tensors on load: not one tensor at a time, so the streamed path refuses, naming a key and
    --no-stream (the in-memory path upscales it: test_mixtral_upscales_with_experts_and_top_k_fixed)."""
    src = _make_source("mixtral", tmp_path / "src")
    with pytest.raises(HFUpscaleError, match=r"experts.*converted on load.*--no-stream"):
        upscale(src, 2, out=tmp_path / "dst", heads="grow", stream=True)
    assert not (tmp_path / "dst").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------------------
# models built without a random init (graphscale.hf._build), as the proxy and the filled model are


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox", "mixtral", "bert"])
def test_a_model_built_without_init_and_loaded_equals_the_class_built_normally(family):
    """A model built by ``_build`` (weights left as torch.empty), loaded with every stored tensor of one
    built normally, and finished by ``_initialize_rest``, holds bitwise the normal model's parameters and
    buffers, non-persistent ones included (rotary frequencies, position ids), with the same ties. With
    nothing written, ``_initialize_rest`` gives every tensor the class's init (finite, not empty memory)."""
    from graphscale import hf

    auto, config = _auto(family), _config(family)
    torch.manual_seed(0)
    normal = auto.from_config(config, dtype=torch.float64, **hf._IMPL).eval()

    def named(m):
        return [*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False)]

    def ties(m):
        first: dict[int, str] = {}
        return sorted((n, first.setdefault(id(t), n)) for n, t in named(m))

    built = hf._build(auto, config, torch.float64)
    assert ties(built) == ties(normal)
    stored = normal.state_dict()
    written: set[int] = set()
    with torch.no_grad():
        for n, t in named(built):
            if n in stored and id(t) not in written:
                t.copy_(stored[n])
                written.add(id(t))
    hf._initialize_rest(built, written)
    want = dict(named(normal))
    for n, t in named(built):
        assert torch.equal(t, want[n]), n
    assert not any(hasattr(o, "_is_hf_initialized") for o in [*built.modules(), *built.parameters()])

    empty = hf._build(auto, config, torch.float64)
    hf._initialize_rest(empty, set())
    for n, t in named(empty):
        w = want[n]
        if n not in stored or not t.is_floating_point() or w.numel() < 16 or w.std() == 0:
            assert torch.equal(t, w), n  # computed (non-persistent buffers) or constant (norm gains, biases)
        else:  # drawn: the class's distribution
            assert abs(t.std() - w.std()) <= 0.3 * w.std() and abs(t.mean()) <= 0.3 * w.std() + 1e-3, n


def test_an_init_that_ignores_the_flags_is_refused(monkeypatch):
    """A class whose init writes a tensor graphscale has set (ignoring transformers' _is_hf_initialized) is
    refused, naming the tensor, rather than leaving a weight graphscale did not compute."""
    from graphscale import hf

    auto, config = _auto("llama"), _config("llama")
    built = hf._build(auto, config, torch.float64)
    written = {id(p) for p in built.parameters()}  # the rotary buffers are left to the init

    def careless(self, module):  # from a module that is initialized (it holds the unwritten rotary buffers)
        if module is built:
            module.get_input_embeddings().weight.normal_()

    monkeypatch.setattr(type(built), "_init_weights", careless)
    with pytest.raises(HFUpscaleError, match=r"overwrote \['model\.embed_tokens\.weight'\]"):
        hf._initialize_rest(built, written)
