"""The speed-ups of analyze/widen (issue 19, item 5) change no result, and the benchmark compares like
with like.

- ``ParamScaling.widen`` writes ``c * narrow`` into the wide tensor in one pass: bitwise the tensor that
  scaling first and replicating after gives, for every dtype and axis layout.
- capture shares parameter storage with the user's model instead of cloning it: the plan's graph holds the
  model's storage, the model is bitwise unchanged, and a graph that may write a weight inside a kernel
  (``nn.Embedding(max_norm=...)``) gets weights of its own; a forward that writes its weights while traced
  is refused by name.
- ``widen_into(plan=...)`` fills the large model exactly as without the plan.
- the width walk of an fx graph runs on meta tensors first: the plan of every built-in example that fx
  traces (a BatchNorm CNN among them) is the one the fake-tensor walk makes, as JSON; export graphs
  (nn.MultiheadAttention's, Hugging Face's) go to fake tensors directly.
- benchmarks/run.py's copy baseline makes bitwise the tensors ``graphscale.widen`` makes, and README's
  table is the one the script prints from the committed results.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import graphscale
from graphscale import zoo
from graphscale.errors import GraphscaleError
from graphscale.record import AxisReplication, ParamScaling
from tests.helpers import record_walk_modes

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _reference(s: ParamScaling, narrow: torch.Tensor) -> torch.Tensor:
    """The formula before the one-pass write: scale the narrow tensor, then replicate it, axis by axis by
    each axis's index map (independent of the broadcast views that widen and replicate use)."""
    if s.copy_scale != 1.0 and narrow.is_floating_point():
        narrow = narrow * s.copy_scale
    out = narrow.clone()
    for dim, axis in enumerate(s.axes):
        if axis is not None:
            out = out.index_select(dim, axis.index())
    return out.contiguous()


ATOM = AxisReplication.atomic
QKV = AxisReplication(("sum", (("atom", 4, 3), ("atom", 4, 3), ("atom", 4, 3))))  # fused q|k|v, plain
HEADS = AxisReplication(("prod", (("atom", 2, 1), ("atom", 3, 2))))  # head_dim grows: not plain
GROWN_HEADS = AxisReplication(("prod", (("atom", 3, 2), ("atom", 4, 1))))  # heads grow: blocks repeat
BOTH = AxisReplication(("prod", (("atom", 2, 3), ("atom", 3, 2))))  # heads and head_dim grow
ROTARY = AxisReplication(("prod", (("atom", 3, 2), ("sum", (("atom", 2, 1), ("atom", 2, 1))))))  # halves
MIXED = AxisReplication(("sum", (("atom", 2, 2), ("atom", 3, 1))))  # parts that grow differently


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64])
@pytest.mark.parametrize("axes,scale", [
    ((ATOM(5, 2), ATOM(6, 3)), 1 / 3),
    ((ATOM(5, 2), None), 1.0),
    ((None, ATOM(6, 4)), 0.25),
    ((QKV, ATOM(6, 2)), 0.5),
    ((HEADS, None), 1 / 7),
    ((GROWN_HEADS, ATOM(5, 2)), 0.5),
    ((ATOM(2, 2), BOTH), 1 / 6),
    ((QKV, GROWN_HEADS), 0.5),
    ((ROTARY, ATOM(3, 2)), 0.5),
    ((MIXED, None), 1.0),
    ((None, None), 0.1),
])
def test_one_pass_widen_is_bitwise_the_two_pass_formula(dtype: torch.dtype, axes: tuple,
                                                         scale: float) -> None:
    shape = tuple(a.narrow_size if a is not None else 6 for a in axes)
    gen = torch.Generator().manual_seed(0)
    narrow = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    wide_shape = tuple(a.wide_size if a is not None else n for a, n in zip(axes, shape))
    s = ParamScaling("w", "w", shape, wide_shape, axes, scale, 1, 1)
    got, want = s.widen(narrow), _reference(s, narrow)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape == wide_shape
    assert got.stride() == want.stride()
    assert torch.equal(got, want)
    assert got.data_ptr() != narrow.data_ptr()
    into = torch.full(wide_shape, 7, dtype=dtype)
    assert s.widen(narrow, out=into) is into and torch.equal(into, want)  # written into a given tensor
    assert torch.equal(s.replicate(narrow), _reference(replace(s, copy_scale=1.0), narrow))
    assert s.replicate(narrow).data_ptr() != narrow.data_ptr()
    if narrow.is_floating_point() and scale != 1.0 and any(a is not None for a in axes):
        assert not torch.equal(got, s.replicate(narrow))  # the scale is applied


def test_widened_gpt_is_bitwise_the_reference_formula() -> None:
    model, inputs = zoo.gpt(n_embd=32, n_layer=1)
    wide = graphscale.widen(model, inputs, multiplier=3)
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    wide_state = dict(wide.named_parameters()) | dict(wide.named_buffers())
    checked = 0
    for name, s in wide.graphscale.params.items():
        if name in wide_state and name in state:
            assert torch.equal(wide_state[name], _reference(s, state[name].detach())), name
            checked += 1
    assert checked >= 10


class WritesOwnWeights(nn.Module):
    def __init__(self, via_data: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.via_data = via_data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for p in self.parameters():  # real tensors even while fx traces: an eager in-place write
                (p.data if self.via_data else p).mul_(0.5)
        return self.fc(x)


def test_capture_shares_the_model_storage_and_leaves_it_bitwise_unchanged() -> None:
    model, inputs = zoo.gpt(n_embd=32, n_layer=1)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    plan = graphscale.analyze(model, inputs)
    gm_params = dict(plan.captured.gm.named_parameters())
    for name, p in model.named_parameters():
        assert gm_params[name] is not p  # new Parameter objects ...
        assert gm_params[name].data_ptr() == p.data_ptr()  # ... over the model's storage, not a clone
    graphscale.widen(model, inputs, multiplier=2, plan=plan)
    graphscale.verify(model, inputs, max_examples=2)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n


def test_a_graph_that_renormalizes_weights_gets_its_own() -> None:
    model = nn.Sequential(nn.Embedding(10, 8, max_norm=1.0), nn.Linear(8, 2)).double()
    ids = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(0))
    plan = graphscale.analyze(model, (ids,))
    assert plan.captured.gm.get_parameter("0.weight").data_ptr() != model[0].weight.data_ptr()
    assert plan.captured.gm.get_parameter("1.weight").data_ptr() != model[1].weight.data_ptr()


def test_a_forward_writing_its_weights_while_traced_is_refused_before_the_write() -> None:
    """The traced copy shares the model's storage: an eager write in forward (through self.parameters()
    or .data, which no version counter sees) must be stopped before it reaches the user's weights."""
    for via_data in (False, True):
        model = WritesOwnWeights(via_data).double()
        before = {n: t.clone() for n, t in model.state_dict().items()}
        with pytest.raises(GraphscaleError, match="write into parameter 'fc.(weight|bias)'"):
            graphscale.analyze(model, (torch.randn(2, 3, dtype=torch.float64),))
        for n, t in model.state_dict().items():
            assert torch.equal(t, before[n]), n


def test_widen_into_with_a_plan_fills_the_same_weights() -> None:
    small, inputs = zoo.gpt(n_embd=32, n_layer=1)
    large_a, _ = zoo.gpt(n_embd=64, n_layer=1, seed=1)
    large_b, _ = zoo.gpt(n_embd=64, n_layer=1, seed=2)
    rec_a = graphscale.widen_into(small, large_a, inputs)
    plan = graphscale.analyze(small, inputs)
    rec_b = graphscale.widen_into(small, large_b, inputs, plan=plan)
    assert rec_a == rec_b
    for (na, a), (nb, b) in zip(large_a.state_dict().items(), large_b.state_dict().items()):
        assert na == nb and torch.equal(a, b), na
    other, _ = zoo.gpt(n_embd=32, n_layer=1)
    with pytest.raises(GraphscaleError, match="different model"):
        graphscale.widen_into(other, large_b, inputs, plan=plan)


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt", "gpt-sdpa"])
def test_the_meta_walk_makes_the_fake_walks_plan(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import graphscale.infer.engine as engine

    model, inputs = zoo.EXAMPLES[name]()
    modes = record_walk_modes(monkeypatch)
    plan = graphscale.analyze(model, inputs)
    assert plan.frontend == "fx" and modes == ["device"]  # the meta walk ran through

    def no_meta(t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("meta walk disabled")

    monkeypatch.setattr(engine, "_meta_stand_in", no_meta)
    modes.clear()
    fake = graphscale.analyze(model, inputs).to_json()
    assert modes == ["FakeTensorMode"]
    assert plan.to_json() == fake


@pytest.mark.parametrize("name", ["mha", "hf-gpt2"])
def test_an_exported_graph_is_walked_on_fake_tensors_directly(name: str, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """An ATen graph from torch.export names its devices: a meta walk would fail at its first factory."""
    model, inputs = zoo.EXAMPLES[name]()
    modes = record_walk_modes(monkeypatch)
    assert graphscale.analyze(model, inputs).frontend == "export" and modes == ["FakeTensorMode"]


def test_benchmark_baseline_makes_the_tensors_widen_makes() -> None:
    bench = _bench()
    model, inputs = bench.build(bench.TINY)
    prepared = bench.prepare_baseline(model, bench.copy_spec(model, inputs))
    wide = graphscale.widen(model, inputs, multiplier=2)
    named = dict(wide.named_parameters(remove_duplicate=False)) | dict(wide.named_buffers())
    for variant in (bench.baseline_copy, bench.baseline_naive):
        tensors = variant(prepared)
        assert len(tensors) >= 10
        for name, t in tensors.items():
            assert torch.equal(t, named[name]), (variant.__name__, name)


def test_readme_table_is_the_benchmark_output() -> None:
    bench = _bench()
    results = json.loads((ROOT / "benchmarks" / "results" / "bench.json").read_text())
    assert not results["quick"] and results["runs"] >= 5
    assert bench.readme_table(results) in (ROOT / "README.md").read_text()
    assert (ROOT / "benchmarks" / "results" / "bench.md").read_text() == bench.to_markdown(results)
