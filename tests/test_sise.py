"""SISE against a slow, literal re-computation (one mask at a time, plain loops) and independent libraries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist
from skimage.filters import threshold_otsu

from conftest import make_tiny_cnn
from convlens.core.maps import otsu_threshold
from convlens.methods import create
from convlens.methods.sise import SISE, code_otsu_threshold, fuse_visualization_maps, group_masks, interpolate_scores

BLOCKS = ("block1", "block2", "block3")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------- literal reference
def literal_activations_and_gradients(
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


def literal_code_otsu(vis_map: np.ndarray, nbins: int = 256, tau: float = 1.5) -> float:
    """The authors' modified Otsu, spelled out as in spec 1.7 (plain loop over split points)."""
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


def literal_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with scipy (mirror padding, radius ceil(3 sigma)) — independent of torchvision."""
    radius = math.ceil(3 * sigma)
    blurred = [
        gaussian_filter(c.numpy().astype(np.float64), sigma, mode="mirror", truncate=radius / sigma) for c in image
    ]
    return torch.as_tensor(np.stack(blurred), dtype=torch.float32)


def literal_sise(
    model: torch.nn.Module,
    image: torch.Tensor,
    mu: float = 0.0,
    fusion: str = "paper",
    baseline: str = "zero",
    layers: tuple[str, ...] = BLOCKS,
    keep_rule=None,
    rescore=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, dict[str, int]]]:
    """SISE of one image, one mask at a time (Eqs. 6-12 and the cascade).

    ``keep_rule(alpha) -> kept indices`` replaces Eq. 7 (for Ada-SISE); ``rescore(layer, maps, scores)``
    replaces the exact scores of the non-constant kept masks (fast mode's approximation)."""
    model.eval()
    with torch.no_grad():
        class_id = int(model(image[None]).argmax())
    acts, grads = literal_activations_and_gradients(model, image, class_id)
    size = tuple(image.shape[-2:])
    if baseline == "zero":
        base = torch.zeros_like(image)
    elif baseline == "mean":
        base = image.mean(dim=(1, 2), keepdim=True).expand_as(image)
    else:
        base = literal_blur(image, 5.0)
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
        kept_counts[layer] = {"kept": len(kept), "scored": len(scored)}
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
        kept_counts[layer]["scores"] = [scores[kept.index(k)] for k in scored]
        if rescore is not None and scored:
            exact = [scores[kept.index(k)] for k in scored]
            approximate = rescore(layer, a[scored], exact)
            scores = [approximate[scored.index(k)] if k in scored else 0.0 for k in kept]
        v = torch.zeros(size)
        for m, s in zip(masks, scores, strict=True):
            v += s * m / (m.sum() + 1e-6)
        vis_maps[layer] = (v - v.min()) / (v.max() - v.min())
    maps = [vis_maps[layer] for layer in layers]
    fused = maps[0].clone()
    for v in maps[1:]:
        if fusion == "paper":
            gate = (v >= threshold_otsu(v.numpy(), nbins=256)).float()
        elif fusion == "code":
            gate = 1 / (1 + torch.exp(-(v - literal_code_otsu(v.numpy())) * 100.0))
        else:
            gate = v
        fused = (fused + v) * gate
    return fused, vis_maps, kept_counts


# ---------------------------------------------------------------------------------------------- SISE == literal
@pytest.mark.parametrize(
    ("fusion", "mu", "baseline"),
    [
        ("paper", 0.0, "zero"),
        ("code", 0.0, "zero"),
        ("simple", 0.0, "zero"),
        ("paper", 0.4, "mean"),
        ("code", 0.0, "blur"),
    ],
)
def test_sise_equals_literal_recomputation(tiny_cnn, tiny_images, fusion, mu, baseline):
    explainer = SISE(tiny_cnn, fusion=fusion, mu=mu, baseline=baseline, batch_size=7)
    explanation = explainer.explain(tiny_images)
    assert explanation.layers == list(BLOCKS)
    for i, image in enumerate(tiny_images):
        final, vis_maps, kept = literal_sise(tiny_cnn, image, mu=mu, fusion=fusion, baseline=baseline)
        for layer in BLOCKS:
            torch.testing.assert_close(explanation.layer_maps[layer][i], vis_maps[layer], atol=2e-5, rtol=1e-4)
            assert explanation.extras["kept_masks"][layer][i] == kept[layer]["kept"]
        torch.testing.assert_close(explanation.maps[i], final, atol=5e-5, rtol=1e-4)
    # the final map is the last fused intermediate
    torch.testing.assert_close(explanation.layer_maps["fused@block3"], explanation.maps.cpu())
    assert explanation.forward_passes == 1 + len(tiny_images) + sum(explanation.extras["masked_forwards"])


def test_mask_scores_are_the_literal_scores(tiny_cnn, tiny_images):
    explanation = SISE(tiny_cnn, keep_mask_scores=True, batch_size=4).explain(tiny_images[:2])
    for i, image in enumerate(tiny_images[:2]):
        _, _, counts = literal_sise(tiny_cnn, image)
        for layer in BLOCKS:
            expected = torch.tensor(counts[layer]["scores"])
            torch.testing.assert_close(torch.tensor(explanation.extras["mask_scores"][layer][i]), expected)


def test_kept_masks_are_the_channels_with_positive_mean_gradient(tiny_images):
    model = make_tiny_cnn()
    with torch.no_grad():  # eight dead channels in block3: all-zero (constant) maps, still with a gradient
        model.block3[0].weight[:8] = 0
        model.block3[0].bias[:8] = -1
    explanation = SISE(model).explain(tiny_images)
    total_constant = 0
    for i, image in enumerate(tiny_images):
        acts, grads = literal_activations_and_gradients(model, image, int(explanation.targets[i]))
        positive = {layer: grads[layer].mean(dim=(1, 2)) > 0 for layer in BLOCKS}
        flat = {layer: acts[layer].flatten(1) for layer in BLOCKS}
        constant = {
            layer: int((positive[layer] & (flat[layer].amax(1) == flat[layer].amin(1))).sum()) for layer in BLOCKS
        }
        assert {layer: explanation.extras["kept_masks"][layer][i] for layer in BLOCKS} == {
            layer: int(positive[layer].sum()) for layer in BLOCKS
        }
        assert {layer: explanation.extras["constant_masks"][layer][i] for layer in BLOCKS} == constant
        kept_total = sum(int(p.sum()) for p in positive.values())
        assert explanation.extras["masked_forwards"][i] == kept_total - sum(constant.values())
        total_constant += sum(constant.values())
        # skipping the constant masks is exact: the literal computation scores them all
        final, _, _ = literal_sise(model, image)
        torch.testing.assert_close(explanation.maps[i], final, atol=5e-5, rtol=1e-4)
    assert total_constant > 0
    assert explanation.extras["candidates"]["block3"] == [32, 32, 32]


def test_mu_one_keeps_only_the_argmax_channel(tiny_cnn, tiny_images):
    selections = SISE(tiny_cnn, mu=1.0).select_feature_maps(tiny_images)
    targets = tiny_cnn(tiny_images).argmax(1)
    for i, image in enumerate(tiny_images):
        _, grads = literal_activations_and_gradients(tiny_cnn, image, int(targets[i]))
        for selection in selections[i]:
            assert selection.kept.tolist() == [int(grads[selection.layer].mean(dim=(1, 2)).argmax())]
    explanation = SISE(tiny_cnn, mu=1.0).explain(tiny_images)
    assert explanation.extras["masked_forwards"] == [3, 3, 3]


def test_mu_orders_the_number_of_kept_masks(tiny_cnn, tiny_images):
    counts = [sum(s.n_kept for s in SISE(tiny_cnn, mu=mu).select_feature_maps(tiny_images)[0]) for mu in (0, 0.3, 0.75)]
    assert counts[0] > counts[1] > counts[2] >= 3


def test_otsu_threshold_equals_scikit_image(tiny_cnn, tiny_images):
    g = torch.Generator().manual_seed(3)
    vis_maps = SISE(tiny_cnn).explain(tiny_images).layer_maps
    samples = [vis_maps[layer][i] for layer in BLOCKS for i in range(3)]
    samples += [
        torch.rand(64, 64, generator=g),
        torch.cat([torch.randn(500, generator=g) * 0.1, 2 + torch.randn(200, generator=g) * 0.3]),
        torch.rand(50, 50, generator=g) ** 4,
    ]
    for values in samples:
        assert otsu_threshold(values, bins=256) == pytest.approx(threshold_otsu(values.double().numpy(), nbins=256))


def test_code_otsu_equals_the_literal_loop_in_both_bottleneck_branches():
    g = torch.Generator().manual_seed(4)
    smooth = torch.rand(40, 40, generator=g)
    peaked = torch.zeros(40, 40)
    peaked[:3, :3] = torch.rand(3, 3, generator=g) * 0.5 + 0.5  # few bright pixels: tau rule fires
    peaked[10:20, 10:20] = 0.25
    peaked[0, 0] = 1.0
    thresholds = []
    for vis_map in (smooth, peaked, smooth**3):
        vis_map = (vis_map - vis_map.min()) / (vis_map.max() - vis_map.min())
        expected = literal_code_otsu(vis_map.double().numpy())
        assert code_otsu_threshold(vis_map) == pytest.approx(expected)
        thresholds.append(expected)
    t_peaked = literal_code_otsu(peaked.double().numpy(), tau=1.0)  # plain Otsu of the peaked map
    assert thresholds[1] == pytest.approx(1.5 * t_peaked)  # bottleneck branch taken
    assert thresholds[0] == pytest.approx(literal_code_otsu(smooth.double().numpy(), tau=1.0))  # not taken


def test_batched_images_equal_single_images(tiny_cnn, tiny_images):
    batched = SISE(tiny_cnn, fusion="code", batch_size=16).explain(tiny_images)
    for i in range(len(tiny_images)):
        single = SISE(tiny_cnn, fusion="code", batch_size=5).explain(tiny_images[i])
        torch.testing.assert_close(batched.maps[i], single.maps[0], atol=2e-5, rtol=1e-4)
        for layer, value in single.layer_maps.items():
            torch.testing.assert_close(batched.layer_maps[layer][i], value[0], atol=2e-5, rtol=1e-4)
        assert single.extras["kept_masks"] == {k: [v[i]] for k, v in batched.extras["kept_masks"].items()}


def test_phase_two_is_one_forward_for_the_whole_batch(tiny_cnn, tiny_images):
    explainer = SISE(tiny_cnn, batch_size=8)
    explainer.layers_for(tiny_images)  # resolve layers (a dummy forward) beforehand
    calls: list[tuple[int, bool]] = []
    handle = tiny_cnn.register_forward_hook(
        lambda _m, inputs, _o: calls.append((inputs[0].shape[0], inputs[0].requires_grad))
    )
    try:
        explanation = explainer.explain(tiny_images)
    finally:
        handle.remove()
    batch_sizes = [n for n, _ in calls]
    assert [n for n, with_grad in calls if with_grad] == [len(tiny_images)]  # phase 2: one forward (+ backward)
    masked = sum(explanation.extras["masked_forwards"])
    assert sum(batch_sizes) == 2 * len(tiny_images) + masked  # + the target-score forward
    per_image = [math.ceil(n / 8) for n in explanation.extras["masked_forwards"]]
    assert len(batch_sizes) == 2 + sum(per_image)  # chunks cross block boundaries: only the last is partial


def test_fusion_cascade_by_hand():
    v1 = torch.tensor([[0.0, 0.2], [0.6, 1.0]])
    v2 = torch.tensor([[1.0, 0.0], [0.09, 0.9]])  # 0.09 lies below the centre of its Otsu bin
    fused, intermediates, thresholds = fuse_visualization_maps([v1, v2], "simple")
    torch.testing.assert_close(fused, (v1 + v2) * v2)
    assert thresholds == [None] and len(intermediates) == 1
    fused, _, (threshold,) = fuse_visualization_maps([v1, v2], "paper")
    assert 0.09 < threshold < 0.9
    torch.testing.assert_close(fused, torch.tensor([[1.0, 0.0], [0.0, 1.9]]))


def test_uninformative_block_is_left_out_of_the_cascade(tiny_cnn, tiny_images):
    class NoBlock2(SISE):
        def select_channels(self, alpha):
            if alpha.numel() == 16:  # block2
                return torch.empty(0, dtype=torch.long), None
            return super().select_channels(alpha)

    explanation = NoBlock2(tiny_cnn).explain(tiny_images[:1])
    final, _, _ = literal_sise(tiny_cnn, tiny_images[0], layers=("block1", "block3"))
    torch.testing.assert_close(explanation.maps[0], final, atol=5e-5, rtol=1e-4)
    assert explanation.extras["skipped_blocks"] == [["block2"]]
    assert explanation.extras["kept_masks"]["block2"] == [0]
    assert float(explanation.layer_maps["block2"].abs().max()) == 0.0


def test_explicit_layers_are_ordered_low_to_high(tiny_cnn, tiny_images):
    reversed_order = SISE(tiny_cnn, layers=["block3", "block1"]).explain(tiny_images[:1])
    assert reversed_order.layers == ["block1", "block3"]
    final, _, _ = literal_sise(tiny_cnn, tiny_images[0], layers=("block1", "block3"))
    torch.testing.assert_close(reversed_order.maps[0], final, atol=5e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- fast mode
def test_group_masks_puts_duplicates_together():
    g = torch.Generator().manual_seed(5)
    a, b, c = torch.rand(3, 6, 6, generator=g)
    maps = torch.stack([a, 2 * a + 1, b, a * 0.5, b * 3, c])  # min-max normalised: three distinct masks
    labels, medoids = group_masks(maps, 3)
    assert labels[0] == labels[1] == labels[3] and labels[2] == labels[4]
    assert len({int(labels[0]), int(labels[2]), int(labels[5])}) == 3
    assert all(int(labels[m]) == group for group, m in enumerate(medoids.tolist()))


def literal_gp(features: np.ndarray, scored: list[int], scores: list[float], noise: float = 1e-3) -> list[float]:
    """Gaussian-process posterior mean (squared-exponential kernel, median length-scale) with numpy/scipy."""
    y = np.asarray(scores, dtype=np.float64)
    pairwise = cdist(features[scored], features[scored])
    length = np.median(pairwise[pairwise > 0])
    gram = np.exp(-(pairwise**2) / (2 * length**2)) + noise * np.eye(len(y))
    cross = np.exp(-(cdist(features, features[scored]) ** 2) / (2 * length**2))
    prediction = y.mean() + cross @ np.linalg.solve(gram, y - y.mean())
    prediction[scored] = y
    return prediction.tolist()


@pytest.mark.parametrize("fast_scores", ["medoid", "gp"])
def test_fast_mode_equals_literal_recomputation(tiny_cnn, tiny_images, fast_scores):
    explainer = SISE(tiny_cnn, fast=True, fast_factor=3, fast_scores=fast_scores, batch_size=6)
    explanation = explainer.explain(tiny_images[:2])
    # the grouping of the explainer's own phase-2 maps (medoid ties are decided by float round-off)
    selections = explainer.select_feature_maps(tiny_images[:2])
    for i, image in enumerate(tiny_images[:2]):
        own_maps = {selection.layer: selection.activations for selection in selections[i]}

        def rescore(layer, maps, exact, own_maps=own_maps):
            torch.testing.assert_close(maps, own_maps[layer], atol=1e-5, rtol=1e-5)
            labels, medoids = group_masks(own_maps[layer], math.ceil(maps.shape[0] / 3))
            medoids = medoids.tolist()
            if fast_scores == "medoid":
                return [exact[medoids[label]] for label in labels]
            # features: min-max normalised maps, average-pooled to at most 7x7 (block1 16x16 -> 7x7)
            pooled = []
            for m in maps.double():
                m = (m - m.min()) / ((m - m.min()).max() + 1e-6)
                pooled.append(F.adaptive_avg_pool2d(m[None, None], [min(7, s) for s in m.shape]).flatten().numpy())
            return literal_gp(np.stack(pooled), medoids, [exact[j] for j in medoids])

        final, _, kept = literal_sise(tiny_cnn, image, rescore=rescore)
        torch.testing.assert_close(explanation.maps[i], final, atol=5e-5, rtol=1e-4)
        groups = explanation.extras["fast"]["groups"][i]
        assert groups == [math.ceil(kept[layer]["scored"] / 3) for layer in BLOCKS]
        assert explanation.extras["masked_forwards"][i] == sum(groups)
        assert explanation.extras["fast"]["forwards_saved"][i] == sum(c["scored"] for c in kept.values()) - sum(groups)
    full = SISE(tiny_cnn).explain(tiny_images[:2])
    assert sum(explanation.extras["masked_forwards"]) < sum(full.extras["masked_forwards"]) / 2.5


def test_interpolated_scores_are_exact_at_the_scored_masks():
    g = torch.Generator().manual_seed(6)
    features = torch.rand(12, 49, generator=g, dtype=torch.float64)
    scored = torch.tensor([0, 4, 7])
    scores = torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64)
    prediction = interpolate_scores(features, scored, scores)
    torch.testing.assert_close(prediction[scored], scores)
    expected = literal_gp(features.numpy(), scored.tolist(), scores.tolist())
    torch.testing.assert_close(prediction, torch.tensor(expected, dtype=torch.float64))
    one = interpolate_scores(features, torch.tensor([3]), torch.tensor([0.7], dtype=torch.float64))
    torch.testing.assert_close(one, torch.full((12,), 0.7, dtype=torch.float64))


def test_fast_factor_one_is_full_sise(tiny_cnn, tiny_images):
    fast = SISE(tiny_cnn, fast=True, fast_factor=1).explain(tiny_images)
    full = SISE(tiny_cnn).explain(tiny_images)
    torch.testing.assert_close(fast.maps, full.maps, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- API
def test_registry_and_params(tiny_cnn, tiny_images):
    explainer = create("sise", tiny_cnn, mu="0.3", fusion="code", baseline="blur", fast="true")
    assert isinstance(explainer, SISE) and explainer.mu == 0.3 and explainer.fast
    explanation = explainer.explain(tiny_images[:1])
    assert explanation.method == "sise"
    assert explanation.params["fusion"] == "code" and explanation.params["baseline"] == "blur"
    assert explanation.extras["fusion"]["mode"] == "code"
    assert set(explanation.timings) >= {"forward_backward", "masked_forwards", "fusion", "total"}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"mu": -0.1}, ValueError),
        ({"mu": "high"}, ValueError),
        ({"fast": "maybe"}, ValueError),
        ({"fast_scores": "knn"}, ValueError),
        ({"fusion": "otsu"}, ValueError),
        ({"baseline": "noise"}, ValueError),
        ({"baseline": [0.0]}, TypeError),
        ({"fast_factor": 0.5}, ValueError),
        ({"blur_sigma": 0}, ValueError),
        ({"score": "prob"}, ValueError),
    ],
)
def test_bad_arguments_raise_one_clear_error(tiny_cnn, kwargs, error):
    with pytest.raises(error):
        SISE(tiny_cnn, **kwargs)
