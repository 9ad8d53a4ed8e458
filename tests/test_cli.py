"""The ``graphscale`` command: argument handling, error reporting, atomic checkpoint writing; and, once the
engine's public API exists, the commands end to end."""

from __future__ import annotations

import copy
import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

import graphscale
from graphscale import cli, zoo
from graphscale.errors import GraphscaleError, MultiplierError
from graphscale.record import WideningRecord


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_parse_multiplier() -> None:
    assert cli.parse_multiplier(None) == 2
    assert cli.parse_multiplier(["3"]) == 3
    assert cli.parse_multiplier(["a=2", "b = 4"]) == {"a": 2, "b": 4}
    for bad, msg in [(["2", "a=3"], "not both"), (["2", "3"], "several"), (["x"], "not an integer"),
                     (["a=1.5"], "not an integer"), (["0"], "positive"), (["=3"], "class name"),
                     (["a=2", "a=3"], "twice")]:
        with pytest.raises(MultiplierError, match=msg):
            cli.parse_multiplier(bad)


def test_errors_are_one_line_exit_2(capsys) -> None:
    assert cli.main(["explain", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("graphscale: error: unknown model 'no-such-model'") and "Traceback" not in err
    assert cli.main(["widen", "mlp", "--multiplier", "2", "--multiplier", "a=3", "--out", "x"]) == 2
    assert "--multiplier" in capsys.readouterr().err
    assert cli.main(["explain", "mlp", "--rules", "/no/such/rules.toml"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_debug_shows_traceback(capsys) -> None:
    assert cli.main(["explain", "no-such-model", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["widen", "mlp"])  # --out is required
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["explain", "mlp", "--tracer", "bogus"])
    assert e.value.code == 2


def test_write_safetensors_atomic_tied(tmp_path) -> None:
    model, _ = zoo.gpt(n_embd=32)
    out = tmp_path / "gpt.safetensors"
    out.write_bytes(b"old contents")
    cli.write_safetensors_atomic(model, out, {"k": "v"})
    assert sorted(os.listdir(tmp_path)) == ["gpt.safetensors"]  # no temp file left behind
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["k"] == "v"
    fresh, _ = zoo.gpt(n_embd=32, seed=1)
    load_model(fresh, str(out))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight is fresh.transformer.wte.weight


def test_write_safetensors_atomic_failure_keeps_old_file(tmp_path, monkeypatch) -> None:
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"old contents")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_model", boom)
    with pytest.raises(OSError, match="disk full"):  # the library raises; the CLI turns it into one line
        cli.write_safetensors_atomic(torch.nn.Linear(2, 2), out)
    assert out.read_bytes() == b"old contents" and os.listdir(tmp_path) == ["w.safetensors"]


def _fake_widen(calls: list):
    """A test double for graphscale.widen: exercises the CLI's plumbing, not the widening itself."""

    def widen(model, inputs, multiplier=2, **kwargs):
        calls.append((model, multiplier, kwargs))
        wide = copy.deepcopy(model)
        mults = {"all": multiplier} if isinstance(multiplier, int) else multiplier
        wide.graphscale = WideningRecord({}, mults)
        return wide

    return widen


def test_widen_plumbing(tmp_path, monkeypatch, capsys) -> None:
    calls: list = []
    monkeypatch.setattr(graphscale, "widen", _fake_widen(calls), raising=False)
    narrow, _ = zoo.mlp(seed=3)
    ckpt = tmp_path / "small.safetensors"
    save_model(narrow, str(ckpt))
    before = _sha(ckpt)
    out = tmp_path / "wide.safetensors"
    rc = cli.main(["widen", "mlp", "--checkpoint", str(ckpt), "--out", str(out), "--multiplier", "3",
                   "--heads", "grow"])
    assert rc == 0, capsys.readouterr().err
    assert _sha(ckpt) == before  # the input checkpoint is never modified
    model, multiplier, kwargs = calls[0]
    # the user's options reach widen, which analyzes once and checks the memory itself
    assert multiplier == 3 and kwargs == {"noise": None, "seed": 0, "heads": "grow"}
    # the checkpoint's weights (seed 3), not the spec's defaults (seed 0), were loaded before widening
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), narrow.state_dict().values()))
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["graphscale.multipliers"]) == {"all": 3}
        assert torch.equal(f.get_tensor("0.weight"), narrow[0].weight)
    assert "wrote" in capsys.readouterr().out


def test_widen_refuses_to_overwrite_checkpoint(tmp_path, capsys) -> None:
    model, _ = zoo.mlp()
    ckpt = tmp_path / "small.safetensors"
    save_model(model, str(ckpt))
    before = _sha(ckpt)
    assert cli.main(["widen", "mlp", "--checkpoint", str(ckpt), "--out", str(ckpt)]) == 2
    assert "refusing" in capsys.readouterr().err and _sha(ckpt) == before
    os.link(ckpt, tmp_path / "alias.safetensors")
    assert cli.main(["widen", "mlp", "--checkpoint", str(ckpt), "--out",
                     str(tmp_path / "alias.safetensors")]) == 2
    assert _sha(ckpt) == before


def test_widen_bad_checkpoint(tmp_path, capsys) -> None:
    other, _ = zoo.mlp(widths=(4, 4))
    ckpt = tmp_path / "other.safetensors"
    save_model(other, str(ckpt))
    assert cli.main(["widen", "mlp", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "cannot load --checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_explain_json_end_to_end(capsys) -> None:
    assert cli.main(["explain", "mlp", "--json"]) == 0
    json.loads(capsys.readouterr().out)


def test_widen_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "wide.safetensors"
    assert cli.main(["widen", "gpt", "--out", str(out)]) == 0, capsys.readouterr().err
    narrow, inputs = zoo.gpt()
    wide = graphscale.load_widened("gpt", out)  # the graphmodule format's load path
    with torch.no_grad():
        assert (wide(*inputs) - narrow(*inputs)).abs().max() <= 1e-5 * narrow(*inputs).abs().max()


def test_verify_end_to_end(capsys) -> None:
    assert cli.main(["verify", "mlp", "--examples", "5"]) == 0, capsys.readouterr().out


def test_graphscale_error_is_base() -> None:
    assert issubclass(MultiplierError, GraphscaleError)
