"""Unit tests per kind: a tiny graph, and the relations, dimensions and requests the kind yields."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphscale.capture import capture
from graphscale.infer.engine import Walk, walk_graph
from graphscale.infer.rulebook import RuleBook
from graphscale.infer.values import Opaque, SizeInfo, TensorInfo
from tests.helpers import Fn, record_walk_modes, same_dim, walk_fn

BOOK = RuleBook.load()


def walk(fn: Callable[..., torch.Tensor], *xs: torch.Tensor, **modules: nn.Module) -> Walk:
    return walk_fn(fn, *xs, **modules)


def info(w: Walk, node: str) -> TensorInfo:
    i = w.info[node]
    assert isinstance(i, TensorInfo), i
    return i


same = same_dim


def test_einsum_linear_relates_input_weight_and_output() -> None:
    w = walk(lambda m, x: m.fc(x), torch.randn(2, 4), fc=nn.Linear(4, 8))
    wd, out = w.tensor_dims["fc.weight"], info(w, "fc")
    assert same(w, out.dims[1], wd[0]) and same(w, w.input_dims[1], wd[1])
    assert [(u.param, u.fan_in_axes) for u in w.requests.uses] == [("fc.weight", (1,)), ("fc.bias", ())]


def test_matmul_of_activations_asks_for_an_output_multiplier() -> None:
    w = walk(lambda m, x: m.fc(x) @ m.fc(x).t(), torch.randn(2, 4), fc=nn.Linear(4, 8))
    (om,) = w.requests.multipliers
    assert same(w, om.dims[0], w.tensor_dims["fc.weight"][0])


def test_conv_groups_is_a_product_and_a_scalar_request() -> None:
    w = walk(lambda m, x: m.conv(x), torch.randn(1, 4, 5, 5), conv=nn.Conv2d(4, 8, 3, groups=2))
    (sc,) = w.requests.scalars
    assert sc.loc == ("attr", "groups") and w.ds.size[sc.dim] == 2
    assert all(d in w.ds.fixed or w.ds.find(d) in w.ds.fixed for d in info(w, "conv").dims[2:])


def test_elementwise_broadcast_unions_aligned_axes() -> None:
    w = walk(lambda m, x: m.a(x) + m.b(x), torch.randn(2, 4), a=nn.Linear(4, 8), b=nn.Linear(4, 8))
    assert same(w, w.tensor_dims["a.weight"][0], w.tensor_dims["b.weight"][0])


def test_reshape_is_a_product_and_its_literal_is_a_shape_request() -> None:
    w = walk(lambda m, x: m.fc(x).view(2, 2, 4), torch.randn(2, 4), fc=nn.Linear(4, 8))
    (req,) = w.requests.shapes
    assert req.varargs_from == 1 and [k for k, _ in req.entries] == [0, 1, 2]
    assert any(t == w.tensor_dims["fc.weight"][0] for t, _, _ in w.ds.prods)


def test_permute_and_transpose_keep_a_parameter_view() -> None:
    w = walk(lambda m, x: x @ m.fc.weight.permute(1, 0), torch.randn(2, 4), fc=nn.Linear(4, 8))
    assert info(w, "permute").param == ("fc.weight", (1, 0))
    assert [u.fan_in_axes for u in w.requests.uses] == [(1,)]
    w = walk(lambda m, x: x @ m.fc.weight.transpose(0, 1), torch.randn(2, 4), fc=nn.Linear(4, 8))
    assert info(w, "transpose").param == ("fc.weight", (1, 0))


@pytest.mark.parametrize("op, multiplier, refused", [
    (lambda h: h.sum(-1), True, False),
    (lambda h: h.mean(dim=-1), False, False),
    (lambda h: torch.logsumexp(h, -1), False, True),
    (lambda h: h.var(-1, unbiased=False), False, False),
    (lambda h: h.var(-1), False, True),
])
def test_reduce_modes(op: Callable[[torch.Tensor], torch.Tensor], multiplier: bool, refused: bool) -> None:
    w = walk(lambda m, x: op(m.fc(x)), torch.randn(2, 4), fc=nn.Linear(4, 8))
    assert bool(w.requests.multipliers) == multiplier and bool(w.requests.refusals) == refused


def test_reduce_keepdim_reads_the_keyword() -> None:
    w = walk(lambda m, x: m.fc(x).amax(-1, keepdim=True), torch.randn(2, 4), fc=nn.Linear(4, 8))
    assert info(w, "amax").shape == (2, 1)


def test_along_refuses_the_axis_it_runs_along() -> None:
    w = walk(lambda m, x: F.softmax(m.fc(x), dim=-1), torch.randn(2, 4), fc=nn.Linear(4, 8))
    (r,) = w.requests.refusals
    assert same(w, r.dim, w.tensor_dims["fc.weight"][0])


def test_cat_and_split_are_concatenations() -> None:
    w = walk(lambda m, x: torch.cat(m.fc(x).split(4, dim=-1), -1), torch.randn(2, 4), fc=nn.Linear(4, 8))
    assert len(w.ds.sums) == 2
    (sc,) = w.requests.scalars
    assert w.ds.size[sc.dim] == 4 and sc.loc == ("pos", 1)


def test_getitem_slice_asks_for_new_bounds() -> None:
    w = walk(lambda m, x: m.fc(x)[:, 2:6], torch.randn(2, 4), fc=nn.Linear(4, 8))
    (sl,) = w.requests.slices
    assert w.ds.size[sl.part] == 4 and w.ds.size[sl.before] == 2


def test_size_and_shape_measure_dimensions() -> None:
    def fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = m.fc(x)
        return h.view(h.size(0), h.shape[1] // 2, 2)

    w = walk(fn, torch.randn(2, 4), fc=nn.Linear(4, 8))
    sizes = [i for i in w.info.values() if isinstance(i, SizeInfo)]
    assert any(s.dim is not None and same(w, s.dim, w.tensor_dims["fc.weight"][0]) for s in sizes)
    getattr_info = next(i for n, i in w.info.items() if n.startswith("getattr"))
    assert isinstance(getattr_info, tuple) and all(isinstance(s, SizeInfo) for s in getattr_info)


def test_attribute_transposes_keep_the_parameter_and_others_are_opaque() -> None:
    w = walk(lambda m, x: x @ m.fc.weight.mT, torch.randn(2, 4), fc=nn.Linear(4, 8))
    assert info(w, "getattr_1").param == ("fc.weight", (1, 0))
    p = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    w2 = Fn(lambda m, x: x, fc=nn.Linear(4, 8))
    w2.p = p
    cap = capture(w2, (torch.randn(2, 4),), "fx", BOOK)
    cap.gm.register_parameter("p", p)
    graph = cap.gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        imag = graph.call_function(getattr, (graph.get_attr("p"), "imag"))
    cap.gm.recompile()
    walked = walk_graph(cap.gm, cap.flat_inputs, BOOK)
    assert isinstance(walked.info[imag.name], Opaque)  # unused: no error, but never a constant


def test_creation_asks_to_rewrite_its_size() -> None:
    w = walk(lambda m, x: m.fc(x) + x.new_zeros(x.size(0), 8), torch.randn(2, 4), fc=nn.Linear(4, 8))
    (req,) = w.requests.shapes
    assert req.varargs_from == 1 and same(w, req.entries[1][1], w.tensor_dims["fc.weight"][0])


def test_sdpa_relates_heads_and_asks_for_a_scale() -> None:
    q = torch.randn(1, 2, 3, 4)
    w = walk(lambda m, a, b, c: F.scaled_dot_product_attention(a, b, c), q, q, q)
    (sc,) = w.requests.scales
    assert sc.head_dim == 4


def test_layer_norm_ties_its_parameters_to_the_normalized_axis() -> None:
    w = walk(lambda m, x: F.layer_norm(m.fc(x), (8,), m.ln.weight, m.ln.bias), torch.randn(2, 4),
             fc=nn.Linear(4, 8), ln=nn.LayerNorm(8))
    assert same(w, w.tensor_dims["ln.weight"][0], w.tensor_dims["fc.weight"][0])
    (req,) = w.requests.shapes
    assert req.loc == ("pos", 1)


def test_group_norm_splits_channels_into_groups() -> None:
    w = walk(lambda m, x: m.gn(x), torch.randn(1, 4, 3), gn=nn.GroupNorm(2, 4))
    (sc,) = w.requests.scalars
    assert sc.loc == ("attr", "num_groups") and w.ds.size[sc.dim] == 2


def test_pool_fixes_spatial_axes() -> None:
    w = walk(lambda m, x: F.avg_pool2d(x, 2), torch.randn(1, 3, 4, 4))
    out = info(w, "avg_pool2d")
    assert out.shape == (1, 3, 2, 2) and all(w.ds.find(d) in {w.ds.find(f) for f in w.ds.fixed}
                                              for d in out.dims[2:])


def test_pad_refuses_the_padded_axis_only() -> None:
    w = walk(lambda m, x: F.pad(m.fc(x), (0, 0, 1, 1)), torch.randn(2, 4), fc=nn.Linear(4, 8))
    (r,) = w.requests.refusals
    assert same(w, r.dim, w.input_dims[0])  # the batch axis, not the hidden one
    assert same(w, info(w, "pad").dims[1], w.tensor_dims["fc.weight"][0])


def test_einsum_call_reads_the_equation() -> None:
    w = walk(lambda m, x: torch.einsum("bi,oi->bo", x, m.fc.weight), torch.randn(2, 4), fc=nn.Linear(4, 8))
    assert same(w, info(w, "einsum").dims[1], w.tensor_dims["fc.weight"][0])
    assert [(u.param, u.fan_in_axes, u.operand) for u in w.requests.uses] == [("fc.weight", (1,), ("pos", 1))]


def test_a_data_dependent_graph_is_walked_with_real_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Meta and fake tensors cannot run a boolean mask (its size depends on the data); the walk falls back
    to the real values instead of failing, and describes the masked result by its real shape."""
    modes = record_walk_modes(monkeypatch)
    x = torch.tensor([[1.0, -1.0, 2.0], [-3.0, 4.0, 5.0]])
    w = walk(lambda m, x: x[x > 0], x)
    assert modes == ["device", "FakeTensorMode", "nullcontext"]  # meta, fake, real
    (out,) = [i for n, i in w.info.items() if n.startswith("getitem")]
    assert out.shape == (4,)


def test_a_dict_output_s_axes_are_model_outputs() -> None:
    """fx keeps ``return {"y": y}`` as a dict in the output node: its tensors' axes are the model's outputs
    (fixed by default) as for a tuple, not a constant the walk skips."""
    w = walk(lambda m, x: {"y": m.b(m.a(x))}, torch.randn(2, 3), a=nn.Linear(3, 8), b=nn.Linear(8, 5))
    assert same(w, w.output_dims[-1], w.tensor_dims["b.weight"][0])
    assert len(w.output_dims) == 2
