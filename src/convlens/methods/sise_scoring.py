"""SISE phase 3, attribution-based input sampling (SISE Eqs. 9-12): the kept masks of one image scored.

Two code paths with one result, :class:`BlockScores` (each block's un-normalised visualisation map
``V_b = sum_m Psi(x ⊙ m) C_m``, ``C_m = m / (sum(m) + 1e-6)``, Eqs. 11-12, and what it cost):

* :func:`score_full` — the paper: every kept mask goes through the model. One engine run streams the
  masks of all blocks in chunks of ``batch_size`` (chunks cross block boundaries, so every forward but
  the last is full); the masks are generated chunk by chunk at input resolution and accumulated on the fly.
* :func:`score_fast` — an approximation (not in the paper): within each block the masks are grouped by
  average-linkage clustering on cosine distance (:func:`group_masks`) into ``ceil(K / fast_factor)``
  groups and only each group's medoid goes through the model. Every other mask gets an interpolated
  score — Gaussian-process regression from all the block's scored medoids on 7x7 down-sampled masks
  (:func:`interpolate_scores`, ``fast_scores="gp"``) or simply its medoid's score
  (``fast_scores="medoid"``) — and contributes with its own ``C_m``. Everything fast mode needs lives in
  the second half of this module, so it can be replaced as a whole. Spending the saved forwards otherwise
  (farthest-point or random subsets, other surrogates, one GP across blocks, more forwards for the last
  block) correlated worse or equal with full SISE on the real-photo set.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from convlens.core.engine import MaskedForwardEngine
from convlens.core.maps import minmax_normalize, upsample
from convlens.core.threads import limit_threads

__all__ = [
    "MASK_EPS",
    "BlockScores",
    "attribution_masks",
    "group_masks",
    "interpolate_scores",
    "mask_features",
    "score_fast",
    "score_full",
]

MASK_EPS = 1e-6  # Omega's min-max epsilon and C_m's denominator epsilon (authors' code: 10e-7)
FastScores = Literal["gp", "medoid"]


@dataclass
class BlockScores:
    """Phase 3 for one image and all its blocks.

    Attributes:
        vis_maps: (blocks, H, W) un-normalised visualisation maps ``V_b`` (Eq. 12; zeros for a block
            without masks).
        mask_scores: per block, the score ``Psi(x ⊙ m)`` of each mask in the order of its feature maps
            (fast mode: the scores it used, exact for the medoids).
        forwards: masked forwards spent.
        groups: fast mode only: the number of groups (= scored medoids) per block.
    """

    vis_maps: torch.Tensor
    mask_scores: list[torch.Tensor]
    forwards: int
    groups: list[int] | None = None

    @property
    def fast(self) -> dict[str, Any] | None:
        """Fast mode's report: groups per block and the forwards saved against full scoring."""
        if self.groups is None:
            return None
        kept = sum(int(scores.numel()) for scores in self.mask_scores)
        return {"groups": self.groups, "forwards_saved": kept - self.forwards}


def attribution_masks(feature_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Omega (SISE, after Eq. 8): bilinear up-sampling to ``size`` and per-mask min-max normalisation
    (eps 1e-6); (K, h, w) -> (K, H, W)."""
    return minmax_normalize(upsample(feature_maps, size), eps=MASK_EPS)


class _MaskStream:
    """The masks of several blocks as one stream of chunks of ``batch_size`` for the engine (``chunk(i)``),
    generated at input resolution chunk by chunk; remembers which rows of each chunk belong to which block."""

    def __init__(self, sources: Sequence[torch.Tensor], size: tuple[int, int], batch_size: int) -> None:
        self.sources = sources
        self.size = size
        self.batch_size = batch_size
        self.runs = [(block, source.shape[0]) for block, source in enumerate(sources) if source.shape[0]]
        self.run = 0
        self.position = 0
        self.layouts: deque[list[tuple[int, int, int]]] = deque()  # per chunk: (block, offset in chunk, count)

    def __call__(self, _index: int) -> torch.Tensor | None:
        parts: list[torch.Tensor] = []
        layout: list[tuple[int, int, int]] = []
        filled = 0
        while filled < self.batch_size and self.run < len(self.runs):
            block, end = self.runs[self.run]
            take = min(self.batch_size - filled, end - self.position)
            maps = self.sources[block][self.position : self.position + take]
            parts.append(attribution_masks(maps, self.size))
            layout.append((block, filled, take))
            filled += take
            self.position += take
            if self.position >= end:
                self.run += 1
                self.position = 0
        if not parts:
            return None
        self.layouts.append(layout)
        return torch.cat(parts)[:, None]


def _accumulator(vis: torch.Tensor, stream: _MaskStream) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The engine's ``on_chunk``: add each scored chunk's ``Psi(x ⊙ m) C_m`` to its blocks' rows of ``vis``."""

    def accumulate(chunk: torch.Tensor, scores: torch.Tensor) -> None:
        flat = chunk.reshape(chunk.shape[0], -1)
        weights = scores[:, 0] / (flat.sum(1) + MASK_EPS)  # Psi(x ⊙ m) · C_m, C_m = m / sum(m)
        for block, offset, count in stream.layouts.popleft():
            vis[block].addmv_(flat[offset : offset + count].T, weights[offset : offset + count])

    return accumulate


def score_full(
    engine: MaskedForwardEngine,
    image: torch.Tensor,
    class_id: torch.Tensor,
    activations: Sequence[torch.Tensor],
    size: tuple[int, int],
    baseline: torch.Tensor | float,
    batch_size: int,
) -> BlockScores:
    """Eqs. 9-12 with every mask scored: ``activations[b]`` (K_b, h, w) are block b's scored feature maps."""
    vis = torch.zeros(len(activations), size[0] * size[1], device=image.device)
    stream = _MaskStream(activations, size, batch_size)
    scores = engine.run(image, stream, class_id, baseline=baseline, on_chunk=_accumulator(vis, stream))[:, 0]
    per_block = list(scores.detach().cpu().split([source.shape[0] for source in activations]))
    total = sum(source.shape[0] for source in activations)
    return BlockScores(vis_maps=vis.view(len(activations), *size), mask_scores=per_block, forwards=total)


# ---------------------------------------------------------------------------------------------- fast mode
@dataclass
class _FastBlock:
    """Fast mode's plan for one block: which masks are scored (one medoid per group) and their features."""

    maps: torch.Tensor  # (K, h, w) the block's scored feature maps
    labels: torch.Tensor  # (K,) group of each map
    medoids: torch.Tensor  # (G,) index of each group's medoid
    features: torch.Tensor  # (K, <= 49) mask_features of every map

    @classmethod
    @limit_threads()
    def of(cls, maps: torch.Tensor, fast_factor: float) -> _FastBlock:
        empty = torch.empty(0, dtype=torch.long)
        if not maps.shape[0]:
            return cls(maps, empty, empty, torch.empty(0, 0, dtype=torch.float64))
        normalised = minmax_normalize(maps.detach().double().cpu(), eps=MASK_EPS)  # once for both uses
        labels, medoids = _group(normalised, math.ceil(maps.shape[0] / fast_factor))
        return cls(maps, labels, medoids, _pooled(normalised))

    @limit_threads()
    def member_scores(self, medoid_scores: torch.Tensor, fast_scores: FastScores) -> torch.Tensor:
        """Every mask's score: exact for the medoids; the GP interpolation or its medoid's for the others."""
        if fast_scores == "medoid":
            return medoid_scores[self.labels.to(medoid_scores.device)]
        return interpolate_scores(self.features, self.medoids, medoid_scores).to(medoid_scores.device)


def score_fast(
    engine: MaskedForwardEngine,
    image: torch.Tensor,
    class_id: torch.Tensor,
    activations: Sequence[torch.Tensor],
    size: tuple[int, int],
    baseline: torch.Tensor | float,
    batch_size: int,
    fast_factor: float,
    fast_scores: FastScores,
) -> BlockScores:
    """Eqs. 9-12 with one scored medoid per group of similar masks and interpolated scores for the rest.

    Nothing is computed twice: the maps are normalised once for grouping and features; a medoid's mask is
    generated once, scored and accumulated as it streams (as in :func:`score_full`); every other mask is
    generated once, with its interpolated score.
    """
    blocks = [_FastBlock.of(maps, fast_factor) for maps in activations]
    medoid_maps = [block.maps[block.medoids.to(block.maps.device)] for block in blocks]
    vis = torch.zeros(len(blocks), size[0] * size[1], device=image.device)
    stream = _MaskStream(medoid_maps, size, batch_size)
    scores = engine.run(image, stream, class_id, baseline=baseline, on_chunk=_accumulator(vis, stream))[:, 0]
    mask_scores = [torch.empty(0) for _ in blocks]
    per_block = scores.split([int(block.medoids.numel()) for block in blocks])
    for index, (block, medoid_scores) in enumerate(zip(blocks, per_block, strict=True)):
        if not block.maps.shape[0]:
            continue
        member_scores = block.member_scores(medoid_scores, fast_scores)
        mask_scores[index] = member_scores.detach().cpu()
        others = torch.ones(block.maps.shape[0], dtype=torch.bool)
        others[block.medoids] = False
        rest = torch.nonzero(others).flatten()
        for start in range(0, rest.numel(), batch_size):
            chunk = rest[start : start + batch_size].to(block.maps.device)
            masks = attribution_masks(block.maps[chunk], size).flatten(1)
            weights = member_scores[chunk.to(member_scores.device)] / (masks.sum(1) + MASK_EPS)
            vis[index].addmv_(masks.T, weights)
    return BlockScores(vis_maps=vis.view(len(blocks), *size), mask_scores=mask_scores,
                       forwards=sum(int(m.shape[0]) for m in medoid_maps),
                       groups=[int(block.medoids.numel()) for block in blocks])


_MEDOID_TIE = 1e-5  # relative: summed similarities this close are a tie


def group_masks(maps: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group near-duplicate masks: average-linkage clustering on cosine distance (scipy).

    Args:
        maps: (K, h, w) kept feature maps of one block (at the layer's resolution).
        n_groups: number of groups (clamped to [1, K]).

    Returns:
        ``labels`` (K,) group of each map (0 .. G-1) and ``medoids`` (G,) the index of each group's
        representative: the member with the highest summed cosine similarity to its group (near-ties within
        1e-5 relative, float noise, go to the first member).
    """
    return _group(minmax_normalize(maps.detach().double().cpu(), eps=MASK_EPS), n_groups)


def _group(normalised: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`group_masks` of maps already min-max normalised (float64, CPU)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n_maps = normalised.shape[0]
    n_groups = max(1, min(int(n_groups), n_maps))
    if n_groups == n_maps:
        index = torch.arange(n_maps)
        return index, index
    vectors = normalised.flatten(1)
    vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)  # a constant map -> 0 vector
    similarity = vectors @ vectors.T
    if n_groups == 1:
        labels = torch.zeros(n_maps, dtype=torch.long)
    else:
        distance = (1 - similarity).clamp_min(0).fill_diagonal_(0)
        tree = linkage(squareform(distance.numpy(), checks=False), method="average")
        labels = torch.as_tensor(fcluster(tree, t=n_groups, criterion="maxclust"), dtype=torch.long) - 1
        _, labels = torch.unique(labels, return_inverse=True)
    medoids = []
    for group in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == group)[:, 0]
        summed = similarity[members][:, members].sum(1)
        # near-ties (within float noise: a batch's activations differ from a single image's by ~1e-7) go to the
        # first member, so that an image gets the same medoids alone or in a batch
        medoids.append(int(members[torch.nonzero(summed >= summed.max() - _MEDOID_TIE * summed.max().abs())[0, 0]]))
    return labels, torch.as_tensor(medoids, dtype=torch.long)


def mask_features(maps: torch.Tensor, resolution: int = 7) -> torch.Tensor:
    """(K, h, w) feature maps -> (K, r*r) min-max normalised maps average-pooled to at most r x r: where
    fast mode compares masks (a mask's score depends on its coarse layout, not on pixel detail)."""
    return _pooled(minmax_normalize(maps.detach().double().cpu(), eps=MASK_EPS), resolution)


def _pooled(normalised: torch.Tensor, resolution: int = 7) -> torch.Tensor:
    """:func:`mask_features` of maps already min-max normalised."""
    out = (min(resolution, normalised.shape[-2]), min(resolution, normalised.shape[-1]))
    return F.adaptive_avg_pool2d(normalised[:, None], out).flatten(1)


def interpolate_scores(
    features: torch.Tensor, scored: torch.Tensor, scores: torch.Tensor, noise: float = 1e-3
) -> torch.Tensor:
    """Scores of all K masks from the scores of a subset: Gaussian-process regression (posterior mean).

    Squared-exponential kernel ``k(a, b) = exp(-|a - b|^2 / (2 l^2))`` on :func:`mask_features`,
    length-scale ``l`` = median distance between the scored masks, constant prior mean = their mean
    score, ``noise`` added to the kernel diagonal; the scored masks keep their exact scores.

    Args:
        features: (K, D) mask features.
        scored: (G,) indices of the scored masks.
        scores: (G,) their scores.
    """
    x_all = features.double()
    x_scored = x_all[scored]
    y = scores.detach().double().cpu()
    prediction = torch.full((x_all.shape[0],), float(y.mean()), dtype=torch.float64)
    distances = torch.cdist(x_scored, x_scored)
    positive = distances[distances > 0]
    if positive.numel():
        length = torch.quantile(positive, 0.5)  # the median (mean of the two middle values, as numpy's)
        gram = torch.exp(-(distances**2) / (2 * length**2)) + noise * torch.eye(len(y), dtype=torch.float64)
        weights = torch.linalg.solve(gram, y - y.mean())
        cross = torch.exp(-(torch.cdist(x_all, x_scored) ** 2) / (2 * length**2))
        prediction = prediction + cross @ weights
    prediction[scored] = y
    return prediction.to(scores.dtype)
