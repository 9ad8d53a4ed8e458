"""What the command line promises beyond its files (issue 17, items 1, 14, 15, 19, 21 and the loose ends):
its output computes the narrow model's function in the model it is loaded into, or is refused there;
non-finite values and absurd multipliers are refused in one line; no code from an HF config directory
runs; ``file.py:callable`` is documented as executing the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import safetensors.torch
import torch

import graphscale
from graphscale import cli, zoo
from graphscale.cli.spec import builtin_kwargs, load_model_spec
from graphscale.cli.widened import read_metadata
from graphscale.errors import GraphscaleError, ModelSpecError
from graphscale.widen import check_memory

REPO = Path(__file__).resolve().parents[1]
MLP = "mlp"


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("graphscale: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- item 1: the file computes the narrow function in the model it loads into --------------------------

CASES = [
    ("gpt:n_embd=32,n_layer=1", "gpt:n_embd=64,n_layer=1", lambda: zoo.gpt(n_embd=32, n_layer=1),
     lambda: zoo.gpt(n_embd=64, n_layer=1)[0]),
    ("gpt-sdpa:n_embd=32,n_layer=1", "gpt-sdpa:n_embd=64,n_layer=1",
     lambda: zoo.gpt_sdpa(n_embd=32, n_layer=1), lambda: zoo.gpt_sdpa(n_embd=64, n_layer=1)[0]),
    ("hf-gpt2:n_embd=16,n_layer=1", "hf-gpt2:n_embd=32,n_layer=1",
     lambda: zoo.hf_gpt2(n_embd=16, n_layer=1), lambda: zoo.hf_gpt2(n_embd=32, n_layer=1)[0]),
]


@pytest.mark.parametrize("small_spec,large_spec,small,large", CASES, ids=["gpt", "gpt-sdpa", "hf-gpt2"])
def test_into_writes_weights_that_compute_the_narrow_function_in_the_users_class(
        tmp_path, capsys, small_spec, large_spec, small, large) -> None:
    if small_spec.startswith("hf-"):
        pytest.importorskip("transformers")
    out = tmp_path / "large.safetensors"
    assert cli.main(["widen", small_spec, "--into", large_spec, "--out", str(out)]) == 0, \
        capsys.readouterr().err
    model, inputs = small()
    user_model = large()
    safetensors.torch.load_model(user_model, str(out), strict=True)  # the user's own class, strictly
    with torch.no_grad():
        assert _rel(user_model(*inputs), model(*inputs)) <= 1e-6
    assert read_metadata(out)["graphscale.format"] == "module"
    assert graphscale.load_widened(large(), out) is not None  # the module format loads into the class


def test_into_float64_exact(tmp_path, capsys) -> None:
    spec = tmp_path / "models64.py"
    spec.write_text(textwrap.dedent("""
        from graphscale import zoo
        def small():
            model, inputs = zoo.gpt(n_embd=32, n_layer=1)
            return model.double(), inputs
        def large():
            model, inputs = zoo.gpt(n_embd=96, n_layer=1)
            return model.double(), inputs
    """))
    out = tmp_path / "large.safetensors"
    assert cli.main(["widen", f"{spec}:small", "--into", f"{spec}:large", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    model, inputs = zoo.gpt(n_embd=32, n_layer=1)
    model = model.double()
    user_model = zoo.gpt(n_embd=96, n_layer=1)[0].double()
    safetensors.torch.load_model(user_model, str(out), strict=True)
    with torch.no_grad():
        assert _rel(user_model(*inputs), model(*inputs)) <= 1e-10


def test_into_hf_config(tmp_path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    for name, width in (("small", 16), ("large", 32)):
        transformers.GPT2Config(vocab_size=20, n_positions=16, n_embd=width, n_layer=1, n_head=2,
                                bos_token_id=19, eos_token_id=19,
                                architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path / name)
    out = tmp_path / "large.safetensors"
    assert cli.main(["widen", "--hf", str(tmp_path / "small"), "--into", str(tmp_path / "large"),
                     "--out", str(out)]) == 0, capsys.readouterr().err
    model, inputs = zoo.hf_from_config(tmp_path / "small")
    user_model, _ = zoo.hf_from_config(tmp_path / "large", seed=5)
    safetensors.torch.load_model(user_model, str(out), strict=True)
    with torch.no_grad():
        assert _rel(user_model(*inputs), model(*inputs)) <= 1e-6


def test_into_a_model_that_computes_something_else_is_refused(tmp_path, capsys) -> None:
    spec = tmp_path / "pair.py"
    spec.write_text(textwrap.dedent("""
        import torch
        def small():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)), \\
                torch.randn(5, 3)
        def other():  # wider, but a different activation: no filling computes small's function
            return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)), \\
                torch.randn(5, 3)
    """))
    out = tmp_path / "w.safetensors"
    assert cli.main(["widen", f"{spec}:small", "--into", f"{spec}:other", "--out", str(out)]) == 2
    assert "does not compute the same function" in _one_line_error(capsys) and not out.exists()


def test_into_refuses_a_disagreeing_multiplier(tmp_path, capsys) -> None:
    rc = cli.main(["widen", "gpt:n_embd=32,n_layer=1", "--into", "gpt:n_embd=64,n_layer=1",
                   "--multiplier", "3", "--out", str(tmp_path / "w.safetensors")])
    assert rc == 2 and "disagrees with --into" in _one_line_error(capsys)
    assert not (tmp_path / "w.safetensors").exists()


def test_graphmodule_file_is_marked_and_loads_only_through_load_widened(tmp_path, capsys) -> None:
    spec = "gpt:n_embd=32,n_layer=1"
    out = tmp_path / "wide.safetensors"
    assert cli.main(["widen", spec, "--out", str(out)]) == 0
    assert "load_widened" in capsys.readouterr().err  # the one-line notice
    meta = read_metadata(out)
    assert meta["graphscale.format"] == "graphmodule" and meta["graphscale.source"] == spec
    assert set(json.loads(meta["graphscale.multipliers"]).values()) == {2}
    model, inputs = zoo.gpt(n_embd=32, n_layer=1)
    with torch.no_grad():
        want = model(*inputs)
        # what load_widened exists for: the strict load into the user's class succeeds, and is wrong
        user_model = zoo.gpt(n_embd=64, n_layer=1)[0]
        safetensors.torch.load_model(user_model, str(out), strict=True)
        assert _rel(user_model(*inputs), want) > 0.1
        for source in (spec, (model, inputs)):
            assert _rel(graphscale.load_widened(source, out)(*inputs), want) <= 1e-6
    with pytest.raises(GraphscaleError, match="wide GraphModule"):
        graphscale.load_widened(zoo.gpt(n_embd=64, n_layer=1)[0], out)
    into = tmp_path / "large.safetensors"
    assert cli.main(["widen", spec, "--into", "gpt:n_embd=64,n_layer=1", "--out", str(into)]) == 0
    with pytest.raises(GraphscaleError, match="twice"):  # and the module format into the GraphModule
        graphscale.load_widened(graphscale.load_widened(spec, out), into)


# --- item 14: non-finite values ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_checkpoint_is_refused_unless_allowed(tmp_path, capsys, bad) -> None:
    model, _ = load_model_spec(MLP)
    with torch.no_grad():
        model[0].weight[0, 0] = bad
    ckpt = tmp_path / "small.safetensors"
    safetensors.torch.save_model(model, str(ckpt))
    out = tmp_path / "w.safetensors"
    assert cli.main(["widen", MLP, "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    line = _one_line_error(capsys)
    assert "NaN or infinite" in line and "0.weight" in line and not out.exists()
    assert cli.main(["widen", MLP, "--checkpoint", str(ckpt), "--out", str(out), "--allow-nonfinite"]) == 0
    assert out.exists()


def test_a_buffer_the_model_defines_as_inf_is_not_damage(tmp_path, capsys) -> None:
    spec = tmp_path / "masked.py"
    spec.write_text(textwrap.dedent("""
        import torch
        class Masked(torch.nn.Module):  # an additive mask: -inf by design
            def __init__(self):
                super().__init__()
                self.a, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
                self.register_buffer("mask", torch.tensor([0.0, float("-inf")]))
            def forward(self, x):
                return self.b(torch.relu(self.a(x))) + self.mask
        def build():
            torch.manual_seed(0)
            return Masked(), torch.randn(5, 3)
    """))
    ckpt, out = tmp_path / "small.safetensors", tmp_path / "w.safetensors"
    model, _ = load_model_spec(f"{spec}:build")
    safetensors.torch.save_model(model, str(ckpt))
    assert cli.main(["widen", f"{spec}:build", "--checkpoint", str(ckpt), "--out", str(out)]) == 0, \
        capsys.readouterr().err
    with torch.no_grad():
        model.mask[0] = float("nan")  # damage where the design has a finite value
    safetensors.torch.save_model(model, str(ckpt))
    assert cli.main(["widen", f"{spec}:build", "--checkpoint", str(ckpt), "--out", str(out), "--force"]) == 2
    assert "mask" in _one_line_error(capsys)


@pytest.mark.parametrize("noise", ["gaussian:nan", "gaussian:-1", "foo:1", "gaussian:inf", "gaussian:",
                                   "spectral:abc", "symmetric:-0.5"])
def test_bad_noise_is_one_line(tmp_path, capsys, noise) -> None:
    out = tmp_path / "w.safetensors"
    assert cli.main(["widen", MLP, "--noise", noise, "--out", str(out)]) == 2
    assert "--noise" in _one_line_error(capsys) and not out.exists()
    assert cli.main(["explain", MLP, "--noise", noise]) == 2
    assert "--noise" in _one_line_error(capsys)


def test_nonfinite_wide_weights_are_not_written(tmp_path, capsys) -> None:
    out = tmp_path / "w.safetensors"  # finite std, but far beyond float32: the noisy weights overflow
    assert cli.main(["widen", MLP, "--noise", "gaussian:1e300", "--out", str(out)]) == 2
    assert "widened model holds NaN or infinite" in _one_line_error(capsys) and not out.exists()


# --- item 15: absurd multipliers ---------------------------------------------------------------------


@pytest.mark.parametrize("k", ["99999999999999999999", "10000000"])
def test_absurd_multiplier_is_refused_before_allocating(tmp_path, capsys, k) -> None:
    out = tmp_path / "w.safetensors"
    assert cli.main(["widen", MLP, "--multiplier", k, "--out", str(out)]) == 2
    line = _one_line_error(capsys)
    assert "are available; choose smaller multipliers" in line and not out.exists()


def test_absurd_multiplier_is_refused_by_verify_and_explain(capsys) -> None:
    assert cli.main(["verify", MLP, "--multiplier", "99999999999999999999", "--examples", "2"]) == 2
    assert "are available; choose smaller multipliers" in _one_line_error(capsys)
    assert cli.main(["explain", MLP, "--multiplier", "99999999999999999999", "--noise", "gaussian:0.1"]) == 2
    assert "are available; choose smaller multipliers" in _one_line_error(capsys)


def test_memory_estimate_matches_the_widened_model() -> None:
    model, inputs = load_model_spec("gpt:n_embd=32,n_layer=1")
    plan = graphscale.analyze(model, inputs)
    mults = plan.multipliers(3)
    wide = graphscale.widen(model, inputs, multiplier=3, plan=plan)
    storage = {t.data_ptr(): t.numel() * t.element_size() for t in wide.state_dict(keep_vars=True).values()}
    actual = sum(storage.values())  # a tied weight is one tensor in memory
    assert check_memory(plan, plan.sizes(mults)) == actual


# --- item 19: no code from an HF config directory -------------------------------------------------------


def test_hf_auto_map_never_runs_the_directorys_code(tmp_path, capsys, monkeypatch) -> None:
    pytest.importorskip("transformers")
    d = tmp_path / "evil"
    d.mkdir()
    marker = tmp_path / "marker"
    (d / "config.json").write_text(json.dumps({
        "model_type": "graphscale-unknown-type", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}}))
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.setattr("builtins.input", lambda *a, **k: "y")  # a user who answers y to [y/N]
    for argv in (["explain", "--hf", str(d)], ["widen", "--hf", str(d), "--out", str(tmp_path / "w")]):
        assert cli.main(argv) == 2
        assert "auto_map" in _one_line_error(capsys)
        assert not marker.exists(), "the config directory's Python ran"


def test_hf_unknown_model_type_is_one_line(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "graphscale-unknown-type"}))
    assert cli.main(["explain", "--hf", str(tmp_path)]) == 2
    assert "transformers cannot read it" in _one_line_error(capsys)


# --- item 21, numpy, broken pipe, specs --------------------------------------------------------------


def test_help_and_readme_say_that_a_file_spec_executes_the_file() -> None:
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0]  # the sub-command action: its choices are the commands
    for command in ("explain", "widen", "verify"):
        assert "EXECUTES the file" in " ".join(sub.choices[command].format_help().split())
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "executes that file" in readme


def test_numpy_is_a_dependency() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("<")[0].split("=")[0].strip() == "numpy" for d in deps)


def test_closed_pipe_is_quiet(tmp_path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written, like `| head` after its lines
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.run([sys.executable, "-m", "graphscale", "explain", MLP], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    os.close(write_end)
    assert child.returncode in (0, 141) and "Traceback" not in child.stderr, child.stderr


def test_builtin_specs_take_builder_arguments() -> None:
    assert builtin_kwargs("gpt:n_embd=128") == ("gpt", {"n_embd": 128})
    assert builtin_kwargs("graphscale.zoo:mlp") is None and builtin_kwargs("gpt:build") is None
    model, _ = load_model_spec("gpt:n_embd=32,n_layer=1")
    assert model.transformer.wte.weight.shape == (65, 32) and len(model.transformer.h) == 1
    for spec, msg in [("gpt:n_embd=__import__('os')", "not a Python literal"), ("gpt:bogus=1", "bogus"),
                      ("gpt:n_embd=1,n_embd=2", "twice"), ("gpt:=3", "KEY=VALUE")]:
        with pytest.raises(ModelSpecError, match=msg):
            load_model_spec(spec)
    assert zoo.load_model_spec("mlp")[0] is not None  # the public zoo entry point still works
