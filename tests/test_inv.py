"""INV (convlens.inv): weights, pruning, clustering, cluster maps, saving, page and CLI.

Every check re-computes the expected value independently: gradients from a hand-written forward of the
tiny CNN, the spec formulas as literal loops, cluster maps from bilinear up-sampling done here,
pytorch-grad-cam's own activations/gradients, or synthetic layers whose true grouping is known.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens.inv import INV
from convlens.inv.clustering import cluster_feature_maps, minmax_rows
from convlens.inv.layers import find_conv_layers
from convlens.inv.weights import channel_weights, prune_threshold, weak_cluster_threshold

TINY_LAYERS = ["block1.2", "block2.2", "block3.1"]  # post-ReLU outputs of TinyCNN's three convs


def _explain(model: nn.Module, x: torch.Tensor, **kwargs: object):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TinyCNN has fewer than 9 conv layers
        return INV(model, **kwargs).explain(x)


def _manual_forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """TinyCNN's forward written out by hand (no hooks): logits and the three post-ReLU maps."""
    h1 = model.block1(x)
    h2 = model.block2(model.pool1(h1))
    h3 = model.block3(model.pool2(h2))
    logits = model.fc(torch.flatten(model.gap(h3), 1))
    return logits, [h1, h2, h3]


def _literal_weights(acts: np.ndarray, grads: np.ndarray, weighting: str) -> tuple[np.ndarray, np.ndarray]:
    """Spec 4.2 as loops: alpha_k = mean_ij 1[A>0] 1[G>0] G (guided) or mean_ij G; w_k in percent."""
    channels, height, width = acts.shape
    alpha = np.zeros(channels)
    for k in range(channels):
        total = 0.0
        for i in range(height):
            for j in range(width):
                g = grads[k, i, j]
                if weighting == "gradcam" or (acts[k, i, j] > 0 and g > 0):
                    total += g
        alpha[k] = total / (height * width)
    positive = np.array([max(a, 0.0) for a in alpha])
    return alpha, 100.0 * positive / positive.sum()


@pytest.fixture(scope="module")
def wide_cnn(make_model) -> nn.Module:
    return make_model(seed=3, width=64)  # 64/128/256 channels: > 30 kept maps per layer, no fallback


@pytest.fixture(scope="module")
def wide_explanation(wide_cnn: nn.Module):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return x, _explain(wide_cnn, x)


# ------------------------------------------------------------------------------------------------ layers
def test_default_layers_vgg16_are_the_nine_relus_of_blocks_3_to_5() -> None:
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):  # skip the 138M-parameter initialisation: discovery needs no weight values
        vgg = torchvision.models.vgg16(weights=None)
    vgg = vgg.to_empty(device="cpu").eval()
    inv = INV(vgg)
    layers = inv.explained_layers((3, 64, 64))
    assert [layer.name for layer in layers] == [f"features.{i}" for i in (11, 13, 15, 18, 20, 22, 25, 27, 29)]
    assert [layer.conv for layer in layers] == [f"features.{i}" for i in (10, 12, 14, 17, 19, 21, 24, 26, 28)]
    assert [layer.channels for layer in layers] == [256] * 3 + [512] * 6
    for layer in layers:  # every chosen module is the ReLU right after its conv
        assert isinstance(vgg.get_submodule(layer.name), nn.ReLU)
        assert isinstance(vgg.get_submodule(layer.conv), nn.Conv2d)
    raw = INV(vgg, post_activation=False).explained_layers((3, 64, 64))
    assert [layer.name for layer in raw] == [layer.conv for layer in layers]


def test_tiny_cnn_uses_all_three_convs_with_a_warning(tiny_cnn: nn.Module) -> None:
    with pytest.warns(UserWarning, match="only 3 convolutional layers"):
        layers = INV(tiny_cnn).explained_layers((3, 32, 32))
    assert [layer.name for layer in layers] == TINY_LAYERS  # block3 has no BN: conv -> ReLU
    assert [layer.conv for layer in layers] == ["block1.0", "block2.0", "block3.0"]


class _SharedReluNet(nn.Module):
    """conv -> BN -> shared ReLU (called twice, like ResNet's) ; conv wrapped in its own Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.stage = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
        self.act = nn.Sequential(nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(x)  # second call of the shared module
        x = self.act(self.stage(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_chain_rules_shared_activation_and_containers() -> None:
    layers = find_conv_layers(_SharedReluNet().eval(), (3, 8, 8))
    # shared ReLU cannot be hooked unambiguously -> stop at BN; an activation inside a container is found
    assert [(layer.conv, layer.name) for layer in layers] == [("conv1", "bn1"), ("stage.0", "act.0")]


def test_explicit_layers_are_explained_in_forward_order(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    inv = INV(tiny_cnn, layers=["block3.0", "block1.0"])  # conv names map to their post-ReLU outputs
    assert [layer.name for layer in inv.explained_layers((3, 32, 32))] == ["block1.2", "block3.1"]
    explanation = inv.explain(tiny_images[0])
    assert [layer.name for layer in explanation.layers] == ["block1.2", "block3.1"]


# ----------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("weighting", ["guided", "gradcam"])
def test_weights_match_literal_recomputation(weighting: str, tiny_images: torch.Tensor, make_model) -> None:
    model = make_model(seed=1, width=8)
    x = tiny_images[1:2]
    explanation = _explain(model, x, weighting=weighting)
    xg = x.clone().requires_grad_(True)
    logits, maps = _manual_forward(model, xg)
    target = int(logits.argmax())
    grads = torch.autograd.grad(logits[0, target], maps)
    assert explanation.target == target
    assert explanation.score == pytest.approx(float(logits[0, target].detach()), rel=1e-5)
    for layer, act, grad in zip(explanation.layers, maps, grads, strict=True):
        alpha, percent = _literal_weights(act[0].detach().double().numpy(), grad[0].double().numpy(), weighting)
        np.testing.assert_allclose(layer.alpha, alpha, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(layer.weights, percent, rtol=1e-4, atol=1e-7)
        # pruning: keep k iff w_k > d(K), d(K) from the spec's table by hand
        d = {8: 76.8 / 8, 16: 76.8 / 16, 32: 76.8 / 32}[layer.num_channels]
        assert layer.prune_threshold == pytest.approx(d)
        assert layer.kept_channels.tolist() == [k for k in range(layer.num_channels) if percent[k] > d]
    if weighting == "guided":
        assert all((layer.alpha >= 0).all() for layer in explanation.layers)


def test_gradcam_weights_agree_with_pytorch_grad_cam(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    """Independent library: pytorch-grad-cam's activations/gradients give the same plain Grad-CAM alpha."""
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

    x = tiny_images[2:3]
    explanation = _explain(tiny_cnn, x, weighting="gradcam")
    modules = [tiny_cnn.get_submodule(name) for name in TINY_LAYERS]
    grabber = ActivationsAndGradients(tiny_cnn, modules, None)
    output = grabber(x)
    tiny_cnn.zero_grad()
    output[0, explanation.target].backward()
    grads = [g.numpy().copy() for g in grabber.gradients]  # forward order (the library prepends)
    grabber.release()
    assert len(grads) == 3
    for layer, grad in zip(explanation.layers, grads, strict=True):
        np.testing.assert_allclose(layer.alpha, grad[0].mean(axis=(1, 2)), rtol=1e-4, atol=1e-9)


def test_channel_weights_hand_case_and_zero_total() -> None:
    acts = torch.tensor([[[[1.0, -1.0]], [[2.0, 2.0]], [[0.0, 3.0]]]])  # (1, 3, 1, 2)
    grads = torch.tensor([[[[4.0, 8.0]], [[-2.0, 2.0]], [[5.0, -1.0]]]])
    alpha, percent = channel_weights(acts, grads, "guided")
    # k0: only (A=1, G=4) counts -> 2; k1: only (2, 2) -> 1; k2: A=0 at G=5, G<0 at A=3 -> 0
    assert alpha[0].tolist() == [2.0, 1.0, 0.0]
    assert percent[0].tolist() == pytest.approx([200 / 3, 100 / 3, 0.0])
    alpha_g, percent_g = channel_weights(acts, grads, "gradcam")
    assert alpha_g[0].tolist() == [6.0, 0.0, 2.0]
    assert percent_g[0].tolist() == pytest.approx([75.0, 0.0, 25.0])
    _, zero = channel_weights(acts, -grads.abs(), "guided")  # no positive gradient: all weights 0, no NaN
    assert zero.tolist() == [[0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="weighting"):
        channel_weights(acts, grads, "plain")  # type: ignore[arg-type]


def test_prune_threshold_table() -> None:
    assert [prune_threshold(k) for k in (2048, 512, 511, 256, 128, 64)] == [0.175, 0.175, 0.35, 0.35, 0.7, 1.4]
    assert prune_threshold(63) == pytest.approx(76.8 / 63)
    with pytest.raises(ValueError):
        prune_threshold(0)


# ------------------------------------------------------------------------------------------- clustering
def test_weak_cluster_threshold_hand_cases() -> None:
    assert weak_cluster_threshold([30, 9, 12, 1]) == pytest.approx(10.0)  # max/3 = 10 > mean/2 = 6.5
    assert weak_cluster_threshold([10, 10, 10, 4]) == pytest.approx(4.25)  # mean/2 = 4.25 > max/3 = 3.33


def test_minmax_rows_keeps_constant_rows() -> None:
    rows = np.array([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    np.testing.assert_allclose(minmax_rows(rows), [[0.0, 1.0, 0.5], [5.0, 5.0, 5.0]])


def _three_patterns(copies: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``copies`` noisy, randomly scaled copies of a vertical bar, a horizontal bar and a corner blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16]
    patterns = [
        (np.abs(xx - 4) < 2).astype(float),
        (np.abs(yy - 11) < 2).astype(float),
        np.exp(-((xx - 12) ** 2 + (yy - 3) ** 2) / 8.0),
    ]
    maps, truth = [], []
    for group, pattern in enumerate(patterns):
        for _ in range(copies):
            maps.append(rng.uniform(0.5, 3.0) * pattern + rng.normal(0, 0.05, pattern.shape))
            truth.append(group)
    order = rng.permutation(len(maps))
    return np.stack(maps)[order], np.array(truth)[order]


@pytest.mark.parametrize("copies", [20, 3])
def test_three_noisy_patterns_give_exactly_three_clusters(copies: int) -> None:
    maps, truth = _three_patterns(copies)
    result = cluster_feature_maps(maps)
    assert result.n_clusters == 3
    for group in range(3):  # each true group is one cluster, and the three clusters differ
        assert len(set(result.labels[truth == group].tolist())) == 1
    assert len({int(result.labels[truth == g][0]) for g in range(3)}) == 3
    if copies == 3:
        assert "perplexity lowered" in (result.fallback or "")
        assert result.perplexity == pytest.approx((9 - 1) / 3)
    else:
        assert result.perplexity == 30.0 and result.fallback is None


def test_silhouette_choice_and_k_range(wide_explanation) -> None:
    from sklearn.metrics import silhouette_score

    _, explanation = wide_explanation
    for layer in explanation.layers:
        assert len(layer.kept_channels) > 30  # no fallback on this model: full 3..8 range
        assert layer.fallback is None
        assert sorted(layer.silhouettes) == [3, 4, 5, 6, 7, 8]
        assert 3 <= layer.n_clusters <= 8
        best = max(layer.silhouettes.values())
        assert layer.n_clusters == min(k for k, v in layer.silhouettes.items() if v == best)
        # the stored labels are the chosen partition of the stored 2-D points
        assert len(np.unique(layer.labels)) == layer.n_clusters
        assert silhouette_score(layer.embedding, layer.labels) == pytest.approx(best, rel=1e-9)


def test_small_layers_fall_back_without_crashing(make_model) -> None:
    rng = np.random.default_rng(0)
    assert cluster_feature_maps(np.zeros((0, 4, 4))).n_clusters == 0
    two = cluster_feature_maps(rng.random((2, 4, 4)))
    assert two.n_clusters == 2 and two.labels.tolist() == [0, 1] and "one cluster per map" in two.fallback
    five = cluster_feature_maps(rng.random((5, 4, 4)))
    assert sorted(five.silhouettes) == [3, 4]  # k <= n - 1
    assert five.perplexity == pytest.approx(4 / 3)
    # a 2-channel-wide CNN (2/4/8 maps per layer) through the whole pipeline: both guards, checked by hand
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    explanation = _explain(make_model(width=2), x)
    branches = set()
    for layer in explanation.layers:
        weights, channels = layer.weights, layer.num_channels
        kept = [k for k in range(channels) if weights[k] > 76.8 / channels]  # d(K) = 76.8 / K for K < 64
        assert layer.kept_channels.tolist() == kept
        if len(kept) <= 3:  # one cluster per kept map, heaviest first, no embedding
            branches.add("one per map")
            by_weight = sorted(kept, key=lambda k: (-weights[k], k))
            assert [c.channels for c in layer.all_clusters] == [[k] for k in by_weight]
            assert layer.n_clusters == len(kept) and layer.embedding is None and "one cluster per map" in layer.fallback
        else:  # 4 maps: perplexity (4 - 1) / 3 = 1 and k = 3 only
            branches.add("embedded")
            assert len(kept) == 4 and layer.perplexity == pytest.approx(1.0) and sorted(layer.silhouettes) == [3]
            assert layer.n_clusters == 3 and sorted(c for cl in layer.all_clusters for c in cl.channels) == kept
        cluster_weights = [float(weights[c.channels].sum()) for c in layer.all_clusters]
        bound = max(max(cluster_weights) / 3, sum(cluster_weights) / len(cluster_weights) / 2)
        assert [c.weight >= bound for c in layer.all_clusters] == [c in layer.clusters for c in layer.all_clusters]
        branches.update({"weak removed"} if layer.weak_clusters else set())
    assert branches == {"one per map", "embedded", "weak removed"}


def test_same_seed_identical_clusters(wide_cnn: nn.Module, wide_explanation) -> None:
    x, first = wide_explanation
    second = _explain(wide_cnn, x, n_jobs=1)
    for a, b in zip(first.layers, second.layers, strict=True):
        np.testing.assert_array_equal(a.embedding, b.embedding)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert [c.channels for c in a.all_clusters] == [c.channels for c in b.all_clusters]
        for ca, cb in zip(a.clusters, b.clusters, strict=True):
            np.testing.assert_array_equal(ca.input_map, cb.input_map)
            assert ca.id == cb.id


def test_parallel_layers_run_single_threaded_numerics_and_restore_limits(
    wide_cnn: nn.Module, wide_explanation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n_jobs=3: every worker clusters with one BLAS and one OpenMP thread (what makes the results independent
    of n_jobs), the workers are really distinct threads, and every limit is back as it was afterwards."""
    import threading

    from threadpoolctl import threadpool_info

    import convlens.inv.explainer as inv_module

    x, first = wide_explanation
    seen: list[tuple[int, set[tuple[str, int]]]] = []
    original = inv_module.cluster_maps_unlimited

    def recording(*args: object, **kwargs: object):
        seen.append((threading.get_ident(), {(i["user_api"], i["num_threads"]) for i in threadpool_info()}))
        return original(*args, **kwargs)

    monkeypatch.setattr(inv_module, "cluster_maps_unlimited", recording)
    before, torch_threads = threadpool_info(), torch.get_num_threads()
    parallel = _explain(wide_cnn, x, n_jobs=3)
    assert len(seen) == 3 and len({ident for ident, _ in seen}) == 3
    assert threading.get_ident() not in {ident for ident, _ in seen}
    for _, limits in seen:
        assert {api for api, _ in limits} >= {"blas", "openmp"} and all(n == 1 for _, n in limits), limits
    assert threadpool_info() == before and torch.get_num_threads() == torch_threads
    for a, b in zip(first.layers, parallel.layers, strict=True):  # and so: the very same clusters
        np.testing.assert_array_equal(a.embedding, b.embedding)
        assert [c.channels for c in a.all_clusters] == [c.channels for c in b.all_clusters]


# ----------------------------------------------------------------------------------- clusters and maps
def test_cluster_weights_weak_rule_and_maps_by_hand(wide_cnn: nn.Module, wide_explanation) -> None:
    x, explanation = wide_explanation
    with torch.no_grad():
        _, maps = _manual_forward(wide_cnn, x)
    removed_any = False
    for layer, raw in zip(explanation.layers, maps, strict=True):
        clusters = layer.all_clusters
        # the clusters partition the kept channels; weights are sums of member weights (percent of the layer)
        members = sorted(c for cluster in clusters for c in cluster.channels)
        assert members == layer.kept_channels.tolist()
        for cluster in clusters:
            assert cluster.weight == pytest.approx(float(layer.weights[cluster.channels].sum()))
            assert cluster.average_weight == pytest.approx(cluster.weight / len(cluster.channels))
        weights = [c.weight for c in clusters]
        bound = max(max(weights) / 3, sum(weights) / len(weights) / 2)
        assert layer.weak_threshold == pytest.approx(bound)
        assert all(c.weight >= bound for c in layer.clusters)
        assert all(c.weight < bound for c in layer.weak_clusters)
        assert len(layer.clusters) + len(layer.weak_clusters) == layer.n_clusters
        removed_any |= bool(layer.weak_clusters)
        assert [c.weight for c in layer.clusters] == sorted((c.weight for c in layer.clusters), reverse=True)
        assert sum(c.weight for c in layer.clusters) <= 100 + 1e-9
        for cluster in layer.clusters:
            w = torch.tensor(layer.weights[cluster.channels])
            members_raw = raw[0, cluster.channels].double()
            up = F.interpolate(members_raw[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
            mean_up = (w[:, None, None] * up).sum(0) / w.sum()
            expected = (mean_up - mean_up.min()) / (mean_up.max() - mean_up.min())
            np.testing.assert_allclose(cluster.input_map, expected.numpy(), atol=1e-4)
            mean_feat = (w[:, None, None] * members_raw).sum(0) / w.sum()
            expected_feat = (mean_feat - mean_feat.min()) / (mean_feat.max() - mean_feat.min())
            np.testing.assert_allclose(cluster.feature_map, expected_feat.numpy(), atol=1e-4)
            assert cluster.feature_map.shape == layer.feature_size
            assert cluster.id == f"{explanation.image_id}:{layer.name}:{cluster.index}"
    assert removed_any, "the weak-cluster branch was never exercised"


class _PatternNet(nn.Module):
    """A layer whose 60 channels are 20 scaled, noisy copies of each of 3 input patterns (1x1 conv), then
    GAP and a head with equal positive weights: every map gets the same weight, none is pruned."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mix = nn.Conv2d(63, 60, 1, bias=False)
        weight = torch.zeros(60, 63)
        self.groups = torch.arange(60) % 3
        weight[torch.arange(60), self.groups] = torch.rand(60, generator=g) * 2 + 0.5
        weight[torch.arange(60), 3 + torch.arange(60)] = 0.03
        self.mix.weight.data = weight[:, :, None, None]
        self.relu = nn.ReLU()
        self.head = nn.Linear(60, 2)
        self.head.weight.data.fill_(1.0)
        self.head.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.mix(x)).mean(dim=(2, 3)))


def test_pattern_layer_end_to_end_recovers_the_three_groups() -> None:
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    patterns = torch.stack([
        0.2 + (torch.abs(xx - 4) < 2).float(), 0.2 + (torch.abs(yy - 11) < 2).float(),
        0.2 + torch.exp(-((xx - 12) ** 2 + (yy - 3) ** 2) / 8.0),
    ])
    noise = torch.rand(60, 16, 16, generator=torch.Generator().manual_seed(1))
    x = torch.cat([patterns, noise])[None]
    net = _PatternNet().eval()
    explanation = _explain(net, x, layers=["mix"], class_names=["a", "b"])
    layer = explanation.layers[0]
    assert layer.name == "relu" and layer.conv == "mix"
    assert len(layer.kept_channels) == 60 and layer.n_clusters == 3 and not layer.weak_clusters
    found = sorted(sorted(c.channels) for c in layer.clusters)
    truth = sorted(sorted(torch.nonzero(net.groups == g)[:, 0].tolist()) for g in range(3))
    assert found == truth
    for cluster in layer.clusters:  # each cluster map is its pattern
        group = int(net.groups[cluster.channels[0]])
        corr = np.corrcoef(cluster.feature_map.ravel(), patterns[group].numpy().ravel())[0, 1]
        assert corr > 0.99
        assert cluster.weight == pytest.approx(100 / 3, abs=2.0)


# ------------------------------------------------------------------------------------------ arguments
def test_invalid_arguments_raise_clear_errors(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="weighting"):
        INV(tiny_cnn, weighting="positive")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="embedding"):
        INV(tiny_cnn, embedding="umap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cluster_range"):
        INV(tiny_cnn, cluster_range=(1, 8))
    with pytest.raises(ValueError, match="not found"):
        INV(tiny_cnn, layers=["block9"]).explain(tiny_images[0])
    with pytest.raises(ValueError, match="one image"):
        INV(tiny_cnn, layers=["block1.0"]).explain(tiny_images)
    with pytest.raises(TypeError):
        INV("not a model")  # type: ignore[arg-type]
