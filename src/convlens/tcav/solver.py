"""CAVs by a batched linear SVM: every pair of sets of one layer and size in one deterministic solve.

A CAV is the normal of a linear classifier that separates two sets' layer activations (Kim et al., ICML
2018, Sec. 3.2). Captum's default is a linear SVM (hinge loss) trained by SGD, whose direction changes
with the seed. Here the SVM uses the squared hinge loss (the L2-SVM, sklearn ``LinearSVC``'s default
loss), with Captum's penalty alpha and an unpenalised intercept, y = +1 for the first set:

    min_{w,b}  (1/n) sum_i max(0, 1 - y_i (w . x_i + b))^2 + (alpha / 2) ||w||^2.

The objective is strictly convex in w and piecewise quadratic, so it has one minimiser, which Newton's
method reaches exactly once the set of margin violators settles (finite Newton, Keerthi & DeCoste, JMLR
2005; a handful of steps): the same data give the same direction, whatever the seed.

By the representer theorem w = sum_i a_i x_i lies in the span of the training rows, so each problem is
solved from the Gram matrix G = X X^T alone, in n unknowns (``_solve``), and many problems at once:
one batched n x n Cholesky factorisation per Newton step. Held-out accuracy is k-fold cross-validated,
folds fixed by position in each set (deterministic too); the direction is fitted on all rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["LinearSVM", "PairFit"]



@dataclass(frozen=True)
class PairFit:
    """Fits of K pairs: ``coef`` (K, n) over the pair's rows (first set, then second), ``intercept`` (K,),
    cross-validated ``accuracy`` (K,; NaN when not asked for) and Newton ``iterations`` of the full fit."""

    coef: torch.Tensor
    intercept: torch.Tensor
    accuracy: torch.Tensor
    iterations: int


@dataclass(frozen=True, kw_only=True)
class LinearSVM:
    """The default CAV trainer: a batched, deterministic L2-SVM (see the module docstring).

    Args:
        alpha: L2 penalty (that of Captum's default ``SGDClassifier``).
        folds: k of the k-fold cross-validated held-out accuracy (row i of a set is in fold i mod k).
        tol: stop when half the squared Newton decrement is below it. The squared hinge's Newton step is
            exact once the margin violators settle, so the default waits for that step (rounding ends it).
        max_iter: Newton steps at most.
    """

    alpha: float = 0.01
    folds: int = 3
    tol: float = 1e-20
    max_iter: int = 100

    def __post_init__(self) -> None:
        if self.alpha <= 0 or self.folds < 2 or self.tol <= 0 or self.max_iter < 1:
            raise ValueError("need alpha > 0, folds >= 2, tol > 0 and max_iter >= 1")

    @property
    def cache_key(self) -> str:
        """The settings that change a CAV (part of the CAV cache's model id)."""
        return f"l2svm-newton-a{self.alpha:g}-k{self.folds}-t{self.tol:g}"

    def fit(self, gram: torch.Tensor, first: torch.Tensor, second: torch.Tensor, *,
            cross_validate: bool = True) -> PairFit:
        """Fit K pairs at once: ``gram`` (R, R) float64 over the rows used, ``first`` (K, s) and ``second``
        (K, t) row indices into it. The direction of pair k is ``coef[k] @ X[cat(first[k], second[k])]``.
        ``cross_validate=False`` leaves the accuracy NaN (the k fold fits are skipped)."""
        rows = torch.cat([first, second], 1)
        labels = torch.cat([torch.ones(first.shape, dtype=gram.dtype, device=gram.device),
                            -torch.ones(second.shape, dtype=gram.dtype, device=gram.device)], 1)
        coef, intercept, iterations = self._solve(_pick(gram, rows, rows), labels)
        accuracy = self._cross_validate(gram, rows, labels, first.shape[1]) if cross_validate else \
            torch.full_like(intercept, math.nan)
        return PairFit(coef, intercept, accuracy, iterations)

    def _cross_validate(self, gram: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, split: int) -> torch.Tensor:
        """Share of rows classified right by the fit that did not see them: k folds (row i of each set in fold
        i mod k), all folds of all pairs in one solve, padded to the largest fold (padding rows weigh 0)."""
        position = torch.cat([torch.arange(split), torch.arange(rows.shape[1] - split)]).to(rows.device) % self.folds
        folds = [f for f in range(self.folds) if bool((position == f).any())]
        train = [torch.nonzero(position != f)[:, 0] for f in folds]
        held = [torch.nonzero(position == f)[:, 0] for f in folds]

        def padded(columns: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            width = max(len(c) for c in columns)
            index = torch.stack([torch.cat([c, c.new_zeros(width - len(c))]) for c in columns])
            mask = torch.stack([torch.arange(width, device=rows.device) < len(c) for c in columns])
            return index, mask  # (folds, width)

        (train_at, train_mask), (held_at, held_mask) = padded(train), padded(held)
        k = rows.shape[0]
        train_rows = rows[:, train_at].transpose(0, 1).reshape(len(folds) * k, -1)  # fold-major
        held_rows = rows[:, held_at].transpose(0, 1).reshape(len(folds) * k, -1)
        weight = train_mask.repeat_interleave(k, 0).to(gram.dtype)
        coef, intercept, _ = self._solve(_pick(gram, train_rows, train_rows) * weight[:, :, None] * weight[:, None, :],
                                         labels[:, train_at].transpose(0, 1).reshape(len(folds) * k, -1) * weight)
        margin = _times(_pick(gram, held_rows, train_rows), coef * weight) + intercept[:, None]
        truth = labels[:, held_at].transpose(0, 1).reshape(len(folds) * k, -1)
        right = (torch.where(margin > 0, 1.0, -1.0) == truth) & held_mask.repeat_interleave(k, 0)
        return right.reshape(len(folds), k, -1).sum((0, 2)).to(gram.dtype) / rows.shape[1]

    def _solve(self, gram: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Coefficients a (K, n) over the rows of the (K, n, n) Gram blocks, intercepts and Newton steps of the
        K problems (labels +-1; 0 marks a padding row, whose Gram row and column must be 0), from (0, 0). A
        converged problem leaves the batch, so its answer does not depend on the others.

        With f = G a + b, the loss gradient g = dL/df = -2 y (1 - y f)_+ / n and the generalised Hessian
        D = diag(2 [y f < 1] / n), Newton's system reduces to (D G + alpha I) da + D 1 db = -(g + alpha a)
        and 1^T D G da + 1^T D 1 db = -1^T g, solved with (D G + alpha I)^-1 x = (x - D^1/2 B^-1 D^1/2 G x)
        / alpha, B = alpha I + D^1/2 G D^1/2 (symmetric positive definite; G is never inverted)."""
        k = labels.shape[0]
        count = (labels != 0).sum(1, keepdim=True).to(gram.dtype)  # n of each problem
        coef, intercept = torch.zeros_like(labels), torch.zeros_like(labels[:, 0])
        state = _Batch(torch.arange(k, device=gram.device), gram, labels, count, coef.clone(), intercept.clone(),
                       coef.clone())
        iterations = 0
        for iterations in range(1, self.max_iter + 1):  # noqa: B007 - the count is returned
            margin = state.kernel_coef + state.intercept[:, None]
            slack = (1 - state.labels * margin).clamp_min(0) * state.labels.abs()  # 0 on padding rows
            grad_margin = -2 * state.labels * slack / state.count
            root = torch.where(slack > 0, (2 / state.count).sqrt(), 0.0)  # D^1/2
            scaled = state.gram * (root[:, :, None] * root[:, None, :])
            scaled.diagonal(dim1=1, dim2=2).add_(self.alpha)
            factor, _ = torch.linalg.cholesky_ex(scaled)
            residual = -(grad_margin + self.alpha * state.coef)
            kernel_residual = _times(state.gram, residual)
            inner = root[:, :, None] * torch.cholesky_solve(torch.stack([root * kernel_residual, root], 2), factor)
            u = (residual - inner[:, :, 0]) / self.alpha  # (D G + alpha I)^-1 residual
            v = inner[:, :, 1]  # (D G + alpha I)^-1 D 1
            d_intercept = (-grad_margin.sum(1) - residual.sum(1) + self.alpha * u.sum(1)) / (
                self.alpha * v.sum(1) + 1e-12)
            d_coef = u - v * d_intercept[:, None]
            decrement = (kernel_residual * d_coef).sum(1) - grad_margin.sum(1) * d_intercept
            moving = decrement / 2 > self.tol
            coef[state.index], intercept[state.index] = state.coef, state.intercept
            if not bool(moving.any()):
                break
            if not bool(moving.all()):
                state, d_coef, d_intercept = state.keep(moving), d_coef[moving], d_intercept[moving]
            kernel_step = _times(state.gram, d_coef)
            size = self._step_size(state, d_coef, kernel_step, d_intercept)
            state.coef = state.coef + size[:, None] * d_coef
            state.intercept = state.intercept + size * d_intercept
            state.kernel_coef = state.kernel_coef + size[:, None] * kernel_step
        coef[state.index], intercept[state.index] = state.coef, state.intercept
        return coef, intercept, iterations

    def _step_size(self, state: _Batch, d_coef: torch.Tensor, kernel_step: torch.Tensor,
                   d_intercept: torch.Tensor) -> torch.Tensor:
        """The exact minimiser t > 0 of the objective along the Newton step, for every problem at once.

        Along the step the slacks are a_i + t b_i and the penalty c0 + c1 t + c2 t^2, so the derivative
        phi'(t) = (2/n) sum_i b_i (a_i + t b_i)_+ + c1 + 2 c2 t is increasing and piecewise linear, with
        kinks where a slack reaches 0: evaluated at every kink, its zero lies on the first segment where it
        turns non-negative (beyond the last kink only the rows with b_i > 0 stay active)."""
        weight = state.labels.abs()  # 0 on padding rows
        a = (1 - state.labels * (state.kernel_coef + state.intercept[:, None])) * weight
        b = -state.labels * (kernel_step + d_intercept[:, None])
        c1 = self.alpha * (state.coef * kernel_step).sum(1)
        c2 = 0.5 * self.alpha * (d_coef * kernel_step).sum(1)
        scale = 2 * weight * b / state.count

        def derivative(t: torch.Tensor) -> torch.Tensor:  # t (K, J) -> phi'(t) (K, J)
            slack = (a[:, None, :] + t[:, :, None] * b[:, None, :]).clamp_min(0)
            return (scale[:, None, :] * slack).sum(2) + c1[:, None] + 2 * c2[:, None] * t

        kinks = torch.where((b != 0) & (weight > 0), -a / torch.where(b != 0, b, 1.0), -1.0)
        kinks = torch.where(kinks > 0, kinks, math.inf).sort(1).values
        points = torch.cat([torch.zeros_like(kinks[:, :1]), kinks], 1)  # 0, then the kinks (inf: none)
        finite = torch.isfinite(points)
        slopes = derivative(torch.where(finite, points, 0.0))
        crossed = (slopes >= 0) & finite
        crossed[:, 0] = False
        after = torch.where(crossed.any(1), crossed.to(torch.int8).argmax(1), 0)  # first kink where phi' >= 0
        last = finite.sum(1) - 1  # the last kink (0 when there is none)
        rows = torch.arange(len(a), device=a.device)
        inside = after > 0
        left = torch.where(inside, after - 1, last)
        t0, d0 = points[rows, left], slopes[rows, left]
        t1, d1 = points[rows, after], slopes[rows, after]
        beyond = (scale * b * ((b > 0) & (weight > 0))).sum(1) + 2 * c2  # phi'' past the last kink
        size = torch.where(inside, t0 - d0 * (t1 - t0) / torch.where(d1 > d0, d1 - d0, 1.0),
                           t0 - d0 / torch.where(beyond > 0, beyond, 1.0))
        return size.clamp_min(0)


@dataclass
class _Batch:
    """The problems still moving: their index in the batch, Gram blocks, labels, n, a, b and G a."""

    index: torch.Tensor
    gram: torch.Tensor
    labels: torch.Tensor
    count: torch.Tensor
    coef: torch.Tensor
    intercept: torch.Tensor
    kernel_coef: torch.Tensor

    def keep(self, moving: torch.Tensor) -> _Batch:
        return _Batch(self.index[moving], self.gram[moving], self.labels[moving], self.count[moving],
                      self.coef[moving], self.intercept[moving], self.kernel_coef[moving])


def _times(gram: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(K, m, n) @ (K, n) -> (K, m)."""
    return (gram @ x[:, :, None])[:, :, 0]


def _pick(gram: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(K, a, b) blocks ``gram[rows[k]][:, columns[k]]``."""
    return gram[rows[:, :, None], columns[:, None, :]]
