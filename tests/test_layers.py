"""The package's layers (README, Layout) hold: every import of a ``parscale_edge`` module, at the
top of a file or inside a function, goes down or sideways, never up; the runtime side needs no
torch; bench/ uses the library, never the CLI; the wheel holds exactly one import package."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"edge": "parscale_edge", "export": "parscale_edge.export", "quant": "parscale_edge.quant",
           "demo": "parscale_edge.demo"}

#: lowest first; a module may import its own layer and the ones below. The torch side and the
#: runtime side share a rank but may not import each other (a device runs exports without torch).
#: Leaves import no module of the package, so every layer may use them.
LAYERS = {
    "leaves": (0, {"evaluate", "plots"}),
    "contract": (0, {"config", "manifest", "atomic", "hub", "tokenizer"}),
    "torch": (1, {"model", "loading", "adapter", "gguf_io", "corpus", "train"}),
    "runtime": (1, {"runtime", "kv_cache", "providers", "validate", "device"}),
    "tools": (2, {"export", "quant", "scaling_law", "prepare", "profile", "report"}),
    "faces": (3, {"cli", "demo", "__main__"}),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1][:-3]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """'parscale_edge.export.onnx_builder' -> 'tools'; the package itself (its __init__) -> None."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    head = parts[1]
    for name, (_, members) in LAYERS.items():
        if head in members:
            return name
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to the README's Layout section")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from parscale_edge import cli` imports parscale_edge.cli
            names = [f"{mod}.{a.name}" for a in node.names if mod.count(".") == 0 and mod == "parscale_edge"]
            out += [(node.lineno, n) for n in names] or [(node.lineno, mod)]
    return out


def sources() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_every_import_goes_down_or_sideways():
    bad = []
    for path in sources():
        me = module_name(path)
        mine = layer_of(me)
        if mine is None:
            continue
        rank = LAYERS[mine][0]
        for line, mod in imports(path):
            if not mod.startswith("parscale_edge."):
                continue
            theirs = layer_of(mod)
            if theirs is None or theirs == mine:
                continue
            r = LAYERS[theirs][0]
            if mine == "leaves" or r > rank or (r == rank and {mine, theirs} == {"torch", "runtime"}):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {me} ({mine}) imports {mod} ({theirs})")
    assert not bad, "imports against the layers (README, Layout):\n" + "\n".join(bad)


def test_the_exporter_does_not_import_the_runtime():
    bad = [f"{p.relative_to(ROOT)}:{line}: {mod}" for p in sorted((ROOT / "export").rglob("*.py"))
           for line, mod in imports(p) if mod.startswith(("parscale_edge.runtime", "parscale_edge.kv_cache"))]
    assert not bad, "the graph's writer imports one of its readers; share names through parscale_edge.manifest:\n" + "\n".join(bad)


def test_the_contract_and_runtime_side_import_no_torch():
    bad = []
    for path in sources():
        if layer_of(module_name(path)) in ("contract", "runtime"):
            bad += [f"{path.relative_to(ROOT)}:{line}: {mod}" for line, mod in imports(path)
                    if mod.split(".")[0] == "torch"]
    assert not bad, "\n".join(bad)


def test_bench_scripts_use_the_library_not_the_cli():
    bad = [f"{p.relative_to(ROOT)}:{line}: {mod}" for p in sorted((ROOT / "bench").rglob("*.py"))
           for line, mod in imports_any(p) if mod == "parscale_edge.cli" or mod.startswith("parscale_edge.cli.")]
    assert not bad, "\n".join(bad)


def imports_any(path: Path) -> list[tuple[int, str]]:
    """Absolute imports of a file outside the package (bench scripts)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            mod = node.module or ""
            out += [(node.lineno, f"{mod}.{a.name}" if mod == "parscale_edge" else mod) for a in node.names]
    return out


def test_the_wheel_holds_one_import_package(tmp_path):
    pytest.importorskip("setuptools", minversion="68")  # the build backend pyproject names
    src = tmp_path / "src"  # a copy: setuptools writes build/ beside pyproject.toml and reuses what it finds there
    src.mkdir()
    for name in ("pyproject.toml", "README.md", *FOLDERS):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("parscale_edge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}) == ["parscale_edge"]
    for must in ("parscale_edge/__main__.py", "parscale_edge/export/onnx_builder.py", "parscale_edge/quant/onnx_quant.py",
                 "parscale_edge/demo/app.py", "parscale_edge/data/scaling-law-runs.csv"):
        assert must in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "parscale = parscale_edge.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_python_dash_m_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "parscale_edge", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: parscale") and "export" in r.stdout
