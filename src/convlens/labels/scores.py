"""Label scores per INV cluster, cluster statistics, best labels and merged cluster groups.

INV (Bianchi et al., IJCAI-24; the authors' ``explainations_utils.py``):

* label score within a cluster C:  s_{C,l} = f_{C,l} (1 - 0.1 * mean level of the games giving l),
  level = reveal-level index 0..5 (factor 1.0 .. 0.5), divided by 4 for wrong guesses
  (:func:`score_labels`). The authors divide by 4 only when *none* of the games giving l in C guessed
  right (``wrong_rule="authors"``, the default): ``explainations_utils.split_dataset_for_cluster_and_features``
  sets ``is_correct`` to "some game of cluster C whose ``synonym`` is l has ``guessed_label_id`` equal to
  the class's ``label_id``" and passes it, with l's frequency and mean ``percentile`` in C, to
  ``compute_score``, which returns ``score / 4`` when it is false; ``"per_play"`` weights each game instead:
  s = sum_i (1 - 0.1 level_i) (1 if guess i was right else 1/4). Both agree when a label's games are
  all right or all wrong.
* cluster statistics: wins, losses (games with and without descriptions), resigns and the cluster
  level  ceil(mean of the guess levels and 5 for each resign)  (:func:`cluster_level`);
* best labels of a cluster: every label with the maximal score (ties kept; equal up to 1e-9 relative);
* clusters of one image and layer that share a best label are merged, transitively (connected
  components; :func:`merge_clusters`); a group's weight, map count, wins, losses and resigns are sums;
* label strength of a group G:  sum_{C in G} w_C s_{C,l} / sum_{C in G} w_C  (s = 0 where C lacks l;
  :func:`label_strengths`), shown top-10 in detail and top-3 under each map. "Full merge" puts all
  clusters of a layer in one group (:func:`full_merge`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "WRONG_FACTOR",
    "ClusterGroup",
    "ClusterStats",
    "LabelScore",
    "LabelVote",
    "best_labels",
    "cluster_level",
    "full_merge",
    "label_strengths",
    "merge_clusters",
    "score_labels",
]

WRONG_FACTOR = 0.25
RESIGN_LEVEL = 5
WrongRule = Literal["authors", "per_play"]
WRONG_RULES: tuple[str, ...] = ("authors", "per_play")


@dataclass(frozen=True)
class LabelVote:
    """One labelled game in an INV cluster: the label its description maps to, its level and outcome."""

    cluster_id: str
    label: str
    level: int
    correct: bool


@dataclass(frozen=True)
class LabelScore:
    """Score of one label within one cluster with its components."""

    label: str
    frequency: int
    mean_level: float
    n_correct: int
    n_wrong: int
    score: float


def score_labels(votes: Iterable[LabelVote], wrong_rule: WrongRule = "authors") -> dict[str, LabelScore]:
    """Scores of the labels of one cluster's games (every vote must belong to the same cluster).

    ``"authors"``: ``f (1 - 0.1 mean level)``, divided by 4 only if no vote for the label is a correct
    guess (``is_correct`` of ``split_dataset_for_cluster_and_features`` in ``explainations_utils.py``:
    *any* guess carrying the label was right); ``"per_play"``: each vote weighted by its own outcome.
    """
    if wrong_rule not in WRONG_RULES:
        raise ValueError(f"unknown wrong_rule {wrong_rule!r}; choose one of {WRONG_RULES}")
    by_label: dict[str, list[LabelVote]] = defaultdict(list)
    for vote in votes:
        by_label[vote.label].append(vote)
    scores = {}
    for label, group in by_label.items():
        frequency = len(group)
        mean_level = sum(v.level for v in group) / frequency
        n_correct = sum(v.correct for v in group)
        if wrong_rule == "authors":
            score = frequency * (1 - 0.1 * mean_level) * (1.0 if n_correct else WRONG_FACTOR)
        else:
            score = sum((1 - 0.1 * v.level) * (1.0 if v.correct else WRONG_FACTOR) for v in group)
        scores[label] = LabelScore(label, frequency, mean_level, n_correct, frequency - n_correct, score)
    return scores


def best_labels(scores: dict[str, LabelScore]) -> list[str]:
    """Labels with the maximal score (ties kept), alphabetical; [] for a cluster without labels."""
    if not scores:
        return []
    top = max(s.score for s in scores.values())
    return sorted(label for label, s in scores.items() if math.isclose(s.score, top, rel_tol=1e-9, abs_tol=1e-12))


def cluster_level(guess_levels: Sequence[int], resigns: int) -> int | None:
    """``ceil(mean(guess levels + [5] * resigns))`` in exact integer arithmetic; None without games."""
    count = len(guess_levels) + resigns
    if count == 0:
        return None
    total = sum(guess_levels) + RESIGN_LEVEL * resigns
    return -(-total // count)


@dataclass
class ClusterStats:
    """One INV cluster (a round) with its games and label scores."""

    cluster_id: str
    class_name: str
    image_id: str
    layer: str
    layer_depth: int | None
    n_layers: int | None
    weight: float
    fmap_count: int
    image_name: str = ""
    cluster_index: int | None = None
    inv_run: str = ""
    wins: int = 0
    losses: int = 0
    resigns: int = 0
    abandoned: int = 0
    guess_levels: list[int] = field(default_factory=list)
    scores: dict[str, LabelScore] = field(default_factory=dict)

    @property
    def level(self) -> int | None:
        return cluster_level(self.guess_levels, self.resigns)

    @property
    def best_labels(self) -> list[str]:
        return best_labels(self.scores)


@dataclass
class ClusterGroup:
    """Clusters of one image and layer merged because they share a best label (or all, full merge)."""

    group_id: str
    members: list[ClusterStats]
    shared_labels: list[str]
    strengths: list[tuple[str, float]]
    merge: str = "best"

    @property
    def first(self) -> ClusterStats:
        return self.members[0]

    @property
    def weight(self) -> float:
        return sum(c.weight for c in self.members)

    @property
    def fmap_count(self) -> int:
        return sum(c.fmap_count for c in self.members)

    @property
    def wins(self) -> int:
        return sum(c.wins for c in self.members)

    @property
    def losses(self) -> int:
        return sum(c.losses for c in self.members)

    @property
    def resigns(self) -> int:
        return sum(c.resigns for c in self.members)


def label_strengths(members: Sequence[ClusterStats]) -> list[tuple[str, float]]:
    """``(label, sum_C w_C s_{C,l} / sum_C w_C)`` for every label of the group, strongest first
    (ties alphabetical). Clusters without a weight count equally when all weights are 0."""
    total = sum(c.weight for c in members)
    weights = [c.weight / total if total > 0 else 1 / len(members) for c in members]
    labels = dict.fromkeys(label for c in members for label in c.scores)
    strengths = {
        label: sum(w * c.scores[label].score for w, c in zip(weights, members, strict=True) if label in c.scores)
        for label in labels
    }
    return sorted(strengths.items(), key=lambda item: (-item[1], item[0]))


def _components(members: Sequence[ClusterStats]) -> list[list[int]]:
    """Connected components of 'shares a best label' (union-find), in order of first member."""
    parent = list(range(len(members)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    holders: dict[str, list[int]] = defaultdict(list)
    for index, cluster in enumerate(members):
        for label in cluster.best_labels:
            holders[label].append(index)
    for indices in holders.values():
        for other in indices[1:]:
            parent[root(other)] = root(indices[0])
    groups: dict[int, list[int]] = defaultdict(list)
    for index in range(len(members)):
        groups[root(index)].append(index)
    return list(groups.values())


def _by_image_layer(clusters: Iterable[ClusterStats]) -> dict[tuple[str, str], list[ClusterStats]]:
    grouped: dict[tuple[str, str], list[ClusterStats]] = defaultdict(list)
    for cluster in clusters:
        grouped[(cluster.image_id, cluster.layer)].append(cluster)
    return grouped


def _shared(members: Sequence[ClusterStats]) -> list[str]:
    if len(members) == 1:
        return members[0].best_labels
    counts: dict[str, int] = defaultdict(int)
    for cluster in members:
        for label in cluster.best_labels:
            counts[label] += 1
    return sorted(label for label, n in counts.items() if n > 1)


def _numbered(groups: list[list[ClusterStats]], image_id: str, layer: str, merge: str) -> list[ClusterGroup]:
    groups = sorted(groups, key=lambda g: (-sum(c.weight for c in g), g[0].cluster_id))
    return [
        ClusterGroup(f"{image_id}:{layer}:{'g' if merge == 'best' else 'f'}{index}", members,
                     _shared(members) if merge == "best" else [], label_strengths(members), merge)
        for index, members in enumerate(groups)
    ]


def merge_clusters(clusters: Iterable[ClusterStats]) -> list[ClusterGroup]:
    """Per image and layer, merge clusters sharing a best label (transitive closure); heaviest group first."""
    result = []
    for (image_id, layer), members in _by_image_layer(clusters).items():
        members = sorted(members, key=lambda c: (-c.weight, c.cluster_id))
        groups = [[members[i] for i in component] for component in _components(members)]
        result.extend(_numbered(groups, image_id, layer, "best"))
    return result


def full_merge(clusters: Iterable[ClusterStats]) -> list[ClusterGroup]:
    """One group per image and layer holding all its clusters (the authors' "full merge")."""
    result = []
    for (image_id, layer), members in _by_image_layer(clusters).items():
        members = sorted(members, key=lambda c: (-c.weight, c.cluster_id))
        result.extend(_numbered([members], image_id, layer, "full"))
    return result
