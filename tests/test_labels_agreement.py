"""Krippendorff's alpha of the labels: a hand-computed case, the krippendorff package as an independent
implementation, the per-cluster decomposition and the constant-label baseline."""

from __future__ import annotations

import math

import krippendorff
import numpy as np
import pytest

from convlens.labels.agreement import (
    alpha_from_counts,
    class_agreement,
    cluster_agreements,
    expected_disagreement,
    unit_disagreement,
    value_counts,
)

# units (clusters) -> labels of the players' descriptions; counts per label a, b, c:
# u1 = [3, 0, 0], u2 = [1, 1, 0], u3 = [0, 1, 2], u4 has one value (not pairable)
UNITS = {"u1": ["a", "a", "a"], "u2": ["a", "b"], "u3": ["b", "c", "c"], "u4": ["c"]}


def test_hand_computed_alpha() -> None:
    # pairable values: n = 8, n_a = 4, n_b = 2, n_c = 2 -> D_e = (64 - 24) / 56 = 5/7
    # D_o,u: u1 = 0, u2 = (4 - 2) / 2 = 1, u3 = (9 - 5) / 6 = 2/3 -> D_o = 3/8*0 + 2/8*1 + 3/8*2/3 = 1/2
    # alpha = 1 - (1/2) / (5/7) = 0.3
    labels, counts = value_counts(list(UNITS.values()))
    assert labels == ["a", "b", "c"]
    assert expected_disagreement(counts) == pytest.approx(5 / 7)
    assert unit_disagreement(counts[:3]).tolist() == pytest.approx([0.0, 1.0, 2 / 3])
    assert alpha_from_counts(counts) == pytest.approx(0.3)
    result = class_agreement("k", UNITS, n_bootstrap=200)
    assert result.alpha == pytest.approx(0.3)
    assert (result.n_units, result.n_values) == (3, 8)
    assert result.observed_agreement == pytest.approx(0.5) and result.chance_agreement == pytest.approx(2 / 7)
    assert (result.constant_label, result.constant_share) == ("a", pytest.approx(4 / 9))
    assert result.ci_low <= result.alpha <= result.ci_high


def test_cluster_alphas_by_hand_and_their_weighted_mean_is_the_class_alpha() -> None:
    rows = cluster_agreements("k", UNITS, n_bootstrap=200)
    alphas = [r.alpha for r in rows]
    # alpha_u = 1 - D_o,u / D_e: u1 = 1, u2 = 1 - 7/5 = -0.4, u3 = 1 - (2/3)(7/5) = 1/15; u4 undefined
    assert alphas[:3] == pytest.approx([1.0, -0.4, 1 / 15])
    assert math.isnan(alphas[3]) and rows[3].note == "fewer than 2 labelled descriptions"
    weights = [3, 2, 3]
    assert sum(w * a for w, a in zip(weights, alphas[:3], strict=True)) / 8 == pytest.approx(0.3)
    assert rows[0].ci_low == rows[0].ci_high == pytest.approx(1.0)  # resampling three "a" gives "a" only
    assert rows[1].constant_share == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(5))
def test_formula_equals_the_krippendorff_package(seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 4, size=(9, 4))
    expected = krippendorff.alpha(value_counts=counts, level_of_measurement="nominal")
    assert alpha_from_counts(counts) == pytest.approx(expected)


def test_constant_label_has_undefined_alpha_and_full_baseline() -> None:
    units = {"u1": ["red", "red"], "u2": ["red", "red", "red"]}
    result = class_agreement("k", units, n_bootstrap=50)
    assert math.isnan(result.alpha) and "constant label" in result.note
    assert result.observed_agreement == pytest.approx(1.0)  # looks like perfect agreement ...
    assert (result.constant_label, result.constant_share) == ("red", 1.0)  # ... but one word says it all
    assert all(math.isnan(r.alpha) for r in cluster_agreements("k", units, n_bootstrap=50))


def test_no_pairable_unit() -> None:
    result = class_agreement("k", {"u1": ["a"], "u2": []}, n_bootstrap=50)
    assert math.isnan(result.alpha) and result.n_units == 0 and "no cluster" in result.note


def test_bootstrap_is_seeded() -> None:
    a = class_agreement("k", UNITS, n_bootstrap=300, seed=7)
    b = class_agreement("k", UNITS, n_bootstrap=300, seed=7)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
