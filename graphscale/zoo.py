"""Built-in example models: small, seeded, float32, each returned as ``(model, example_inputs)``.

``example_inputs`` is always a tuple of positional inputs, so ``model(*example_inputs)`` runs. Every
builder takes its width arguments, so the same architecture can be built at two widths (``n`` and ``2n``)
for comparisons; the example inputs depend only on the seed and the fixed sizes, not on the width, so
both widths get the same inputs. Builders are deterministic (seeded inside a forked RNG, so the caller's
global RNG state is untouched) and give every tensor a non-trivial value: biases, norm gains/shifts and
BatchNorm running statistics are random rather than 0/1, so equivalence checks exercise every parameter.

Hugging Face builders (``hf_*``) construct models from small configs (no weights are downloaded), need
``pip install 'graphscale[hf]'``, and are wrapped in :class:`HFWrapper` so that ``model(input_ids)``
returns a plain tensor.

Example:
    >>> model, inputs = EXAMPLES["mlp"]()
    >>> model(*inputs).shape
    torch.Size([4, 10])
    >>> model, inputs = load_model_spec("gpt")
    >>> model(*inputs).shape
    torch.Size([2, 8, 65])
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphscale.errors import ModelSpecError

__all__ = [
    "EXAMPLES",
    "GPT",
    "HFWrapper",
    "gpt",
    "gpt_sdpa",
    "hf_bert",
    "hf_from_config",
    "hf_gpt2",
    "hf_llama",
    "load_model_spec",
    "mha_model",
    "mlp",
    "resnet_cnn",
]

Example = tuple[nn.Module, tuple[Any, ...]]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[torch.Generator]:
    """Seed torch's global RNG inside a fork (restored on exit) and yield a generator with the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def _input_gen(seed: int) -> torch.Generator:
    """A generator for example inputs, separate from the weights' so inputs do not depend on the width."""
    return torch.Generator().manual_seed(seed + 7919)


def _randomize_affine_(model: nn.Module, gen: torch.Generator, std: float = 0.1) -> None:
    """Give biases and norm affine parameters non-trivial values (their defaults are 0 and 1)."""
    with torch.no_grad():
        for module in model.modules():
            is_norm = "Norm" in type(module).__name__  # nn.LayerNorm, BatchNorm*d, HF's RMSNorm classes
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.copy_(torch.randn(bias.shape, generator=gen) * std)
            weight = getattr(module, "weight", None)
            if is_norm and isinstance(weight, nn.Parameter) and weight.dim() == 1:
                weight.copy_(1.0 + torch.randn(weight.shape, generator=gen) * std)


# ---------------------------------------------------------------------------------------------------------
# MLP


def mlp(widths: tuple[int, ...] = (50, 100, 200), d_in: int = 16, d_out: int = 10, seed: int = 0) -> Example:
    """An MLP with non-uniform hidden widths, alternating ReLU and GELU.

    Returns ``(model, (x,))`` with ``x`` of shape ``(4, d_in)``; output ``(4, d_out)``.

    Example:
        >>> model, (x,) = mlp(widths=(8, 16))
        >>> model(x).shape
        torch.Size([4, 10])
    """
    if not widths:
        raise ValueError("mlp needs at least one hidden width")
    with _seeded(seed):
        layers: list[nn.Module] = []
        fan_in = d_in
        for i, w in enumerate(widths):
            layers += [nn.Linear(fan_in, w), nn.ReLU() if i % 2 == 0 else nn.GELU()]
            fan_in = w
        layers.append(nn.Linear(fan_in, d_out))
        model = nn.Sequential(*layers)
        x = torch.randn(4, d_in, generator=_input_gen(seed))
    return model.eval(), (x,)


# ---------------------------------------------------------------------------------------------------------
# ResNet-style CNN


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual; a strided 1x1 conv+BN projection when the shape changes.
    ``groups`` splits the second conv into channel groups (ResNeXt-style)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False, groups=groups)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCNN(nn.Module):
    """Stem conv+BN+ReLU, residual blocks (the last one strided with doubled channels), pool, linear head."""

    def __init__(self, channels: int = 16, blocks: int = 2, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        layers = [BasicBlock(channels, channels) for _ in range(blocks - 1)]
        layers.append(BasicBlock(channels, 2 * channels, stride=2))
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.layers(self.stem(x)))))


def resnet_cnn(channels: int = 16, blocks: int = 2, num_classes: int = 10, image: int = 8,
               seed: int = 0) -> Example:
    """A small ResNet for ``(B, 1, image, image)`` inputs (like scikit-learn's 8x8 digits), in eval mode.

    ``blocks - 1`` identity blocks at ``channels`` are followed by one strided block to ``2 * channels``
    with a 1x1 conv+BN projection shortcut. BatchNorm running statistics are filled by a few train-mode
    forwards on random data, so they are not the trivial 0/1. Returns ``(model, (x,))``, ``x`` of shape
    ``(4, 1, image, image)``.

    Example:
        >>> model, (x,) = resnet_cnn(channels=8)
        >>> model(x).shape
        torch.Size([4, 10])
    """
    if blocks < 1:
        raise ValueError("resnet_cnn needs blocks >= 1")
    with _seeded(seed) as gen:
        model = ResNetCNN(channels, blocks, num_classes)
        _randomize_affine_(model, gen)
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(16, 1, image, image, generator=gen) + 0.5)
        x = torch.randn(4, 1, image, image, generator=_input_gen(seed))
    return model.eval(), (x,)


# ---------------------------------------------------------------------------------------------------------
# GPT (nanoGPT style, written so that torch.fx can trace it)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused ``c_attn`` projection.

    ``attention="manual"`` computes ``softmax(mask(q @ k^T * scale)) @ v`` with the causal mask stored as
    the buffer ``bias`` of shape ``(1, 1, block_size, block_size)``; ``attention="sdpa"`` calls
    ``F.scaled_dot_product_attention(..., is_causal=True)``. The scale is ``1/sqrt(head_dim)`` (for SDPA the
    default ``scale=None``), or ``1/head_dim`` with ``mup_attention=True``; it is computed from Python ints,
    so it is a literal in a traced graph, as are ``n_head`` and ``n_embd`` in the ``split``/``view`` calls.
    """

    def __init__(self, n_embd: int, n_head: int, block_size: int, bias: bool, mup_attention: bool,
                 attention: str) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        if attention not in ("manual", "sdpa"):
            raise ValueError(f"attention must be 'manual' or 'sdpa', got {attention!r}")
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head = n_head
        self.n_embd = n_embd
        self.head_dim = n_embd // n_head
        self.attention = attention
        self.mup_attention = mup_attention
        if attention == "manual":
            mask = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
            self.register_buffer("bias", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.size(0)
        T = x.size(1)
        C = self.n_embd
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.attention == "sdpa":
            scale = 1.0 / self.head_dim if self.mup_attention else None
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            scale = 1.0 / self.head_dim if self.mup_attention else 1.0 / math.sqrt(self.head_dim)
            att = (q @ k.transpose(-2, -1)) * scale
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class GPTMLP(nn.Module):
    """``c_proj(gelu(c_fc(x)))`` with a 4x hidden width."""

    def __init__(self, n_embd: int, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class GPTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, bias: bool, mup_attention: bool,
                 attention: str) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, bias, mup_attention, attention)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = GPTMLP(n_embd, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A GPT-2 style decoder (after nanoGPT) with the readout weight tied to the token embedding, no dropout.

    ``forward(idx)`` maps ``(B, T)`` token ids to ``(B, T, vocab)`` logits. Traceable with
    ``torch.fx.symbolic_trace`` for ``attention="sdpa"``; the manual-attention variant slices its mask
    buffer by the traced length, which needs a tracer with ``proxy_buffer_attributes = True``.
    """

    def __init__(self, vocab: int = 65, block_size: int = 32, n_layer: int = 2, n_head: int = 4,
                 n_embd: int = 64, mup_attention: bool = False, bias: bool = True,
                 attention: str = "manual") -> None:
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([GPTBlock(n_embd, n_head, block_size, bias, mup_attention, attention)
                             for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd, bias=bias),
        ))
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def _init_gpt_(model: GPT, gen: torch.Generator) -> None:
    proj_std = 0.02 / math.sqrt(2 * len(model.transformer.h))  # nanoGPT's scaled residual projections
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = proj_std if name.endswith("c_proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    _randomize_affine_(model, gen)


def gpt(vocab: int = 65, block_size: int = 32, n_layer: int = 2, n_head: int = 4, n_embd: int = 64,
        mup_attention: bool = False, bias: bool = True, seed: int = 0) -> Example:
    """A hand-written GPT-2 style model with manual causal attention (see :class:`GPT`).

    Returns ``(model, (idx,))`` with ``idx`` a ``(2, 8)`` long tensor; output ``(2, 8, vocab)``.

    Example:
        >>> model, (idx,) = gpt(n_embd=32)
        >>> model(idx).shape
        torch.Size([2, 8, 65])
    """
    return _build_gpt(vocab, block_size, n_layer, n_head, n_embd, mup_attention, bias, seed, "manual")


def gpt_sdpa(vocab: int = 65, block_size: int = 32, n_layer: int = 2, n_head: int = 4, n_embd: int = 64,
             mup_attention: bool = False, bias: bool = True, seed: int = 0) -> Example:
    """Like :func:`gpt` but attention is ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``.

    The scale is SDPA's default (``scale=None``, i.e. ``1/sqrt(head_dim)``), or ``1/head_dim`` with
    ``mup_attention=True``. The model has no mask buffer and traces with plain ``torch.fx.symbolic_trace``.

    Example:
        >>> model, (idx,) = gpt_sdpa(n_embd=32)
        >>> model(idx).shape
        torch.Size([2, 8, 65])
    """
    return _build_gpt(vocab, block_size, n_layer, n_head, n_embd, mup_attention, bias, seed, "sdpa")


def _build_gpt(vocab: int, block_size: int, n_layer: int, n_head: int, n_embd: int, mup_attention: bool,
               bias: bool, seed: int, attention: str) -> Example:
    with _seeded(seed) as gen:
        model = GPT(vocab, block_size, n_layer, n_head, n_embd, mup_attention, bias, attention)
        _init_gpt_(model, gen)
        idx = torch.randint(0, vocab, (2, min(8, block_size)), generator=_input_gen(seed))
    return model.eval(), (idx,)


# ---------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention


class MHAModel(nn.Module):
    """Embedding, one ``nn.MultiheadAttention`` self-attention block, LayerNorm, MLP, linear readout."""

    def __init__(self, d: int = 32, heads: int = 4, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.readout = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = self.ln(x)
        x = x + self.mlp(x)
        return self.readout(x)


def mha_model(d: int = 32, heads: int = 4, vocab: int = 50, seed: int = 0) -> Example:
    """A model built around ``nn.MultiheadAttention(batch_first=True)`` (see :class:`MHAModel`).

    Returns ``(model, (idx,))`` with ``idx`` a ``(2, 8)`` long tensor; output ``(2, 8, vocab)``.

    Example:
        >>> model, (idx,) = mha_model(d=16)
        >>> model(idx).shape
        torch.Size([2, 8, 50])
    """
    with _seeded(seed) as gen:
        model = MHAModel(d, heads, vocab)
        _randomize_affine_(model, gen)
        idx = torch.randint(0, vocab, (2, 8), generator=_input_gen(seed))
    return model.eval(), (idx,)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face transformers (5.x)


def transformers_module() -> Any:
    """The ``transformers`` package, or a ModelSpecError saying how to install it (the ``hf`` extra)."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModelSpecError(
            "Hugging Face models need the 'transformers' package: pip install 'graphscale[hf]'") from e
    return transformers


class HFWrapper(nn.Module):
    """Makes a Hugging Face model callable as ``wrapper(input_ids) -> tensor``.

    Calls ``model(input_ids=input_ids, ...)`` (with ``use_cache=False`` for causal LMs) and returns the
    output's ``logits`` if it has them, else ``last_hidden_state``. ``torch.export.export(wrapper, (ids,),
    strict=False)`` captures it.

    Example:
        >>> model, (ids,) = hf_gpt2()  # doctest: +SKIP
        >>> isinstance(model, HFWrapper), model(ids).shape  # doctest: +SKIP
        (True, torch.Size([1, 8, 100]))
    """

    def __init__(self, model: nn.Module, causal: bool) -> None:
        super().__init__()
        self.model = model
        self.causal = causal

    @property
    def config(self) -> Any:
        """The wrapped model's ``PretrainedConfig``."""
        return self.model.config

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.causal:
            out = self.model(input_ids=input_ids, use_cache=False)
        else:
            out = self.model(input_ids=input_ids)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state


_HF_ATTN = "sdpa"  # eager works too; sdpa is transformers' default and exports to one ATen op per layer


def _hf_build(config: Any, kind: str, seed: int, attn_implementation: str = _HF_ATTN,
              seq: int = 8) -> Example:
    """Build, seed and wrap an HF model from ``config``; ``kind`` is ``causal``, ``masked`` or ``base``."""
    tf = transformers_module()
    auto = {"causal": tf.AutoModelForCausalLM, "masked": tf.AutoModelForMaskedLM, "base": tf.AutoModel}[kind]
    with _seeded(seed) as gen:
        # never run Python from a config's directory (an auto_map): refuse rather than ask [y/N]
        model = auto.from_config(config, attn_implementation=attn_implementation, trust_remote_code=False)
        _randomize_affine_(model, gen)
        ids = torch.randint(0, config.vocab_size, (1, seq), generator=_input_gen(seed))
    model = model.float().eval()
    return HFWrapper(model, causal=kind == "causal").eval(), (ids,)


def hf_gpt2(n_embd: int = 64, n_head: int = 4, n_layer: int = 2, vocab: int = 100, n_positions: int = 64,
            attn_implementation: str = _HF_ATTN, seed: int = 0) -> Example:
    """A small randomly initialised HF ``GPT2LMHeadModel`` (tied readout), wrapped to return logits.

    Returns ``(HFWrapper, (input_ids,))`` with ``input_ids`` of shape ``(1, 8)``.

    Example:
        >>> model, (ids,) = hf_gpt2()  # doctest: +SKIP
        >>> model(ids).shape  # doctest: +SKIP
        torch.Size([1, 8, 100])
    """
    tf = transformers_module()
    config = tf.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                           n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                           bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    return _hf_build(config, "causal", seed, attn_implementation)


def hf_llama(hidden: int = 64, intermediate: int = 128, heads: int = 4, kv_heads: int = 2, layers: int = 2,
             vocab: int = 100, attn_implementation: str = _HF_ATTN, seed: int = 0) -> Example:
    """A small HF ``LlamaForCausalLM`` with grouped-query attention (``kv_heads < heads``), RoPE, RMSNorm.

    Returns ``(HFWrapper, (input_ids,))`` with ``input_ids`` of shape ``(1, 8)``; output ``(1, 8, vocab)``.

    Example:
        >>> model, (ids,) = hf_llama()  # doctest: +SKIP
        >>> model(ids).shape  # doctest: +SKIP
        torch.Size([1, 8, 100])
    """
    tf = transformers_module()
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            max_position_embeddings=64, use_cache=False, tie_word_embeddings=False)
    return _hf_build(config, "causal", seed, attn_implementation)


def hf_bert(hidden: int = 64, intermediate: int = 128, heads: int = 4, layers: int = 2, vocab: int = 100,
            attn_implementation: str = _HF_ATTN, seed: int = 0) -> Example:
    """A small HF ``BertForMaskedLM`` (tied MLM decoder), wrapped to return ``(1, 8, vocab)`` logits.

    A masked-LM head is used rather than the bare encoder so that the hidden size is not a model output
    (an output axis is fixed) and can be widened.

    Example:
        >>> model, (ids,) = hf_bert()  # doctest: +SKIP
        >>> model(ids).shape  # doctest: +SKIP
        torch.Size([1, 8, 100])
    """
    tf = transformers_module()
    config = tf.BertConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=64,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _hf_build(config, "masked", seed, attn_implementation)


def hf_from_config(path: str | Path, seed: int = 0, attn_implementation: str = _HF_ATTN) -> Example:
    """Build a randomly initialised HF model from a config JSON file or a directory with ``config.json``.

    The model class follows ``config.architectures``: ``...ForCausalLM``/``...LMHeadModel`` builds
    ``AutoModelForCausalLM``, ``...ForMaskedLM`` builds ``AutoModelForMaskedLM``; without ``architectures``,
    an encoder type that has a masked-LM class (BERT, RoBERTa, ...) builds a masked LM and anything else a
    causal LM; if that fails, the base ``AutoModel`` (which returns ``last_hidden_state``) is tried. No
    weights are downloaded, and no Python from the config's directory runs: a config with an ``auto_map``
    (custom code) is refused with :class:`~graphscale.errors.ModelSpecError`, and transformers is called
    with ``trust_remote_code=False``.

    Example:
        >>> model, (ids,) = hf_from_config("configs/tiny-llama/")  # doctest: +SKIP
    """
    tf = transformers_module()
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelSpecError(f"{p} is a directory without a config.json")
        file = p / "config.json"
    elif p.is_file():
        file = p
    else:
        raise ModelSpecError(f"HF config {str(path)!r} is neither a JSON file nor a directory "
                             "with config.json")
    refuse_remote_code(file)
    try:
        config = tf.AutoConfig.from_pretrained(str(p), trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:  # unknown model_type, malformed JSON, ...
        detail = " ".join(str(e).split())[:300]
        raise ModelSpecError(f"HF config {file}: transformers cannot read it ({detail})") from e
    named = architecture_kind(config)
    if named is not None:
        kinds = [named]
    elif _is_encoder(config):
        kinds = ["masked", "base"]
    else:
        kinds = ["causal", "base"]
    if "causal" in kinds and hasattr(config, "use_cache"):
        config.use_cache = False
    errors = []
    for kind in kinds:
        try:
            return _hf_build(config, kind, seed, attn_implementation)
        except (ValueError, KeyError) as e:  # no model class of this kind for the config type
            errors.append(f"{kind}: {e}")
    raise ModelSpecError(f"cannot build a model from {path}: " + "; ".join(errors))


def architecture_kind(config: Any) -> str | None:
    """``"causal"`` or ``"masked"`` when ``config.architectures`` names a causal or masked LM class
    (``...ForCausalLM``/``...LMHeadModel``, ``...ForMaskedLM``), else ``None``."""
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "ForCausalLM" in archs or "LMHeadModel" in archs:
        return "causal"
    if "ForMaskedLM" in archs:
        return "masked"
    return None


def refuse_remote_code(file: Path) -> None:
    """Refuse a config that asks transformers to import Python from its directory (``auto_map``)."""
    import json

    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelSpecError(f"HF config {file}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ModelSpecError(f"HF config {file}: expected a JSON object, got {type(data).__name__}")
    if "auto_map" in data:
        raise ModelSpecError(
            f"HF config {file} has an 'auto_map': it asks to run Python code from its directory (custom "
            f"model classes {sorted(data['auto_map'])}); graphscale never runs code from a config directory. "
            "Use a config whose model_type transformers ships, or build the model in a file.py:callable "
            "spec you have read.")


def _is_encoder(config: Any) -> bool:
    """True for a config type with a masked-LM head class that is not configured as a decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


# ---------------------------------------------------------------------------------------------------------
# Registry and specs


EXAMPLES: dict[str, Callable[..., Example]] = {
    "mlp": mlp,
    "cnn": resnet_cnn,
    "gpt": gpt,
    "gpt-sdpa": gpt_sdpa,
    "mha": mha_model,
    "hf-gpt2": hf_gpt2,
    "hf-llama": hf_llama,
    "hf-bert": hf_bert,
}


def load_model_spec(spec: str) -> Example:
    """Build ``(model, example_inputs)`` from a model spec string; kept here for existing callers.

    The command line's spec loading lives in :func:`graphscale.cli.spec.load_model_spec`, which this calls:
    a built-in name (optionally ``name:key=value,...``), ``path/to/file.py:callable`` (**the file is
    executed**) or ``package.module:callable``.

    Example:
        >>> model, inputs = load_model_spec("mlp")
        >>> type(model).__name__, len(inputs)
        ('Sequential', 1)
    """
    from graphscale.cli.spec import load_model_spec as load

    return load(spec)
