"""Import a bench/ script as a module: bench/ is no package (its scripts run from the command line),
so tests load them by path."""
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(rel: str):
    """``bench/<rel>`` (e.g. ``"peers/run.py"``) as a fresh module named after its file."""
    path = BENCH / rel
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
