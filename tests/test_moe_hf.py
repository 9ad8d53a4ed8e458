"""Hugging Face mixtures of experts (Mixtral; Qwen2-MoE with its gated shared expert): widen x2 and
widen_into the model built at twice the width compute the narrow model's logits, and 10 steps of
training the x2 model with ``mup_optimizer`` follow the narrow model with the plain optimizer. The
expert count and top-k stay fixed, the router's logits over the experts are a fixed axis, and each
expert's hidden width is a width class of its own (docs/math.md, "Routing").

The experts run as HF's ``batched_mm`` implementation (each token's expert weights gathered, then one
batched matmul): it exports, where the default grouped_mm has no float64 kernel and the eager loop over
the experts hit is data-dependent. Both models compute their router softmax and RMSNorm in float32 whatever
the weights' dtype, so the wide model's mean over twice as many copied values rounds differently:
relative <= 1e-6 for the function, <= 1e-4 after training (the census' float32 tolerances).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import graphscale
from graphscale import zoo

transformers = pytest.importorskip("transformers")

VOCAB = 64
TOL, TRAIN_TOL = 1e-6, 1e-4


def _model(family: str, hidden: int) -> torch.nn.Module:
    tf = transformers
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=16, num_experts_per_tok=2, use_cache=False,
                  attention_dropout=0.0, tie_word_embeddings=False)
    if family == "mixtral":
        config = tf.MixtralConfig(intermediate_size=hidden, num_local_experts=4, **common)
    else:
        config = tf.Qwen2MoeConfig(intermediate_size=2 * hidden, moe_intermediate_size=hidden, num_experts=4,
                                   shared_expert_intermediate_size=hidden, decoder_sparse_step=1, **common)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                experts_implementation="batched_mm")
    with torch.no_grad():  # default inits leave norms at 1: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return zoo.HFWrapper(model, causal=True).double().eval()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


IDS = (torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1)),)


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def widened(request):
    small = _model(request.param, 16)
    plan = graphscale.analyze(small, IDS)
    wide = graphscale.widen(small, IDS, 2, plan=plan)
    return request.param, small, plan, wide


def test_experts_and_router_stay_fixed_and_expert_width_grows(widened):
    family, small, plan, wide = widened
    experts = next(n for n, _ in small.named_parameters() if n.endswith("experts.gate_up_proj"))
    router = next(n for n, _ in small.named_parameters() if n.endswith("mlp.gate.weight"))
    rule_e, rule_r = plan.rules[experts], plan.rules[router]
    assert rule_e.axis_multipliers[0] == 1 and rule_r.axis_multipliers[0] == 1  # the expert count
    expert_width = rule_e.axis_multipliers[1]  # 2 x intermediate (gate | up), a class of its own
    hidden = rule_e.axis_multipliers[2]
    assert expert_width != 1 and hidden != 1 and expert_width != hidden
    narrow, big = dict(small.named_parameters()), dict(wide.named_parameters())
    assert big[experts].shape == (4, 2 * narrow[experts].shape[1], 2 * narrow[experts].shape[2])
    assert big[router].shape == (4, 32)


def test_widen_is_exact(widened):
    family, small, plan, wide = widened
    with torch.no_grad():
        rel = _rel(wide(*IDS), small(*IDS))
    assert rel <= TOL, f"{family}: relative logit error {rel:.3g}"


def test_widen_into_the_model_built_twice_as_wide_is_exact(widened):
    family, small, plan, wide = widened
    large = _model(family, 32)
    graphscale.widen_into(small, large, IDS)
    with torch.no_grad():
        rel = _rel(large(*IDS), small(*IDS))
    assert rel <= TOL, f"{family}: relative logit error {rel:.3g}"


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[torch.Tensor]:
    outs = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        ids = torch.randint(0, VOCAB, (2, 6), generator=gen)
        target = torch.randint(0, VOCAB, (2, 6), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(ids).reshape(-1, VOCAB), target.reshape(-1)).backward()
        opt.step()
        with torch.no_grad():
            outs.append(model(ids))
    return outs


@pytest.mark.parametrize("opt_cls, hp", [
    (torch.optim.AdamW, {"lr": 1e-3, "eps": 1e-3, "weight_decay": 0.1}),
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
], ids=["adamw", "sgd"])
def test_ten_training_steps_follow_the_narrow_model(widened, opt_cls, hp):
    family, small, plan, wide = widened
    narrow, big = copy.deepcopy(small).train(), copy.deepcopy(wide).train()
    big.graphscale = wide.graphscale
    want = _train(narrow, opt_cls(narrow.parameters(), **hp), 10)
    got = _train(big, graphscale.mup_optimizer(big, opt_cls, **hp), 10)
    worst = max(_rel(g, w) for g, w in zip(got, want))
    assert worst <= TRAIN_TOL, f"{family}: diverged by {worst:.3g}"
    if opt_cls is torch.optim.SGD and family == "mixtral":  # control: the plain optimizer drifts away
        plain = copy.deepcopy(wide).train()
        drift = max(_rel(g, w) for g, w in zip(_train(plain, opt_cls(plain.parameters(), **hp), 10), want))
        assert drift > 100 * TRAIN_TOL, f"plain SGD followed too ({drift:.3g}): the test cannot fail"
