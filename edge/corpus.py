"""Training text: the Python standard-library split, file collection, tokenization, data order.

No torch here. The data order is a pure function of (seed, global sample index), so a resumed run
and every process of a distributed run agree on it without communicating.

**Standard-library split** (:func:`stdlib_split`). Files are the ``.py`` modules under the running
interpreter's stdlib folder, skipping test suites (any path part ``test``, ``tests`` or
``idle_test``), ``site-packages``, ``pydoc_data`` (prose) and ``encodings`` (codec tables). A module
is *held out* when its path relative to the stdlib folder (POSIX form, e.g. ``json/decoder.py``) is
one of :data:`parscale_edge.evaluate.HELDOUT_MODULES` (the evaluation text of ``parscale eval``/``convert``
and of the training report), or when the first 8 hex digits of ``sha256(path)`` read as an integer
are ``< 0.05 * 16**8`` (about 5% of the modules, chosen by name only, so the split does not depend on
file contents or order). Everything else is training data. Held-out modules are never trained on.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .evaluate import HELDOUT_MODULES

#: Path parts whose files are never used as stdlib training or held-out text.
STDLIB_SKIP_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "pydoc_data", "encodings", "__pycache__"})
#: Fraction of stdlib modules held out by the hash rule (on top of HELDOUT_MODULES).
HASH_HELDOUT_FRACTION = 0.05
#: Text placed between files (the same as :func:`parscale_edge.evaluate.stdlib_text` uses).
FILE_SEPARATOR = "\n\n"


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout_module(relpath: str) -> bool:
    """Whether a stdlib module (POSIX path relative to the stdlib folder) is held out (module docstring)."""
    if relpath in HELDOUT_MODULES:
        return True
    return int(hashlib.sha256(relpath.encode("utf-8")).hexdigest()[:8], 16) < HASH_HELDOUT_FRACTION * 16**8


@dataclass
class StdlibSplit:
    """Training and held-out stdlib files (absolute paths, sorted by relative path)."""

    root: Path
    train: list[Path]
    heldout: list[Path]


def stdlib_split(root: str | os.PathLike | None = None) -> StdlibSplit:
    """Split the standard library's modules into training and held-out files by module path.

    Raises FileNotFoundError when the folder has no ``.py`` files."""
    root = Path(root) if root is not None else stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if not (STDLIB_SKIP_PARTS & set(p.relative_to(root).parts)))
    if not files:
        raise FileNotFoundError(f"no .py files under {root}; pass --data FILES instead of stdlib")
    train, held = [], []
    for p in files:
        (held if is_heldout_module(p.relative_to(root).as_posix()) else train).append(p)
    return StdlibSplit(root, train, held)


def collect_files(specs: Sequence[str]) -> list[Path]:
    """Resolve ``--data``/``--eval`` arguments into a sorted, de-duplicated list of files.

    Each spec is ``stdlib`` (the training half of :func:`stdlib_split`), a file, a folder (its
    ``.py`` files, recursively) or a glob (``**`` allowed). Raises FileNotFoundError naming a spec
    that matches nothing."""
    out: list[Path] = []
    for spec in specs:
        if spec == "stdlib":
            out += stdlib_split().train
            continue
        p = Path(spec)
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(p.rglob("*.py"))
            if not found:
                raise FileNotFoundError(f"folder {p} holds no .py files; pass files or a glob such as '{p}/**/*.txt'")
            out += found
        else:
            found = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
            if not found:
                raise FileNotFoundError(f"{spec!r} matches no file (use a file, a folder, a glob or 'stdlib')")
            out += found
    seen, unique = set(), []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(p)
    return unique


def read_texts(files: Iterable[Path]) -> list[str]:
    """UTF-8 contents of ``files``. Raises ValueError naming a file that is not UTF-8 text."""
    texts = []
    for f in files:
        try:
            texts.append(Path(f).read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{f} is not UTF-8 text ({e}); remove it from --data") from None
    return texts


def tokenize_texts(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Token ids of the texts joined by :data:`FILE_SEPARATOR` (each text tokenized on its own):
    int32 [T]. ``tokenizer`` is an :class:`parscale_edge.tokenizer.Tokenizer`."""
    sep = tokenizer.encode(FILE_SEPARATOR)
    ids: list[int] = []
    for i, enc in enumerate(tokenizer.hf.encode_batch(list(texts), add_special_tokens=False)):
        if i:
            ids += sep
        ids += enc.ids
    return np.asarray(ids, dtype=np.int32)


def tokens_sha256(tokens: np.ndarray) -> str:
    """sha256 of a token array (int32 little-endian): identifies the data of a run for ``--resume``."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i4").data).hexdigest()


class BlockOrder:
    """Fixed-length training blocks and their order.

    The text (int32 [T]) is cut into ``T // seq_len`` blocks of ``seq_len`` tokens. Global sample
    ``g`` (counted over the whole run) is block ``perm_e[g % n]`` with ``e = g // n`` the epoch and
    ``perm_e`` a permutation seeded by ``(seed, e)``. Optimizer step ``t`` with ``batch`` sequences
    per micro-batch and process, ``grad_accum`` micro-batches and ``world`` processes uses samples
    ``t*G .. (t+1)*G - 1`` (``G = batch*grad_accum*world``); within micro-batch ``k`` process ``r``
    takes every ``world``-th sample starting at ``r`` (as torch's DistributedSampler does), so the
    union over processes is the same samples a single process with ``batch*world`` would see.

    Raises ValueError when the text is shorter than one block.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0):
        if seq_len < 2:
            raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
        self.n_blocks = int(tokens.size) // seq_len
        if self.n_blocks < 1:
            raise ValueError(f"the training text has {tokens.size} tokens, fewer than one block of "
                             f"--seq-len {seq_len}; add data or lower --seq-len")
        self.blocks = np.asarray(tokens[: self.n_blocks * seq_len], dtype=np.int64).reshape(self.n_blocks, seq_len)
        self.seq_len, self.seed = seq_len, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def block_of(self, g: int) -> int:
        """Block index of global sample ``g``."""
        epoch, i = divmod(g, self.n_blocks)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks))
        return int(self._perm[1][i])

    def sample_ids(self, step: int, micro: int, rank: int, world: int, batch: int, grad_accum: int) -> list[int]:
        """Global sample indices of one micro-batch of one process (see the class docstring)."""
        base = step * batch * grad_accum * world + micro * batch * world
        return [base + j * world + rank for j in range(batch)]

    def batch(self, step: int, micro: int, rank: int, world: int, batch: int, grad_accum: int) -> np.ndarray:
        """int64 [batch, seq_len] token ids of one micro-batch of one process."""
        return self.blocks[[self.block_of(g) for g in self.sample_ids(step, micro, rank, world, batch, grad_accum)]]
