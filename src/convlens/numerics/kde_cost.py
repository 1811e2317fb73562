"""ssvkernel's ``CostFunction`` (Shimazaki & Shinomoto 2010, Eqs. 17-18) and its golden-section search, batched.

For a stiffness ``g`` every grid point ``t_k`` gets the bandwidth ``optwv_k`` of its locally optimal
window (``g WIN_i`` for the last window ``i`` with ``optws_i(t_k) / WIN_i >= g``; ``min WIN`` above all
ratios, ``max WIN`` below all of them); Nadaraya–Watson regression with Gaussian kernels of width
``s_l = optwv_l / g`` smooths them,

    optwp_k = sum_l optwv_l G(t_k - t_l; s_l) / sum_l G(t_k - t_l; s_l),

and the balloon estimator with bandwidths ``optwp`` gives the density and its L2-risk estimate.

The regression is the reference's O(L^2) step and is computed here without evaluating L^2 exponentials
per call. Its widths take few values: ``s_l = WIN_i`` for a point on window ``i`` (``optwv_l / g`` —
independent of ``g``), ``min WIN / g`` or ``max WIN / g`` for the two outer cases; and ``optwv_l / s_l = g``
for every point. So with ``S_i(k) = sum_{l on window i} exp(-(t_k - t_l)^2 / (2 WIN_i^2))``,

    optwp_k = g sum_i S_i(k) / sum_i S_i(k) / WIN_i,

where the tables ``exp(-(t_k - t_l)^2 / (2 WIN_i^2))`` do not depend on ``g``: each is computed once per
row (once per chunk when the rows share their grid and windows, as ADVISE's do) and every call is a
matrix product over the windows in use. When all points of a row share one width the regression returns
that width (``optwp = optwv``: a weighted mean of equal values). Rows with an outer-case width among
others (about 2 % of the calls on real layers) take the reference's dense sum. The sums run in another
order than the reference's, a difference of ~1e-16 relative.
"""

from __future__ import annotations

import math

import torch

__all__ = ["CostFunction", "golden_section"]

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_PHI = (math.sqrt(5.0) + 1.0) / 2.0  # golden ratio
_MIN_WINDOW, _MAX_WINDOW = -1, -2  # codes of the two outer cases


def _take(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``tensor[rows]`` for sorted distinct ``rows``; the tensor itself (no copy) when they are all of its rows."""
    return tensor if rows.numel() == tensor.shape[0] else tensor[rows]


class CostFunction:
    """Batched ``CostFunction`` of ssvkernel.m for the rows of one chunk (padded to Lmax; ``inside`` marks the
    first ``L_r`` points of each row)."""

    def __init__(self, y_hist: torch.Tensor, total: torch.Tensor, distance2: torch.Tensor, dt: torch.Tensor,
                 optws: torch.Tensor, windows: torch.Tensor, inside: torch.Tensor) -> None:
        self.y_hist = y_hist  # (R, Lmax), zero outside
        self.total = total  # (R,)
        self.dt = dt  # (R,)
        self.windows = windows  # (R, M)
        self.distance2 = distance2  # (R or 1, Lmax, Lmax)
        self.inside = inside  # (R, Lmax)
        ratios = optws / windows[:, :, None]  # gs = optws(:, k)' ./ WIN, (R, M, Lmax)
        # suffix maxima over the windows: the last i with gs_i >= g is (number of i with suffix_max_i >= g) - 1
        self.suffix_max = torch.flip(torch.cummax(torch.flip(ratios, [1]), dim=1).values, [1])
        self.ratio_min = ratios.amin(dim=1)
        self.window_min = windows.amin(dim=1)
        self.window_max = windows.amax(dim=1)
        # rows that share the grid and the windows share the regression tables
        self.shared = distance2.shape[0] == 1 and bool((windows == windows[:1]).all())
        self.tables: dict[int, torch.Tensor] = {}
        self.sums: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # per window: last sets, sums
        # the balloon estimator sums over the non-empty bins only (ssvkernel's "speed optimized" form):
        # their squared distances to every grid point, (R, Lmax, P), P = most non-empty bins of a row
        occupied = y_hist > 0
        count = max(1, int(occupied.sum(dim=1).max()))
        bins = torch.argsort((~occupied).to(torch.uint8), dim=1, stable=True)[:, :count]  # (R, P)
        self.bin_weights = torch.gather(y_hist * dt[:, None], 1, bins) * torch.gather(occupied, 1, bins)
        if distance2.shape[0] == 1:
            self.bin_distance2 = distance2[0][:, bins].permute(1, 0, 2).contiguous()
        else:
            self.bin_distance2 = torch.gather(distance2, 2, bins[:, None, :].expand(-1, distance2.shape[1], -1))

    def table(self, window: int) -> torch.Tensor:
        """``exp(-(t_k - t_l)^2 / (2 WIN_i^2))`` for window ``i``: (R or 1, Lmax, Lmax), computed on first use."""
        if window not in self.tables:
            widths = self.windows[:1, window] if self.shared else self.windows[:, window]
            self.tables[window] = torch.mul(self.distance2, (-0.5 / widths**2)[:, None, None]).exp_()
        return self.tables[window]

    def _bandwidths(self, g: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each point's bandwidth ``optwv`` and its case: the window index, or an outer-case code."""
        last = (_take(self.suffix_max, rows) >= g[:, None, None]).sum(dim=1) - 1  # find(gs >= g, 1, 'last') - 1
        chosen = g[:, None] * torch.gather(_take(self.windows, rows), 1, last.clamp(min=0))
        below = g[:, None] < _take(self.ratio_min, rows)
        optwv = torch.where(
            last < 0,
            _take(self.window_min, rows)[:, None].expand_as(chosen),
            torch.where(below, _take(self.window_max, rows)[:, None].expand_as(chosen), chosen),
        )
        case = torch.where(last < 0, _MIN_WINDOW, torch.where(below, _MAX_WINDOW, last))
        return optwv, case

    def _regression_dense(self, g: torch.Tensor, rows: torch.Tensor, optwv: torch.Tensor) -> torch.Tensor:
        """The reference's Nadaraya–Watson sums, one exponential per pair of points (rows ``rows`` only)."""
        inside = _take(self.inside, rows)
        width = optwv / g[:, None]
        distance2 = self.distance2 if self.distance2.shape[0] == 1 else _take(self.distance2, rows)
        kernel = torch.mul(distance2, (-0.5 / width**2)[:, None, :]).exp_()  # (r, L, L)
        inverse_width = torch.where(inside, 1.0 / width, 0.0)
        sums = torch.bmm(kernel, torch.stack([optwv * inverse_width, inverse_width], dim=-1))  # (r, L, 2)
        return sums[..., 0] / sums[..., 1]

    def _window_sums(self, window: int, rows: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """``S_i(k)`` of window ``i`` for ``rows`` whose points on that window are ``members`` (r, L) bool.

        ``S_i`` depends on ``g`` only through which points are on window ``i``; the search's later calls
        mostly keep that set, so each row's last set and sums are kept and recomputed only when the set changed.
        """
        if window not in self.sums:
            self.sums[window] = (torch.zeros_like(self.inside), torch.zeros_like(self.y_hist),
                                 torch.zeros_like(self.total, dtype=torch.bool))
        known_members, known_sums, known = self.sums[window]
        stale = ~_take(known, rows) | (_take(known_members, rows) != members).any(dim=1)
        if bool(stale.any()):
            update = rows[stale]
            weights = members[stale].to(self.y_hist.dtype)
            table = self.table(window)
            if self.shared:  # one symmetric table for all rows
                sums = weights @ table[0]
            else:
                whole = update.numel() == table.shape[0]  # rows are sorted: then update == all rows, no gather
                sums = torch.bmm(table if whole else table[update], weights[:, :, None])[..., 0]
            known_sums[update] = sums
            known_members[update] = members[stale]
            known[update] = True
        return _take(known_sums, rows)

    def _regression_tables(self, g: torch.Tensor, rows: torch.Tensor, case: torch.Tensor) -> torch.Tensor:
        """``g sum_i S_i / sum_i S_i / WIN_i`` from the per-window tables (rows on windows only)."""
        inside = _take(self.inside, rows)
        numerator = torch.zeros_like(case, dtype=g.dtype)
        denominator = torch.zeros_like(numerator)
        for window in torch.unique(case[inside]).tolist():
            members = (case == window) & inside  # (r, L)
            using = torch.nonzero(members.any(dim=1)).flatten()
            sums = self._window_sums(window, rows[using], members[using])
            numerator[using] += sums
            denominator[using] += sums / self.windows[rows[using], window][:, None]
        return g[:, None] * numerator / denominator

    def regression(self, g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Nadaraya–Watson smoothed bandwidths ``optwp`` (r, Lmax) of ``rows`` at stiffness ``g``; 1 outside."""
        optwv, case = self._bandwidths(g, rows)
        inside = _take(self.inside, rows)
        first = case[:, :1]
        uniform = ((case == first) | ~inside).all(dim=1)
        optwp = optwv.clone()  # one width everywhere: the weighted mean of equal values
        outer = ((case < 0) & inside).any(dim=1)
        dense = torch.nonzero(~uniform & outer).flatten()
        tabled = torch.nonzero(~uniform & ~outer).flatten()
        if dense.numel():
            optwp[dense] = self._regression_dense(g[dense], rows[dense], optwv[dense])
        if tabled.numel():
            optwp[tabled] = self._regression_tables(g[tabled], rows[tabled], case[tabled])
        return torch.where(inside, optwp, 1.0)

    def __call__(self, g: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cost ``C(g)``, balloon density ``yv`` and smoothed bandwidths ``optwp`` of ``rows`` at stiffness ``g``."""
        optwp = self.regression(g, rows)
        inside = _take(self.inside, rows)
        dt = _take(self.dt, rows)[:, None]
        y_hist = _take(self.y_hist, rows)
        # balloon estimator: bandwidth optwp_k at evaluation point k, sum over the non-empty bins
        balloon = torch.mul(_take(self.bin_distance2, rows), (-0.5 / optwp**2)[:, :, None]).exp_()  # (r, L, P)
        yv = torch.bmm(balloon, _take(self.bin_weights, rows)[:, :, None])[..., 0] / (_SQRT_2PI * optwp)
        yv = torch.where(inside, yv, 0.0)
        yv = yv * _take(self.total, rows)[:, None] / (yv * dt).sum(-1, keepdim=True)
        cost_density = yv**2 - 2 * yv * y_hist + 2 / _SQRT_2PI / optwp * y_hist
        return (cost_density * dt).sum(-1), yv, optwp


def golden_section(cost: CostFunction, dt: torch.Tensor, width: int, max_evaluations: int, tol: float
                   ) -> tuple[torch.Tensor, ...]:
    """Golden-section search of g in [1e-12, 1] per row (ADVISEkernel.m l.125-163): density ``yopt``,
    bandwidths, g and cost of the last evaluated point, and the evaluations after the initial two."""
    rows = dt.shape[0]
    a = torch.full((rows,), 1e-12, dtype=dt.dtype, device=dt.device)
    b = torch.ones_like(a)
    c1 = (_PHI - 1) * a + (2 - _PHI) * b
    c2 = (2 - _PHI) * a + (_PHI - 1) * b
    everyone = torch.arange(rows, device=dt.device)
    state = torch.stack([a, b, c1, c2, cost(c1, everyone)[0], cost(c2, everyone)[0]])  # a, b, c1, c2, f1, f2
    # per row: the last evaluated point's density, bandwidths (R, 2, width), g and cost
    last = torch.full((rows, 2, width), float("nan"), dtype=dt.dtype, device=dt.device)
    g_last = torch.full((2, rows), float("nan"), dtype=dt.dtype, device=dt.device)
    evaluations = torch.zeros(rows, dtype=torch.long, device=dt.device)
    for _ in range(max_evaluations):
        a, b, c1, c2 = state[:4]
        active = torch.nonzero(torch.abs(b - a) > tol * (torch.abs(c1) + torch.abs(c2))).flatten()
        if active.numel() == 0:
            break
        a_, b_, c1_, c2_, f1_, f2_ = _take(state.T, active).T
        left = f1_ < f2_  # False for NaN, like MATLAB and numpy
        new_b = torch.where(left, c2_, b_)
        new_a = torch.where(left, a_, c1_)
        new_c1 = torch.where(left, (_PHI - 1) * a_ + (2 - _PHI) * new_b, c2_)
        new_c2 = torch.where(left, c1_, (2 - _PHI) * new_a + (_PHI - 1) * b_)
        g = torch.where(left, new_c1, new_c2)
        f_new, yv, optwp = cost(g, active)
        new_f1, new_f2 = torch.where(left, f_new, f2_), torch.where(left, f1_, f_new)
        updated = torch.stack([new_a, new_b, new_c1, new_c2, new_f1, new_f2])
        density = yv / (yv * _take(dt, active)[:, None]).sum(-1, keepdim=True)
        if active.numel() == rows:
            state, g_last = updated, torch.stack([g, f_new])
            last = torch.stack([density, optwp], dim=1)
        else:
            state[:, active] = updated
            g_last[:, active] = torch.stack([g, f_new])
            last[active] = torch.stack([density, optwp], dim=1)
        evaluations[active] += 1
    return last[:, 0], last[:, 1], g_last[0], g_last[1], evaluations
