"""``graphscale widen --out FILE`` writes atomically: a write interrupted half-way leaves the old FILE
byte for byte (or no FILE, if there was none), never a partial one.

The interruption is real and independent of how the CLI writes: the command runs in a subprocess whose
file-size limit (``RLIMIT_FSIZE``) is below the size of the wide checkpoint, so the kernel stops whichever
write crosses it -- with ``SIGXFSZ`` (the process dies mid-write) or, when that signal is ignored as
CPython does by default, with ``EFBIG`` (the write fails and the command must fail).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

resource = pytest.importorskip("resource")  # POSIX only
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs SIGXFSZ (POSIX)")

REPO = Path(__file__).resolve().parent.parent
LIMIT = 100_000  # bytes; `widen mlp --multiplier 2` writes ~425 kB
OLD = b"the previous checkpoint, which must survive\n" * 200  # ~9 kB, under the limit

# Runs the CLI as `python -m graphscale` would; `die` restores SIGXFSZ's default action (terminate) that
# CPython ignores at startup, so the process is killed at the write that crosses the limit.
RUNNER = ("import runpy, signal, sys\n"
          "if sys.argv[1] == 'die':\n"
          "    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)\n"
          "sys.argv = ['graphscale'] + sys.argv[2:]\n"
          "runpy.run_module('graphscale', run_name='__main__')\n")


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def _widen_interrupted(out: Path, mode: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PYTHONDONTWRITEBYTECODE="1")  # a .pyc written at import must not hit the limit first
    return subprocess.run([sys.executable, "-c", RUNNER, mode, "widen", "mlp", "--multiplier", "2",
                           "--out", str(out), "--force"], cwd=out.parent, env=env,
                          preexec_fn=_limit_file_size, capture_output=True, text=True, timeout=300)


def test_killed_mid_write_keeps_the_old_file(tmp_path: Path) -> None:
    out = tmp_path / "wide.safetensors"
    out.write_bytes(OLD)
    proc = _widen_interrupted(out, "die")
    assert proc.returncode == -signal.SIGXFSZ, (proc.returncode, proc.stderr[-2000:])  # killed mid-write
    assert out.read_bytes() == OLD


def test_killed_mid_write_leaves_no_file_at_the_target(tmp_path: Path) -> None:
    out = tmp_path / "wide.safetensors"
    proc = _widen_interrupted(out, "die")
    assert proc.returncode == -signal.SIGXFSZ, (proc.returncode, proc.stderr[-2000:])
    assert not out.exists(), f"a partial file of {out.stat().st_size} bytes was left at --out"


def test_failed_write_keeps_the_old_file_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """In-process (CPython ignores SIGXFSZ, so the write fails with EFBIG): the command must fail, keep the
    old file and remove its temporary file. Only the soft limit is lowered, and restored afterwards."""
    from graphscale import cli

    out = tmp_path / "wide.safetensors"
    out.write_bytes(OLD)
    monkeypatch.chdir(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
    try:
        status = cli.main(["widen", "mlp", "--multiplier", "2", "--out", str(out), "--force"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    captured = capsys.readouterr()
    assert status == 2, status  # a one-line refusal, not a traceback
    assert "wrote" not in captured.out
    (line,) = [ln for ln in captured.err.splitlines() if ln.startswith("graphscale: error:")]
    assert "File too large" in line and "the existing file is unchanged" in line, line  # failed at the write
    assert out.read_bytes() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left behind
