"""Acceptance tests of width inference: the axes that ``analyze`` calls width are exactly the axes that grow.

The oracle is the model's own constructor: build the same architecture at width n and at 2n (every hidden
width doubled; for transformers head_dim doubled with the heads fixed, or the head count doubled with
``heads="grow"``). A parameter or buffer axis whose size differs between the two builds must be an axis
that ``analyze(narrow)`` infers as width, and every axis it infers as width must differ. An axis "is width"
when its rule's axis multiplier is not 1; for parameters this must agree with membership in a width class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import graphscale
from graphscale import zoo
from graphscale.plan import Plan
from tests.strategies import (
    Arch,
    MLPArch,
    build,
    build_mlp,
    check_traceable,
    cnn_archs,
    mlp_archs,
    n_width_classes,
    transformer_archs,
)

Axis = tuple[str, int]

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by every name it has (tied weights under each of their names)."""
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


def differing_axes(narrow: nn.Module, wide: nn.Module) -> set[Axis]:
    a, b = tensors(narrow), tensors(wide)
    assert a.keys() == b.keys(), "the two builds must have the same tensors"
    out = set()
    for name, t in a.items():
        assert t.dim() == b[name].dim(), name
        out |= {(name, i) for i in range(t.dim()) if t.shape[i] != b[name].shape[i]}
    return out


def unused_buffers(plan: Plan, model: nn.Module) -> set[str]:
    """Buffers the captured graph reads nowhere (HF Llama's ``original_inv_freq``): nothing relates their
    axes to the model's, so they keep their size; a wide build of the same class may still grow them."""
    buffers = dict(model.named_buffers(remove_duplicate=False))
    return {str(n.target) for n in plan.captured.gm.graph.nodes
            if n.op == "get_attr" and not n.users and str(n.target) in buffers}


def inferred_width_axes(plan: Plan, model: nn.Module) -> set[Axis]:
    """Axes whose derived rule has a non-1 multiplier; every tensor of the model must have a rule."""
    rules = {}
    for name, rule in plan.rules.items():
        rules[name] = rule
        rules.update({alias: rule for alias in rule.aliases})
    out = set()
    for name, t in tensors(model).items():
        if t.dim() == 0:
            continue
        assert name in rules, f"analyze derived no rule for {name}"
        rule = rules[name]
        assert len(rule.axis_multipliers) == t.dim(), name
        out |= {(name, i) for i, k in enumerate(rule.axis_multipliers) if k != 1}
    return out


def class_member_axes(plan: Plan) -> set[Axis]:
    out = set()
    for c in plan.width_classes:
        for m in c.members:
            name, _, axis = m.rpartition("[")
            out.add((name, int(axis.rstrip("]"))))
    return out


def assert_width_axes_match(narrow: nn.Module, wide: nn.Module, plan: Plan) -> None:
    grown = {(n, i) for n, i in differing_axes(narrow, wide) if n not in unused_buffers(plan, narrow)}
    inferred = inferred_width_axes(plan, narrow)
    assert grown, "the wide build must differ from the narrow one somewhere"
    missed, extra = sorted(grown - inferred), sorted(inferred - grown)
    assert not missed and not extra, (f"axes that grow but are not inferred as width: {missed}; "
                                      f"axes inferred as width that do not grow: {extra}\n{plan}")
    params = dict(narrow.named_parameters(remove_duplicate=False))
    param_axes = {(n, i) for n, i in inferred if n in params}
    canonical = {n for n, _ in class_member_axes(plan)}
    # class members name each shared tensor once (by its canonical name)
    assert class_member_axes(plan) == {(n, i) for n, i in param_axes if n in canonical}, \
        "width class membership disagrees with the rules' axis multipliers"


def check_arch(arch: Arch, heads: Literal["fixed", "grow"] = "fixed") -> Plan:
    narrow, inputs = build(arch, 1, heads)
    wide, _ = build(arch, 2, heads)
    check_traceable(narrow)
    plan = graphscale.analyze(narrow, inputs, heads=heads)
    assert plan.frontend == "fx"
    assert_width_axes_match(narrow, wide, plan)
    expected = n_width_classes(arch, heads)
    assert len(plan.width_classes) == expected, f"expected {expected} independent width classes:\n{plan}"
    return plan


# ---------------------------------------------------------------------------------------------------------
# random architectures (50 + 40 + 50 + 40 + 25 = 205 examples)


@settings(max_examples=50, **SETTINGS)
@given(arch=mlp_archs())
def test_random_mlp_width_axes(arch: MLPArch) -> None:
    check_arch(arch)


@settings(max_examples=40, **SETTINGS)
@given(arch=cnn_archs())
def test_random_cnn_width_axes(arch: Arch) -> None:
    check_arch(arch)


@settings(max_examples=50, **SETTINGS)
@given(arch=transformer_archs("fixed"))
def test_random_transformer_width_axes_heads_fixed(arch: Arch) -> None:
    plan = check_arch(arch, "fixed")
    assert plan.heads == "fixed"


@settings(max_examples=40, **SETTINGS)
@given(arch=transformer_archs("grow"))
def test_random_transformer_width_axes_heads_grow(arch: Arch) -> None:
    plan = check_arch(arch, "grow")
    assert plan.heads == "grow"


@settings(max_examples=25, **SETTINGS)
@given(arch=mlp_archs(), data=st.data())
def test_random_mlp_per_layer_multipliers(arch: MLPArch, data: st.DataObject) -> None:
    """Class i is hidden layer i: scaling only some layers grows exactly the members of their classes."""
    ks = tuple(data.draw(st.sampled_from([1, 2, 3])) for _ in arch.hidden)
    narrow, inputs = build_mlp(arch, 1)
    wide, _ = build_mlp(arch, ks)
    plan = graphscale.analyze(narrow, inputs)
    assert len(plan.width_classes) == len(arch.hidden)
    expected = {a for c, k in zip(plan.width_classes, ks) if k != 1 for a in class_member_axes_of(c)}
    assert differing_axes(narrow, wide) == expected


def class_member_axes_of(c: graphscale.plan.WidthClass) -> set[Axis]:
    return {(m.rpartition("[")[0], int(m.rpartition("[")[2].rstrip("]"))) for m in c.members}


# ---------------------------------------------------------------------------------------------------------
# the fixed models


def test_mlp_50_100_200_three_classes() -> None:
    narrow, inputs = zoo.mlp((50, 100, 200))
    wide, _ = zoo.mlp((100, 200, 400))
    plan = graphscale.analyze(narrow, inputs)
    assert [(c.name, c.size) for c in plan.width_classes] == \
        [("0.weight[0]", 50), ("2.weight[0]", 100), ("4.weight[0]", 200)]
    assert_width_axes_match(narrow, wide, plan)
    assert sorted(class_member_axes(plan)) == sorted(
        [("0.weight", 0), ("0.bias", 0), ("2.weight", 1), ("2.weight", 0), ("2.bias", 0), ("4.weight", 1),
         ("4.weight", 0), ("4.bias", 0), ("6.weight", 1)])
    fixed = {c.name for c in plan.classes if c.role == "fixed"}
    assert {"0.weight[1]", "6.weight[0]"} <= fixed  # input features, output classes


def test_resnet_cnn_width_axes() -> None:
    narrow, inputs = zoo.resnet_cnn(channels=8)
    wide, _ = zoo.resnet_cnn(channels=16)
    plan = graphscale.analyze(narrow, inputs)
    assert_width_axes_match(narrow, wide, plan)
    # stem/first residual stream, block 0 inner, block 1 inner, block 1 residual stream (projection)
    assert [c.size for c in plan.width_classes] == [8, 8, 16, 16]
    assert "stem.0.weight[1]" in {c.name for c in plan.classes if c.role == "fixed"}  # input channels
    assert "head.weight[0]" in {c.name for c in plan.classes if c.role == "fixed"}


@pytest.mark.parametrize("builder", [zoo.gpt, zoo.gpt_sdpa])
def test_gpt_classes_heads_fixed(builder: Callable[..., zoo.Example]) -> None:
    narrow, inputs = builder(n_embd=32, n_head=4, n_layer=2)
    wide, _ = builder(n_embd=64, n_head=4, n_layer=2)
    plan = graphscale.analyze(narrow, inputs)
    assert_width_axes_match(narrow, wide, plan)
    names = [c.name for c in plan.width_classes]
    assert names == ["transformer.wte.weight[1]",
                     "transformer.h.0.attn.c_proj.weight[1]", "transformer.h.0.mlp.c_fc.weight[0]",
                     "transformer.h.1.attn.c_proj.weight[1]", "transformer.h.1.mlp.c_fc.weight[0]"]
    by_name = {c.name: c for c in plan.width_classes}
    assert by_name["transformer.wte.weight[1]"].size == 32  # the residual stream
    assert "transformer.ln_f.weight[0]" in by_name["transformer.wte.weight[1]"].members
    for layer in (0, 1):
        attn = by_name[f"transformer.h.{layer}.attn.c_proj.weight[1]"]
        assert attn.size == 32 and attn.atom_size == 8  # 4 heads (fixed) x head_dim 8 (growing)
        assert "4 fixed x 8 growing" in attn.reason
        assert by_name[f"transformer.h.{layer}.mlp.c_fc.weight[0]"].size == 128
    fixed = {c.name: c for c in plan.classes if c.role == "fixed"}
    assert fixed["transformer.wte.weight[0]"].size == 65  # vocab
    assert fixed["transformer.wpe.weight[0]"].size == 32  # positions


def test_gpt_heads_grow() -> None:
    narrow, inputs = zoo.gpt(n_embd=32, n_head=4, n_layer=2)
    wide, _ = zoo.gpt(n_embd=64, n_head=8, n_layer=2)  # head_dim 8 in both
    plan = graphscale.analyze(narrow, inputs, heads="grow")
    assert_width_axes_match(narrow, wide, plan)
    attn = {c.name: c for c in plan.width_classes}["transformer.h.0.attn.c_proj.weight[1]"]
    assert attn.atom_size == 4  # the head count grows


def test_mha_model_width_axes() -> None:
    narrow, inputs = zoo.mha_model(d=16, heads=4)
    wide, _ = zoo.mha_model(d=32, heads=4)
    plan = graphscale.analyze(narrow, inputs)
    assert_width_axes_match(narrow, wide, plan)
    assert [c.size for c in plan.width_classes] == [16, 48, 64]  # residual, 3 x attention inner, MLP hidden


def _hf_pair(name: str) -> tuple[nn.Module, nn.Module, tuple]:
    pytest.importorskip("transformers")
    if name == "gpt2":
        narrow, inputs = zoo.hf_gpt2(n_embd=32, n_head=4)
        wide, _ = zoo.hf_gpt2(n_embd=64, n_head=4)
    elif name == "llama":
        narrow, inputs = zoo.hf_llama(hidden=32, intermediate=48, heads=4, kv_heads=2)
        wide, _ = zoo.hf_llama(hidden=64, intermediate=96, heads=4, kv_heads=2)
    else:
        narrow, inputs = zoo.hf_bert(hidden=32, intermediate=48, heads=4)
        wide, _ = zoo.hf_bert(hidden=64, intermediate=96, heads=4)
    return narrow, wide, inputs


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_hf_width_axes(name: str) -> None:
    narrow, wide, inputs = _hf_pair(name)
    plan = graphscale.analyze(narrow, inputs)
    assert plan.frontend == "export"
    assert_width_axes_match(narrow, wide, plan)
    if name == "llama":
        # RoPE's inv_freq (a non-persistent buffer) grows with head_dim
        assert any("inv_freq" in n for n, _ in differing_axes(narrow, wide))


# ---------------------------------------------------------------------------------------------------------
# depthwise convolution: channels = groups x 1


def test_depthwise_conv_infers() -> None:
    def make(c: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(c, c, 3, padding=1, groups=c), nn.ReLU(),
                                 nn.Conv2d(c, 3, 1)).eval()
    x = torch.randn(2, 1, 8, 8)
    narrow = make(4)
    plan = graphscale.analyze(narrow, (x,))
    # widening a depthwise conv keeps channels = groups x 1: the group count must grow with the channels
    wide = make(8)
    assert_width_axes_match(narrow, wide, plan)
