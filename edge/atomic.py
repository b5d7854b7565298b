"""Atomic output folders: build in a temporary sibling, then rename into place.

A failed, interrupted or killed write leaves either the old output or none at the destination,
never a half-written folder that later loads:

* the folder is built in ``.<name>.tmp-<host>-<pid>.<random>`` next to the destination and renamed
  into place only when complete;
* replacing an existing folder renames the old one aside first (``.<name>.old-...``), so no moment
  shows a half-deleted folder under the real name;
* the renames run under an exclusive lock on the parent folder (``flock``), so two processes
  writing the same destination at once end with one complete result;
* temporary siblings left by killed processes (same host, dead pid) are removed by the next write
  to the same destination.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _owner() -> str:
    """``<host>-<pid>``: who made a temporary sibling (hostnames may contain '-' and '.')."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its files
    return True


def temp_prefix(out: str | os.PathLike, kind: str = "tmp") -> str:
    """Name prefix of a temporary sibling of ``out``: ``.<name>.<kind>-<host>-<pid>.``."""
    return f".{Path(out).name}.{kind}-{_owner()}."


def clean_stale(out: str | os.PathLike) -> list[Path]:
    """Remove temporary siblings of ``out`` (``.<name>.tmp-*``, ``.<name>.old-*``, ``.<name>.*.partial``)
    whose writer was a process on this host that no longer runs. Returns what was removed."""
    out = Path(out)
    host = socket.gethostname()
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}.*"):
        rest = p.name[len(out.name) + 2:]
        kind, _, tail = rest.partition("-")
        if kind not in ("tmp", "old") or "." not in tail:
            continue
        owner = tail.removesuffix(".partial").rsplit(".", 1)[0]
        h, _, pid = owner.rpartition("-")
        if h != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``folder`` (flock on its directory file; no lock file is left).
    Where flock is unavailable (Windows) the renames run unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def staging_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder next to ``out`` for intermediate files (removed on exit, and by
    :func:`clean_stale` if this process is killed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; on success it replaces ``out``.

    Permissions follow the umask (mkdtemp alone would leave the folder private, 0700).
    Raises FileExistsError when ``out`` exists and ``overwrite`` is False (also when another
    process created it while this one was writing), NotADirectoryError when ``out`` is an existing
    file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder; choose another output path")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    old = None
    try:
        yield tmp
        mask = _umask()
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        with _locked(out.parent):
            if out.exists():
                if not overwrite:
                    raise FileExistsError(f"{out} was created by another process while this one was writing it; "
                                          "pass --overwrite or choose another folder")
                if not out.is_dir():
                    raise NotADirectoryError(f"{out} exists and is not a folder; choose another output path")
                old = Path(tempfile.mkdtemp(prefix=temp_prefix(out, "old"), dir=out.parent))
                os.replace(out, old)  # the old folder leaves in one step (old is empty, so this is allowed)
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON through a unique temporary sibling and a rename (never
    half-written, also with concurrent writers)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(p), suffix=".partial", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=2) + "\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def folder_size_mib(folder: str | os.PathLike) -> float:
    """Size of the files directly in ``folder``, MiB (2**20 bytes)."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file()) / 2**20
