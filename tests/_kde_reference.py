"""Independent references of the adaptive KDE for the tests (loaded through conftest's ``kde_reference``).

* :func:`adaptivekde_density`: the PyPI package ``adaptivekde`` itself (first output of its ``ssvkernel``).
* :func:`port`: a literal, slow re-computation, line by line, of either ``adaptivekde.ssvkernel`` (the
  PyPI port, ``convention="adaptivekde"``) or ``ADVISEkernel.m`` (MATLAB, ``convention="matlab"``) with
  adaptivekde's helper functions (``fftkernel``, ``CostFunction``). Unlike the package it keeps its state:
  the search's trace (every compared pair of costs) and the estimator at any stiffness ``g``
  (:meth:`Port.at`) — which is what a test needs to tell a wrong estimator from a golden-section
  comparison decided by rounding.

Differences of ADVISEkernel.m to adaptivekde's top level: T = range of tin; dt_samp from the in-range
samples (none -> t = tin, no error); ``histc(x_ab, t - dt/2)`` with L edges (values above the last edge
are dropped, an exact hit on it counts); 29 evaluations (k = 1..29); N = 0 gives NaN (None here).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from adaptivekde import ssvkernel as adaptivekde_ssvkernel
from adaptivekde.ssvkernel import CostFunction, fftkernel, fftkernelWin, ilogexp, logexp
from scipy.signal import find_peaks

PHI = (5**0.5 + 1) / 2
COST_NOISE = 1e-13  # |C_ours(g) - C_ref(g)| / |C_ref(g)|: float64 sums of <= 1000 terms agree far better
TIE = 1e-12  # costs closer than this (relative) are compared by rounding noise


def adaptivekde_density(x: np.ndarray, tin: np.ndarray) -> np.ndarray | None:
    """First output of ``adaptivekde.ssvkernel(x, tin, M=10, nbs=1, WinFunc='Gauss')``; None when it raises."""
    np.random.seed(0)  # only its bootstrap (nbs=1) draws random numbers; the first output is deterministic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return adaptivekde_ssvkernel(x, tin, M=10, nbs=1, WinFunc="Gauss")[0]
        except (IndexError, ValueError):
            return None


@dataclass
class Port:
    """The reference's state after its set-up, and the result of its golden-section search."""

    tin: np.ndarray
    t: np.ndarray
    y_hist: np.ndarray
    N: float
    dt: float
    optws: np.ndarray
    W: np.ndarray
    density: np.ndarray = field(default_factory=lambda: np.empty(0))
    g: float = float("nan")
    cost: float = float("nan")
    compared: list[tuple[float, float, float, float]] = field(default_factory=list)  # (f1, f2, a, b) per step

    def at(self, g: float) -> tuple[float, np.ndarray]:
        """The cost C(g) and the density on ``tin`` of the estimator at stiffness ``g`` (no search)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cost, yv, _ = CostFunction(self.y_hist, self.N, self.t, self.dt, self.optws, self.W, "Gauss", g)
        return float(cost), np.interp(self.tin, self.t, yv / np.sum(yv * self.dt))

    def internal(self, g: float) -> np.ndarray:
        """The normalised density ``yopt`` at stiffness ``g`` on the internal grid ``t`` (before interpolation)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yv = CostFunction(self.y_hist, self.N, self.t, self.dt, self.optws, self.W, "Gauss", g)[1]
        return yv / np.sum(yv * self.dt)

    def first_tie(self, rel: float) -> tuple[float, float] | None:
        """The bracket [a, b] of the first comparison ``f1 < f2`` of two costs equal within ``rel`` (relative):
        from there on the branch is decided by rounding. None if the search had no such comparison."""
        for f1, f2, a, b in self.compared:
            if abs(f1 - f2) <= rel * max(abs(f1), abs(f2)):
                return a, b
        return None


def _grid(x: np.ndarray, tin: np.ndarray, convention: str) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(t, in-range samples x_ab, T), or None where the reference raises."""
    x_ab = x[(x >= tin.min()) & (x <= tin.max())]
    if convention == "adaptivekde":
        T = np.max(x) - np.min(x)
        dx = np.sort(np.diff(np.sort(x)))
        if not np.count_nonzero(dx):
            return None  # dx[np.nonzero(dx)][0]: IndexError
        dt_samp = dx[np.nonzero(dx)][0]
    else:
        T = tin.max() - tin.min()
        gaps = np.sort(np.diff(np.sort(x_ab)))
        gaps = gaps[gaps != 0]
        dt_samp = gaps[0] if gaps.size else 0.0  # empty: t = tin
    t = np.linspace(min(tin), max(tin), int(min(np.ceil(T / dt_samp), 1e3))) if dt_samp > min(np.diff(tin)) else tin
    return (t, x_ab, T) if t.size >= 2 else None


def _histogram(x_ab: np.ndarray, t: np.ndarray, dt: float, convention: str) -> np.ndarray:
    if convention == "adaptivekde":
        return np.histogram(x_ab, np.concatenate((t, (t[-1] + dt)[np.newaxis])) - dt / 2)[0] / dt
    edges = t - dt / 2
    counts = np.zeros(t.size)
    for value in x_ab:  # histc: L edges, [e_k, e_k+1), a value equal to the last edge in the last bin
        k = np.searchsorted(edges, value, side="right") - 1
        if 0 <= k < t.size - 1 or (k == t.size - 1 and value == edges[-1]):
            counts[k] += 1
    return counts / dt


def _setup(x: np.ndarray, tin: np.ndarray, convention: str, M: int) -> Port | None:
    grid = _grid(x, tin, convention)
    if grid is None:
        return None
    t, x_ab, T = grid
    dt = min(np.diff(t))
    y_hist = _histogram(x_ab, t, dt, convention)
    N = float(sum(y_hist * dt)) if convention == "adaptivekde" else float(np.sum(y_hist * dt))
    if N == 0:
        return None  # MATLAB: NaN density; adaptivekde: NaN
    W = logexp(np.linspace(ilogexp(np.array([5 * dt])), ilogexp(np.array([T])), M).ravel())
    c = np.zeros((M, y_hist.size))
    for j in range(M):
        yh = fftkernel(y_hist, W[j] / dt)
        c[j] = yh**2 - 2 * yh * y_hist + 2 / (2 * np.pi) ** 0.5 / W[j] * y_hist
    optws = np.zeros((M, y_hist.size))
    for i in range(M):
        local = np.array([fftkernelWin(c[j], W[i] / dt, "Gauss") for j in range(M)])
        optws[i] = W[np.argmin(local, axis=0)]
    return Port(tin=tin, t=t, y_hist=y_hist, N=N, dt=dt, optws=optws, W=W)


def port(x: np.ndarray, tin: np.ndarray, convention: str = "matlab", M: int = 10) -> Port | None:
    """The reference (``convention`` "matlab" = ADVISEkernel.m, "adaptivekde" = the package) for one sample
    vector, with its search trace; None where it fails (raises, or no in-range sample: N = 0)."""
    state = _setup(x, tin, convention, M)
    if state is None:
        return None
    a, b, tol = 1e-12, 1.0, 1e-5
    c1, c2 = (PHI - 1) * a + (2 - PHI) * b, (2 - PHI) * a + (PHI - 1) * b
    f1, f2 = state.at(c1)[0], state.at(c2)[0]
    k, limit = (0, 30) if convention == "adaptivekde" else (1, 30)
    while abs(b - a) > tol * (abs(c1) + abs(c2)) and k < limit:
        state.compared.append((f1, f2, a, b))
        if f1 < f2:
            b, c2, f2 = c2, c1, f1
            c1 = (PHI - 1) * a + (2 - PHI) * b
            f1, state.density = state.at(c1)
            state.g, state.cost = c1, f1
        else:
            a, c1, f1 = c1, c2, f2
            c2 = (2 - PHI) * a + (PHI - 1) * b
            f2, state.density = state.at(c2)
            state.g, state.cost = c2, f2
        k += 1
    return state


def assert_matches(result: Any, rows: np.ndarray, tin: np.ndarray, convention: str) -> dict[str, list[Any]]:
    """Prove, for every row of a ``KDEResult`` of ``rows``, what holds on every machine (see test_kde.py):

    1. at our stiffness g, our density and cost are the reference estimator's at that g (no search);
    2. either the search ended at the reference's g (then the peak counts agree too), or the reference's own
       search compared two costs equal within ``TIE`` and our g lies in the bracket of its first such
       comparison (implementations whose costs differ by <= ``COST_NOISE`` can branch differently only there).

    Returns the rows that ended at the reference's g ("same"), elsewhere after a tie ("tie"), or failed in
    both ("failed"), and in ``"densities"`` the reference's density for each row at our g (None if failed)."""
    outcome: dict[str, list[Any]] = {"same": [], "tie": [], "failed": [], "densities": []}
    for i, row in enumerate(rows):
        ref = port(row, tin, convention)
        assert bool(result.valid[i]) == (ref is not None), f"row {i}: ours valid={bool(result.valid[i])}"
        if ref is None:
            outcome["failed"].append(i)
            outcome["densities"].append(None)
            continue
        ours, g = result.density[i].numpy(), float(result.stiffness[i])
        cost_at_g, density_at_g = ref.at(g)
        assert abs(float(result.cost[i]) - cost_at_g) <= COST_NOISE * abs(cost_at_g), (i, result.cost[i], cost_at_g)
        assert np.abs(ours - density_at_g).max() <= 1e-10 * np.abs(density_at_g).max(), i
        outcome["densities"].append(density_at_g)
        if math.isclose(g, ref.g, rel_tol=1e-12):
            assert len(find_peaks(ours)[0]) == len(find_peaks(ref.density)[0]), i
            outcome["same"].append(i)
            continue
        bracket = ref.first_tie(TIE)
        assert bracket is not None, f"row {i}: g = {g} vs the reference's {ref.g} without a tie in its search"
        assert bracket[0] <= g <= bracket[1], (i, g, bracket)
        outcome["tie"].append(i)
    return outcome
