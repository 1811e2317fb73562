"""SISE re-computed literally for the tests (loaded through conftest's ``sise_reference``): one mask at a
time, plain loops, the TinyCNN forward written out, scikit-image's Otsu, scipy's blur, clustering and GP.

Nothing here calls convlens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist, pdist
from skimage.filters import threshold_otsu

BLOCKS = ("block1", "block2", "block3")

# rescore(layer, maps (K, h, w), exact scores (K,)) -> the scores SISE combines (fast mode's approximation)
Rescore = Callable[[str, torch.Tensor, list[float]], list[float]]


def activations_and_gradients(
    model: torch.nn.Module, image: torch.Tensor, class_id: int, score: str = "softmax"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """TinyCNN's forward written out by hand; gradients of the class score w.r.t. each block output."""
    x = image[None].clone().requires_grad_(True)
    a1 = model.block1(x)
    a2 = model.block2(model.pool1(a1))
    a3 = model.block3(model.pool2(a2))
    logits = model.fc(torch.flatten(model.gap(a3), 1))
    value = torch.softmax(logits, 1)[0, class_id] if score == "softmax" else logits[0, class_id]
    g1, g2, g3 = torch.autograd.grad(value, [a1, a2, a3])
    acts = {"block1": a1[0].detach(), "block2": a2[0].detach(), "block3": a3[0].detach()}
    grads = {"block1": g1[0], "block2": g2[0], "block3": g3[0]}
    return acts, grads


def code_otsu(vis_map: np.ndarray, nbins: int = 256, tau: float = 1.5) -> float:
    """The SISE authors' modified Otsu, spelled out (plain loop over split points, bottleneck rule)."""
    q = np.round(vis_map * nbins)
    hist, _ = np.histogram(q.ravel(), nbins, (0, nbins))
    levels = np.arange(nbins)
    between = np.zeros(nbins)
    with np.errstate(invalid="ignore", divide="ignore"):
        for j in range(1, nbins):
            w0 = hist[:j].sum()
            w1 = hist[j:].sum()
            u0 = (hist[:j] * levels[:j]).sum() / w0
            u1 = (hist[j:] * levels[j:]).sum() / w1
            between[j] = w0 * w1 * (u0 - u1) ** 2
    t = int(np.argmax(between))
    if hist[round(t * tau) :].sum() < 0.1 * hist.sum():
        return t * tau / nbins
    return t / nbins


def blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with scipy (mirror padding, radius ceil(3 sigma)) — independent of torchvision."""
    radius = math.ceil(3 * sigma)
    blurred = [
        gaussian_filter(c.numpy().astype(np.float64), sigma, mode="mirror", truncate=radius / sigma) for c in image
    ]
    return torch.as_tensor(np.stack(blurred), dtype=torch.float32)


def _baseline(image: torch.Tensor, baseline: str) -> torch.Tensor:
    if baseline == "zero":
        return torch.zeros_like(image)
    if baseline == "mean":
        return image.mean(dim=(1, 2), keepdim=True).expand_as(image)
    return blur(image, 5.0)


def _fuse(maps: Sequence[torch.Tensor], fusion: str) -> torch.Tensor:
    """The cascade E_1 = V_1, E_b = (E_{b-1} + V_b) * G(V_b)."""
    fused = maps[0].clone()
    for v in maps[1:]:
        if fusion == "paper":
            gate = (v >= threshold_otsu(v.numpy(), nbins=256)).float()
        elif fusion == "code":
            gate = 1 / (1 + torch.exp(-(v - code_otsu(v.numpy())) * 100.0))
        else:
            gate = v
        fused = (fused + v) * gate
    return fused


def sise(
    model: torch.nn.Module,
    image: torch.Tensor,
    mu: float = 0.0,
    fusion: str = "paper",
    baseline: str = "zero",
    layers: tuple[str, ...] = BLOCKS,
    keep_rule: Callable[[torch.Tensor], list[int]] | None = None,
    rescore: Rescore | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, dict]]:
    """SISE of one image, one mask at a time (Eqs. 6-12 and the cascade).

    ``keep_rule(alpha) -> kept indices`` replaces Eq. 7 (for Ada-SISE); ``rescore(layer, maps, scores)``
    replaces the exact scores of the non-constant kept masks (fast mode's approximation). Returns the final
    map, the normalised ``V_b`` per layer and per layer the counts ``kept``, ``scored`` and the exact
    ``scores`` of the scored masks."""
    model.eval()
    with torch.no_grad():
        class_id = int(model(image[None]).argmax())
    acts, grads = activations_and_gradients(model, image, class_id)
    size = tuple(image.shape[-2:])
    base = _baseline(image, baseline)
    vis_maps, kept_counts = {}, {}
    for layer in layers:
        a, g = acts[layer], grads[layer]
        alphas = [float(g[k].mean()) for k in range(a.shape[0])]
        if keep_rule is None:
            beta = max(alphas)
            kept = [k for k in range(a.shape[0]) if alphas[k] > mu * beta]
        else:
            kept = keep_rule(torch.tensor(alphas))
        scored = [k for k in kept if a[k].max() > a[k].min()]
        masks, scores = [], []
        for k in kept:  # every kept mask is scored here, the constant ones too
            m = F.interpolate(a[k][None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            m = m - m.min()
            m = m / (m.max() + 1e-6)
            if k not in scored:
                m = torch.zeros(size)  # Omega of a constant map is the zero mask (no interpolation round-off)
            with torch.no_grad():
                masked = base + (image - base) * m
                scores.append(float(torch.softmax(model(masked[None]), 1)[0, class_id]))
            masks.append(m)
        exact = [scores[kept.index(k)] for k in scored]
        kept_counts[layer] = {"kept": len(kept), "scored": len(scored), "scores": exact}
        if rescore is not None and scored:
            approximate = rescore(layer, a[scored], exact)
            scores = [approximate[scored.index(k)] if k in scored else 0.0 for k in kept]
        v = torch.zeros(size)
        for m, s in zip(masks, scores, strict=True):
            v += s * m / (m.sum() + 1e-6)
        vis_maps[layer] = (v - v.min()) / (v.max() - v.min())
    return _fuse([vis_maps[layer] for layer in layers], fusion), vis_maps, kept_counts


# ---------------------------------------------------------------------------------------------- fast mode
def unit_vectors(maps: torch.Tensor) -> np.ndarray:
    """Each map min-max normalised (eps 1e-6), flattened and scaled to unit length (float64)."""
    rows = []
    for m in maps.double():
        m = (m - m.min()) / ((m - m.min()).max() + 1e-6)
        rows.append(m.flatten().numpy())
    vectors = np.stack(rows)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def groups(maps: torch.Tensor, n_groups: int) -> tuple[np.ndarray, list[list[int]]]:
    """Average-linkage clustering on cosine distance (scipy ``pdist`` + ``linkage``) into ``n_groups``;
    returns each map's group (numbered by scipy's cluster label order) and, per group, its medoid
    candidates: the members whose summed cosine similarity to the group is maximal up to 1e-5 relative (a group
    of two members has two: their sums are equal; the explainer takes the first of a near-tie, so that an image's
    medoids do not depend on the ~1e-7 noise between its activations alone and in a batch)."""
    vectors = unit_vectors(maps)
    n_maps = len(vectors)
    if n_groups >= n_maps:
        return np.arange(n_maps), [[i] for i in range(n_maps)]
    if n_groups == 1:
        labels = np.zeros(n_maps, dtype=int)
    else:
        tree = linkage(np.clip(pdist(vectors, "cosine"), 0, None), method="average")
        labels = np.unique(fcluster(tree, t=n_groups, criterion="maxclust"), return_inverse=True)[1]
    similarity = vectors @ vectors.T
    candidates = []
    for group in range(labels.max() + 1):
        members = np.flatnonzero(labels == group)
        sums = similarity[np.ix_(members, members)].sum(1)
        floor = sums.max() - 1e-5 * abs(sums.max())
        candidates.append([int(m) for m, s in zip(members, sums, strict=True) if s >= floor])
    return labels, candidates


def pooled_features(maps: torch.Tensor) -> np.ndarray:
    """Min-max normalised maps average-pooled to at most 7 x 7 (block1's 16 x 16 -> 7 x 7), flattened."""
    pooled = []
    for m in maps.double():
        m = (m - m.min()) / ((m - m.min()).max() + 1e-6)
        pooled.append(F.adaptive_avg_pool2d(m[None, None], [min(7, s) for s in m.shape]).flatten().numpy())
    return np.stack(pooled)


def gp(features: np.ndarray, scored: list[int], scores: list[float], noise: float = 1e-3) -> list[float]:
    """Gaussian-process posterior mean (squared-exponential kernel, median length-scale) with numpy/scipy."""
    y = np.asarray(scores, dtype=np.float64)
    prediction = np.full(len(features), y.mean())
    pairwise = cdist(features[scored], features[scored])
    if (pairwise > 0).any():  # else (one scored mask): the prior mean, its score
        length = np.median(pairwise[pairwise > 0])
        gram = np.exp(-(pairwise**2) / (2 * length**2)) + noise * np.eye(len(y))
        cross = np.exp(-(cdist(features, features[scored]) ** 2) / (2 * length**2))
        prediction += cross @ np.linalg.solve(gram, y - y.mean())
    prediction[scored] = y
    return prediction.tolist()
