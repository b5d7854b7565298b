"""The ParScale parallel scaling law (Chen et al. 2025, arXiv 2505.10475, Eq. 5).

    L(N, P) = (A / (N * (k * ln P + 1))) ** alpha + E

* ``N``: non-embedding parameters of the backbone, as a plain count (``1.6e9``, not ``1.6``).
* ``P``: number of parallel streams, ``P >= 1`` (``P = 1`` is the dense model); natural log.
* ``L``: the cross-entropy training loss in nats per token (the paper: after 42B tokens).
* ``E`` (nats/token): the irreducible loss; ``A`` (parameters): the scale; ``alpha``: the exponent;
  ``k`` (dimensionless): the effective-parameter gain per unit of ``ln P``.

Running P streams is worth ``k ln P + 1`` times the parameters (:meth:`ScalingLaw.gain`): the
dense model of the same predicted loss has ``N' = N * (k ln P + 1)`` non-embedding parameters
(:meth:`ScalingLaw.equivalent_dense_params`).

:func:`fit` follows the paper, which follows Chinchilla (Hoffmann et al. 2022, Appendix D.2):
minimise the Huber loss (``delta = 1e-3``) between the log of the predicted and the log of the
observed losses with L-BFGS-B, over a grid of initialisations in the Chinchilla log-space
parametrisation ``e = ln E``, ``a = ln A`` (plus ``k`` and ``alpha``), keeping the best. On the 48
runs in ``tests/data/scaling-law-runs.csv`` it reproduces the paper's constants (table below) to
better than 1e-3 relative. The result depends on ``delta``: 1e-4 or 1e-2 instead of 1e-3 move
E by up to 6 % and alpha by up to 10 %, so keep the default when comparing with the paper.

=================  ======  =======  ======  ======  ======
data               E       A        k       alpha   R^2
=================  ======  =======  ======  ======  ======
Stack-V2-Python    0.6912  1.131e7  0.3935  0.1894  0.9978
Pile               1.2888  1.974e8  0.3345  0.1963  0.9987
=================  ======  =======  ======  ======  ======

numpy, scipy and threadpoolctl only (no torch): the `profile` extra.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import numpy as np

__all__ = [
    "ScalingLaw",
    "PAPER",
    "HUBER_DELTA",
    "DEFAULT_GRID",
    "CHINCHILLA_GRID",
    "paper_law",
    "fit",
    "load_runs",
    "predict",
    "dense_equivalent",
    "r_squared",
    "PAPER_RUNS_CSV",
    "parse_count",
    "fit_rows",
    "predict_rows",
]

ArrayLike = Union[float, int, Sequence[float], np.ndarray]

#: Huber threshold of the paper / Chinchilla fit, in log-loss units.
HUBER_DELTA = 1e-3

#: Initialisation grid of :func:`fit` (18 starts): ``e = ln E``, ``a = ln A``, ``alpha``, ``k``.
#: Chosen from :data:`CHINCHILLA_GRID` by checking every start alone on both datasets of the
#: paper: each of these 18 reaches the same optimum, while starts with ``a = 0``, ``5`` or ``25``
#: or ``alpha = 1`` sometimes end in a worse local minimum (E -> 0, alpha ~ 0.07) or run long.
#: A fit takes about 0.1 s on one core (plus about 0.3 s to import scipy the first time).
DEFAULT_GRID: Mapping[str, tuple[float, ...]] = {
    "e": (-1.0, 0.0, 1.0),
    "a": (10.0, 15.0, 20.0),
    "alpha": (0.2, 0.5),
    "k": (0.5,),
}

#: A grid in the spirit of Chinchilla's (e in -1..1 step 0.5, a in 0..25 step 5, several alpha),
#: plus three values of k: 360 starts, about 2 s per fit on one core; same optimum as the default.
CHINCHILLA_GRID: Mapping[str, tuple[float, ...]] = {
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "alpha": (0.1, 0.2, 0.5, 1.0),
    "k": (0.1, 0.5, 1.0),
}

_GRID_KEYS = ("e", "a", "alpha", "k")


def _as_array(name: str, x: ArrayLike) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, got {x!r}") from exc
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {x!r}")
    return arr


def _check_N(N: ArrayLike) -> np.ndarray:
    arr = _as_array("N (non-embedding parameters)", N)
    if np.any(arr <= 0):
        raise ValueError(f"N (non-embedding parameters) must be > 0, got {N!r}")
    return arr


def _check_P(P: ArrayLike) -> np.ndarray:
    arr = _as_array("P (parallel streams)", P)
    if np.any(arr < 1):
        raise ValueError(f"P (parallel streams) must be >= 1, got {P!r}")
    return arr


def _out(x: np.ndarray) -> Union[float, np.ndarray]:
    return float(x) if np.ndim(x) == 0 else x


@dataclass(frozen=True)
class ScalingLaw:
    """``L(N, P) = (A / (N * (k ln P + 1)))**alpha + E`` (ParScale, arXiv 2505.10475, Eq. 5).

    E: irreducible loss (nats/token). A: scale (parameters). k: gain per unit of ln P
    (dimensionless). alpha: exponent (dimensionless). r2: coefficient of determination of the fit
    on the losses, if known. dataset: the data the constants belong to, if known.
    """

    E: float
    A: float
    k: float
    alpha: float
    r2: float | None = None
    dataset: str | None = None

    def __post_init__(self) -> None:
        for name in ("E", "A", "k", "alpha"):
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
                raise ValueError(f"ScalingLaw.{name} must be a finite number, got {v!r}")
        if self.A <= 0:
            raise ValueError(f"ScalingLaw.A must be > 0, got {self.A!r}")
        if self.alpha <= 0:
            raise ValueError(f"ScalingLaw.alpha must be > 0, got {self.alpha!r}")

    def gain(self, P: ArrayLike) -> Union[float, np.ndarray]:
        """Effective-parameter multiplier ``k ln P + 1`` of P streams (1 at P = 1)."""
        g = self.k * np.log(_check_P(P)) + 1.0
        if np.any(g <= 0):
            raise ValueError(f"k ln P + 1 must be > 0; k = {self.k} and P = {P!r} give {g!r}")
        return _out(g)

    def equivalent_dense_params(self, N: ArrayLike, P: ArrayLike) -> Union[float, np.ndarray]:
        """Non-embedding parameters N' of the dense model (P = 1) with ``L(N', 1) == L(N, P)``.

        ``N' = N * (k ln P + 1)``, in parameters (same unit as N). Broadcasts N against P.
        """
        return _out(_check_N(N) * np.asarray(self.gain(P)))

    def loss(self, N: ArrayLike, P: ArrayLike = 1) -> Union[float, np.ndarray]:
        """Predicted loss (nats/token) of N non-embedding parameters with P streams."""
        n_eff = np.asarray(self.equivalent_dense_params(N, P))
        return _out((self.A / n_eff) ** self.alpha + self.E)


#: The constants the paper reports (Table/Eq. 5 fit; E, A, k, alpha, R^2).
PAPER: dict[str, ScalingLaw] = {
    "stack-v2-python": ScalingLaw(0.6912, 1.131e7, 0.3935, 0.1894, 0.9978, "stack-v2-python"),
    "pile": ScalingLaw(1.2888, 1.974e8, 0.3345, 0.1963, 0.9987, "pile"),
}


def paper_law(dataset: str) -> ScalingLaw:
    """The paper's law for ``dataset`` (``"stack-v2-python"`` or ``"pile"``, case-insensitive)."""
    key = str(dataset).strip().lower()
    if key not in PAPER:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(PAPER)}")
    return PAPER[key]


def _resolve(law: Union[ScalingLaw, str]) -> ScalingLaw:
    if isinstance(law, ScalingLaw):
        return law
    if isinstance(law, str):
        return paper_law(law)
    raise ValueError(f"law must be a ScalingLaw or a dataset name, got {law!r}")


def predict(N: ArrayLike, P: ArrayLike, law: Union[ScalingLaw, str]) -> Union[float, np.ndarray]:
    """Predicted loss (nats/token); ``law`` is a :class:`ScalingLaw` or a dataset name."""
    return _resolve(law).loss(N, P)


def dense_equivalent(N: ArrayLike, P: ArrayLike, law: Union[ScalingLaw, str]) -> Union[float, np.ndarray]:
    """Dense non-embedding parameters matching (N, P); ``law`` is a law or a dataset name."""
    return _resolve(law).equivalent_dense_params(N, P)


def r_squared(law: ScalingLaw, N: ArrayLike, P: ArrayLike, loss: ArrayLike) -> float:
    """``1 - SS_res / SS_tot`` of ``law`` on observed losses (in loss, not log-loss, units)."""
    L = _check_loss(loss)
    pred = np.asarray(law.loss(N, P), dtype=np.float64)
    ss_res = float(np.sum((L - pred) ** 2))
    ss_tot = float(np.sum((L - L.mean()) ** 2))
    if ss_tot == 0:
        raise ValueError("R^2 is undefined when all observed losses are equal")
    return 1.0 - ss_res / ss_tot


def _check_loss(loss: ArrayLike) -> np.ndarray:
    arr = _as_array("loss", loss)
    if np.any(arr <= 0):
        raise ValueError(f"loss must be > 0 (it is fitted in log space), got {loss!r}")
    return arr


@contextlib.contextmanager
def _single_threaded_blas():
    """Run L-BFGS-B with one BLAS thread (threadpoolctl).

    L-BFGS-B calls BLAS on 4x4 problems; with OpenBLAS's default thread pool on a busy machine
    the threads spin and a fit took 10 to 40x longer here (0.3 s against 3 to 13 s).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _objective(N: np.ndarray, P: np.ndarray, L: np.ndarray, delta: float):
    """Huber(delta) of log-loss residuals and its gradient in theta = (e, a, k, alpha)."""
    lnN, lnP, lnL = np.log(N), np.log(P), np.log(L)

    def f(theta: np.ndarray):
        e, a, k, alpha = theta
        g = 1.0 + k * lnP
        u = a - lnN - np.log(g)  # ln(A / (N g))
        z = alpha * u  # ln of the reducible term
        pred = np.logaddexp(z, e)  # ln(exp(z) + E)
        r = pred - lnL
        ar = np.abs(r)
        value = float(np.sum(np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))))
        dr = np.clip(r, -delta, delta)  # d huber / d r
        w = np.exp(z - pred)  # d pred / d z
        grad = np.array(
            [
                np.sum(dr * (1.0 - w)),
                np.sum(dr * w * alpha),
                np.sum(dr * w * (-alpha * lnP / g)),
                np.sum(dr * w * u),
            ]
        )
        return value, grad

    return f


def _grid_starts(grid: Union[Mapping[str, Iterable[float]], Iterable[Sequence[float]], None]):
    if grid is None:
        grid = DEFAULT_GRID
    if isinstance(grid, Mapping):
        missing = [key for key in _GRID_KEYS if key not in grid]
        extra = [key for key in grid if key not in _GRID_KEYS]
        if missing or extra:
            raise ValueError(f"grid needs exactly the keys {_GRID_KEYS}; missing {missing}, extra {extra}")
        axes = [tuple(float(v) for v in grid[key]) for key in _GRID_KEYS]
        starts = [tuple(s) for s in itertools.product(*axes)]
    else:
        starts = [tuple(float(v) for v in s) for s in grid]
        if any(len(s) != 4 for s in starts):
            raise ValueError("each start must be (e, a, alpha, k) = (ln E, ln A, alpha, k)")
    if not starts:
        raise ValueError("grid is empty")
    # Stored (e, a, alpha, k) as in Chinchilla; the optimiser works on (e, a, k, alpha).
    return [np.array([e, a, k, alpha]) for e, a, alpha, k in starts]


def fit(
    N: ArrayLike,
    P: ArrayLike,
    loss: ArrayLike,
    *,
    delta: float = HUBER_DELTA,
    grid: Union[Mapping[str, Iterable[float]], Iterable[Sequence[float]], None] = None,
    dataset: str | None = None,
    ftol: float = 1e-15,
    gtol: float = 1e-12,
    maxiter: int = 5000,
) -> ScalingLaw:
    """Fit Eq. 5 of ParScale (arXiv 2505.10475) to runs, as the paper and Chinchilla do.

    N: non-embedding parameters per run (count). P: streams per run (>= 1, at least two distinct
    values). loss: observed loss per run (nats/token, > 0).

    Minimises ``sum_i Huber_delta(ln L_hat_i - ln L_i)`` with scipy's L-BFGS-B from every start of
    ``grid`` (Chinchilla's log-space parametrisation: ``e = ln E``, ``a = ln A``, plus ``alpha``
    and ``k``; a mapping of axes, whose product is taken, or an iterable of ``(e, a, alpha, k)``
    tuples; default :data:`DEFAULT_GRID`) and keeps the lowest objective. The gradient is
    analytic. ``ftol``/``gtol`` are tighter than scipy's defaults because the objective is tiny
    (about 1e-5): with the defaults L-BFGS-B stops early and k moves in the 3rd digit.
    Bounds: ``alpha > 0`` and ``k ln P_max + 1 > 0``. Returns a :class:`ScalingLaw` with ``r2``
    (on the losses) and ``dataset`` set.
    """
    from scipy.optimize import minimize

    Na, Pa, La = _check_N(N), _check_P(P), _check_loss(loss)
    if not (Na.ndim == Pa.ndim == La.ndim == 1) or not (len(Na) == len(Pa) == len(La)):
        raise ValueError(
            f"N, P and loss must be 1-D of equal length, got shapes {Na.shape}, {Pa.shape}, {La.shape}"
        )
    if len(Na) < 5:
        raise ValueError(f"need at least 5 runs to fit 4 parameters, got {len(Na)}")
    if len(np.unique(Pa)) < 2:
        raise ValueError("need runs with at least two distinct P to identify k")
    if len(np.unique(Na)) < 2:
        raise ValueError("need runs with at least two distinct N to identify alpha")
    if not (delta > 0 and math.isfinite(delta)):
        raise ValueError(f"delta must be a positive finite number, got {delta!r}")

    f = _objective(Na, Pa, La, delta)
    k_min = -1.0 / math.log(float(Pa.max())) * (1.0 - 1e-9)
    bounds = [(None, None), (None, None), (k_min, None), (1e-8, None)]
    best = None
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), _single_threaded_blas():
        for x0 in _grid_starts(grid):
            x0 = x0.copy()
            x0[2] = max(x0[2], k_min / 2)
            res = minimize(
                f, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                options={"ftol": ftol, "gtol": gtol, "maxiter": maxiter},
            )
            if np.isfinite(res.fun) and np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
                best = res
    if best is None:
        raise RuntimeError("no start of the grid produced a finite fit")
    e, a, k, alpha = (float(v) for v in best.x)
    law = ScalingLaw(E=math.exp(e), A=math.exp(a), k=k, alpha=alpha, dataset=dataset)
    return ScalingLaw(law.E, law.A, law.k, law.alpha, r_squared(law, Na, Pa, La), dataset)


def load_runs(path: Union[str, os.PathLike]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Read a runs CSV with columns ``dataset,P,non_embedding_params,loss``.

    Returns ``{dataset: (N, P, loss)}``, float64 arrays in file order (N in parameters, loss in
    nats/token).
    """
    need = ("dataset", "P", "non_embedding_params", "loss")
    groups: dict[str, list[tuple[float, float, float]]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{os.fspath(path)}: missing columns {missing}; need {list(need)}")
        for line, row in enumerate(reader, start=2):
            try:
                n, p, l = float(row["non_embedding_params"]), float(row["P"]), float(row["loss"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{os.fspath(path)}:{line}: bad number in {row!r}") from exc
            groups.setdefault(row["dataset"].strip(), []).append((n, p, l))
    if not groups:
        raise ValueError(f"{os.fspath(path)}: no runs")
    out = {}
    for name, rows in groups.items():
        arr = np.array(rows, dtype=np.float64)
        out[name] = (_check_N(arr[:, 0]), _check_P(arr[:, 1]), _check_loss(arr[:, 2]))
    return out


# ----------------------------------------------------------------------- rows of `parscale scaling-law`
#: The paper's 48 runs (dataset, P, non-embedding parameters, loss), shipped with the package.
PAPER_RUNS_CSV = Path(__file__).parent / "data" / "scaling-law-runs.csv"


def parse_count(text: str) -> float:
    """``"1.6e9"``, ``"1600000000"``, ``"1.6B"``, ``"500M"`` (suffixes K, M, B or G, T) -> parameters.
    Raises ValueError for anything else."""
    t = text.strip().upper()
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(t[-1:], 1)
    try:
        return float(t[:-1] if mult != 1 else t) * mult
    except ValueError:
        raise ValueError(f"cannot read a parameter count from {text!r}; write e.g. 1.6e9 or 1.6B") from None


def fit_rows(path: Union[str, os.PathLike], dataset: str | None = None) -> list[dict]:
    """Fit the law to each dataset of the runs CSV ``path`` (:func:`load_runs`), or to ``dataset``
    alone: per dataset ``{"dataset", "runs", "E", "A", "k", "alpha", "r2"}`` and the paper's
    constants as ``paper_E`` ... ``paper_alpha`` (None where :data:`PAPER` has no fit of it), datasets
    in name order. Raises ValueError for a ``dataset`` the file does not hold, and what
    :func:`load_runs` and :func:`fit` raise."""
    runs = load_runs(path)
    rows = []
    for name in [dataset] if dataset else sorted(runs):
        if name not in runs:
            raise ValueError(f"dataset {name!r} not in {os.fspath(path)}; it has {', '.join(sorted(runs))}")
        N, P, L = runs[name]
        fitted, paper = fit(N, P, L, dataset=name), PAPER.get(name)
        rows.append({"dataset": name, "runs": len(N), "E": fitted.E, "A": fitted.A, "k": fitted.k,
                     "alpha": fitted.alpha, "r2": fitted.r2,
                     **{f"paper_{c}": getattr(paper, c) if paper else None for c in ("E", "A", "k", "alpha")}})
    return rows


def predict_rows(law: ScalingLaw, N: float, parallel: Sequence[int]) -> list[dict]:
    """Per P of ``parallel``: ``{"P", "loss"}`` (nats/token) of ``N`` non-embedding parameters under
    ``law``, its ``gain`` ``k ln P + 1`` and the ``dense_equivalent_params`` of equal loss."""
    return [{"P": P, "loss": law.loss(N, P), "gain": law.gain(P),
             "dense_equivalent_params": law.equivalent_dense_params(N, P)} for P in parallel]
