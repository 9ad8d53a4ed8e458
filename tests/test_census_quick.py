"""The architecture census (benchmarks/zoo.py): its --quick subset runs end to end and writes the
documented JSON and Markdown; the known-good models pass every check; a model with a known missing rule
is listed with that reason, not skipped; the two-width oracle catches an axis that was not widened."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOOD = ["causal/gpt2", "causal/llama", "encoder/bert", "causal/bloom"]
CHECKS = ["oracle", "widen", "widen_into", "train_adamw", "train_sgd"]


def _census_module():
    spec = importlib.util.spec_from_file_location("census_zoo", ROOT / "benchmarks" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path]:
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("census") / "zoo.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "zoo.py"), "--quick", "--jobs", "2",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), out


def test_quick_census_writes_every_model_with_status_and_checks(quick) -> None:
    data, out = quick
    census = _census_module()
    assert set(data) == {"meta", "summary", "results"}
    assert sorted(data["results"]) == sorted(census.QUICK)
    for entry, r in data["results"].items():
        assert r["status"] in ("ok", "fail", "not built", "not exported", "timeout", "crash"), entry
        assert {"stage", "reason", "checks", "times"} <= set(r), entry
        assert (r["status"] == "ok") == (r["reason"] == ""), entry
    assert data["summary"]["causal"]["models"] == 3 and data["summary"]["encoder"]["models"] == 2
    table = out.with_suffix(".md").read_text()
    for entry in census.QUICK:
        assert f"| {entry.split('/', 1)[1]} |" in table


def test_known_good_models_pass_every_check(quick) -> None:
    data, _ = quick
    for entry in GOOD:
        r = data["results"][entry]
        assert r["status"] == "ok", (entry, r.get("stage"), r.get("reason"))
        assert [r["checks"][c] for c in CHECKS] == ["ok"] * len(CHECKS), (entry, r["checks"])
        assert r["widen_error"] <= r["tolerance"] and r["widen_into_error"] <= r["tolerance"]
        assert r["width_classes"], entry


def test_a_failing_model_is_listed_with_its_stage_and_reason(quick) -> None:
    data, _ = quick
    # FNet mixes tokens with a Fourier transform over the hidden axis, which no widening keeps: aten.fft_fftn
    # has no rule, and the model is listed with that reason, one line, not skipped
    r = data["results"]["encoder/fnet"]
    assert r["status"] == "fail" and r["stage"] == "analyze", (r["stage"], r["reason"])
    assert "aten.fft_fftn" in r["reason"] and "\n" not in r["reason"]
    census = _census_module()
    classes = dict(census.failure_classes(data["results"]))
    assert any("encoder/fnet" in members for members in classes.values())


def test_readme_section_is_generated_from_the_results(quick) -> None:
    data, out = quick
    script = str(ROOT / "benchmarks" / "zoo.py")
    proc = subprocess.run([sys.executable, script, "--readme", "--out", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "gpt2, llama" in proc.stdout
    assert "| fnet | analyze: no graphscale rule covers function aten.fft_fftn.default" in proc.stdout


def test_oracle_flags_an_axis_that_grows_with_the_config_but_was_not_widened() -> None:
    import graphscale

    census = _census_module()
    torch.manual_seed(0)
    x = (torch.randn(2, 4),)
    small = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    plan = graphscale.analyze(small, x)
    wide = graphscale.widen(small, x, 2, plan=plan)
    # the output axis is fixed by default, so a "2w" config that also grows the output is not matched
    large = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6))
    missed, extra, _ = census._oracle(plan, wide.graphscale, small, large)
    assert missed and all(m.startswith("2.") for m in missed)
    # a config that keeps the hidden size: the hidden class is an extra inferred class, not a miss
    same = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    missed, extra, _ = census._oracle(plan, wide.graphscale, small, same)
    assert not missed and extra == ["0.weight[0]"]


def test_heads_grown_oracle_config_keeps_per_head_sizes_and_doubles_head_counts() -> None:
    """The oracle's 2w config where the plan grows heads (a partial rotary): head_dim and rotary_dim keep
    their value at w, the head counts double, and hidden_size is 2w as in the plain 2w config."""
    pytest.importorskip("transformers")
    census = _census_module()
    w = census.WIDTH
    plain, grown = census.hf_config("gptj", 2 * w), census.hf_config("gptj", 2 * w, w)
    narrow = census.hf_config("gptj", w)
    assert plain.n_embd == grown.n_embd == 2 * w
    assert (plain.n_head, plain.rotary_dim) == (narrow.n_head, 2 * narrow.rotary_dim)
    assert (grown.n_head, grown.rotary_dim) == (2 * narrow.n_head, narrow.rotary_dim)
    llama = census.hf_config("llama", 2 * w, w)
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim) == (8, 4, w // 4)


class _SplitProj(torch.nn.Module):
    """Mamba's x_proj pattern: one projection split into a rank part that grows with the config and two
    parts of a size the config keeps (graphscale widens that one too: an extra class)."""

    def __init__(self, width: int, rank: int, state: int) -> None:
        super().__init__()
        self.rank, self.state = rank, state
        self.inp, self.out = torch.nn.Linear(4, width), torch.nn.Linear(width, 3)
        self.x_proj = torch.nn.Linear(width, rank + 2 * state, bias=False)
        self.dt_proj = torch.nn.Linear(rank, width)
        self.b_proj, self.c_proj = torch.nn.Linear(state, width), torch.nn.Linear(state, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        dt, b, c = torch.split(self.x_proj(h), [self.rank, self.state, self.state], dim=-1)
        return self.out(self.dt_proj(dt) * self.b_proj(b) + self.c_proj(c))


def test_oracle_holds_a_concatenated_axis_with_an_extra_part_to_the_2w_size_of_the_rest() -> None:
    """The state part is an extra class (kept by the config, widened by graphscale); the oracle compares
    x_proj's concatenated axis with the extra class at multiplier 1: rank 2 -> 4 plus state 2 x 3 kept is
    the 2w model's 10, not a miss (the old oracle compared the x2 widening, 16)."""
    import graphscale

    census = _census_module()
    torch.manual_seed(0)
    x = (torch.randn(2, 4, dtype=torch.float64),)
    small = _SplitProj(8, 2, 3).double()
    plan = graphscale.analyze(small, x)
    wide = graphscale.widen(small, x, 2, plan=plan)
    assert wide.get_parameter("x_proj.weight").shape[0] == 16  # both classes x2
    missed, extra, _ = census._oracle(plan, wide.graphscale, small, _SplitProj(16, 4, 3).double())
    assert not missed, missed
    assert extra == sorted({plan.classification.lookup(f"{p}_proj.weight[1]").name for p in "bc"})
    # an x_proj of any other size at 2w is still a miss (10 expected: rank 4 plus the kept 2 x 3)
    odd = _SplitProj(16, 4, 3).double()
    odd.x_proj = torch.nn.Linear(16, 11, bias=False).double()
    missed, _, _ = census._oracle(plan, wide.graphscale, small, odd)
    assert missed == ["x_proj.weight[0] is 8 at w and 11 at 2w but widened to 10 (the extra classes kept)"]


class _DeadBuffer(torch.nn.Module):
    """A frequency buffer sized by the width whose computation the output never uses (Flint's rotary
    embedding where no layer of the config is rotary)."""

    def __init__(self, width: int, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.inp, self.out = torch.nn.Linear(4, width), torch.nn.Linear(width, 3)
        self.register_buffer("freq", torch.arange(width // 2, dtype=torch.float64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.freq.cos()  # computed, never used
        h = torch.tanh(self.inp(x))
        if self.inplace:  # used after all: written into h in place, the add's own result unused
            h.add_(self.freq.sum())
        return self.out(h)


def test_oracle_does_not_count_a_buffer_the_output_does_not_depend_on() -> None:
    import graphscale

    census = _census_module()
    x = (torch.randn(2, 4, dtype=torch.float64),)
    small = _DeadBuffer(8).double()
    plan = graphscale.analyze(small, x, tracer="fx")
    assert any(n.op == "get_attr" and n.target == "freq" for n in plan.captured.gm.graph.nodes)
    wide = graphscale.widen(small, x, 2, plan=plan)
    missed, _, unused = census._oracle(plan, wide.graphscale, small, _DeadBuffer(16).double())
    assert not missed and unused == ["freq"], (missed, unused)
    # the same buffer added in place into a live activation: it is used, and its kept size is a miss
    small = _DeadBuffer(8, inplace=True).double()
    plan = graphscale.analyze(small, x, tracer="fx")
    wide = graphscale.widen(small, x, 2, plan=plan)
    missed, _, _ = census._oracle(plan, wide.graphscale, small, _DeadBuffer(16, inplace=True).double())
    assert missed and missed[0].startswith("freq[0] is 4 at w and 8 at 2w"), missed


class _LogSigmoidMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.act = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3), torch.nn.LogSigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.logsigmoid(self.up(x)) + self.act(self.up(x)))


class _DetachInPlaceMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.up(x)).detach_()  # a stop-gradient gate, as DeBERTa-v2 and GPT-Neo write it
        return self.down(self.up(x) * gate)


class _AliasArithmetic(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.down = torch.nn.Linear(4, 8), torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.multiply(self.a(x), torch.tanh(self.c(x)))  # ConvBERT writes torch.multiply
        return self.down(torch.subtract(h, 1.0).divide(2.0))


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize(("model_cls", "k"),
                         [(_LogSigmoidMLP, 3), (_DetachInPlaceMLP, 2), (_AliasArithmetic, 2)],
                         ids=["log-sigmoid", "detach-inplace", "arithmetic-aliases"])
def test_census_rules_widen_exactly(model_cls: type[torch.nn.Module], k: int, tracer: str) -> None:
    """rules/elementwise.toml, ops the census met without a rule: log-sigmoid (function, module, ATen op)
    and in-place detach are elementwise, multiply/subtract/divide (ConvBERT's aten.multiply.Tensor) are
    mul/sub/div; each widens exactly and its down projection's fan-in grows k times."""
    import graphscale

    torch.manual_seed(0)
    model, x = model_cls().double(), (torch.randn(5, 4, dtype=torch.float64),)
    wide = graphscale.widen(model, x, k, tracer=tracer)
    assert tuple(wide.get_parameter("down.weight").shape) == (3, 8 * k)
    assert (wide(*x) - model(*x)).abs().max().item() <= 1e-12


def _mlp_pair() -> tuple[torch.nn.Module, torch.nn.Module, tuple]:
    import graphscale

    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).double()
    x = (torch.randn(4, 6, dtype=torch.float64),)
    return small, graphscale.widen(small, x, 2), x


def test_census_training_check_catches_a_wrong_law_at_the_first_step(monkeypatch) -> None:
    """The first-step bound: training the x2 model with the plain optimizer (no μP law) differs by ~lr
    after one step, far above the widen tolerance, while mup_optimizer matches to rounding."""
    import graphscale

    census = _census_module()
    small, wide, x = _mlp_pair()
    hp = {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
    first, worst = census._train(census.copy.deepcopy(small), wide, x, torch.optim.SGD, hp)
    assert first <= census.TOL_F64 and worst <= census.TRAIN_TOL_F64
    monkeypatch.setattr(graphscale, "mup_optimizer", lambda model, cls, **kw: cls(model.parameters(), **kw))
    small, wide, x = _mlp_pair()
    first, _ = census._train(small, wide, x, torch.optim.SGD, hp)
    assert first > 1e3 * census.TOL_F64


def test_census_chaos_control_grows_with_the_learning_rate() -> None:
    """The control measures the narrow model's own sensitivity: a 1e-8 perturbation stays ~1e-8 at a
    small lr and grows by orders of magnitude where the narrow trajectory itself is unstable."""
    census = _census_module()
    small, _, x = _mlp_pair()
    calm = census._chaos_control(small, x, torch.optim.SGD, {"lr": 1e-3}, 1e-8)
    wild = census._chaos_control(small, x, torch.optim.SGD, {"lr": 30.0, "momentum": 0.9}, 1e-8)
    assert calm < 1e-7 and wild > 1e3 * calm



def test_census_chaos_control_perturbs_again_after_every_step() -> None:
    """The control's copy is perturbed after every step, as the wide model's float32 rounding differs at
    every step: over 30 steps the copy drifts further than one perturbation at the start carries it."""
    census = _census_module()
    small, _, x = _mlp_pair()
    once_a, once_b = census.copy.deepcopy(small), census.copy.deepcopy(small)
    census._perturb_(once_b, 1e-8, torch.Generator().manual_seed(7))
    once = census._train(once_a, once_b, x, torch.optim.SGD, {"lr": 1e-3}, plain=True)[1]
    every = census._chaos_control(small, x, torch.optim.SGD, {"lr": 1e-3}, 1e-8)
    assert every > 2 * once, (every, once)

def test_oracle_sets_apart_an_axis_the_builder_does_not_scale_by_an_integer() -> None:
    """MobileNetV3's squeeze channels are rounded (64 at w, 120 at 2w): no multiplier can match them,
    so they are listed as rounded, not as an inference miss; a 2x axis that was not widened still is."""
    import graphscale

    census = _census_module()
    torch.manual_seed(0)
    x = (torch.randn(2, 4),)
    small = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    wide = graphscale.widen(small, x, 2)
    plan = graphscale.analyze(small, x)
    rounded: list[str] = []
    large = torch.nn.Sequential(torch.nn.Linear(4, 15), torch.nn.ReLU(), torch.nn.Linear(15, 3))
    missed, _, _ = census._oracle(plan, wide.graphscale, small, large, rounded)
    assert not missed and rounded and rounded[0].startswith("0.weight[0] is 8 at w and 15 at 2w")
    with pytest.raises(graphscale.GraphscaleError, match="not an integer multiple"):
        graphscale.widen_into(small, large, x)
    grown = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6))
    missed, _, _ = census._oracle(plan, wide.graphscale, small, grown, rounded)
    assert missed and missed[0].startswith("2.")


class _Float32Norm(torch.nn.Module):
    """A float64 model whose own code casts to float32 (an RMSNorm as Hugging Face writes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)
        self.gain = torch.nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        var = h.float().pow(2).mean(-1, keepdim=True)
        h = (h.to(torch.float32) * torch.rsqrt(var + 1e-6)).to(x.dtype)
        return self.out(self.gain * h)


def _float32_norm(w: int | None = None) -> tuple[torch.nn.Module, tuple]:
    torch.manual_seed(0)
    return _Float32Norm().double(), (torch.randn(5, 4, dtype=torch.float64),)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_promotion_runs_the_float32_casts_in_float64_and_the_graph_keeps_none(tracer: str) -> None:
    """The float64 rerun's mode: ``.float()`` and ``.to(torch.float32)`` of a float64 input give float64
    inside it and float32 outside; a graph captured inside it computes no float32 (fx's ``.float()`` runs
    at run time, under the mode), while the same graph captured as written does."""
    import graphscale

    census = _census_module()
    x = torch.randn(3, dtype=torch.float64)

    class Casts(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return (x.float(), x.to(torch.float32), x.to(dtype=torch.float32),
                    torch.ones(2, dtype=torch.float32))

    assert {t.dtype for t in Casts()(x)} == {torch.float32}
    with census.promote_float32() as mode:
        assert {t.dtype for t in Casts()(x)} == {torch.float64}
        assert mode.as_written(lambda: torch.ones(1))().dtype == torch.float32  # building stays as written
    assert torch.get_default_dtype() == torch.float32 and Casts()(x)[0].dtype == torch.float32
    model, inputs = _float32_norm()
    with census.promote_float32():
        plan = graphscale.analyze(model, inputs, tracer=tracer)
        assert census._float32_left(plan) == []
        assert model(*inputs).dtype == torch.float64
    assert census._float32_left(graphscale.analyze(model, inputs, tracer=tracer))


def test_a_model_failing_the_float32_bounds_is_ok_only_if_the_float64_rerun_passes(monkeypatch) -> None:
    """A model that fails the float32 bounds by a figure is ok only through a passing float64 rerun, and is
    counted and listed apart; when the rerun fails too (a wrong law), or float32 remains in it, it fails."""
    import graphscale

    census = _census_module()
    monkeypatch.setattr(census, "TOL_F32", 1e-30)  # the as-written run now fails by figures
    r = census.check_model(_float32_norm, False)
    assert r["status"] == "ok" and r["as_written"]["status"] == "fail"
    assert r["float64_rerun"]["status"] == "ok"
    assert r["checks"]["widen"].startswith("fail: output differs by")  # the figures as written are kept
    assert census._worst(r["float64_rerun"]) <= census.TOL_F64
    summary = census.summarize({"causal/norm": r})["causal"]
    assert (summary["ok"], summary["ok_as_written"], summary["ok_float64_rerun"]) == (1, 0, 1)
    section = census.readme_section({"causal/norm": r})
    assert "exact:** (none)." in section and "as written they fail):** norm (there: worst" in section
    assert f"| norm | {census.PROMOTED_OK} (there: worst" in census.markdown({"causal/norm": r}, {})

    # a wrong law fails the rerun too: the model fails, with the rerun's reason
    monkeypatch.setattr(graphscale, "mup_optimizer", lambda model, cls, **kw: cls(model.parameters(), **kw))
    r = census.check_model(_float32_norm, False)
    assert r["status"] == "fail" and r["stage"] == "train_adamw", (r["stage"], r["reason"])
    assert r["reason"].startswith("with float32 casts run in float64: differs by")
    assert census.summarize({"causal/norm": r})["causal"]["ok"] == 0
    monkeypatch.undo()

    # float32 the mode cannot reach (a float32 buffer kept as built) fails the rerun, not passes it
    monkeypatch.setattr(census, "TOL_F32", 1e-30)

    class Float32Buffer(_Float32Norm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * self.scale

    def with_float32_buffer(w: int | None = None) -> tuple[torch.nn.Module, tuple]:
        torch.manual_seed(0)
        model = Float32Buffer().double()
        model.register_buffer("scale", torch.full((3,), 0.5, dtype=torch.float32))
        return model, (torch.randn(5, 4, dtype=torch.float64),)

    r = census.check_model(with_float32_buffer, False)
    assert r["status"] == "fail" and r["stage"] == "promotion", (r["stage"], r["reason"])
    assert "float32 remains" in r["reason"]
