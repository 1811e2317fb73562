"""From players' descriptions to concept labels, per class (INV label analysis, Bianchi et al., IJCAI-24).

For one class, given the content texts of correct guesses (the words of each description that may name
something visible, spelling fixed: :mod:`convlens.labels.text`, :mod:`convlens.labels.spelling`):

1. the distinct texts are embedded with Sentence-BERT (any :class:`~convlens.labels.embedders.Embedder`),
   in one batch;
2. they are clustered agglomeratively with cosine distance and complete linkage; the number of text
   clusters k maximises the silhouette score (Euclidean, on the embeddings, as the authors'
   ``silhouette_score`` default) over k = 2 .. min(n - 1, ``max_k``), ties to the smallest k
   (:func:`choose_text_clusters`). The bound keeps the search at ``max_k`` silhouettes of O(n^2) each
   (the authors scored every k: O(n^3)). With n < 3 distinct texts each is its own cluster;
3. the representative of a text cluster is its **concept word** (:func:`concept_word`): the lemma that
   most of its plays have as the head of their phrase (a content text ends on its head: English noun
   phrases end on their head noun, "green *eye*", "wheel *rim*", and
   :func:`~convlens.labels.text.content_words` moves the head of "the *handle* of the cup" last); ties go
   to the lemma more of its plays use, then more plays of the whole class, then to the authors' rule (the
   word w maximising sum_d f_d cos(e(w), e(d)), :func:`representative_word`), then to the word seen
   first. It is written in its most frequent form. The authors' rule alone picks the word closest to
   the texts in embedding space, which is often the modifier or a generic word ("a green eye" -> green,
   "eye shape" -> shape); counting uses first instead picks a modifier shared by synonyms ("rising steam",
   "rising mist" -> rising);
4. representatives that share a lemma are replaced by their most frequent form (:func:`merge_by_lemma`;
   simplemma, offline: "wings" -> "wing", "stripes" -> "stripe");
5. every description maps to the label of its text cluster (:meth:`ClassLabelling.label_of`).

A wrong guess is labelled with a word of its own description (:func:`own_word`), never with a word it
does not contain.

The tree is built once (scipy ``linkage``) and cut at every k (``cut_tree``), the same partitions as
sklearn's ``AgglomerativeClustering(metric="cosine", linkage="complete")`` refitted per k (tested).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from convlens.labels.embedders import Embedder
from convlens.labels.text import words

__all__ = [
    "DEFAULT_MAX_K",
    "ClassLabelling",
    "TextCluster",
    "candidate_words",
    "choose_text_clusters",
    "concept_word",
    "label_class",
    "lemmatize_en",
    "merge_by_lemma",
    "own_word",
    "representative_word",
    "unit_rows",
]

Lemmatizer = Callable[[str], str]
DEFAULT_MAX_K = 40
RULE_SILHOUETTE = "silhouette over k = 2..n-1"
RULE_SMALL = "one cluster per distinct description (n < 3: no k in 2..n-1)"


def lemmatize_en(word: str) -> str:
    """simplemma's English lemma of one word, lower-cased (offline dictionary lookup)."""
    return _lemma(word)


_LEMMAS: dict[str, str] = {}


def _lemma(word: str) -> str:
    found = _LEMMAS.get(word)
    if found is None:
        import simplemma

        found = _LEMMAS[word] = str(simplemma.lemmatize(word, lang="en")).lower()
    return found


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


def silhouette_rule(n: int, max_k: int) -> str:
    """The rule text recorded for a class with ``n`` distinct texts."""
    if n < 3:
        return RULE_SMALL
    return RULE_SILHOUETTE if n - 1 <= max_k else f"silhouette over k = 2..{max_k} (bounded; n - 1 = {n - 1})"


def choose_text_clusters(
    embeddings: np.ndarray, max_k: int = DEFAULT_MAX_K
) -> tuple[np.ndarray, dict[int, float], str]:
    """Agglomerative clustering (cosine, complete linkage) with k chosen by silhouette over 2..min(n-1, max_k).

    Returns ``(assignment, silhouettes, rule)``: one cluster index per row (clusters numbered by first
    appearance), the silhouette score of every k tried, and which rule chose the clusters.
    """
    n = len(embeddings)
    if n < 3:
        return np.arange(n, dtype=int), {}, RULE_SMALL
    if max_k < 2:
        raise ValueError(f"max_k must be >= 2, got {max_k}")
    from scipy.cluster.hierarchy import cut_tree, linkage
    from scipy.spatial.distance import pdist, squareform
    from sklearn.metrics import silhouette_score

    unit_rows(embeddings)  # reject zero vectors before scipy turns them into NaN distances
    points = np.asarray(embeddings, dtype=np.float64)
    tree = linkage(points, method="complete", metric="cosine")
    euclidean = squareform(pdist(points))
    ks = list(range(2, min(n - 1, max_k) + 1))
    cuts = cut_tree(tree, n_clusters=ks)  # one column per k, from one pass over the tree
    silhouettes = {k: float(silhouette_score(euclidean, cuts[:, i], metric="precomputed")) for i, k in enumerate(ks)}
    best = max(silhouettes, key=lambda k: (silhouettes[k], -k))
    return _first_appearance_labels(cuts[:, ks.index(best)]), silhouettes, silhouette_rule(n, max_k)


def candidate_words(texts: Sequence[str], stop_words: frozenset[str]) -> list[str]:
    """Distinct non-stop-word tokens of ``texts``, in order of first appearance."""
    return list(dict.fromkeys(w for text in texts for w in words(text) if w not in stop_words))


def representative_word(
    candidates: Sequence[str], candidate_vectors: np.ndarray, text_vectors: np.ndarray, counts: Sequence[int]
) -> tuple[str, float]:
    """The authors' rule: the candidate maximising ``sum_d f_d cos(e(w), e(d))``; ``("", 0.0)`` without
    candidates (ties: first seen)."""
    if not candidates:
        return "", 0.0
    similarity = unit_rows(candidate_vectors) @ unit_rows(text_vectors).T  # (candidates, texts)
    scores = similarity @ np.asarray(counts, dtype=np.float64)
    best = int(np.argmax(scores))  # first maximum: the word seen first wins ties
    return candidates[best], float(scores[best])


EmbeddingTieBreak = Callable[[Sequence[str]], Sequence[float]]


def concept_word(
    texts: Sequence[str], counts: Sequence[int], stop_words: frozenset[str],
    class_plays: Mapping[str, int] | None = None, tie_break: EmbeddingTieBreak | None = None,
    lemmatize: Lemmatizer = lemmatize_en,
) -> tuple[str, float]:
    """The concept word of a text cluster and the share of its plays that use it (see the module docstring).

    ``class_plays``: lemma -> plays of the whole class using it; ``tie_break(candidates)``: the authors'
    embedding score of each tied candidate (the largest wins). ``("", 0.0)`` without candidates.
    """
    uses: Counter[str] = Counter()
    heads: Counter[str] = Counter()
    forms: dict[str, Counter[str]] = {}
    for text, count in zip(texts, counts, strict=True):
        content = [w for w in words(text) if w not in stop_words]
        for word in content:
            forms.setdefault(lemmatize(word), Counter())[word] += count
        for lemma in dict.fromkeys(lemmatize(w) for w in content):
            uses[lemma] += count
        if content:
            heads[lemmatize(content[-1])] += count
    if not uses:
        return "", 0.0
    class_plays = class_plays or {}
    order = list(forms)  # first seen
    key = {m: (heads[m], uses[m], class_plays.get(m, 0)) for m in order}
    top = max(key.values())
    tied = [m for m in order if key[m] == top]
    if len(tied) > 1 and tie_break is not None:
        written = [forms[m].most_common(1)[0][0] for m in tied]
        scores = list(tie_break(written))
        tied = [tied[int(np.argmax(scores))]]
    lemma = tied[0]
    return forms[lemma].most_common(1)[0][0], uses[lemma] / sum(counts)


def own_word(
    content: Sequence[str], labels: Mapping[str, str], class_plays: Mapping[str, int],
    study_plays: Mapping[str, int], study_forms: Mapping[str, str], lemmatize: Lemmatizer = lemmatize_en,
) -> tuple[str, str]:
    """The label of a wrong guess: a word of its own description (``content``, its content words in order).

    Its lemmas are ranked by: a label of the guessed class (``labels``: lemma -> label), plays of the guessed
    class using it (``class_plays``), plays of the whole study (``study_plays``), being the last word (the
    head of the phrase), first seen. Returns ``(label, why)``; the label is written as the guessed class's
    label, else in the study's most frequent form (``study_forms``: lemma -> form). ``("", "")`` without words.
    """
    lemmas = list(dict.fromkeys(lemmatize(w) for w in content))
    if not lemmas:
        return "", ""
    last = lemmatize(content[-1])
    best = max(lemmas, key=lambda m: (m in labels, class_plays.get(m, 0), study_plays.get(m, 0), m == last,
                                      -lemmas.index(m)))
    if best in labels:
        return labels[best], "a label of the guessed class"
    return study_forms.get(best, next(w for w in content if lemmatize(w) == best)), "not a label of the guessed class"


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
    """One cluster of distinct descriptions of a class and its label (``representative_score``: the share
    of the cluster's plays whose description uses the representative)."""

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
    lemma_plays: dict[str, int] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.clusters)

    @property
    def labels_by_lemma(self) -> dict[str, str]:
        """lemma -> label of this class's text clusters."""
        return {c.lemma: c.label for c in self.clusters if c.label}

    def label_of(self, text: str) -> tuple[int, str]:
        """``(text cluster, label)`` of a distinct description of this class."""
        cluster = self.clusters[int(self.assignment[self.texts.index(text)])]
        return cluster.index, cluster.label


def lemma_plays(texts: Sequence[str], counts: Sequence[int], stop_words: frozenset[str],
                lemmatize: Lemmatizer = lemmatize_en) -> dict[str, int]:
    """lemma -> number of plays whose text uses it (each text counted once per lemma)."""
    found: Counter[str] = Counter()
    for text, count in zip(texts, counts, strict=True):
        for lemma in {lemmatize(w) for w in words(text) if w not in stop_words}:
            found[lemma] += count
    return dict(found)


def label_class(
    class_name: str,
    descriptions: Sequence[str],
    embedder: Embedder,
    stop_words: frozenset[str],
    lemmatize: Lemmatizer = lemmatize_en,
    max_k: int = DEFAULT_MAX_K,
) -> ClassLabelling:
    """Steps 1-5 for one class; ``descriptions`` are cleaned texts, one per play (repeats count)."""
    frequency = Counter(descriptions)
    texts = list(frequency)  # first-appearance order
    counts = [frequency[t] for t in texts]
    embeddings = np.asarray(embedder.encode(texts), dtype=np.float64) if texts else np.zeros((0, 0))
    assignment, silhouettes, rule = choose_text_clusters(embeddings, max_k)
    labelling = ClassLabelling(class_name, texts, counts, embeddings, assignment, silhouettes, rule,
                               lemma_plays=lemma_plays(texts, counts, stop_words, lemmatize))
    members: list[list[int]] = [[] for _ in range(int(assignment.max(initial=-1)) + 1)]
    for row, cluster in enumerate(assignment.tolist()):
        members[cluster].append(row)
    for index, rows in enumerate(members):
        cluster_texts, cluster_counts = [texts[i] for i in rows], [counts[i] for i in rows]

        def tie_break(candidates: Sequence[str], rows: list[int] = rows,
                      weights: list[int] = cluster_counts) -> list[float]:
            vectors = np.asarray(embedder.encode(list(candidates)), dtype=np.float64)
            similarity = unit_rows(vectors) @ unit_rows(embeddings[rows]).T
            return (similarity @ np.asarray(weights, dtype=np.float64)).tolist()

        word, share = concept_word(cluster_texts, cluster_counts, stop_words, labelling.lemma_plays, tie_break,
                                   lemmatize)
        labelling.clusters.append(TextCluster(index, cluster_texts, cluster_counts,
                                              candidate_words(cluster_texts, stop_words), word, share))
    merged = merge_by_lemma([c.representative for c in labelling.clusters], [c.frequency for c in labelling.clusters],
                            lemmatize)
    for cluster, (lemma, label) in zip(labelling.clusters, merged, strict=True):
        cluster.lemma, cluster.label = lemma, label
    return labelling
