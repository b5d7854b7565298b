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
  to the same destination;
* ``overwrite`` only ever replaces a folder this toolkit wrote (:func:`check_replaceable`): every
  folder made here carries :data:`OWNER_FILE`, which lists what it holds; a folder with other
  content, a link, or a folder that is or holds the source of the work is refused.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

#: written into every folder :func:`atomic_folder` makes: {"written_by": "parscale-edge", "files": [...]}
OWNER_FILE = ".parscale-edge.json"
#: what older parscale-edge folders without :data:`OWNER_FILE` held, recognised by their first file
#: (export/quantize: manifest.json; the demo's profile folder: profile.json)
_LEGACY = {"manifest.json": {"model.onnx", "model.onnx.data", "manifest.json", "tokenizer.json",
                             "tokenizer_config.json", "generation_config.json", "parscale"},
           "profile.json": None}  # None: profile.json with *.png, *.csv, *.json beside it


class OutputPathError(ValueError):
    """An output path cannot be written or must not be replaced (one line naming the path and the fix)."""


def _inside(a: Path, b: Path) -> bool:
    """True when resolved ``a`` is ``b`` or lies inside it."""
    return a == b or b in a.parents


def check_replaceable(out: str | os.PathLike, sources: Sequence[str | os.PathLike] = (),
                      own_files: Iterable[str] | None = None) -> None:
    """Raise :class:`OutputPathError` unless the existing folder ``out`` may be replaced (``--overwrite``).

    Allowed: an empty folder, or a folder this toolkit wrote holding nothing else: listed in its
    :data:`OWNER_FILE`, an older export / profile folder (:data:`_LEGACY`), or, with ``own_files``,
    only those names (e.g. a training run's files). Refused: ``out`` is a link, or is or holds one
    of ``sources`` (the inputs of the work, links resolved)."""
    out = Path(out)
    if out.is_symlink():
        raise OutputPathError(f"{out} is a link; --overwrite replaces only folders this toolkit wrote, not links "
                              "(remove the link or choose another output folder)")
    if not out.exists():
        return
    real = out.resolve()
    for src in sources:
        s = Path(src)
        if not s.exists():
            continue
        s = s.resolve()
        if _inside(s, real):  # an output inside the source is fine: replacing it deletes nothing of the source
            what = "is" if s == real else "holds"
            raise OutputPathError(f"{out} {what} the source {src}; --overwrite would delete it. Choose another "
                                  "output folder")
    if not out.is_dir():
        raise OutputPathError(f"{out} exists and is not a folder; choose another output path")
    names = {p.name for p in out.iterdir()} - {OWNER_FILE}
    names = {n for n in names if not (n.startswith(".") and (".tmp-" in n or ".old-" in n))}  # our temp files
    if not names and not (out / OWNER_FILE).exists():
        return  # an empty folder: nothing to lose
    allowed = _owned_names(out, own_files)
    if allowed is None:
        raise OutputPathError(f"{out} was not written by parscale-edge (no {OWNER_FILE} or manifest); --overwrite "
                              "replaces only this toolkit's output folders. Choose another output folder")
    other = sorted(names - allowed)
    if other:
        raise OutputPathError(f"{out} holds files parscale-edge did not write ({', '.join(other[:3])}"
                              f"{', ...' if len(other) > 3 else ''}); --overwrite would delete them. Move them "
                              "or choose another output folder")


def _owned_names(out: Path, own_files: Iterable[str] | None) -> set[str] | None:
    """The names ``out`` may hold as this toolkit's folder, or None when it is not one."""
    try:
        d = json.loads((out / OWNER_FILE).read_text())
        if isinstance(d, dict) and d.get("written_by") == "parscale-edge" and isinstance(d.get("files"), list):
            return {str(f) for f in d["files"]}
    except (OSError, ValueError):
        pass
    if own_files is not None:
        return set(own_files)
    if (out / "manifest.json").is_file():
        try:
            if isinstance(json.loads((out / "manifest.json").read_text()), dict):
                return _LEGACY["manifest.json"]
        except (OSError, ValueError):
            return None
    if (out / "profile.json").is_file():
        return {p.name for p in out.iterdir() if p.is_file() and p.suffix in (".png", ".csv", ".json")}
    return None


def check_output_file(path: str | os.PathLike, flag: str = "--json") -> Path:
    """Fail before any slow work when the file ``path`` (``flag``'s value) cannot be written:
    it is a folder, or the nearest existing parent is not a writable folder. Raises OutputPathError."""
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(f"{flag} {p} is a folder; give a file name, e.g. {p / 'result.json'}")
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{flag} {p}: {parent} is not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {p}: {parent} is not writable; choose another path")
    return p


def check_output_folder(out: str | os.PathLike, overwrite: bool = False,
                        sources: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Fail before any slow work when the folder ``out`` cannot be written: it is a file, it exists
    and ``overwrite`` is False, ``overwrite`` may not replace it (:func:`check_replaceable`: only this
    toolkit's folders, never one that is or holds one of ``sources``; None and missing ones are
    skipped), or it cannot be created (:func:`check_creatable`). Raises OutputPathError."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{p} exists and is not a folder; choose another output path")
    if p.exists() and not overwrite:
        raise OutputPathError(f"{p} exists; pass --overwrite or choose another folder")
    if overwrite:
        check_replaceable(p, [s for s in sources if s and Path(s).exists()])
    check_creatable(p)
    return p


def check_creatable(folder: str | os.PathLike) -> None:
    """Raises OutputPathError when the folder cannot be created: its nearest existing parent is a
    file or not writable."""
    p = Path(folder)
    parent = p.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot create {p}: {parent} is a file, not a folder; choose another output path")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"cannot create {p}: {parent} is not writable")


def current_umask() -> int:
    """The process's file-creation mask (os.umask can only be read by setting it: set and restore)."""
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
def atomic_folder(out: str | os.PathLike, overwrite: bool = False,
                  sources: Sequence[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; on success it replaces ``out``, with
    :data:`OWNER_FILE` added (it lists the folder's files, so a later ``overwrite`` knows them).

    Permissions follow the umask (mkdtemp alone would leave the folder private, 0700).
    Raises FileExistsError when ``out`` exists and ``overwrite`` is False (also when another
    process created it while this one was writing), NotADirectoryError when ``out`` is an existing
    file, OutputPathError when ``overwrite`` may not replace ``out`` (:func:`check_replaceable`;
    ``sources``: the work's inputs, never replaced), checked before and again at the rename.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder; choose another output path")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite or choose another folder")
    if overwrite:
        check_replaceable(out, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    old = None
    try:
        yield tmp
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / OWNER_FILE).write_text(json.dumps({"written_by": "parscale-edge", "files": files}) + "\n")
        mask = current_umask()
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
                check_replaceable(out, sources)
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
    half-written, also with concurrent writers). Raises OutputPathError naming ``path`` (not the
    temporary file) when it cannot be written: a folder, no permission, no space."""
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(f"{p} is a folder; give a file name, e.g. {p / 'result.json'}")
    tmp = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(p), suffix=".partial", dir=p.parent)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=2) + "\n")
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, p)
    except OSError as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise OutputPathError(f"cannot write {p}: {e.strerror or e}") from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise
    return p


#: a temporary sibling's name: ``.<name>.tmp-<host>-<pid>.<random>[.partial]`` (or ``.old-``)
_TEMP_PART = re.compile(r"^\.(.+)\.(?:tmp|old)-.+?\.[^.]+(?:\.partial)?$")


def public_path(path: str | os.PathLike) -> Path:
    """``path`` with a temporary sibling of this module (``.<name>.tmp-<host>-<pid>.<random>``,
    ``.old-``, ``.partial``) replaced by the destination it stands for, for messages: the user
    knows the folder they asked for, not the hidden one."""
    p = Path(path)
    parts = list(p.parts)
    for i, part in enumerate(parts):
        m = _TEMP_PART.match(part)
        if m:
            parts[i] = m.group(1)
    return Path(*parts) if parts else p


def folder_size_mib(folder: str | os.PathLike) -> float:
    """Size of the files directly in ``folder``, MiB (2**20 bytes)."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file()) / 2**20
