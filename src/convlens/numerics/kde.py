"""Shimazaki–Shinomoto locally adaptive bandwidth kernel density estimation, vectorised in torch.

ADVISE (Dehshibi et al. 2024; code ``ADVISEkernel.m``) scores every feature-map unit by the number of modes
of this KDE of its activation values (Shimazaki & Shinomoto, J. Comput. Neurosci. 29:171-182, 2010, Sec. 2.3):

1. histogram ``y_hist`` of the in-grid samples on the grid ``t`` (bin width ``dt``);
2. ``M`` softplus-spaced bandwidths ``W`` in ``[5 dt, T]``; per bandwidth the local MISE integrand
   ``c_j(t) = yh_j^2 - 2 yh_j y_hist + 2/(sqrt(2 pi) W_j) y_hist`` (``yh_j``: ``y_hist`` smoothed by ``W_j``);
3. per window ``WIN_i`` the locally optimal bandwidth ``optw_i(t) = W[argmin_j (c_j * G_WIN_i)(t)]``;
4. for a stiffness ``g``: ``w(t) = g WIN_i`` of the last window with ``optw_i(t)/WIN_i >= g``, smoothed by
   Nadaraya–Watson regression; the balloon estimator gives the density and its cost ``C(g)``;
5. golden-section search of ``g`` in ``[1e-12, 1]``; the density of the *last evaluated* point is returned.

Why it is written so: the references fit one vector at a time, with O(L^2) work per cost evaluation and
``M^2`` FFTs per vector; here all rows run at once and what the references repeat is done once — equal
rows fitted once (:func:`_distinct_rows`), the smoothings as closed-form periodic kernels or one matrix
product (:mod:`convlens.numerics.kde_smoothing`), per-window Nadaraya–Watson tables re-summed only when a
window changes (:mod:`convlens.numerics.kde_cost`), and the search kept evaluation for evaluation (its result
is the last evaluated point). At equal ``g`` the densities match the references to ~1e-12; where ``C(g)`` is
flat within rounding the search may end at another ``g`` of the same cost, as it does between the
references' own platforms and thread counts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from convlens.core.threads import limit_threads
from convlens.numerics.kde_cost import CostFunction, golden_section
from convlens.numerics.kde_smoothing import fft_length, periodic_gaussian, smooth

__all__ = ["KDEConvention", "KDEResult", "linspace_like_numpy", "ssvkernel"]

KDEConvention = Literal["matlab", "adaptivekde"]

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_MAX_GRID_POINTS = 1000  # ssvkernel.m: min(ceil(T / dt_samp), 1e3)


@dataclass(frozen=True)
class KDEResult:
    """Adaptive KDE of R sample vectors, evaluated on the Z-point input grid.

    Attributes:
        density: (R, Z) density on the input grid; NaN on failed rows.
        valid: (R,) True where the estimator produced a density.
        bandwidth: (R, Z) the Nadaraya–Watson smoothed local bandwidth ``optw`` of the returned density.
        stiffness: (R,) the stiffness ``g`` of the returned density (last evaluated point); NaN on failures.
        grid_points: (R,) length L of the internal grid ``t`` (``Z`` when ``t = tin``); 0 on failures.
        evaluations: (R,) golden-section cost evaluations after the two initial ones.
        cost: (R,) the L2-risk estimate ``C(g)`` of the returned density (Eqs. 17-18); NaN on failures.
    """

    density: torch.Tensor
    valid: torch.Tensor
    bandwidth: torch.Tensor
    stiffness: torch.Tensor
    grid_points: torch.Tensor
    evaluations: torch.Tensor
    cost: torch.Tensor


def linspace_like_numpy(start: float, stop: float, num: int, dtype: torch.dtype = torch.float64,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """``numpy.linspace(start, stop, num)`` bit for bit: ``arange(num) * step + start``, last = ``stop``."""
    if num == 1:
        return torch.tensor([start], dtype=dtype, device=device)
    step = (stop - start) / (num - 1)
    values = torch.arange(num, dtype=dtype, device=device) * step + start
    values[-1] = stop
    return values


def _logexp(x: torch.Tensor) -> torch.Tensor:  # softplus log(1 + exp(x)), identity from 100 on (ssvkernel.m)
    return torch.where(x < 1e2, torch.log(1 + torch.exp(torch.clamp(x, max=1e2))), x)


def _ilogexp(x: torch.Tensor) -> torch.Tensor:  # inverse softplus log(exp(x) - 1), identity from 100 on
    return torch.where(x < 1e2, torch.log(torch.exp(torch.clamp(x, max=1e2)) - 1), x)


def _row_grids(grid: torch.Tensor, lengths: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """(R, Lmax) internal grids: ``tin`` or ``numpy.linspace(min tin, max tin, L_r)``, padded with ``max tin``."""
    lo, hi = grid[0], grid[-1]
    width = max(int(lengths.max()), grid.numel())
    k = torch.arange(width, dtype=grid.dtype, device=grid.device)
    step = (hi - lo) / (lengths.to(grid.dtype) - 1).clamp(min=1)
    spaced = k * step[:, None] + lo
    spaced = torch.where(k[None] == (lengths[:, None] - 1), hi, spaced)
    tin = torch.nn.functional.pad(grid, (0, width - grid.numel()), value=float(hi))
    t = torch.where(coarse[:, None], spaced, tin[None])
    return torch.where(k[None] < lengths[:, None], t, hi)


def _histogram(samples: torch.Tensor, in_grid: torch.Tensor, t: torch.Tensor, dt: torch.Tensor,
               lengths: torch.Tensor, convention: KDEConvention) -> torch.Tensor:
    """Counts per bin centred on ``t``: MATLAB ``histc(x, t - dt/2)`` or
    ``numpy.histogram(x, [t, t_L + dt] - dt/2)``."""
    rows, width = t.shape
    k = torch.arange(width + 1, device=t.device)[None]
    last = lengths[:, None]
    padded = torch.cat([t, t[:, -1:]], dim=1)
    if convention == "matlab":  # L edges; [e_k, e_k+1), and x == e_L in the last bin
        edges = torch.where(k < last, padded - dt[:, None] / 2, torch.inf)
        index = torch.searchsorted(edges, samples.contiguous(), right=True) - 1
        last_edge = torch.gather(edges, 1, last - 1)
        keep = (index >= 0) & ((index <= last - 2) | ((index == last - 1) & (samples == last_edge)))
    else:  # L + 1 edges, the last bin closed
        t_last = torch.gather(t, 1, last - 1)
        edges = torch.where(k < last, padded, torch.where(k == last, t_last + dt[:, None], torch.inf)) - dt[:, None] / 2
        index = torch.searchsorted(edges, samples.contiguous(), right=True) - 1
        on_last = (index == last) & (samples == torch.gather(edges, 1, last))
        index = torch.where(on_last, index - 1, index)
        keep = (index >= 0) & (index <= last - 1)
    keep &= in_grid
    counts = samples.new_zeros((rows, width + 1))
    counts.scatter_add_(1, torch.where(keep, index, width), keep.to(samples.dtype))
    return counts[:, :width]


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``numpy.interp(x, xp_r[:L_r], fp_r[:L_r])`` for every row r (``x`` shared)."""
    last = lengths[:, None] - 1
    bounded = torch.where(torch.arange(xp.shape[1], device=xp.device)[None] <= last, xp, torch.inf)
    index = torch.minimum(torch.searchsorted(bounded, x.expand(xp.shape[0], -1).contiguous(), right=True) - 1,
                          last - 1).clamp(min=0)
    x0, x1 = torch.gather(xp, 1, index), torch.gather(xp, 1, index + 1)
    f0, f1 = torch.gather(fp, 1, index), torch.gather(fp, 1, index + 1)
    values = (f1 - f0) / (x1 - x0) * (x - x0) + f0
    return torch.where(x >= torch.gather(xp, 1, last), torch.gather(fp, 1, last), values)


def _optimal_widths(y_hist: torch.Tensor, dt: torch.Tensor, span: torch.Tensor, lengths: torch.Tensor,
                    inside: torch.Tensor, n_bandwidths: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3: the M windows ``WIN = W`` (R, M) and the locally optimal fixed bandwidth ``optws``
    (R, M, L) of every window: ``W[argmin_j (c_j * G_WIN_i)(t)]`` (smoothings: :mod:`.kde_smoothing`)."""
    rows, width = y_hist.shape
    # M softplus-spaced bandwidths in [5 dt, T] (windows WIN = bandwidths W)
    low = _ilogexp(5 * dt)
    high = _ilogexp(span)
    steps = torch.arange(n_bandwidths, dtype=y_hist.dtype, device=y_hist.device)
    spaced = steps * ((high - low) / (n_bandwidths - 1))[:, None] + low[:, None]
    spaced[:, -1] = high
    windows = _logexp(spaced)  # (R, M)
    sigma_bins = windows / dt[:, None]
    periods = fft_length(lengths, sigma_bins)
    # rows on the same grid share their kernels (ADVISE's convention: all rows of a grid length)
    distinct, index = torch.unique(torch.cat([sigma_bins, periods.to(sigma_bins.dtype)], 1), dim=0, return_inverse=True)
    kernels = periodic_gaussian(distinct[:, :n_bandwidths], distinct[:, n_bandwidths:], width)  # bandwidth j = window j
    # local MISE integrands c_j (R, M, L), zero outside the row's grid
    smoothed = smooth(y_hist[:, None, :], kernels, index, width)[:, :, 0]
    local_cost = smoothed**2 - 2 * smoothed * y_hist[:, None] + (2 / _SQRT_2PI / windows)[..., None] * y_hist[:, None]
    local_cost = torch.where(inside[:, None], local_cost, 0.0)
    # optimal fixed bandwidth per window i: argmin_j of c_j smoothed with window i
    windowed = smooth(local_cost, kernels, index, width).transpose(2, 3).contiguous()  # (R, M_i, L, M_j)
    best = torch.argmin(windowed, dim=-1)  # (R, M_i, L)
    optws = torch.gather(windows, 1, best.flatten(1)).view(rows, n_bandwidths, width)
    return windows, optws


def _fit_chunk(samples: torch.Tensor, in_grid: torch.Tensor, span: torch.Tensor, grid: torch.Tensor,
               lengths: torch.Tensor, coarse: torch.Tensor, n_bandwidths: int, convention: KDEConvention,
               max_evaluations: int, tol: float) -> tuple[torch.Tensor, ...]:
    """ssvkernel for a chunk of rows with internal grids of lengths ``lengths``: (density and bandwidth on
    ``grid``, g and cost of the returned density, N, evaluations)."""
    t = _row_grids(grid, lengths, coarse)  # (R, Lmax)
    width = t.shape[1]
    inside = torch.arange(width, device=samples.device)[None] < lengths[:, None]
    dt = torch.where(inside[:, 1:], torch.diff(t, dim=1), torch.inf).amin(dim=1)
    y_hist = _histogram(samples, in_grid, t, dt, lengths, convention) / dt[:, None]
    total = (y_hist * dt[:, None]).sum(-1)
    windows, optws = _optimal_widths(y_hist, dt, span, lengths, inside, n_bandwidths)
    shared = bool((~coarse).all()) and width == grid.numel()
    distance2 = ((grid[:, None] - grid[None, :]) ** 2)[None] if shared else (t[:, :, None] - t[:, None, :]) ** 2
    cost = CostFunction(y_hist, total, distance2, dt, optws, windows, inside)
    yopt, optw, g_last, cost_last, evaluations = golden_section(cost, dt, width, max_evaluations, tol)
    return _interp(grid, t, yopt, lengths), _interp(grid, t, optw, lengths), g_last, cost_last, total, evaluations


def _validated(samples: torch.Tensor, grid: torch.Tensor | None, convention: str, n_bandwidths: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples in ``dtype`` and the evaluation grid (default ``linspace(0, 1, S)``), or one clear error."""
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"samples must be a torch.Tensor, got {type(samples).__name__}")
    if samples.ndim != 2 or samples.shape[1] < 1:
        raise ValueError(f"samples must have shape (rows, samples), got {tuple(samples.shape)}")
    if convention not in ("matlab", "adaptivekde"):
        raise ValueError(f"unknown convention {convention!r}: use 'matlab' or 'adaptivekde'")
    if n_bandwidths < 2:
        raise ValueError(f"n_bandwidths must be >= 2, got {n_bandwidths}")
    x = samples.detach().to(dtype)
    if not torch.isfinite(x).all():
        raise ValueError("samples contain NaN or infinite values")
    if grid is None:
        grid = linspace_like_numpy(0.0, 1.0, x.shape[1], dtype, samples.device)
    grid = grid.detach().to(device=samples.device, dtype=dtype).flatten()
    if grid.numel() < 2 or not bool((torch.diff(grid) > 0).all()):
        raise ValueError("grid must hold at least two strictly increasing points")
    return x, grid


@dataclass(frozen=True)
class _RowPlan:
    """Per row: in-grid samples, span T, whether the reference fits it, and its internal grid (``coarse``)."""

    in_grid: torch.Tensor
    span: torch.Tensor
    valid: torch.Tensor
    coarse: torch.Tensor
    lengths: torch.Tensor


def _plan_rows(x: torch.Tensor, grid: torch.Tensor, convention: KDEConvention, min_distinct: int | None) -> _RowPlan:
    """Step 1's set-up as the chosen convention does it (see the module docstring)."""
    rows, dtype, device = x.shape[0], x.dtype, x.device
    lo, hi = float(grid[0]), float(grid[-1])
    grid_step = float(torch.diff(grid).min())
    in_grid = (x >= lo) & (x <= hi)
    # smallest positive gap between sorted samples (in-grid ones for MATLAB, all for adaptivekde)
    in_grid_sorted = torch.sort(torch.where(in_grid, x, torch.inf), dim=1).values
    in_grid_gaps = torch.diff(in_grid_sorted, dim=1)
    in_grid_positive = torch.isfinite(in_grid_gaps) & (in_grid_gaps > 0)
    n_distinct = in_grid.any(dim=1).long() + in_grid_positive.sum(dim=1)
    if convention == "matlab":
        gaps, positive = in_grid_gaps, in_grid_positive
        span = torch.full((rows,), hi - lo, dtype=dtype, device=device)
    else:
        gaps = torch.diff(torch.sort(x, dim=1).values, dim=1)
        positive = gaps > 0
        span = x.amax(dim=1) - x.amin(dim=1)
    dt_samp = torch.where(positive, gaps, torch.inf).amin(dim=1) if gaps.shape[1] else torch.full(
        (rows,), torch.inf, dtype=dtype, device=device)
    # adaptivekde raises IndexError without two distinct samples; MATLAB goes on with t = tin
    valid = torch.isfinite(dt_samp) if convention == "adaptivekde" else torch.ones_like(in_grid[:, 0])
    if min_distinct is not None:
        valid &= n_distinct >= min_distinct
    valid &= in_grid.any(dim=1)  # N = 0: NaN density (MATLAB), NaN or error (adaptivekde)
    # internal grid: tin, or a coarser linspace when the data are coarser than the grid
    coarse = torch.isfinite(dt_samp) & (dt_samp > grid_step)
    ratio = torch.where(coarse, span / torch.where(coarse, dt_samp, 1.0), 0.0)
    lengths = torch.where(coarse, torch.clamp(torch.ceil(ratio), max=_MAX_GRID_POINTS), grid.numel()).long()
    valid &= lengths >= 2  # linspace(.., 1) leaves no dt: the reference errors
    return _RowPlan(in_grid, span, valid, coarse, lengths)


def _distinct_rows(x: torch.Tensor, grid: torch.Tensor, convention: KDEConvention) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose estimate is the same: ``(representatives, inverse)`` with ``x[representatives][inverse]``
    standing for ``x``. The estimator sees a row only through the multiset of its values — in the MATLAB
    convention only of its in-grid values (T is the grid's span, out-of-grid samples are dropped before
    anything else) — so rows with the same sorted key get the same result: e.g. the all-zero channels of a
    ReLU layer, a third to two thirds of EfficientNet-Lite0's ``bn2`` on photos, are fitted once."""
    key = x if convention == "adaptivekde" else torch.where((x >= grid[0]) & (x <= grid[-1]), x, torch.inf)
    _, inverse = torch.unique(torch.sort(key, dim=1).values, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), x.shape[0], dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, inverse, torch.arange(x.shape[0], device=x.device), reduce="amin")
    return first, inverse


def _chunks(sizes: list[int], grid_points: int, n_bandwidths: int, max_chunk_elements: int
            ) -> Iterator[tuple[int, int]]:
    """(start, stop) of rows sorted by grid length: similar lengths (padding < 25 %), bounded temporaries."""
    start = 0
    while start < len(sizes):
        stop = start + 1
        first_width = max(sizes[start], grid_points)
        while stop < len(sizes):
            width = max(sizes[stop], grid_points)
            too_big = (stop + 1 - start) * max(width * width, n_bandwidths * n_bandwidths * width) > max_chunk_elements
            padded = width > 128 and width > 1.25 * first_width and stop - start >= 32  # few rows: padding is cheap
            if too_big or padded:
                break
            stop += 1
        yield start, stop
        start = stop


@limit_threads()
def ssvkernel(
    samples: torch.Tensor,
    grid: torch.Tensor | None = None,
    n_bandwidths: int = 10,
    convention: KDEConvention = "matlab",
    min_distinct: int | None = None,
    max_evaluations: int | None = None,
    tol: float = 1e-5,
    dtype: torch.dtype = torch.float64,
    max_chunk_elements: int = 2**20,
) -> KDEResult:
    """Locally adaptive bandwidth KDE of every row of ``samples`` (Shimazaki & Shinomoto 2010), batched.

    Args:
        samples: (R, S) sample vectors (e.g. the R channels of a feature map, S = h*w activations each).
        grid: (Z,) increasing evaluation points ``tin``; default ``linspace(0, 1, S)`` (ADVISE's
            ``binNumber = linspace(0, 1, Z)``). Only samples inside ``[min(grid), max(grid)]`` are used.
        n_bandwidths: M, the number of bandwidths / windows examined (ADVISE: 10; ssvkernel default 80).
        convention: ``"matlab"`` (default, = ADVISEkernel.m): ``T = max(tin) - min(tin)``; the smallest
            sample gap over the in-grid samples; MATLAB's ``histc(x_ab, t - dt/2)`` with ``L`` edges (samples
            in ``(t_L - dt/2, t_L]`` fall into no bin, only one exactly on the last edge counts); a single
            distinct in-grid value is fitted (one bump); no in-grid sample is a failed row (NaN in MATLAB).
            ``"adaptivekde"`` (= ``adaptivekde.ssvkernel(x, tin, M, nbs, WinFunc='Gauss')[0]``, the PyPI
            port): ``T`` and the smallest gap over *all* samples; ``numpy.histogram`` with ``L + 1`` edges
            (last bin closed); fewer than two distinct values or no in-grid sample is a failed row.
        min_distinct: optional extra failure rule on top of either convention: rows with fewer distinct
            in-grid values fail (``2``: stricter than ADVISEkernel.m, which fits one value).
        max_evaluations: golden-section evaluations after the initial two; default 29 (MATLAB,
            ``k = 1 .. 29``) or 30 (adaptivekde, ``k = 0 .. 29``).
        tol: relative tolerance of the golden-section bracket (``|b - a| <= tol (|c1| + |c2|)``).
        dtype: computation dtype (float64 matches the references to ~1e-12).
        max_chunk_elements: about this many elements per (rows x L x L) temporary of a chunk of rows: 2^20
            (8 MB in float64) stays cache-sized on CPU; raise it on GPUs for more rows per kernel launch.

    Returns:
        :class:`KDEResult` with (R, Z) densities (NaN where the estimator fails).

    Runs on one torch thread (:func:`convlens.core.threads.limit_threads`): thousands of small operations,
    which on a busy machine's shared cores were ~25x slower on torch's default threads (BENCHMARKS.md, load).
    """
    x, grid = _validated(samples, grid, convention, n_bandwidths, dtype)
    if max_evaluations is None:
        max_evaluations = 29 if convention == "matlab" else 30
    representatives, inverse = _distinct_rows(x, grid, convention)
    fit = _fit_rows(x[representatives], grid, n_bandwidths, convention, min_distinct, max_evaluations, tol,
                    max_chunk_elements)
    return KDEResult(**{f.name: getattr(fit, f.name)[inverse] for f in dataclasses.fields(KDEResult)})


def _fit_rows(x: torch.Tensor, grid: torch.Tensor, n_bandwidths: int, convention: KDEConvention,
              min_distinct: int | None, max_evaluations: int, tol: float, max_chunk_elements: int) -> KDEResult:
    """:func:`ssvkernel` of every row of ``x`` (validated), chunk by chunk of similar grid lengths."""
    plan = _plan_rows(x, grid, convention, min_distinct)
    rows, device, dtype = x.shape[0], x.device, x.dtype
    density = torch.full((rows, grid.numel()), float("nan"), dtype=dtype, device=device)
    bandwidth = torch.full_like(density, float("nan"))
    stiffness = torch.full((rows,), float("nan"), dtype=dtype, device=device)
    cost = torch.full_like(stiffness, float("nan"))
    evaluations = torch.zeros(rows, dtype=torch.long, device=device)
    fitted = torch.zeros(rows, dtype=torch.bool, device=device)
    members = torch.nonzero(plan.valid).flatten()
    members = members[torch.argsort(plan.lengths[members], stable=True)]
    for start, stop in _chunks(plan.lengths[members].tolist(), grid.numel(), n_bandwidths, max_chunk_elements):
        idx = members[start:stop]
        on_grid, width_on_grid, g, g_cost, total, used = _fit_chunk(
            x[idx], plan.in_grid[idx], plan.span[idx], grid, plan.lengths[idx], plan.coarse[idx], n_bandwidths,
            convention, max_evaluations, tol,
        )
        ok = total > 0  # no sample in any bin (e.g. all in MATLAB's dropped last half bin): N = 0, NaN density
        density[idx] = torch.where(ok[:, None], on_grid, float("nan"))
        bandwidth[idx] = torch.where(ok[:, None], width_on_grid, float("nan"))
        stiffness[idx] = torch.where(ok, g, float("nan"))
        cost[idx] = torch.where(ok, g_cost, float("nan"))
        evaluations[idx] = used
        fitted[idx] = ok
    return KDEResult(density, fitted, bandwidth, stiffness, torch.where(fitted, plan.lengths, 0), evaluations, cost)
