"""Global explanations: how each concept label of a class grows or fades with layer depth.

INV (Bianchi et al., IJCAI-24; the authors' ``testing&global.ipynb``): for a class and a label, per
layer the mean label score over the clusters of that layer that carry the label (0 if none does), then
the least-squares slope of that mean over the layer index; the six labels with the largest positive
slopes (concepts that grow with depth) and the six with the most negative slopes are plotted.

Beyond the notebook, every slope gets a percentile bootstrap interval over **images**: images of the
class are resampled with replacement and the per-layer means recomputed from the resampled images'
clusters. With S[i, l] the summed scores and C[i, l] the number of clusters of image i at depth l that
carry the label, and m the resampled multiplicity of each image:

    mean_l = sum_i m_i S[i, l] / sum_i m_i C[i, l]   (0 where the denominator is 0),
    slope  = sum_l (x_l - x̄)(mean_l - mean̄) / sum_l (x_l - x̄)^2,   x_l = layer depth 0..L-1.

The overview ranks by **evidence**, not by slope alone (a slope of a label seen once, a typo or another
class's word, is as steep as any): :attr:`ClassTrends.top` are the labels with the largest total score
(sum over the class's clusters); "rising"/"falling" are the labels whose bootstrap interval lies above /
below 0, by total score, among those with at least ``MIN_SHARE`` (2 %) of the class's score. Where no
interval exists (one image, one layer) they fall back to the sign of the slope, still by total score, and
the class's notes say so. Scores are those of single (unmerged)
clusters, as in the notebook.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convlens.labels.export import optional_int
from convlens.labels.files import LabelsFolder, read_labels

__all__ = [
    "TOP_K", "ClassTrends", "LabelTrend", "ScoredCluster", "bootstrap_slopes", "class_trends", "global_explanations",
    "layer_means",
    "ls_slope",
]

TOP_K = 6
MIN_SHARE = 0.02  # a label below 2 % of its class's score is too rare to be called rising or falling
N_BOOTSTRAP = 1000


def ls_slope(x: Sequence[float] | np.ndarray, y: np.ndarray) -> np.ndarray | float:
    """Least-squares slope of ``y`` over ``x`` (``y`` may hold one series per row); NaN with < 2 points."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    centred = x - x.mean() if x.size else x
    denominator = float(np.sum(centred**2))
    if x.size < 2 or denominator == 0:
        return np.full(y.shape[:-1], np.nan) if y.ndim > 1 else float("nan")
    slope = (y - y.mean(axis=-1, keepdims=True)) @ centred / denominator
    return slope if y.ndim > 1 else float(slope)


def layer_means(scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-layer mean label score from summed scores and cluster counts (last axis = layers); 0 where
    no cluster carries the label."""
    scores = np.asarray(scores, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, scores / np.where(counts > 0, counts, 1), 0.0)


def bootstrap_slopes(
    scores: np.ndarray, counts: np.ndarray, x: Sequence[float], n_bootstrap: int, rng: np.random.Generator
) -> np.ndarray:
    """Slopes of ``n_bootstrap`` resamples of images; ``scores``/``counts`` are (images x layers)."""
    n_images = scores.shape[0]
    multiplicity = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_bootstrap).astype(np.float64)
    return np.asarray(ls_slope(x, layer_means(multiplicity @ scores, multiplicity @ counts)))


@dataclass
class LabelTrend:
    """One label of one class across the layers."""

    label: str
    means: list[float]
    clusters_per_layer: list[int]
    slope: float
    ci_low: float
    ci_high: float
    total_score: float
    n_images: int

    @property
    def direction(self) -> str:
        if not np.isfinite(self.slope) or self.slope == 0:
            return "flat"
        return "rising" if self.slope > 0 else "falling"

    @property
    def interval_excludes_zero(self) -> bool:
        return bool(np.isfinite(self.ci_low) and (self.ci_low > 0 or self.ci_high < 0))


@dataclass
class ClassTrends:
    """All label trends of one class, with the six most rising and six most falling."""

    class_name: str
    depths: list[int]
    layer_names: list[str]
    n_images: int
    trends: list[LabelTrend]
    notes: list[str] = field(default_factory=list)

    @property
    def total_score(self) -> float:
        return float(sum(t.total_score for t in self.trends))

    def share(self, trend: LabelTrend) -> float:
        """The label's part of the class's total label score."""
        total = self.total_score
        return trend.total_score / total if total > 0 else 0.0

    @property
    def by_evidence(self) -> list[LabelTrend]:
        """Every label, largest total score first (ties alphabetical)."""
        return sorted(self.trends, key=lambda t: (-t.total_score, t.label))

    @property
    def top(self) -> list[LabelTrend]:
        """The six labels with the largest total score."""
        return self.by_evidence[:TOP_K]

    @property
    def intervals(self) -> bool:
        """True when the slopes have bootstrap intervals (two images or more, two layers or more)."""
        return any(np.isfinite(t.ci_low) for t in self.trends)

    def _trending(self, sign: int) -> list[LabelTrend]:
        evident = [t for t in self.by_evidence if self.share(t) >= MIN_SHARE]
        if self.intervals:
            chosen = [t for t in evident if t.interval_excludes_zero and sign * t.slope > 0]
        else:
            chosen = [t for t in evident if np.isfinite(t.slope) and sign * t.slope > 0]
        return chosen[:TOP_K]

    @property
    def rising(self) -> list[LabelTrend]:
        """Labels that grow with depth (interval above 0; the slope's sign without intervals), by total score."""
        return self._trending(+1)

    @property
    def falling(self) -> list[LabelTrend]:
        """Labels that fade with depth (interval below 0; the slope's sign without intervals), by total score."""
        return self._trending(-1)


@dataclass(frozen=True)
class ScoredCluster:
    """The input of :func:`class_trends`: one cluster's depth and its label scores."""

    image_id: str
    layer: str
    depth: int
    n_layers: int | None
    scores: Mapping[str, float]


def _depths(clusters: Sequence[ScoredCluster], notes: list[str]) -> tuple[list[int], list[str]]:
    layer_counts = {c.n_layers for c in clusters if c.n_layers}
    if len(layer_counts) > 1:
        notes.append(f"images come from INV runs with different layer counts {sorted(layer_counts)}: "
                     "depth indices are not comparable across them")
    n_layers = max([*layer_counts, max(c.depth for c in clusters) + 1])
    names: dict[int, Counter[str]] = defaultdict(Counter)
    for c in clusters:
        names[c.depth][c.layer] += 1
    return list(range(n_layers)), [names[d].most_common(1)[0][0] if names[d] else "" for d in range(n_layers)]


def class_trends(
    class_name: str, clusters: Iterable[ScoredCluster], n_bootstrap: int = N_BOOTSTRAP, seed: int = 0
) -> ClassTrends:
    """Per-layer means, slopes and bootstrap intervals of every label of one class."""
    clusters = list(clusters)
    notes: list[str] = []
    if not clusters:
        return ClassTrends(class_name, [], [], 0, [], ["no clusters"])
    depths, names = _depths(clusters, notes)
    images = sorted({c.image_id for c in clusters})
    row = {image: i for i, image in enumerate(images)}
    labels = sorted({label for c in clusters for label in c.scores})
    scores = np.zeros((len(labels), len(images), len(depths)))
    counts = np.zeros_like(scores)
    column = {label: i for i, label in enumerate(labels)}
    for c in clusters:
        for label, score in c.scores.items():
            scores[column[label], row[c.image_id], c.depth] += score
            counts[column[label], row[c.image_id], c.depth] += 1
    if len(depths) < 2:
        notes.append("one layer only: slopes are undefined")
    rng = np.random.default_rng(seed)
    trends = []
    for index, label in enumerate(labels):
        means = layer_means(scores[index].sum(axis=0), counts[index].sum(axis=0))
        slope = ls_slope(depths, means)
        low = high = float("nan")
        if np.isfinite(slope) and len(images) >= 2:
            samples = bootstrap_slopes(scores[index], counts[index], depths, n_bootstrap, rng)
            low, high = (float(v) for v in np.percentile(samples, [2.5, 97.5]))
        per_layer = counts[index].sum(axis=0).astype(int).tolist()
        n_images = int(np.count_nonzero(counts[index].sum(axis=1)))
        trends.append(LabelTrend(label, means.tolist(), per_layer, float(slope), low, high,
                                 float(scores[index].sum()), n_images))
    if len(images) < 2:
        notes.append("one image only: no bootstrap interval over images")
    return ClassTrends(class_name, depths, names, len(images), trends, notes)


def scored_clusters(folder: LabelsFolder) -> dict[str, list[ScoredCluster]]:
    scores: dict[str, dict[str, float]] = defaultdict(dict)
    for row in folder.label_scores:
        scores[row["cluster_id"]][row["label"]] = float(row["score"])
    by_class: dict[str, list[ScoredCluster]] = defaultdict(list)
    for row in folder.clusters:
        depth = optional_int(row.get("layer_depth"))
        if depth is None:
            raise ValueError(f"cluster {row['cluster_id']} has no layer_depth: cannot place it on the depth axis")
        n_layers = optional_int(row.get("n_layers"))
        cluster_scores = scores.get(row["cluster_id"], {})
        by_class[row["class"]].append(ScoredCluster(row["image_id"], row["layer"], depth, n_layers, cluster_scores))
    return by_class


def global_explanations(
    labels: LabelsFolder | str | Path, *, n_bootstrap: int = 1000, seed: int = 0
) -> dict[str, ClassTrends]:
    """Per class of a labels folder (``convlens labels``), every label's trend over layer depth.

    ``labels`` is a folder path or a :class:`~convlens.labels.files.LabelsFolder` already read;
    the pages and plots of ``convlens global`` are :func:`convlens.reports.global_report.build_global`.
    """
    folder = labels if isinstance(labels, LabelsFolder) else read_labels(labels)
    return {name: class_trends(name, clusters, n_bootstrap, seed)
            for name, clusters in sorted(scored_clusters(folder).items())}
