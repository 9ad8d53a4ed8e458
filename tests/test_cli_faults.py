"""Fault injection for the command line's files (issue 17, items 10-13): every input survives, every
failure is one line with exit status 2, and no partial or temporary file outlives a run.

Faults injected: ``--out`` naming each kind of input (directly, through a symlink and a hard link); an
existing ``--out``; a process killed mid-write by SIGTERM and by SIGKILL; a read-only directory; a full
disk, simulated by a writer that fails after writing part of the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from graphscale import cli
from graphscale.cli.files import temp_prefix

REPO = Path(__file__).resolve().parents[1]
MODEL = "mlp"  # small (28k parameters): these tests are about files, not widening
TEMP = re.compile(r"^\..+\.graphscale-(\d+)-[A-Za-z0-9-]*\.\w+\.tmp$")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("graphscale: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- item 10: --out may not name any input ------------------------------------------------------------


def _hf_config_dir(tmp_path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "hf"
    transformers.GPT2Config(vocab_size=20, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                            architectures=["GPT2LMHeadModel"]).save_pretrained(d)
    (d / "notes.txt").write_text("the user's notes beside the config\n")
    return d


def test_out_refuses_every_input(tmp_path, capsys) -> None:
    spec_file = tmp_path / "mymodel.py"
    spec_file.write_text(textwrap.dedent("""
        from graphscale import zoo
        def build():
            return zoo.mlp()
    """))
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "extra.toml").write_text("# no extra rules\n")
    rules_file = tmp_path / "mine.toml"
    rules_file.write_text("# no extra rules\n")
    hf = _hf_config_dir(tmp_path)
    (tmp_path / "link.py").symlink_to(spec_file)
    os.link(rules_file, tmp_path / "hardlink.toml")
    cases = [
        ([f"{spec_file}:build"], spec_file, spec_file),
        ([f"{spec_file}:build"], tmp_path / "link.py", spec_file),  # through a symlink
        ([MODEL, "--rules", str(rules_file)], rules_file, rules_file),
        ([MODEL, "--rules", str(rules_file)], tmp_path / "hardlink.toml", rules_file),  # a hard link
        ([MODEL, "--rules", str(rules)], rules / "extra.toml", rules / "extra.toml"),
        (["--hf", str(hf)], hf / "config.json", hf / "config.json"),
        (["--hf", str(hf)], hf / "notes.txt", hf / "notes.txt"),
        (["--hf", str(hf / "config.json")], hf / "config.json", hf / "config.json"),
        ([MODEL, "--into", f"{spec_file}:build"], spec_file, spec_file),
    ]
    for args, out, target in cases:
        before = _sha(target)
        rc = cli.main(["widen", *args, "--out", str(out), "--force"])
        assert rc == 2, (args, out)
        assert "refusing to overwrite an input" in _one_line_error(capsys), (args, out)
        assert _sha(target) == before, f"{target} was modified by widen {args} --out {out}"
        assert not any(TEMP.match(n) for n in os.listdir(out.parent))


def test_out_refuses_a_module_specs_file(tmp_path, monkeypatch, capsys) -> None:
    """``package.module:callable``: the module's file is known once imported; it is refused too."""
    (tmp_path / "tinymod_cli_faults.py").write_text(
        "from graphscale import zoo\ndef build():\n    return zoo.mlp()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = _sha(tmp_path / "tinymod_cli_faults.py")
    rc = cli.main(["widen", "tinymod_cli_faults:build", "--out", str(tmp_path / "tinymod_cli_faults.py"),
                   "--force"])
    assert rc == 2 and "refusing to overwrite an input" in _one_line_error(capsys)
    assert _sha(tmp_path / "tinymod_cli_faults.py") == before
    sys.modules.pop("tinymod_cli_faults", None)


# --- item 11: --force, and the umask's mode ----------------------------------------------------------


def test_existing_out_needs_force(tmp_path, capsys) -> None:
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"the user's previous file")
    assert cli.main(["widen", MODEL, "--out", str(out)]) == 2
    assert "--force" in _one_line_error(capsys)
    assert out.read_bytes() == b"the user's previous file"
    assert cli.main(["widen", MODEL, "--out", str(out), "--force"]) == 0, capsys.readouterr().err
    from graphscale.cli.widened import read_metadata

    assert read_metadata(out)["graphscale.format"] == "graphmodule"  # replaced by the new weights


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_out_mode_follows_umask(tmp_path, capsys, umask) -> None:
    out = tmp_path / "w.safetensors"
    old = os.umask(umask)
    try:
        assert cli.main(["widen", MODEL, "--out", str(out)]) == 0, capsys.readouterr().err
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~umask)


# --- item 12: killed mid-write ------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import sys, time
    import safetensors.torch
    from graphscale import cli

    def slow_writer(module, path, metadata=None):  # writes part of the file, then stalls: a large write
        with open(path, "wb") as f:
            f.write(b"x" * 1_000_000)
            f.flush()
        with open(sys.argv[1], "w") as f:
            f.write(path)
        time.sleep(120)

    safetensors.torch.save_model = slow_writer
    sys.exit(cli.main(sys.argv[2:]))
""")


def _start_mid_write(tmp_path: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / "ready"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, str(script), str(ready), "widen", MODEL, "--out", str(out),
                              "--force"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (ready.exists() and ready.read_text()):
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            out_, err = child.communicate()
            pytest.fail(f"the child never reached the write (rc {child.returncode}): {err[-2000:]}")
        time.sleep(0.05)
    tmp = Path(ready.read_text())
    assert tmp.exists() and tmp.stat().st_size == 1_000_000
    return child, tmp


def test_sigterm_mid_write_removes_the_temp_file_and_keeps_the_old_file(tmp_path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out = work / "w.safetensors"
    out.write_bytes(b"previous weights")
    child, tmp = _start_mid_write(tmp_path, out)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode != 0, "a terminated run must not report success"
    assert "Traceback" not in err and "SIGTERM" in err, err
    assert not tmp.exists(), "SIGTERM left the partial temporary file behind"
    assert os.listdir(work) == ["w.safetensors"] and out.read_bytes() == b"previous weights"


def test_sigkill_mid_write_leaves_a_temp_file_that_the_next_run_removes(tmp_path, capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out = work / "w.safetensors"
    out.write_bytes(b"previous weights")
    child, tmp = _start_mid_write(tmp_path, out)
    child.kill()
    child.communicate(timeout=60)  # reaped: its pid is dead
    assert tmp.exists() and TEMP.match(tmp.name) and int(TEMP.match(tmp.name)[1]) == child.pid
    # a live process's temp file (this one's) and a file that only looks similar are not touched
    live = work / (temp_prefix("x.safetensors") + "abc123.tmp")
    live.write_bytes(b"mid-write in a live process")
    other = work / ".notes.tmp"
    other.write_bytes(b"not graphscale's")
    assert cli.main(["widen", MODEL, "--out", str(work / "other.safetensors")]) == 0
    assert not tmp.exists(), "the next run in the directory did not remove the dead run's temp file"
    assert "removed" in capsys.readouterr().err
    assert live.exists() and other.exists() and out.read_bytes() == b"previous weights"


# --- item 13: read-only directory, full disk ------------------------------------------------------------


def test_read_only_directory_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro / "w.safetensors"
    out.write_bytes(b"previous weights")
    ro.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root writes anyway: make the kernel's refusal happen where it would
            import tempfile

            def refuse(*args, dir=None, **kwargs):
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))

            monkeypatch.setattr(tempfile, "mkstemp", refuse)
        rc = cli.main(["widen", MODEL, "--out", str(out), "--force"])
        assert rc == 2
        line = _one_line_error(capsys)
        assert "cannot write --out" in line and ("not writable" in line or "Permission denied" in line)
        assert out.read_bytes() == b"previous weights" and os.listdir(ro) == ["w.safetensors"]
    finally:
        ro.chmod(0o755)


def test_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"previous weights")

    def disk_fills(module, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr("safetensors.torch.save_model", disk_fills)
    assert cli.main(["widen", MODEL, "--out", str(out), "--force"]) == 2
    line = _one_line_error(capsys)
    assert "No space left on device" in line and "unchanged" in line
    assert out.read_bytes() == b"previous weights" and os.listdir(tmp_path) == ["w.safetensors"]


def test_full_disk_new_file_leaves_nothing(tmp_path, monkeypatch, capsys) -> None:
    def disk_fills(module, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr("safetensors.torch.save_model", disk_fills)
    assert cli.main(["widen", MODEL, "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "nothing was written" in _one_line_error(capsys) and os.listdir(tmp_path) == []


def test_metadata_names_the_format(tmp_path, capsys) -> None:
    out = tmp_path / "w.safetensors"
    assert cli.main(["widen", MODEL, "--out", str(out)]) == 0
    from graphscale.cli.widened import read_metadata

    meta = read_metadata(out)
    assert meta["graphscale.format"] == "graphmodule" and meta["graphscale.source"] == MODEL
    assert json.loads(meta["graphscale.multipliers"]) and "load_widened" in capsys.readouterr().err
