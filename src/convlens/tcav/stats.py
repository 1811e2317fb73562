"""Statistics of a TCAV test: the concept against random concepts, Holm's correction, the effect size.

Kim et al. (ICML 2018, Sec. 3.5) train a concept's CAV against N random sets and compare its TCAV scores
with random-vs-random scores by a two-sided t-test. Done literally — a two-sample t-test of the N
concept-vs-R_i scores against N random-vs-random scores — the test is not valid: all concept scores share
the one concept set C, so their spread shows the variation over random sets R_i but not the variation
over concept sets, which is what a random C would bring. On the synthetic benchmark that test calls
random sets posing as concepts significant in 17-45 % of cases at alpha = 0.05 (``benchmarks/bench_tcav.py``).

The test used here keeps the paper's ingredients but compares like with like:

* statistic of the concept: T_C = mean over the N runs of its score against R_1..R_N;
* null: each random set R_j in turn plays the concept, against the other N-1 sets (random-vs-random,
  one CAV per unordered pair serves both directions): T_{R_j} = mean_{i != j} score(R_j vs R_i);
  under H0 the concept is just another random set and T_C is one more draw of T_R;
* two-sided t-test of one observation against a sample (Crawford & Howell 1998):
  t = (T_C - mean(T_R)) / (s_R sqrt(1 + 1/N)), N - 1 degrees of freedom — what
  ``scipy.stats.ttest_ind([T_C], T_R)`` (Student, pooled variance) computes;
* Holm's step-down correction over all tests of a class (Holm 1979):
  p_(i)^adj = max_{j <= i} min(1, (m - j + 1) p_(j));
* effect sizes: the mean difference T_C - mean(T_R) in score units (its sign is the direction), and the
  standardised difference z = (T_C - mean(T_R)) / s_R, the case-vs-controls analogue of Cohen's d
  (Crawford, Garthwaite & Porter 2010).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["STATISTICS", "NullComparison", "compare_to_null", "holm", "pseudo_concept_means"]

STATISTICS = ("magnitude", "sign_count")  # the per-run scores a test can compare (tcav.runner defines them)


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values (same order as the input; NaN counts as 1)."""
    p = np.nan_to_num(np.asarray(p_values, dtype=float), nan=1.0)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def pseudo_concept_means(pair_scores: np.ndarray) -> np.ndarray:
    """T_{R_j}: row means of an (N, N) matrix of score(R_j vs R_i), ignoring the diagonal."""
    n = pair_scores.shape[0]
    if pair_scores.shape != (n, n) or n < 3:
        raise ValueError("need an (N, N) random-vs-random score matrix with N >= 3")
    off_diagonal = ~np.eye(n, dtype=bool)
    return np.array([pair_scores[j, off_diagonal[j]].mean() for j in range(n)])


@dataclass(frozen=True)
class NullComparison:
    """The concept's statistic against the null sample: Crawford-Howell t, two-sided p, effect sizes."""

    value: float  # T_C
    null_mean: float
    null_std: float
    t: float
    p: float
    mean_difference: float
    effect_size: float  # (T_C - mean null) / SD null

    @property
    def direction(self) -> str:
        return "positive" if self.mean_difference > 0 else "negative" if self.mean_difference < 0 else "none"


def compare_to_null(value: float, null: Sequence[float] | np.ndarray) -> NullComparison:
    """Two-sided t-test of one value against a null sample (Crawford & Howell 1998), via scipy.

    A constant null gives NaN t and p (no spread to judge by), which :func:`holm` treats as 1.
    """
    sample = np.asarray(null, dtype=float)
    if len(sample) < 2:
        raise ValueError("the null sample needs at least 2 values")
    mean, std = float(sample.mean()), float(sample.std(ddof=1))
    diff = float(value) - mean
    if std == 0.0:
        return NullComparison(float(value), mean, std, math.nan, math.nan, diff, math.nan)
    result = stats.ttest_ind([float(value)], sample, equal_var=True)
    return NullComparison(float(value), mean, std, float(result.statistic), float(result.pvalue), diff, diff / std)
