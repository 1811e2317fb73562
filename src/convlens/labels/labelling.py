"""From players' descriptions to concept labels, per class (INV label analysis, Bianchi et al., IJCAI-24).

For one class, given the cleaned descriptions of correct guesses (see :mod:`convlens.labels.text`):

1. the distinct descriptions are embedded with Sentence-BERT (any :class:`~convlens.labels.embedders.Embedder`);
2. they are clustered agglomeratively with cosine distance and complete linkage; the number of text
   clusters k maximises the silhouette score (Euclidean, on the embeddings, as the authors'
   ``silhouette_score`` default) over k = 2 .. n-1, ties to the smallest k (:func:`choose_text_clusters`).
   With n < 3 distinct descriptions no k in that range exists: each description is its own cluster;
3. the representative word of a text cluster is the non-stop-word token w of its descriptions that
   maximises  sum_d f_d cos(e(w), e(d))  over the cluster's distinct descriptions d with frequency f_d
   (the authors repeat each description f_d times), ties to the word seen first (:func:`representative_word`);
4. representatives that share a lemma are replaced by their most frequent form (:func:`merge_by_lemma`).
   The authors POS-tag each representative *alone* with NLTK and lemmatise it with WordNet; a tagger
   sees no context in a one-word sentence, so this is in effect a dictionary lemmatisation, which
   simplemma (offline, no POS) does: "wings" -> "wing", "stripes" -> "stripe", "running" -> "run";
5. every description maps to the label of its text cluster (:meth:`ClassLabelling.label_of`).

The tree is built once (scipy ``linkage``) and cut at every k (``cut_tree``), the same partitions as
sklearn's ``AgglomerativeClustering(metric="cosine", linkage="complete")`` refitted per k (tested).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from convlens.labels.embedders import Embedder
from convlens.labels.text import words

__all__ = [
    "ClassLabelling",
    "TextCluster",
    "candidate_words",
    "choose_text_clusters",
    "label_class",
    "lemmatize_en",
    "merge_by_lemma",
    "representative_word",
    "unit_rows",
]

Lemmatizer = Callable[[str], str]
RULE_SILHOUETTE = "silhouette over k = 2..n-1"
RULE_SMALL = "one cluster per distinct description (n < 3: no k in 2..n-1)"


def lemmatize_en(word: str) -> str:
    """simplemma's English lemma of one word, lower-cased (offline dictionary lookup)."""
    import simplemma

    return str(simplemma.lemmatize(word, lang="en")).lower()


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity = dot product); zero rows are an error."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if vectors.size and not np.all(norms > 0):
        raise ValueError("the embedder returned a zero vector: cosine similarity is undefined")
    return vectors / norms


def _first_appearance_labels(raw: np.ndarray) -> np.ndarray:
    order = {label: index for index, label in enumerate(dict.fromkeys(raw.tolist()))}
    return np.array([order[label] for label in raw.tolist()], dtype=int)


def choose_text_clusters(embeddings: np.ndarray) -> tuple[np.ndarray, dict[int, float], str]:
    """Agglomerative clustering (cosine, complete linkage) with k chosen by silhouette.

    Returns ``(assignment, silhouettes, rule)``: one cluster index per row (clusters numbered by first
    appearance), the silhouette score of every k tried, and which rule chose the clusters.
    """
    n = len(embeddings)
    if n < 3:
        return np.arange(n, dtype=int), {}, RULE_SMALL
    from scipy.cluster.hierarchy import cut_tree, linkage
    from scipy.spatial.distance import pdist, squareform
    from sklearn.metrics import silhouette_score

    unit_rows(embeddings)  # reject zero vectors before scipy turns them into NaN distances
    tree = linkage(np.asarray(embeddings, dtype=np.float64), method="complete", metric="cosine")
    euclidean = squareform(pdist(np.asarray(embeddings, dtype=np.float64)))
    silhouettes: dict[int, float] = {}
    partitions: dict[int, np.ndarray] = {}
    for k in range(2, n):
        labels = cut_tree(tree, n_clusters=k).ravel()
        partitions[k] = labels
        silhouettes[k] = float(silhouette_score(euclidean, labels, metric="precomputed"))
    best = max(silhouettes, key=lambda k: (silhouettes[k], -k))
    return _first_appearance_labels(partitions[best]), silhouettes, RULE_SILHOUETTE


def candidate_words(texts: Sequence[str], stop_words: frozenset[str]) -> list[str]:
    """Distinct non-stop-word tokens of ``texts``, in order of first appearance."""
    return list(dict.fromkeys(w for text in texts for w in words(text) if w not in stop_words))


def representative_word(
    candidates: Sequence[str], candidate_vectors: np.ndarray, text_vectors: np.ndarray, counts: Sequence[int]
) -> tuple[str, float]:
    """The candidate maximising ``sum_d f_d cos(e(w), e(d))``; ``("", 0.0)`` without candidates."""
    if not candidates:
        return "", 0.0
    similarity = unit_rows(candidate_vectors) @ unit_rows(text_vectors).T  # (candidates, texts)
    scores = similarity @ np.asarray(counts, dtype=np.float64)
    best = int(np.argmax(scores))  # first maximum: the word seen first wins ties
    return candidates[best], float(scores[best])


def merge_by_lemma(
    representatives: Sequence[str], sizes: Sequence[int], lemmatize: Lemmatizer = lemmatize_en
) -> list[tuple[str, str]]:
    """``(lemma, label)`` per text cluster: representatives sharing a lemma take the form used by the
    most text clusters (ties: more descriptions, then alphabetical). Empty representatives stay empty."""
    lemmas = [lemmatize(r) if r else "" for r in representatives]
    clusters_per_form: Counter[str] = Counter(representatives)
    size_per_form: Counter[str] = Counter()
    for form, size in zip(representatives, sizes, strict=True):
        size_per_form[form] += size
    chosen: dict[str, str] = {}
    for lemma in dict.fromkeys(lemmas):
        forms = {r for r, m in zip(representatives, lemmas, strict=True) if m == lemma}
        chosen[lemma] = min(forms, key=lambda f: (-clusters_per_form[f], -size_per_form[f], f))
    return [(lemma, chosen[lemma] if lemma else "") for lemma in lemmas]


@dataclass
class TextCluster:
    """One cluster of distinct descriptions of a class and its label."""

    index: int
    texts: list[str]
    counts: list[int]
    candidates: list[str]
    representative: str
    representative_score: float
    lemma: str = ""
    label: str = ""

    @property
    def frequency(self) -> int:
        return int(sum(self.counts))


@dataclass
class ClassLabelling:
    """The label analysis of one class: distinct descriptions, their clusters and labels."""

    class_name: str
    texts: list[str]
    counts: list[int]
    embeddings: np.ndarray
    assignment: np.ndarray
    silhouettes: dict[int, float]
    rule: str
    clusters: list[TextCluster] = field(default_factory=list)

    @property
    def k(self) -> int:
        return len(self.clusters)

    def label_of(self, text: str) -> tuple[int, str]:
        """``(text cluster, label)`` of a distinct description of this class."""
        cluster = self.clusters[int(self.assignment[self.texts.index(text)])]
        return cluster.index, cluster.label

    def nearest(self, vector: np.ndarray) -> tuple[int, float]:
        """The text cluster with the largest frequency-weighted mean cosine similarity to ``vector``, and
        that similarity. It is an argmax, returned however small the similarity: the caller decides whether
        it is close enough (:class:`~convlens.labels.pipeline.LabelSettings` ``min_similarity``)."""
        if not self.clusters:
            raise ValueError(f"class {self.class_name!r} has no text clusters")
        similarity = unit_rows(self.embeddings) @ unit_rows(vector[None, :])[0]
        counts = np.asarray(self.counts, dtype=np.float64)
        means = [
            float(np.sum(similarity[self.assignment == c.index] * counts[self.assignment == c.index]) / c.frequency)
            for c in self.clusters
        ]
        best = int(np.argmax(means))
        return best, means[best]


def label_class(
    class_name: str,
    descriptions: Sequence[str],
    embedder: Embedder,
    stop_words: frozenset[str],
    lemmatize: Lemmatizer = lemmatize_en,
) -> ClassLabelling:
    """Spec steps 4-8 for one class; ``descriptions`` are cleaned texts, one per play (repeats count)."""
    frequency = Counter(descriptions)
    texts = list(frequency)  # first-appearance order
    counts = [frequency[t] for t in texts]
    embeddings = np.asarray(embedder.encode(texts), dtype=np.float64) if texts else np.zeros((0, 0))
    assignment, silhouettes, rule = choose_text_clusters(embeddings)
    labelling = ClassLabelling(class_name, texts, counts, embeddings, assignment, silhouettes, rule)
    members = [[i for i in range(len(texts)) if assignment[i] == c] for c in range(int(assignment.max(initial=-1)) + 1)]
    all_candidates = candidate_words(texts, stop_words)
    candidate_vectors = {}
    if all_candidates:
        candidate_vectors = dict(zip(all_candidates, embedder.encode(all_candidates), strict=True))
    for index, rows in enumerate(members):
        cluster_texts = [texts[i] for i in rows]
        cluster_counts = [counts[i] for i in rows]
        candidates = candidate_words(cluster_texts, stop_words)
        vectors = np.stack([candidate_vectors[w] for w in candidates]) if candidates else np.zeros((0, 0))
        word, score = representative_word(candidates, vectors, embeddings[rows], cluster_counts)
        labelling.clusters.append(TextCluster(index, cluster_texts, cluster_counts, candidates, word, score))
    merged = merge_by_lemma([c.representative for c in labelling.clusters], [c.frequency for c in labelling.clusters],
                            lemmatize)
    for cluster, (lemma, label) in zip(labelling.clusters, merged, strict=True):
        cluster.lemma, cluster.label = lemma, label
    return labelling
