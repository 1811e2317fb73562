"""SISE against a slow, literal re-computation (one mask at a time, plain loops: tests/_sise_reference.py,
the ``sise_reference`` fixture) and independent libraries."""

from __future__ import annotations

import math

import pytest
import torch
from skimage.filters import threshold_otsu

from convlens.core.params import ParamError
from convlens.methods import create
from convlens.methods.sise import SISE, SISEParams, fuse_visualization_maps
from convlens.methods.sise_scoring import group_masks, interpolate_scores
from convlens.numerics.otsu import code_otsu_threshold, otsu_threshold

BLOCKS = ("block1", "block2", "block3")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
def test_sise_equals_literal_recomputation(tiny_cnn, tiny_images, fusion, mu, baseline, sise_reference):
    explainer = SISE(tiny_cnn, fusion=fusion, mu=mu, baseline=baseline, batch_size=7)
    explanation = explainer.explain(tiny_images)
    assert explanation.layers == list(BLOCKS)
    for i, image in enumerate(tiny_images):
        final, vis_maps, kept = sise_reference.sise(tiny_cnn, image, mu=mu, fusion=fusion, baseline=baseline)
        for layer in BLOCKS:
            torch.testing.assert_close(explanation.layer_maps[layer][i], vis_maps[layer], atol=2e-5, rtol=1e-4)
            assert explanation.extras["kept_masks"][layer][i] == kept[layer]["kept"]
        torch.testing.assert_close(explanation.maps[i], final, atol=5e-5, rtol=1e-4)
    # the final map is the last fused intermediate
    torch.testing.assert_close(explanation.layer_maps["fused@block3"], explanation.maps.cpu())
    assert explanation.forward_passes == 2 * len(tiny_images) + sum(explanation.extras["masked_forwards"])


def test_mask_scores_are_the_literal_scores(tiny_cnn, tiny_images, sise_reference):
    explanation = SISE(tiny_cnn, keep_mask_scores=True, batch_size=4).explain(tiny_images[:2])
    for i, image in enumerate(tiny_images[:2]):
        _, _, counts = sise_reference.sise(tiny_cnn, image)
        for layer in BLOCKS:
            expected = torch.tensor(counts[layer]["scores"])
            torch.testing.assert_close(torch.tensor(explanation.extras["mask_scores"][layer][i]), expected)


def test_kept_masks_are_the_channels_with_positive_mean_gradient(tiny_images, make_model, sise_reference):
    model = make_model()
    with torch.no_grad():  # eight dead channels in block3: all-zero (constant) maps, still with a gradient
        model.block3[0].weight[:8] = 0
        model.block3[0].bias[:8] = -1
    explanation = SISE(model).explain(tiny_images)
    total_constant = 0
    for i, image in enumerate(tiny_images):
        acts, grads = sise_reference.activations_and_gradients(model, image, int(explanation.targets[i]))
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
        final, _, _ = sise_reference.sise(model, image)
        torch.testing.assert_close(explanation.maps[i], final, atol=5e-5, rtol=1e-4)
    assert total_constant > 0
    assert explanation.extras["candidates"]["block3"] == [32, 32, 32]


def test_mu_one_keeps_only_the_argmax_channel(tiny_cnn, tiny_images, sise_reference):
    selections = SISE(tiny_cnn, mu=1.0).select_feature_maps(tiny_images)
    targets = tiny_cnn(tiny_images).argmax(1)
    for i, image in enumerate(tiny_images):
        _, grads = sise_reference.activations_and_gradients(tiny_cnn, image, int(targets[i]))
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


def test_code_otsu_equals_the_literal_loop_in_both_bottleneck_branches(sise_reference):
    g = torch.Generator().manual_seed(4)
    smooth = torch.rand(40, 40, generator=g)
    peaked = torch.zeros(40, 40)
    peaked[:3, :3] = torch.rand(3, 3, generator=g) * 0.5 + 0.5  # few bright pixels: tau rule fires
    peaked[10:20, 10:20] = 0.25
    peaked[0, 0] = 1.0
    thresholds = []
    for vis_map in (smooth, peaked, smooth**3):
        vis_map = (vis_map - vis_map.min()) / (vis_map.max() - vis_map.min())
        expected = sise_reference.code_otsu(vis_map.double().numpy())
        assert code_otsu_threshold(vis_map) == pytest.approx(expected)
        thresholds.append(expected)
    t_peaked = sise_reference.code_otsu(peaked.double().numpy(), tau=1.0)  # plain Otsu of the peaked map
    assert thresholds[1] == pytest.approx(1.5 * t_peaked)  # bottleneck branch taken
    assert thresholds[0] == pytest.approx(sise_reference.code_otsu(smooth.double().numpy(), tau=1.0))  # not taken


def test_batched_images_equal_single_images(tiny_cnn, tiny_images):
    batched = SISE(tiny_cnn, fusion="code", batch_size=16).explain(tiny_images)
    for i in range(len(tiny_images)):
        single = SISE(tiny_cnn, fusion="code", batch_size=5).explain(tiny_images[i])
        torch.testing.assert_close(batched.maps[i], single.maps[0], atol=2e-5, rtol=1e-4)
        for layer, value in single.layer_maps.items():
            torch.testing.assert_close(batched.layer_maps[layer][i], value[0], atol=2e-5, rtol=1e-4)
        assert single.extras["kept_masks"] == {k: [v[i]] for k, v in batched.extras["kept_masks"].items()}


@pytest.mark.parametrize("fast_scores", ["medoid", "gp"])
def test_fast_mode_batched_images_equal_single_images(tiny_cnn, tiny_images, fast_scores):
    options = {"fast": True, "fast_factor": 3, "fast_scores": fast_scores, "fusion": "code"}
    batched = SISE(tiny_cnn, batch_size=16, **options).explain(tiny_images)
    for i in range(len(tiny_images)):
        single = SISE(tiny_cnn, batch_size=5, **options).explain(tiny_images[i])
        torch.testing.assert_close(batched.maps[i], single.maps[0], atol=2e-5, rtol=1e-4)
        assert single.extras["fast"]["groups"] == [batched.extras["fast"]["groups"][i]]
        assert single.extras["masked_forwards"] == [batched.extras["masked_forwards"][i]]


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


def test_uninformative_block_is_left_out_of_the_cascade(tiny_cnn, tiny_images, sise_reference):
    class NoBlock2(SISE):
        def select_channels(self, alpha):
            if alpha.numel() == 16:  # block2
                return torch.empty(0, dtype=torch.long), None
            return super().select_channels(alpha)

    explanation = NoBlock2(tiny_cnn).explain(tiny_images[:1])
    final, _, _ = sise_reference.sise(tiny_cnn, tiny_images[0], layers=("block1", "block3"))
    torch.testing.assert_close(explanation.maps[0], final, atol=5e-5, rtol=1e-4)
    assert explanation.extras["skipped_blocks"] == [["block2"]]
    assert explanation.extras["kept_masks"]["block2"] == [0]
    assert float(explanation.layer_maps["block2"].abs().max()) == 0.0


def test_explicit_layers_are_ordered_low_to_high(tiny_cnn, tiny_images, sise_reference):
    reversed_order = SISE(tiny_cnn, layers=["block3", "block1"]).explain(tiny_images[:1])
    assert reversed_order.layers == ["block1", "block3"]
    final, _, _ = sise_reference.sise(tiny_cnn, tiny_images[0], layers=("block1", "block3"))
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


def resolve_medoids(candidates: list[list[int]], exact: list[float], used: list[float]) -> list[int]:
    """The medoid of each group: its single candidate, or — where the candidates' summed similarities are
    equal and rounding decides (a group of two) — the candidate SISE scored: in both fast modes the scored
    medoid keeps its exact score, which no other member gets (medoid mode: its medoid's; gp: interpolated)."""
    medoids = []
    for group in candidates:
        scored = [k for k in group if abs(used[k] - exact[k]) <= 1e-6]
        assert len(group) == 1 or scored, (group, exact, used)
        medoids.append(group[0] if len(group) == 1 else scored[0])
    return medoids


@pytest.mark.parametrize("fast_scores", ["medoid", "gp"])
def test_fast_mode_equals_literal_recomputation(tiny_cnn, tiny_images, fast_scores, sise_reference):
    explainer = SISE(tiny_cnn, fast=True, fast_factor=3, fast_scores=fast_scores, batch_size=6, keep_mask_scores=True)
    explanation = explainer.explain(tiny_images[:2])
    for i, image in enumerate(tiny_images[:2]):
        used = {layer: explanation.extras["mask_scores"][layer][i] for layer in BLOCKS}

        def rescore(layer, maps, exact, used=used):
            labels, candidates = sise_reference.groups(maps, math.ceil(maps.shape[0] / 3))
            medoids = resolve_medoids(candidates, exact, used[layer])
            if fast_scores == "medoid":
                return [exact[medoids[label]] for label in labels]
            return sise_reference.gp(sise_reference.pooled_features(maps), medoids, [exact[j] for j in medoids])

        final, _, kept = sise_reference.sise(tiny_cnn, image, rescore=rescore)
        torch.testing.assert_close(explanation.maps[i], final, atol=5e-5, rtol=1e-4)
        groups = explanation.extras["fast"]["groups"][i]
        assert groups == [math.ceil(kept[layer]["scored"] / 3) for layer in BLOCKS]
        assert explanation.extras["masked_forwards"][i] == sum(groups)
        assert explanation.extras["fast"]["forwards_saved"][i] == sum(c["scored"] for c in kept.values()) - sum(groups)
    full = SISE(tiny_cnn).explain(tiny_images[:2])
    assert sum(explanation.extras["masked_forwards"]) < sum(full.extras["masked_forwards"]) / 2.5


def test_group_masks_equals_scipy_clustering(tiny_cnn, tiny_images, sise_reference):
    selection = SISE(tiny_cnn).select_feature_maps(tiny_images[:1])[0]
    for block in selection:
        for n_groups in (1, 2, math.ceil(block.n_scored / 3), block.n_scored):
            labels, medoids = group_masks(block.activations, n_groups)
            expected_labels, candidates = sise_reference.groups(block.activations, n_groups)
            assert labels.tolist() == expected_labels.tolist()
            assert all(int(m) in group for m, group in zip(medoids, candidates, strict=True))


@pytest.mark.parametrize("n_scored", [3, 4, 5, 6])  # 3, 6, 10, 15 pairs: even counts have two middle distances
def test_interpolated_scores_are_exact_at_the_scored_masks(sise_reference, n_scored):
    g = torch.Generator().manual_seed(6)
    features = torch.rand(12, 49, generator=g, dtype=torch.float64)
    scored = torch.tensor([0, 4, 7, 9, 10, 2][:n_scored])
    scores = torch.tensor([0.2, 0.9, 0.5, 0.1, 0.7, 0.4][:n_scored], dtype=torch.float64)
    prediction = interpolate_scores(features, scored, scores)
    torch.testing.assert_close(prediction[scored], scores)
    expected = sise_reference.gp(features.numpy(), scored.tolist(), scores.tolist())
    torch.testing.assert_close(prediction, torch.tensor(expected, dtype=torch.float64), atol=1e-10, rtol=1e-10)
    one = interpolate_scores(features, torch.tensor([3]), torch.tensor([0.7], dtype=torch.float64))
    torch.testing.assert_close(one, torch.full((12,), 0.7, dtype=torch.float64))


def test_fast_factor_one_is_full_sise(tiny_cnn, tiny_images):
    fast = SISE(tiny_cnn, fast=True, fast_factor=1).explain(tiny_images)
    full = SISE(tiny_cnn).explain(tiny_images)
    torch.testing.assert_close(fast.maps, full.maps, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- API
def test_registry_and_params(tiny_cnn, tiny_images):
    explainer = create("sise", tiny_cnn, mu="0.3", fusion="code", baseline="blur", fast="true")
    assert isinstance(explainer, SISE) and explainer.config.mu == 0.3 and explainer.config.fast
    assert create("sise", tiny_cnn, fast="yes").config.fast and not create("sise", tiny_cnn, fast="off").config.fast
    explanation = explainer.explain(tiny_images[:1])
    assert explanation.method == "sise"
    assert explanation.params["fusion"] == "code" and explanation.params["baseline"] == "blur"
    assert explanation.extras["fusion"]["mode"] == "code"
    assert set(explanation.timings) >= {"forward_backward", "masked_forwards", "fusion", "total"}


def test_recorded_params_keep_their_names_order_and_values(tiny_cnn):
    recorded = create("sise", tiny_cnn, mu=0.5, fast=True, baseline="0.25", batch_size=8).params()
    assert list(recorded.items()) == [
        ("score", "softmax"), ("batch_size", 8), ("layers", "blocks"), ("mu", 0.5), ("fusion", "paper"),
        ("temperature", 100.0), ("bottleneck_tau", 1.5), ("baseline", 0.25), ("blur_sigma", 5.0), ("fast", True),
        ("fast_factor", 8.0), ("fast_scores", "gp"),
    ]
    explicit = SISE(tiny_cnn, layers=["block3", "block1"])
    explicit.layers_for(torch.zeros(1, 3, 32, 32))
    assert explicit.params()["layers"] == ["block1", "block3"]
    assert SISE(tiny_cnn, params=SISEParams(mu=0.5)).params() == SISE(tiny_cnn, mu=0.5).params()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mu": -0.1}, "sise.mu: must be [0, 1], got -0.1"),
        ({"mu": 2.0}, "sise.mu: must be [0, 1], got 2.0"),
        ({"mu": "high"}, "sise.mu: expected a number, got 'high'"),
        ({"fast": "maybe"}, "sise.fast: expected true or false, got 'maybe'"),
        ({"fast_scores": "knn"}, "sise.fast_scores: must be one of 'gp', 'medoid', got 'knn'"),
        ({"fusion": "otsu"}, "sise.fusion: must be one of 'paper', 'code', 'simple', got 'otsu'"),
        ({"baseline": "noise"}, "sise.baseline: expected 'zero' | 'mean' | 'blur' | float, got 'noise'"),
        ({"baseline": [0.0]}, "sise.baseline: expected 'zero' | 'mean' | 'blur' | float, got [0.0]"),
        ({"fast_factor": 0.5}, "sise.fast_factor: must be >= 1, got 0.5"),
        ({"blur_sigma": 0}, "sise.blur_sigma: must be > 0, got 0.0"),
        ({"temperature": -1}, "sise.temperature: must be > 0, got -1.0"),
        ({"bottleneck_tau": 0}, "sise.bottleneck_tau: must be > 0, got 0.0"),
        ({"otsu_bins": 64}, "sise has no parameter 'otsu_bins'"),
    ],
)
def test_bad_arguments_raise_one_clear_error(tiny_cnn, kwargs, message):
    with pytest.raises(ParamError) as info:
        SISE(tiny_cnn, **kwargs)
    assert str(info.value).startswith(message)


def test_bad_score_is_an_error(tiny_cnn):
    with pytest.raises(ValueError, match="unknown score"):
        SISE(tiny_cnn, score="prob")


def test_param_ranges_are_the_documented_ones():
    ranges = {spec.name: spec.range for spec in SISEParams.describe()}
    assert ranges == {
        "fusion": "", "temperature": "> 0", "bottleneck_tau": "> 0", "baseline": "", "blur_sigma": "> 0",
        "fast": "", "fast_factor": ">= 1", "fast_scores": "", "mu": "[0, 1]",
    }
    assert SISEParams.describe()[0].type == "'paper' | 'code' | 'simple'"
    assert all(spec.doc for spec in SISEParams.describe())
