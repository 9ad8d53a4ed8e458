"""The built-in example models: they run, are deterministic, trace (fx) or export (torch.export), and
build at two widths with the same inputs; model specs resolve or fail with a clear error."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.fx

from graphscale import zoo
from graphscale.errors import GraphscaleError, ModelSpecError

# builder, narrow width kwargs, wide width kwargs
WIDTHS = {
    "mlp": (zoo.mlp, dict(widths=(8, 16)), dict(widths=(16, 32))),
    "cnn": (zoo.resnet_cnn, dict(channels=8), dict(channels=16)),
    "gpt": (zoo.gpt, dict(n_embd=32), dict(n_embd=64)),
    "gpt-sdpa": (zoo.gpt_sdpa, dict(n_embd=32), dict(n_embd=64)),
    "mha": (zoo.mha_model, dict(d=16), dict(d=32)),
    "hf-gpt2": (zoo.hf_gpt2, dict(n_embd=32), dict(n_embd=64)),
    "hf-llama": (zoo.hf_llama, dict(hidden=32, intermediate=64), dict(hidden=64, intermediate=128)),
    "hf-bert": (zoo.hf_bert, dict(hidden=32, intermediate=64), dict(hidden=64, intermediate=128)),
}
FX_MODELS = ["mlp", "cnn", "gpt", "gpt-sdpa", "mha"]
HF_MODELS = ["hf-gpt2", "hf-llama", "hf-bert"]


class ProxyBufferTracer(torch.fx.Tracer):
    """Buffers become graph values, so ``bias[:, :, :T, :T]`` slices by the traced length."""

    proxy_buffer_attributes = True


def _needs_hf(name: str) -> None:
    if name.startswith("hf-"):
        pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def built() -> dict:
    """Each example built once at its default size (HF builds are the slow part of this file)."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = zoo.EXAMPLES[name]()
        return cache[name]

    return get


def test_registry_names() -> None:
    assert set(zoo.EXAMPLES) == set(WIDTHS)


@pytest.mark.parametrize("name", list(WIDTHS))
def test_forward_deterministic_and_rng_neutral(name: str, built) -> None:
    _needs_hf(name)
    model, inputs = built(name)
    assert isinstance(inputs, tuple) and not model.training
    with torch.no_grad():
        out = model(*inputs)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and torch.isfinite(out).all()
    state = torch.random.get_rng_state()
    model2, inputs2 = zoo.EXAMPLES[name]()
    assert torch.equal(state, torch.random.get_rng_state())  # builders do not touch the global RNG
    with torch.no_grad():
        assert torch.equal(model2(*inputs2), out)


@pytest.mark.parametrize("name", list(WIDTHS))
def test_two_widths_share_inputs(name: str) -> None:
    _needs_hf(name)
    builder, narrow_kw, wide_kw = WIDTHS[name]
    narrow, inputs_n = builder(**narrow_kw)
    wide, inputs_w = builder(**wide_kw)
    assert all(torch.equal(a, b) for a, b in zip(inputs_n, inputs_w))
    n_params = sum(p.numel() for p in narrow.parameters())
    assert sum(p.numel() for p in wide.parameters()) > n_params
    with torch.no_grad():
        assert narrow(*inputs_n).shape == wide(*inputs_w).shape


@pytest.mark.parametrize("name", FX_MODELS)
def test_fx_trace_matches(name: str, built) -> None:
    model, inputs = built(name)
    gm = torch.fx.GraphModule(model, ProxyBufferTracer().trace(model))
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=0, atol=0)


def test_manual_attention_traces_only_with_proxied_buffers() -> None:
    model, (idx,) = zoo.gpt_sdpa(n_embd=32)
    torch.fx.symbolic_trace(model)  # sdpa variant: no mask buffer, plain symbolic_trace works
    manual, _ = zoo.gpt(n_embd=32)
    gm = torch.fx.GraphModule(manual, ProxyBufferTracer().trace(manual))
    assert any(n.op == "get_attr" and n.target.endswith("attn.bias") for n in gm.graph.nodes)


def test_gpt_structure() -> None:
    model, (idx,) = zoo.gpt(n_embd=32, n_head=4)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.h[0].attn.bias.shape == (1, 1, 32, 32)
    gm = torch.fx.GraphModule(model, ProxyBufferTracer().trace(model))
    literals = [a for n in gm.graph.nodes for a in n.args if isinstance(a, float)]
    assert 1.0 / (32 // 4) ** 0.5 in literals  # the attention scale is a literal in the graph
    mup, _ = zoo.gpt(n_embd=32, n_head=4, mup_attention=True)
    gm = torch.fx.GraphModule(mup, ProxyBufferTracer().trace(mup))
    assert 1.0 / (32 // 4) in [a for n in gm.graph.nodes for a in n.args if isinstance(a, float)]


@pytest.mark.parametrize("name", FX_MODELS + HF_MODELS)
def test_export_matches(name: str, built) -> None:
    _needs_hf(name)
    model, inputs = built(name)
    ep = torch.export.export(model, inputs, strict=False)
    with torch.no_grad():
        # export may pick a different kernel path (nn.MultiheadAttention), so float32 rounding can differ
        torch.testing.assert_close(ep.module()(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


def test_hf_structure(built) -> None:
    pytest.importorskip("transformers")
    gpt2, _ = built("hf-gpt2")
    assert gpt2.model.lm_head.weight is gpt2.model.transformer.wte.weight
    llama, _ = built("hf-llama")
    cfg = llama.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.use_cache is False
    assert cfg._attn_implementation == "sdpa"
    bert, _ = built("hf-bert")
    assert type(bert.model).__name__ == "BertForMaskedLM"


@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_eager_matches_sdpa(name: str, built) -> None:
    _needs_hf(name)
    builder = WIDTHS[name][0]
    eager, inputs = builder(attn_implementation="eager")
    model, _ = built(name)
    with torch.no_grad():
        torch.testing.assert_close(eager(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


def test_hf_from_config(tmp_path, built) -> None:
    pytest.importorskip("transformers")
    llama, (ids,) = built("hf-llama")
    llama.config.save_pretrained(tmp_path / "llama")
    model, (ids2,) = zoo.hf_from_config(tmp_path / "llama")
    assert type(model.model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(model(ids2), llama(ids), rtol=0, atol=0)
    bert, _ = built("hf-bert")
    bert.config.save_pretrained(tmp_path / "bert")
    model, _ = zoo.hf_from_config(tmp_path / "bert" / "config.json")
    assert type(model.model).__name__ == "BertForMaskedLM"
    with pytest.raises(ModelSpecError, match="config.json"):
        zoo.hf_from_config(tmp_path)


def test_load_model_spec_forms(tmp_path) -> None:
    model, inputs = zoo.load_model_spec("mlp")
    assert model(*inputs).shape == (4, 10)
    model, inputs = zoo.load_model_spec("graphscale.zoo:mlp")
    assert model(*inputs).shape == (4, 10)
    f = tmp_path / "mymodel.py"
    f.write_text(textwrap.dedent("""
        import torch
        def build():
            return torch.nn.Linear(3, 2), torch.ones(1, 3)
        class ns:
            build = staticmethod(lambda: (torch.nn.Linear(3, 4), [torch.ones(2, 3)]))
        def bad():
            return torch.nn.Linear(3, 2)
        not_callable = 3
    """))
    model, inputs = zoo.load_model_spec(f"{f}:build")
    assert isinstance(inputs, tuple) and model(*inputs).shape == (1, 2)
    model, inputs = zoo.load_model_spec(f"{f}:ns.build")
    assert isinstance(inputs, tuple) and model(*inputs).shape == (2, 4)
    for spec, msg in [
        ("nosuchmodel", "built-in name"),
        (f"{tmp_path}/missing.py:build", "does not exist"),
        (f"{f}:nope", "no attribute"),
        (f"{f}:not_callable", "not callable"),
        (f"{f}:bad", "expected a pair"),
        ("graphscale_no_such_module_xyz:build", "cannot import module"),
    ]:
        with pytest.raises(ModelSpecError, match=msg):
            zoo.load_model_spec(spec)
    assert issubclass(ModelSpecError, GraphscaleError)
