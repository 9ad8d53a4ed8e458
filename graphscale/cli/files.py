"""File safety of the command line: never overwrite an input, never leave a partial or stale file behind.

- :func:`check_out` refuses an ``--out`` that is one of the command's inputs (through symlinks and hard
  links), an existing file without ``--force``, or a directory.
- :func:`write_safetensors_atomic` writes to a temporary file in the destination directory, named
  ``.<out name>.graphscale-<pid>-<host>.<random>.tmp``, fsyncs it, gives it the mode a new file gets under the
  umask (``0666 & ~umask``), and renames it over ``--out``: readers see the old file or the new one.
- :func:`sigterm_raises` turns SIGTERM into an exception, so the writer's cleanup removes its temporary file.
- :func:`remove_stale_temps` removes the temporary files of graphscale processes that no longer run
  (killed with SIGKILL, or a machine crash): only names of that pattern, only when written on this host
  (a shared directory may hold another machine's live write) and only when that pid is dead.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from graphscale.errors import GraphscaleError

__all__ = ["Terminated", "check_out", "remove_stale_temps", "sigterm_raises", "temp_prefix", "umask_mode",
           "write_safetensors_atomic"]

_TEMP = re.compile(r"^\..+\.graphscale-(?P<pid>\d+)-(?P<host>[A-Za-z0-9-]*)\.[A-Za-z0-9_]+\.tmp$")


def _host() -> str:
    """This machine's name, reduced to the characters a temporary file's name uses here."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64]


def temp_prefix(out: str | os.PathLike[str]) -> str:
    """The name prefix of ``out``'s temporary file: ``.<name>.graphscale-<pid>-<host>.``.

    Example:
        >>> temp_prefix("w.safetensors").startswith(f".w.safetensors.graphscale-{os.getpid()}-")
        True
    """
    return f".{Path(out).name}.graphscale-{os.getpid()}-{_host()}."


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (see :func:`sigterm_raises`).

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` swallows it while the
    ``finally``/``except BaseException`` cleanups on the way up still run.
    """


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` instead of killing the process outright.

    Only the main thread can install signal handlers; elsewhere this does nothing.

    Example:
        >>> with sigterm_raises():
        ...     pass
    """
    try:
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: Any) -> None:
            raise Terminated(signum)

        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def umask_mode() -> int:
    """The mode a new regular file gets from ``open()``: ``0o666 & ~umask``.

    Example:
        >>> old = os.umask(0o027); oct(umask_mode()); _ = os.umask(old)
        '0o640'
    """
    mask = os.umask(0)  # the only portable way to read the umask is to set it, then restore it
    os.umask(mask)
    return 0o666 & ~mask


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we could have written: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # alive under another user, or not a real pid: keep the file
    return True


def is_stale_temp(name: str) -> bool:
    """Whether ``name`` is a graphscale temporary file or folder whose writing process on this host is dead.

    Example:
        >>> is_stale_temp(f".w.safetensors.graphscale-999999999-{_host()}.abc.tmp")
        True
        >>> is_stale_temp(temp_prefix("w.safetensors") + "abc.tmp")  # this process: alive
        False
    """
    match = _TEMP.match(name)
    return match is not None and match["host"] == _host() and not _pid_alive(int(match["pid"]))


def remove_stale_temps(directory: str | os.PathLike[str], directories: bool = False) -> list[Path]:
    """Delete graphscale's temporary files in ``directory`` whose writing process is dead; return them.

    Only regular files named ``.<name>.graphscale-<pid>-<host>.<random>.tmp`` written on this host whose
    ``<pid>`` runs no process are removed (a live pid's file may be mid-write; another host's pids are not
    ours to judge). With ``directories``, only (non-symlink) directories of that name are removed, with all
    they hold: the temporary directories of :func:`graphscale.hf.upscale`.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> dead = f".w.safetensors.graphscale-999999999-{_host()}.abc.tmp"
        >>> _ = (d / dead).write_bytes(b"partial")
        >>> _ = (d / (temp_prefix("w.safetensors") + "abc.tmp")).write_bytes(b"this process: alive")
        >>> _ = (d / ".w.safetensors.graphscale-999999999-otherhost.abc.tmp").write_bytes(b"elsewhere")
        >>> [p.name for p in remove_stale_temps(d)] == [dead], len(os.listdir(d))
        (True, 2)
    """
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not is_stale_temp(name):
            continue
        path = Path(directory) / name
        try:
            mode = os.lstat(path).st_mode
            if directories and stat.S_ISDIR(mode):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            elif not directories and stat.S_ISREG(mode):
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass  # gone already, or not ours to remove: the next run tries again
    return removed


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a link to an input is that input
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_out(out: str | os.PathLike[str], inputs: Iterable[tuple[str, str | os.PathLike[str]]],
              force: bool) -> Path:
    """Refuse an ``--out`` path that names an input, an existing file (without ``force``) or a directory.

    ``inputs`` are ``(what, path)`` pairs such as ``("--checkpoint", "small.safetensors")``; an input is
    recognised through symlinks and hard links (same device and inode). Returns ``out`` as a ``Path``.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); f = d / "model.py"; _ = f.write_text("")
        >>> check_out(d / "new.safetensors", [("MODEL", f)], force=False).name
        'new.safetensors'
        >>> check_out(f, [("MODEL", f)], force=True)
        Traceback (most recent call last):
        ...
        graphscale.errors.GraphscaleError: --out ... is MODEL's file ...; refusing to overwrite an input
    """
    out = Path(out)
    out_id = _file_id(out)
    if out_id is not None:
        for what, path in inputs:
            if _file_id(Path(path)) == out_id:
                raise GraphscaleError(f"--out {out} is {what}'s file {path}; refusing to overwrite an input")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.resolve().is_dir():
        raise GraphscaleError(f"--out {out}: directory {parent} does not exist")
    if out.is_dir():
        raise GraphscaleError(f"--out {out} is a directory; give a file name")
    if (out.exists() or out.is_symlink()) and not force:
        raise GraphscaleError(f"--out {out} exists; pass --force to replace it")
    return out


def write_safetensors_atomic(module: Any, out: str | os.PathLike[str],
                             metadata: dict[str, str] | None = None) -> None:
    """Write ``module``'s state dict to ``out`` in safetensors format, atomically.

    The tensors go to a temporary file ``.<name>.graphscale-<pid>-<host>.<random>.tmp`` in the destination
    directory, which is flushed to disk, given mode ``0666 & ~umask`` (what a plain ``open`` would create)
    and then renamed over ``out``: readers see the old file or the complete new one, never a partial write.
    On any error, or SIGTERM under :func:`sigterm_raises`, the temporary file is removed and ``out`` is
    untouched; the error propagates (an ``OSError`` for a full disk or a read-only directory). Tensors that
    share memory (tied weights) are stored once, as ``safetensors.torch.save_model`` does; read the file
    back with ``safetensors.torch.load_model``.

    Example:
        >>> import torch, tempfile
        >>> d = tempfile.mkdtemp()
        >>> write_safetensors_atomic(torch.nn.Linear(2, 3), os.path.join(d, "w.safetensors"))
        >>> sorted(os.listdir(d))
        ['w.safetensors']
    """
    import safetensors.torch

    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=temp_prefix(out), suffix=".tmp")
    try:
        os.close(fd)
        fd = -1
        safetensors.torch.save_model(module, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            # after the save: safetensors may recreate the file, and mkstemp's 0600 is not what users expect
            os.fchmod(f.fileno(), umask_mode())
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def describe_os_error(e: OSError) -> str:
    """One line for a failed write: the reason and the path, no traceback.

    Example:
        >>> import errno
        >>> describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/d/.w.tmp"))
        'No space left on device (/d/.w.tmp)'
    """
    reason = e.strerror or str(e) or type(e).__name__
    return f"{reason} ({e.filename})" if e.filename else reason


def note(message: str) -> None:
    """Print a one-line notice on stderr (kept off stdout, which may be piped into another tool)."""
    print(f"graphscale: note: {message}", file=sys.stderr)
