"""Do players agree on what a cluster shows? Krippendorff's alpha of the normalised labels.

Reliability data (Krippendorff 2011, "Computing Krippendorff's alpha-reliability"): a **unit** is one INV
cluster (one round), a **coder** one participant (at most one value per unit, coders differ from unit to
unit: alpha allows both), a **value** the nominal label of a correct guess's description (the ones labelled
with the class's own vocabulary). Nominal alpha needs only each unit's value counts; with ``n_c`` the count
of label c over the pairable units (``m_u >= 2`` values) and ``n = sum n_c``:

    D_e = (n^2 - sum_c n_c^2) / (n (n - 1)),   D_o,u = (m_u^2 - sum_c n_uc^2) / (m_u (m_u - 1)),
    D_o = sum_u (m_u / n) D_o,u,                alpha = 1 - D_o / D_e.

Per class (:func:`class_agreement`) alpha over its clusters with a bootstrap interval over units; per
cluster (:func:`cluster_agreements`) its share of the class alpha. Why the baselines beside alpha: a single
frequent word can look like agreement, so every row also gives the observed and chance agreement and the
*constant-label baseline* (what a labeller always answering the class's most frequent label would score).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Agreement",
    "agreement_table",
    "alpha_from_counts",
    "class_agreement",
    "cluster_agreements",
    "expected_disagreement",
    "unit_disagreement",
    "value_counts",
]

N_BOOTSTRAP = 1000


@dataclass(frozen=True)
class Agreement:
    """Agreement of one class (``cluster_id`` empty) or one cluster."""

    scope: str
    class_name: str
    cluster_id: str
    n_units: int
    n_values: int
    alpha: float
    ci_low: float
    ci_high: float
    observed_agreement: float
    chance_agreement: float
    constant_label: str
    constant_share: float
    note: str = ""


def value_counts(units: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """``(labels, counts)``: the label vocabulary (sorted) and the (units x labels) count matrix."""
    labels = sorted({v for unit in units for v in unit})
    index = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(units), len(labels)), dtype=np.int64)
    for row, unit in enumerate(units):
        for value in unit:
            counts[row, index[value]] += 1
    return labels, counts


def _pairable(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts)
    return counts[counts.sum(axis=1) >= 2]


def expected_disagreement(counts: np.ndarray) -> float:
    """D_e over the pairable units of a (units x labels) count matrix (NaN with fewer than 2 values)."""
    totals = _pairable(counts).sum(axis=0).astype(np.float64)
    n = totals.sum()
    return float((n * n - np.sum(totals**2)) / (n * (n - 1))) if n >= 2 else float("nan")


def unit_disagreement(row: np.ndarray) -> np.ndarray:
    """D_o,u: share of ordered pairs of a unit's values that disagree (rows of counts; NaN if m_u < 2)."""
    row = np.asarray(row, dtype=np.float64)
    m = row.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(m >= 2, (m * m - np.sum(row**2, axis=-1)) / (m * (m - 1)), np.nan)


def alpha_from_counts(counts: np.ndarray) -> float:
    """Nominal alpha from unit value counts (the formula above; equals ``krippendorff.alpha``); NaN when
    D_e = 0 (every value is one label: a constant label carries no information)."""
    pairable = _pairable(counts)
    d_e = expected_disagreement(pairable)
    if not pairable.size or not d_e > 0:
        return float("nan")
    m = pairable.sum(axis=1).astype(np.float64)
    d_o = float(np.sum(m * unit_disagreement(pairable)) / m.sum())
    return 1.0 - d_o / d_e


def _interval(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


def _constant(counts: np.ndarray, labels: Sequence[str]) -> tuple[str, int]:
    totals = counts.sum(axis=0)
    if not len(labels) or totals.sum() == 0:
        return "", -1
    best = int(np.argmax(totals))  # ties: alphabetical first (labels are sorted)
    return labels[best], best


def class_agreement(
    class_name: str, units: Mapping[str, Sequence[str]], n_bootstrap: int = N_BOOTSTRAP, seed: int = 0
) -> Agreement:
    """Alpha of one class over its clusters (``units``: cluster id -> labels), with a bootstrap interval."""
    import krippendorff

    labels, counts = value_counts(list(units.values()))
    pairable = _pairable(counts)
    constant, column = _constant(counts, labels)
    n_values = int(pairable.sum())
    d_e = expected_disagreement(pairable)
    note, alpha = "", float("nan")
    if len(pairable) == 0:
        note = "no cluster has 2 or more labelled descriptions: alpha undefined"
    elif not d_e > 0:
        note = "every description has the same label: alpha undefined (a constant label)"
    else:
        alpha = float(krippendorff.alpha(value_counts=pairable, level_of_measurement="nominal"))
    low = high = float("nan")
    if np.isfinite(alpha) and len(pairable) >= 2:
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, len(pairable), size=(n_bootstrap, len(pairable)))
        low, high = _interval(np.array([alpha_from_counts(pairable[d]) for d in draws]))
    m = pairable.sum(axis=1).astype(np.float64)
    observed = float(1 - np.sum(m * unit_disagreement(pairable)) / m.sum()) if m.size else float("nan")
    share = float(counts[:, column].sum() / counts.sum()) if column >= 0 else float("nan")
    return Agreement("class", class_name, "", len(pairable), n_values, alpha, low, high, observed,
                     1 - d_e if np.isfinite(d_e) else float("nan"), constant, share, note)


def cluster_agreements(
    class_name: str, units: Mapping[str, Sequence[str]], n_bootstrap: int = N_BOOTSTRAP, seed: int = 0
) -> list[Agreement]:
    """alpha_u = 1 - D_o,u / D_e(class) per cluster, with an interval from resampling its values (D_e fixed).

    Alpha is not defined on one unit; the m_u-weighted mean of these shares is exactly the class alpha."""
    labels, counts = value_counts(list(units.values()))
    d_e = expected_disagreement(counts)
    constant, column = _constant(counts, labels)
    rng = np.random.default_rng(seed)
    rows = []
    for (cluster_id, _), row in zip(units.items(), counts, strict=True):
        m = int(row.sum())
        d_o = float(unit_disagreement(row))
        alpha = 1 - d_o / d_e if m >= 2 and d_e > 0 else float("nan")
        low = high = float("nan")
        if np.isfinite(alpha):
            draws = rng.multinomial(m, row / m, size=n_bootstrap)
            low, high = _interval(1 - unit_disagreement(draws) / d_e)
        note = "" if m >= 2 else "fewer than 2 labelled descriptions"
        if m >= 2 and not d_e > 0:
            note = "every description of the class has the same label: alpha undefined"
        rows.append(Agreement(
            "cluster", class_name, cluster_id, int(m >= 2), m, alpha, low, high,
            1 - d_o if m >= 2 else float("nan"), 1 - d_e if np.isfinite(d_e) else float("nan"), constant,
            float(row[column] / m) if m and column >= 0 else float("nan"), note,
        ))
    return rows


def agreement_table(
    units_by_class: Mapping[str, Mapping[str, Sequence[str]]], n_bootstrap: int = N_BOOTSTRAP, seed: int = 0
) -> list[Agreement]:
    """Per class: its row, then one row per cluster (clusters in the order given)."""
    rows: list[Agreement] = []
    for class_name, units in units_by_class.items():
        rows.append(class_agreement(class_name, units, n_bootstrap, seed))
        rows.extend(cluster_agreements(class_name, units, n_bootstrap, seed))
    return rows

