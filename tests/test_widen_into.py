"""widen_into: fill a wider model the user built (same class, larger config) with exact widened weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import graphscale
from graphscale import zoo


def _double(model: torch.nn.Module, inputs: tuple) -> tuple[torch.nn.Module, tuple]:
    return model.double(), tuple(x.double() if x.is_floating_point() else x for x in inputs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / (1 + b.abs().max())).item()


CASES = [
    ("mlp", dict(widths=(50, 100, 200)), dict(widths=(500, 500, 800)), 1e-10),
    ("gpt", dict(n_embd=32), dict(n_embd=64), 1e-10),
    ("gpt", dict(n_embd=32, mup_attention=True), dict(n_embd=96, mup_attention=True), 1e-10),
    ("hf_gpt2", dict(n_embd=64), dict(n_embd=128), 1e-10),
    ("hf_bert", dict(hidden=64, intermediate=128), dict(hidden=128, intermediate=256), 1e-10),
    ("hf_llama", dict(hidden=64, intermediate=128), dict(hidden=128, intermediate=256), 1e-6),
]


@pytest.mark.parametrize(("builder", "small_kw", "large_kw", "tol"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_widen_into_is_exact(builder: str, small_kw: dict, large_kw: dict, tol: float) -> None:
    if builder.startswith("hf_"):
        pytest.importorskip("transformers")
    small, inputs = _double(*getattr(zoo, builder)(**small_kw))
    large, _ = _double(*getattr(zoo, builder)(**large_kw))
    before = copy.deepcopy(small.state_dict())
    record = graphscale.widen_into(small, large, inputs)
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())  # small untouched
    with torch.no_grad():
        assert _rel(large(*inputs), small(*inputs)) <= tol
    assert large.graphscale is record and max(record.multipliers.values()) > 1


def test_widen_into_multipliers_read_off_shapes_are_per_class() -> None:
    small, inputs = zoo.mlp(widths=(50, 100, 200))
    large, _ = zoo.mlp(widths=(500, 500, 800))
    assert graphscale.widen_into(small, large, inputs).multipliers == \
        {"0.weight[0]": 10, "2.weight[0]": 5, "4.weight[0]": 4}


def test_widen_into_refuses_a_ratio_that_is_not_an_integer() -> None:
    small, inputs = zoo.mlp(widths=(50, 100))
    large, _ = zoo.mlp(widths=(75, 200))
    with pytest.raises(graphscale.MultiplierError, match=r"0\.weight\[0\].*75.*not an integer multiple.*50"):
        graphscale.widen_into(small, large, inputs)


def test_widen_into_refuses_shapes_that_do_not_match() -> None:
    small, inputs = zoo.mlp(widths=(8, 8), d_out=10)
    large, _ = zoo.mlp(widths=(16, 16), d_out=12)  # a different output size is not a widening
    with pytest.raises(graphscale.WidthConflictError, match=r"6\.weight|4\.weight|weight"):
        graphscale.widen_into(small, large, inputs)


def test_widen_into_refuses_a_different_architecture() -> None:
    small, inputs = zoo.mlp(widths=(8, 8))
    large, _ = zoo.mlp(widths=(16, 16, 16))
    with pytest.raises(graphscale.GraphscaleError):
        graphscale.widen_into(small, large, inputs)


class _ScaledEmbedding(torch.nn.Module):
    """An embedding scaled by sqrt(d) computed from the model's own width (BioGPT, CTRL, Gemma, ...);
    ``after_tanh`` applies the scale after a nonlinearity instead, where no weight can carry it."""

    def __init__(self, d: int, after_tanh: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, d)
        self.scale = math.sqrt(d)
        self.readout = torch.nn.Linear(d, 3)
        self.after_tanh = after_tanh

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.after_tanh:
            return self.readout(torch.tanh(self.embed(idx)) * self.scale)
        return self.readout(torch.tanh(self.embed(idx) * self.scale))


def test_width_dependent_constant_is_named_in_the_refusal() -> None:
    """The larger model's sqrt(d_model) differs from the small one's, and no weight carries the ratio
    through the tanh: refused, naming the op and both constants (before: only the output error)."""
    torch.manual_seed(0)
    small, large = _ScaledEmbedding(4, after_tanh=True), _ScaledEmbedding(8, after_tanh=True)
    idx = torch.randint(0, 10, (2, 3))
    want = (r"constants from its own sizes, which no weight carries.*mul.*: 2 in the small model, "
            r"2\.82843 in the larger")
    with pytest.raises(graphscale.WidthConflictError, match=want):
        graphscale.widen_into(small, large, (idx,))


def test_width_dependent_constant_is_folded_into_the_embedding_feeding_it() -> None:
    """sqrt(d) applied to an (untied) embedding's output: the embedding carries sqrt(d_small / d_large),
    so the larger model's own constant gives the small one's activations; it trains alike too."""
    torch.manual_seed(0)
    small, large = _ScaledEmbedding(4).double(), _ScaledEmbedding(8).double()
    idx = torch.randint(0, 10, (2, 3))
    record = graphscale.widen_into(small, large, (idx,))
    assert record["embed.weight"].copy_scale == pytest.approx(2 / math.sqrt(8), rel=1e-12)
    assert any("embed.weight carries a further 0.707107" in n for n in record.notes)
    with torch.no_grad():
        assert _rel(large(idx), small(idx)) <= 1e-12
    s_opt = torch.optim.AdamW(small.parameters(), lr=1e-2)
    l_opt = graphscale.mup_optimizer(large, torch.optim.AdamW, lr=1e-2)
    for _ in range(3):
        for model, opt in ((small, s_opt), (large, l_opt)):
            opt.zero_grad()
            model(idx).square().mean().backward()
            opt.step()
    with torch.no_grad():
        assert _rel(large(idx), small(idx)) <= 1e-9


class _TiedScaledEmbedding(torch.nn.Module):
    """Gemma's pattern: the embedding times sqrt(d) (a float, or a scalar tensor made in forward, which
    torch.export lifts), tied to the readout after a final LayerNorm."""

    def __init__(self, d: int, tensor: bool) -> None:
        super().__init__()
        torch.manual_seed(d)
        self.embed = torch.nn.Embedding(10, d)
        self.fc = torch.nn.Linear(d, d)
        self.norm = torch.nn.LayerNorm(d)
        self.d, self.tensor = d, tensor
        self.double()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        h = h * (torch.tensor(self.d ** 0.5, dtype=h.dtype) if self.tensor else self.d ** 0.5)
        h = h + torch.tanh(self.fc(h))
        return torch.nn.functional.linear(self.norm(h), self.embed.weight)


@pytest.mark.parametrize(("tensor", "tracer"), [(False, "fx"), (True, "export")])
def test_width_dependent_constant_on_a_tied_embedding_is_undone_at_the_readout(tensor: bool,
                                                                               tracer: str) -> None:
    """The tied embedding carries sqrt(d_small / d_large) = 2**-0.5; its readout use needs 1/k = 1/2 in
    all, so the final norm's gain and bias carry the rest, 2**-0.5 (docs/math.md §8)."""
    small, large = _TiedScaledEmbedding(8, tensor), _TiedScaledEmbedding(16, tensor)
    idx = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(0))
    record = graphscale.widen_into(small, large, (idx,), tracer=tracer)
    assert record["embed.weight"].copy_scale == pytest.approx(2 ** -0.5, rel=1e-12)
    assert record["norm.weight"].copy_scale == pytest.approx(2 ** -0.5, rel=1e-12)
    with torch.no_grad():
        assert _rel(large(idx), small(idx)) <= 1e-12


def test_widen_into_with_outputs_width_compares_the_widened_outputs() -> None:
    """outputs="width": the output axis widens with the model, so the larger model's output is the small
    one's repeated along it (before: shapes differed and every candidate had error inf)."""
    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 6)).double()
    large = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 18)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    record = graphscale.widen_into(small, large, (x,), outputs="width")
    assert record.multipliers == {"0.weight[0]": 2, "2.weight[0]": 3}
    with torch.no_grad():
        assert _rel(large(x), small(x).repeat_interleave(3, dim=-1)) <= 1e-12


class _DeadTable(torch.nn.Module):
    """A buffer sized by the width that only a computation nothing reads uses: HF computes rotary tables
    in the model and passes them to every layer, and a config whose layers are all linear attention never
    reads them (Qwen3.5). ``.to(dtype)`` is what torch.export guards with a metadata assert."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc, self.out = torch.nn.Linear(3, width), torch.nn.Linear(width, 2)
        self.register_buffer("table", torch.arange(width // 4, dtype=torch.float64) + width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scratch = x[..., :1] * self.table.to(x.dtype)  # computed, never read
        scratch[..., 0].copy_(x[..., 0])  # and written into, as HF's interleaved rotary does
        return self.out(torch.tanh(self.fc(x)))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_widen_into_leaves_a_tensor_the_output_does_not_depend_on_to_the_larger_model(tracer: str) -> None:
    """Before: the dead chain (its in-place write; under export the dtype assert) kept the buffer in the
    graph, and widen_into refused: 'the larger model has shape (4,), widening the small one gives (2,)'."""
    torch.manual_seed(0)
    small, large = _DeadTable(8).double(), _DeadTable(16).double()
    own = large.table.clone()
    x = torch.randn(4, 3, dtype=torch.float64)
    graphscale.widen_into(small, large, (x,), tracer=tracer)
    with torch.no_grad():
        assert (large(x) - small(x)).abs().max().item() <= 1e-12
    assert torch.equal(large.table, own)


class _TiedBiasReadout(torch.nn.Module):
    """HF's masked-LM head: ``lm_head.bias`` is the same parameter as ``lm_head.decoder.bias``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.emb, self.dense = torch.nn.Embedding(11, width), torch.nn.Linear(width, width)
        self.decoder = torch.nn.Linear(width, 11)
        self.bias = self.decoder.bias

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.tanh(self.dense(self.emb(ids))))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_widen_into_fills_a_readout_whose_bias_has_a_second_name(tracer: str) -> None:
    """Before: under export the tensor's first name, ``bias``, is read by no node (the op reads
    ``decoder.bias``), so widen_into dropped it from the record as unused and then failed with
    KeyError 'bias' while listing the readout's biases (LUKE in the census)."""
    torch.manual_seed(0)
    small, large = _TiedBiasReadout(8).double(), _TiedBiasReadout(16).double()
    ids = torch.randint(0, 11, (2, 5))
    graphscale.widen_into(small, large, (ids,), tracer=tracer)
    with torch.no_grad():
        assert (large(ids) - small(ids)).abs().max().item() <= 1e-12


class _ActivationEMA(torch.nn.Module):
    """Keeps a running mean of its hidden units (state the forward writes and never reads)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc, self.out = torch.nn.Linear(3, width), torch.nn.Linear(width, 2)
        self.register_buffer("ema", torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        self.ema.mul_(0.9).add_(0.1 * h.mean(0).detach())
        return self.out(h)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_widen_into_fills_state_the_forward_only_writes(tracer: str) -> None:
    """The output does not depend on a buffer the forward only writes (an EMA of activations, like a
    train-mode batch norm's statistics), yet it is the model's state: widen_into fills it, or the larger
    model would carry its own. Guards the liveness that decides what widen_into leaves alone (with data
    edges alone the buffer counts as unused and keeps the larger model's zeros)."""
    torch.manual_seed(0)
    small, large = _ActivationEMA(4).double(), _ActivationEMA(8).double()
    with torch.no_grad():
        small.ema.uniform_(0.5, 1)
    x = torch.randn(6, 3, dtype=torch.float64)
    graphscale.widen_into(small, large, (x,), tracer=tracer)
    assert torch.equal(large.ema, small.ema.repeat_interleave(2))


@pytest.mark.filterwarnings("ignore::graphscale.errors.SliceFoldWarning")
@pytest.mark.parametrize(("builder", "small_kw", "large_kw"),
                         [("hf_bert", dict(hidden=32, intermediate=64), dict(hidden=64, intermediate=128)),
                          ("hf_gpt2", dict(n_embd=32), dict(n_embd=64))], ids=["hf_bert", "hf_gpt2"])
def test_widen_into_on_use_holds_one_op_of_wide_parameters_and_makes_the_filled_values(
        builder: str, small_kw: dict, large_kw: dict) -> None:
    """widen_into(on_use=OnUse()) writes no parameter of large: each holds one element, and is made (as the
    fill writes it) only while an op reads it, so that the candidates' forwards hold one op's wide
    parameters at a time, never the model's. The record is the eager one's; every parameter made alone is
    bitwise the eager fill's (BERT's query factor folded whole into its copy scale, GPT-2's into part of
    the fused q|k|v rows; both tie the readout); the forward under ``with on_use:`` gives the eager
    model's outputs bitwise. The streamed upscale's memory bound rests on this (graphscale.hf_stream)."""
    from graphscale.on_use import OnUse

    if builder.startswith("hf_"):
        pytest.importorskip("transformers")
    small, inputs = _double(*getattr(zoo, builder)(**small_kw))
    eager, _ = _double(*getattr(zoo, builder)(**large_kw))
    lazy = copy.deepcopy(eager)
    want = graphscale.widen_into(small, eager, inputs)
    on_use = OnUse()
    with pytest.raises(ValueError, match="transactional=False"):
        graphscale.widen_into(small, lazy, inputs, on_use=on_use)
    got = graphscale.widen_into(small, lazy, inputs, transactional=False, on_use=on_use)
    assert got.params == want.params and got.multipliers == want.multipliers
    assert any("query carries a further" in n for n in got.notes)
    one_op = max(sum(p.nbytes for p in m.parameters(recurse=False)) for m in lazy.modules())
    assert on_use.made > 0 and 0 < on_use.peak_bytes <= one_op < sum(p.nbytes for p in lazy.parameters())
    for (name, p), (_, q) in zip(lazy.named_parameters(), eager.named_parameters(), strict=True):
        assert p.untyped_storage().nbytes() == p.element_size(), f"{name} holds memory"
        assert torch.equal(on_use.value(p), q), name
    with torch.no_grad(), on_use:
        out = lazy(*inputs)
    with torch.no_grad():
        assert torch.equal(out, eager(*inputs))
    assert all(p.isnan().all() for p in lazy.parameters())  # dropped again: a read outside gives NaN
