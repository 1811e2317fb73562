"""INV's clustering of one layer's kept feature maps: PCA, a 2-D embedding, Ward clusters.

Bianchi et al. (IJCAI-24) min-max normalise each kept map, reduce the maps with PCA (at most 50
components, seed 432), embed them in 2-D with t-SNE (seed 432, perplexity 30) and cluster the 2-D
points with Ward agglomerative clustering, choosing k in 3..8 by the silhouette on the same points.

Guards for small layers (documented choices; the paper's code would crash):

* no kept map: no cluster; 1..k_min kept maps: each map is its own cluster, no embedding (a silhouette
  needs at least k_min + 1 points);
* n kept maps with n <= perplexity (sklearn refuses perplexity >= n): perplexity lowered to
  ``(n - 1) / 3``, openTSNE's own rule (with ``embedding="opentsne"`` whenever ``3 perplexity > n - 1``,
  as openTSNE would do itself); larger layers keep the paper's perplexity exactly;
* k is limited to ``k_min..min(k_max, n - 1)``.

Threads. PCA (BLAS) and t-SNE (OpenMP, a Barnes-Hut reduction whose rounding depends on the thread
count) run on one thread: one thread removes the thread count as a source of differences and avoids
oversubscription. The two limits have different scopes: BLAS's thread count is one process-wide setting,
OpenMP's is per calling thread. :func:`cluster_feature_maps` and :func:`embed_2d` set both around
their own work. A caller that clusters several layers in worker threads (INV's ``n_jobs``) instead
limits BLAS once in the coordinating thread, before the workers start and until they have all ended,
and each worker limits only its own OpenMP thread count (:func:`openmp_limiter`), so no thread ever
changes a setting another thread relies on.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = [
    "EMBEDDINGS",
    "INV_SEED",
    "ClusteringResult",
    "Embedding",
    "blas_single_thread",
    "cluster_feature_maps",
    "cluster_maps_unlimited",
    "embed_2d",
    "minmax_rows",
    "openmp_limiter",
]

INV_SEED = 432  # the INV code's dataLoader.py / main.ipynb
Embedding = Literal["tsne", "opentsne", "pca"]
EMBEDDINGS: tuple[str, ...] = ("tsne", "opentsne", "pca")


@dataclass
class ClusteringResult:
    """Outcome of :func:`cluster_feature_maps` for one layer's kept maps.

    ``labels`` (n,) hold cluster ids 0..k-1 as returned by the Ward fit with the chosen k;
    ``silhouettes`` maps each tried k to its silhouette on ``embedding``.
    """

    labels: np.ndarray
    embedding: np.ndarray | None
    n_clusters: int
    silhouettes: dict[int, float]
    pca_components: int
    perplexity: float | None
    fallback: str | None
    timings: dict[str, float] = field(default_factory=dict)


def minmax_rows(rows: np.ndarray) -> np.ndarray:
    """Min-max normalise each row to [0, 1]; constant rows are left unchanged."""
    rows = np.asarray(rows, dtype=np.float64)
    lo = rows.min(axis=1, keepdims=True)
    span = rows.max(axis=1, keepdims=True) - lo
    constant = span <= 0
    return np.where(constant, rows, (rows - lo) / np.where(constant, 1.0, span))


@contextlib.contextmanager
def blas_single_thread() -> Iterator[None]:
    """One BLAS thread for the body — a process-wide setting: enter it from one coordinating thread."""
    _import_sklearn()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def openmp_limiter() -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A factory of contexts that limit the *calling* thread's OpenMP thread count to one.

    Build it in the coordinating thread (it scans the loaded libraries once); each worker enters its
    own context. OpenMP keeps the thread count per thread, so workers do not affect each other.
    """
    _import_sklearn()
    from threadpoolctl import ThreadpoolController

    openmp = ThreadpoolController().select(user_api="openmp")
    return lambda: openmp.limit(limits=1)


def _import_sklearn() -> None:
    """Load sklearn's compiled modules first, so that their BLAS/OpenMP libraries are found and limited."""
    import sklearn.cluster
    import sklearn.decomposition
    import sklearn.manifold

    del sklearn  # imported for their side effect only


def embed_2d(
    features: np.ndarray, method: Embedding = "tsne", seed: int = INV_SEED, perplexity: float = 30.0
) -> np.ndarray:
    """2-D embedding of (n, d) features: sklearn t-SNE (the paper's), openTSNE, or the first two
    principal components (``features`` are PCA scores already, so their first two columns).

    Runs on one BLAS and one OpenMP thread with ``random_state=seed``; sklearn's defaults otherwise
    (``init="pca"``, ``learning_rate="auto"``, 1000 iterations), ``init="random"`` when the features have
    a single dimension. With the PCA initialisation, sklearn's Barnes-Hut t-SNE is deterministic given
    the data, so the seed hardly changes the result (observed: identical embeddings for seeds 432 and 7);
    it is still passed, as the paper's code does.
    """
    with blas_single_thread(), openmp_limiter()():
        return _embed(features, method, seed, perplexity)


def _embed(features: np.ndarray, method: Embedding, seed: int, perplexity: float) -> np.ndarray:
    features = np.ascontiguousarray(features, dtype=np.float32)
    n, dims = features.shape
    if method == "pca":
        points = np.zeros((n, 2), dtype=np.float64)
        points[:, : min(2, dims)] = features[:, :2]
        return points
    if method == "tsne":
        from sklearn.manifold import TSNE

        init = "pca" if dims >= 2 else "random"
        tsne = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init=init)
        return tsne.fit_transform(features).astype(np.float64)
    if method == "opentsne":
        try:
            import openTSNE
        except ImportError as exc:
            raise ValueError("embedding='opentsne' needs the openTSNE package: pip install openTSNE") from exc
        tsne = openTSNE.TSNE(
            n_components=2, perplexity=perplexity, random_state=seed, n_jobs=1,
            negative_gradient_method="bh", initialization="pca" if dims >= 2 else "random", verbose=False,
        )
        return np.asarray(tsne.fit(features), dtype=np.float64)
    raise ValueError(f"unknown embedding {method!r}; choose one of {EMBEDDINGS}")


def cluster_feature_maps(
    maps: np.ndarray,
    seed: int = INV_SEED,
    max_pca_components: int = 50,
    perplexity: float = 30.0,
    embedding: Embedding = "tsne",
    cluster_range: tuple[int, int] = (3, 8),
) -> ClusteringResult:
    """Cluster feature maps as INV does (see the module docstring), on one BLAS and one OpenMP thread.

    Args:
        maps: (n, h, w) or (n, h*w) raw kept feature maps.
        seed: random state of PCA and t-SNE (INV: 432).
        max_pca_components: PCA keeps ``min(max_pca_components, n, h*w)`` components.
        perplexity: t-SNE perplexity (lowered to ``(n-1)/3`` for small n).
        embedding: ``"tsne"`` (sklearn, the paper's), ``"opentsne"`` or ``"pca"``.
        cluster_range: smallest and largest k tried (inclusive); the silhouette on the 2-D points picks
            k, ties going to the smallest k.
    """
    with blas_single_thread(), openmp_limiter()():
        return cluster_maps_unlimited(maps, seed, max_pca_components, perplexity, embedding, cluster_range)


def cluster_maps_unlimited(
    maps: np.ndarray, seed: int, max_pca_components: int, perplexity: float, embedding: Embedding,
    cluster_range: tuple[int, int],
) -> ClusteringResult:
    """:func:`cluster_feature_maps` without touching thread limits (the caller has set them)."""
    k_min, k_max = cluster_range
    if not 2 <= k_min <= k_max:
        raise ValueError(f"cluster_range must be (k_min, k_max) with 2 <= k_min <= k_max, got {cluster_range}")
    if embedding not in EMBEDDINGS:
        raise ValueError(f"unknown embedding {embedding!r}; choose one of {EMBEDDINGS}")
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim < 2:
        raise ValueError(f"expected (n, h, w) or (n, h*w) feature maps, got shape {maps.shape}")
    vectors = maps.reshape(maps.shape[0], int(np.prod(maps.shape[1:])))
    n = vectors.shape[0]
    timings: dict[str, float] = {"pca": 0.0, "embedding": 0.0, "clustering": 0.0}
    if n == 0:
        return ClusteringResult(np.zeros(0, dtype=np.int64), None, 0, {}, 0, None, "no kept map", timings)
    if n <= k_min:
        return ClusteringResult(
            np.arange(n, dtype=np.int64), None, n, {}, 0, None,
            f"{n} kept map(s) < {k_min + 1}: one cluster per map, no embedding", timings,
        )
    from sklearn.decomposition import PCA

    t0 = time.perf_counter()
    normalized = minmax_rows(vectors)
    n_components = min(max_pca_components, n, normalized.shape[1])
    reduced = PCA(n_components=n_components, random_state=seed).fit_transform(normalized)
    t1 = time.perf_counter()
    used_perplexity, fallback = _perplexity_for(n, perplexity, embedding)
    points = _embed(reduced, embedding, seed, used_perplexity or perplexity)
    t2 = time.perf_counter()
    upper = min(k_max, n - 1)
    if upper < k_max:
        note = f"k limited to {k_min}..{upper} for {n} kept maps"
        fallback = note if fallback is None else f"{fallback}; {note}"
    best_k, labels, silhouettes = _ward_by_silhouette(points, k_min, upper)
    timings.update(pca=t1 - t0, embedding=t2 - t1, clustering=time.perf_counter() - t2)
    return ClusteringResult(labels, points, best_k, silhouettes, n_components, used_perplexity, fallback, timings)


def _perplexity_for(n: int, perplexity: float, embedding: Embedding) -> tuple[float | None, str | None]:
    """The t-SNE perplexity used for ``n`` points (None for the PCA embedding) and a note if lowered."""
    if embedding not in ("tsne", "opentsne"):
        return None, None
    # sklearn refuses perplexity >= n; openTSNE itself lowers any perplexity > (n - 1) / 3
    too_large = perplexity >= n if embedding == "tsne" else 3 * perplexity > n - 1
    if not too_large:
        return float(perplexity), None
    lowered = (n - 1) / 3
    return lowered, f"perplexity lowered from {perplexity:g} to {lowered:.3g} for {n} kept maps"


def _ward_by_silhouette(points: np.ndarray, k_min: int, k_max: int) -> tuple[int, np.ndarray, dict[int, float]]:
    """Ward clusters of ``points`` for every k in ``k_min..k_max``; the best silhouette wins (ties: smallest k)."""
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import silhouette_score

    silhouettes: dict[int, float] = {}
    best_k, best_score, best_labels = k_min, -math.inf, None
    for k in range(k_min, k_max + 1):
        labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(points)
        # all points identical -> a single label: silhouette undefined, rank it last
        score = float(silhouette_score(points, labels)) if len(np.unique(labels)) > 1 else -1.0
        silhouettes[k] = score
        if score > best_score:
            best_k, best_score, best_labels = k, score, labels
    assert best_labels is not None
    return best_k, best_labels.astype(np.int64), silhouettes
