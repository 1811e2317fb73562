"""Global explanations: per-layer mean label scores, least-squares slopes and the bootstrap over images."""

from __future__ import annotations

import math

import numpy as np
import pytest

from convlens.labels.trends import ScoredCluster, bootstrap_slopes, class_trends, layer_means, ls_slope


def test_slope_by_hand_and_against_polyfit() -> None:
    assert ls_slope([0, 1, 2], np.array([0.0, 1.0, 2.0])) == pytest.approx(1.0)
    assert ls_slope([0, 1, 2], np.array([2.0, 0.0, 3.0])) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    y = rng.standard_normal((5, 9))
    assert ls_slope(range(9), y) == pytest.approx([np.polyfit(np.arange(9), row, 1)[0] for row in y])
    assert math.isnan(ls_slope([0], np.array([1.0])))


def test_layer_means_are_zero_where_no_cluster_carries_the_label() -> None:
    assert layer_means(np.array([2.0, 0.0, 6.0]), np.array([1, 0, 2])).tolist() == [2.0, 0.0, 3.0]


CLUSTERS = [
    ScoredCluster("A", "L0", 0, 3, {"wing": 2.0}),
    ScoredCluster("A", "L1", 1, 3, {}),
    ScoredCluster("A", "L2", 2, 3, {"wing": 4.0}),
    ScoredCluster("B", "L1", 1, 3, {"sky": 3.0}),
    ScoredCluster("B", "L2", 2, 3, {"wing": 2.0}),
]


def test_class_trends_by_hand() -> None:
    trends = class_trends("bird", CLUSTERS, n_bootstrap=200)
    by_label = {t.label: t for t in trends.trends}
    # wing: depth 0 -> 2 (one cluster), depth 1 -> 0 (none), depth 2 -> (4 + 2) / 2 = 3; slope 0.5
    assert by_label["wing"].means == [2.0, 0.0, 3.0] and by_label["wing"].clusters_per_layer == [1, 0, 2]
    assert by_label["wing"].slope == pytest.approx(0.5) and by_label["wing"].total_score == 8.0
    # sky: [0, 3, 0] -> slope 0 (flat)
    assert by_label["sky"].slope == pytest.approx(0.0) and by_label["sky"].direction == "flat"
    assert trends.depths == [0, 1, 2] and trends.layer_names == ["L0", "L1", "L2"] and trends.n_images == 2
    assert [t.label for t in trends.rising] == ["wing"] and trends.falling == []


def test_bootstrap_equals_a_literal_resampling_of_images() -> None:
    images = ["A", "B"]
    scores = {"A": [2.0, 0.0, 4.0], "B": [0.0, 0.0, 2.0]}  # label "wing"
    counts = {"A": [1, 0, 1], "B": [0, 0, 1]}
    s = np.array([scores[i] for i in images])
    c = np.array([counts[i] for i in images])
    fast = bootstrap_slopes(s, c, [0, 1, 2], 50, np.random.default_rng(3))
    draws = np.random.default_rng(3).multinomial(2, [0.5, 0.5], size=50)
    literal = []
    for draw in draws:
        sample = [image for image, m in zip(images, draw, strict=True) for _ in range(m)]  # images with repeats
        means = []
        for depth in range(3):
            values = [scores[i][depth] for i in sample if counts[i][depth]]
            means.append(sum(values) / len(values) if values else 0.0)
        literal.append(np.polyfit([0, 1, 2], means, 1)[0])
    assert fast == pytest.approx(literal)


def test_interval_and_top_lists() -> None:
    clusters = []
    for image in range(6):
        for depth in range(4):
            scores = {f"up{k}": float(depth * (k + 1) + image % 2) for k in range(8)}  # eight rising labels
            scores["down"] = float(4 - depth)
            clusters.append(ScoredCluster(f"i{image}", f"L{depth}", depth, 4, scores))
    trends = class_trends("k", clusters, n_bootstrap=300, seed=1)
    assert len(trends.rising) == 6 and [t.label for t in trends.rising][:2] == ["up7", "up6"]
    assert [t.label for t in trends.falling] == ["down"]
    down = trends.falling[0]
    assert down.slope == pytest.approx(-1.0) and down.ci_low == pytest.approx(-1.0) and down.interval_excludes_zero


def test_one_layer_and_one_image_are_explained_not_errors() -> None:
    one_layer = class_trends("k", [ScoredCluster("A", "L", 0, 1, {"x": 1.0})])
    assert math.isnan(one_layer.trends[0].slope) and any("one layer" in n for n in one_layer.notes)
    one_image = class_trends("k", CLUSTERS[:3])
    assert math.isnan(one_image.trends[0].ci_low) and any("one image" in n for n in one_image.notes)
    assert class_trends("k", []).notes == ["no clusters"]


def test_overview_ranks_by_evidence_not_by_slope() -> None:
    """A strong flat concept leads the top list; a typo seen once in a deep cluster has the steepest slope but
    an interval that includes 0, so it is not "rising"; a concept rising in every image is."""
    clusters = []
    for image in range(4):
        for depth in range(3):
            scores = {"handlebar": 5.0 + 0.1 * ((image + depth) % 2), "mirror": 0.5 + 0.4 * depth,
                      "tiny": 0.01 + 0.01 * depth}  # rises in every image, but < 2 % of the class's score
            if image == 0 and depth == 2:
                scores["hanldebar"] = 3.0
            clusters.append(ScoredCluster(f"i{image}", f"L{depth}", depth, 3, scores))
    trends = class_trends("moped", clusters, n_bootstrap=300, seed=2)
    by_label = {t.label: t for t in trends.trends}
    assert by_label["hanldebar"].slope > by_label["mirror"].slope > 0  # steepest by slope alone
    assert [t.label for t in trends.top] == ["handlebar", "mirror", "hanldebar", "tiny"]
    assert [t.label for t in trends.rising] == ["mirror"] and trends.falling == []
    assert by_label["tiny"].interval_excludes_zero and trends.share(by_label["tiny"]) < 0.02
    assert not by_label["hanldebar"].interval_excludes_zero and by_label["mirror"].interval_excludes_zero
    total = sum(t.total_score for t in trends.trends)
    assert trends.share(by_label["handlebar"]) == pytest.approx(by_label["handlebar"].total_score / total)
