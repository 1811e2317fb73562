"""Label scores, cluster levels, best labels, merged groups and label strengths — hand-computed cases."""

from __future__ import annotations

import pytest

from convlens.labels.scores import (
    ClusterStats,
    LabelScore,
    LabelVote,
    best_labels,
    cluster_level,
    full_merge,
    label_strengths,
    merge_clusters,
    score_labels,
)

VOTES = [
    LabelVote("c", "wing", 1, True), LabelVote("c", "wing", 3, True),   # f=2, mean 2   -> 2 * 0.8 = 1.6
    LabelVote("c", "sky", 0, False),                                    # f=1, mean 0, all wrong -> 1.0 / 4
    LabelVote("c", "red", 4, True), LabelVote("c", "red", 2, False),    # f=2, mean 3, one right
]


def test_scores_authors_rule() -> None:
    scores = score_labels(VOTES)
    assert scores["wing"] == LabelScore("wing", 2, 2.0, 2, 0, pytest.approx(1.6))
    assert scores["sky"].score == pytest.approx(0.25)
    # authors: divided by 4 only when no game giving the label guessed right -> 2 * (1 - 0.3)
    assert scores["red"].score == pytest.approx(1.4)
    assert (scores["red"].n_correct, scores["red"].n_wrong, scores["red"].mean_level) == (1, 1, 3.0)


def test_scores_per_play_rule() -> None:
    scores = score_labels(VOTES, wrong_rule="per_play")
    assert scores["wing"].score == pytest.approx(0.9 + 0.7)
    assert scores["sky"].score == pytest.approx(0.25)
    assert scores["red"].score == pytest.approx(0.6 + 0.8 / 4)
    with pytest.raises(ValueError, match="wrong_rule"):
        score_labels(VOTES, wrong_rule="other")  # type: ignore[arg-type]


def test_level_factor_spans_one_to_one_half() -> None:
    assert score_labels([LabelVote("c", "x", 0, True)])["x"].score == pytest.approx(1.0)
    assert score_labels([LabelVote("c", "x", 5, True)])["x"].score == pytest.approx(0.5)


def test_cluster_level_is_the_ceiling_of_the_mean_with_resigns_as_five() -> None:
    assert cluster_level([0, 1, 1], resigns=1) == 2  # (0 + 1 + 1 + 5) / 4 = 1.75
    assert cluster_level([2, 2, 2], resigns=0) == 2  # exact: no float ceiling trap
    assert cluster_level([1] * 9 + [2], resigns=0) == 2  # 1.1 -> 2
    assert cluster_level([], resigns=2) == 5
    assert cluster_level([], resigns=0) is None


def _scores(**values: float) -> dict[str, LabelScore]:
    return {k: LabelScore(k, 1, 0.0, 1, 0, v) for k, v in values.items()}


def test_best_labels_keep_ties() -> None:
    assert best_labels(_scores(a=1.6, b=1.6, c=1.0)) == ["a", "b"]
    # 2 * (1 - 0.1 * 1.5) and 3 * (1 - 0.1 * 13/3) are both 1.7 up to rounding
    tied = score_labels([LabelVote("c", "x", 1, True), LabelVote("c", "x", 2, True),
                         LabelVote("c", "y", 4, True), LabelVote("c", "y", 4, True), LabelVote("c", "y", 5, True)])
    assert best_labels(tied) == ["x", "y"]
    assert best_labels({}) == []


def _cluster(cid: str, image: str, layer: str, weight: float, **scores: float) -> ClusterStats:
    return ClusterStats(cid, "k", image, layer, 0, 3, weight, 2, scores=_scores(**scores))


def test_merge_is_transitive_per_image_and_layer() -> None:
    clusters = [
        _cluster("c1", "A", "L", 30, wing=2.0),
        _cluster("c2", "A", "L", 10, wing=1.0, sky=1.0),   # best {sky, wing}: links c1 and c3
        _cluster("c3", "A", "L", 5, sky=3.0),
        _cluster("c4", "A", "L", 20, red=1.0),
        _cluster("c5", "A", "L", 1),                        # no labels: alone
        _cluster("c6", "A", "M", 7, wing=1.0),              # other layer: not merged
        _cluster("c7", "B", "L", 9, wing=1.0),              # other image: not merged
    ]
    groups = merge_clusters(clusters)
    members = {g.group_id: [c.cluster_id for c in g.members] for g in groups}
    assert members == {"A:L:g0": ["c1", "c2", "c3"], "A:L:g1": ["c4"], "A:L:g2": ["c5"], "A:M:g0": ["c6"],
                       "B:L:g0": ["c7"]}
    first = groups[0]
    assert first.weight == 45 and first.fmap_count == 6 and first.shared_labels == ["sky", "wing"]
    assert groups[2].shared_labels == [] and groups[1].shared_labels == ["red"]


def test_label_strength_is_the_weighted_mean_of_scores() -> None:
    members = [_cluster("c1", "A", "L", 30, wing=2.0), _cluster("c2", "A", "L", 10, wing=1.0, sky=3.0)]
    # wing: (30 * 2 + 10 * 1) / 40 = 1.75; sky: (30 * 0 + 10 * 3) / 40 = 0.75
    assert label_strengths(members) == [("wing", pytest.approx(1.75)), ("sky", pytest.approx(0.75))]
    zero = [_cluster("c1", "A", "L", 0, wing=2.0), _cluster("c2", "A", "L", 0, sky=1.0)]
    assert label_strengths(zero) == [("wing", pytest.approx(1.0)), ("sky", pytest.approx(0.5))]


def test_group_counts_are_sums_and_full_merge_takes_the_whole_layer() -> None:
    a = _cluster("c1", "A", "L", 30, wing=2.0)
    b = _cluster("c2", "A", "L", 10, sky=3.0)
    a.wins, a.losses, a.resigns, b.wins, b.losses, b.resigns = 3, 1, 0, 1, 2, 4
    assert len(merge_clusters([a, b])) == 2  # different best labels
    (group,) = full_merge([a, b])
    assert (group.group_id, group.merge, group.weight) == ("A:L:f0", "full", 40)
    assert (group.wins, group.losses, group.resigns) == (4, 3, 4)
