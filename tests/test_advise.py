"""ADVISE against a literal re-computation of imADVISE.m, MATLAB imresize by hand, layers vs the paper."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.signal import find_peaks

from conftest import make_tiny_cnn
from convlens.core.layers import resolve_layers
from convlens.methods import create, get_method
from convlens.methods.advise import ADVISE, imresize_bicubic, paper_layer, rescale, unit_relevance
from convlens.methods.kde import linspace_like_numpy, ssvkernel
from convlens.metrics.advise_protocol import AVXOptions, avx_protocol
from convlens.models.preprocessing import Preprocessing

PREP = Preprocessing(size=32, resize=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def uint8_batch(n: int, seed: int = 0) -> torch.Tensor:
    """Model inputs made from 8-bit images (so the image the model sees is recovered exactly)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.float32)
    images[:, 6:20, 10:26] = rng.integers(150, 256, (n, 1, 1, 3))  # a bright patch
    return PREP.normalize(torch.from_numpy(images / 255.0).permute(0, 3, 1, 2))


def literal_advise(model: torch.nn.Module, x: torch.Tensor, layer: str) -> dict[str, object]:
    """imADVISE.m step by step for one image: own hook, one autograd call per class, loops over groups."""
    module = dict(model.named_modules())[layer]
    store: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda _m, _i, out: store.__setitem__("A", out))
    try:
        probabilities = torch.softmax(model(x[None]), dim=1)[0]
    finally:
        handle.remove()
    c1, c2 = probabilities.topk(2).indices.tolist()
    activations = store["A"]
    grad1 = torch.autograd.grad(probabilities[c1], activations, retain_graph=True)[0][0]
    grad2 = torch.autograd.grad(probabilities[c2], activations)[0][0]
    a = activations[0].detach().double()
    k, h, w = a.shape
    rows = a.reshape(k, -1)
    density = ssvkernel(rows, linspace_like_numpy(0, 1, h * w)).density.numpy()
    peaks = np.array([0 if np.isnan(d).any() else len(find_peaks(d)[0]) for d in density])
    image = torch.round(PREP.denormalize(x) * 255)
    groups: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for r in range(peaks.min(), peaks.max() + 1):
        members = np.flatnonzero(peaks == r)
        if members.size == 0:
            continue
        cams = []
        for grad in (grad1, grad2):
            cam = sum(float(grad[i].double().mean()) * a[i] for i in members)
            cam = torch.clamp(cam, min=0)
            low, high = float(cam.min()), float(cam.max())
            cams.append((cam - low) / (high - low) if high > low else torch.zeros_like(cam))
        if float(cams[0].sum()) <= 0:
            continue
        groups[r] = (imresize_bicubic(cams[0], (32, 32)), imresize_bicubic(cams[1], (32, 32)), members.size)
    order = sorted(groups)
    result = avx_protocol(
        model, image / 255.0, torch.stack([groups[r][0] for r in order]), torch.stack([groups[r][1] for r in order]),
        class_id=c1, reference_score=float(probabilities[c1].detach()), preprocessing=PREP,
    )
    best = order[int(torch.argmax(result.avx))]
    failed = int(np.isnan(density).any(axis=1).sum())
    return {"classes": [c1, c2], "peaks": peaks, "groups": groups, "avx": result, "best": best, "order": order,
            "failed": failed}


def test_matches_literal_recomputation() -> None:
    model = make_tiny_cnn(seed=3, num_classes=10, width=8)
    x = uint8_batch(2, seed=1)
    explainer = ADVISE(model, preprocessing=PREP)
    explanation = explainer.explain(x)
    assert explanation.layers == ["block3"]
    for b in range(2):
        expected = literal_advise(model, x[b], "block3")
        info = explanation.extras["images"][b]
        assert info["classes"] == expected["classes"]
        histogram = {str(r): int((expected["peaks"] == r).sum()) for r in np.unique(expected["peaks"])}
        assert info["peak_histogram"] == histogram
        assert info["kde_failed_units"] == expected["failed"]
        assert sorted(info["groups"]) == [f"R={r}" for r in expected["order"]]
        for j, r in enumerate(expected["order"]):
            up1, _, units = expected["groups"][r]
            torch.testing.assert_close(explanation.layer_maps[f"R={r}"][b], up1.float(), atol=1e-4, rtol=1e-4)
            parts = info["groups"][f"R={r}"]
            assert parts["units"] == units
            assert parts["avx"] == pytest.approx(float(expected["avx"].avx[j]), abs=1e-4)
            assert parts["fsimc"] == pytest.approx(float(expected["avx"].fsimc[j]), abs=1e-4)
        assert info["selected"] == f"R={expected['best']}"
        torch.testing.assert_close(explanation.maps[b], expected["groups"][expected["best"]][0].float(), atol=1e-4,
                                   rtol=1e-4)
        best_avx = max(g["avx"] for g in info["groups"].values())
        assert info["groups"][info["selected"]]["avx"] == best_avx
    # 1 logits forward + 2 (image twice for both gradients) per image + (1 + groups) AVX forwards per image
    n_groups = sum(len(info["groups"]) for info in explanation.extras["images"])
    assert explanation.forward_passes == 1 + 2 * 2 + 2 + n_groups
    assert explanation.backward_passes == 4
    assert {"forward_backward", "kde", "maps", "avx", "total"} <= set(explanation.timings)


def test_unit_relevance_by_construction() -> None:
    from scipy.stats import norm

    z = 144
    quantiles = norm.ppf(np.linspace(0.01, 0.99, z // 2))  # evenly spread normal samples, no sampling noise
    bimodal = np.concatenate([0.25 + 0.04 * quantiles, 0.75 + 0.04 * quantiles])
    unimodal = 0.5 + 0.08 * norm.ppf(np.linspace(0.01, 0.99, z))
    outside = np.linspace(1.5, 4.0, z)  # no value in [0, 1]: the KDE fails, R = 0
    acts = torch.from_numpy(np.stack([bimodal, unimodal, outside]).reshape(1, 3, 12, 12))
    assert unit_relevance(acts).tolist() == [[2, 1, 0]]
    # min-max normalisation (not in the code) moves every unit into [0, 1]
    normalized = unit_relevance(acts, normalize=True)
    assert normalized[0, 2] >= 1


def test_imresize_bicubic_by_hand_and_against_pil() -> None:
    # imresize([0 1], [1 4], 'bicubic'): cubic a = -0.5, u = x/2 + 1/4, mirrored border (worked by hand)
    out = imresize_bicubic(torch.tensor([[0.0, 1.0]], dtype=torch.float64), (1, 4))
    torch.testing.assert_close(out, torch.tensor([[-0.09375, 0.203125, 0.796875, 1.09375]], dtype=torch.float64))
    constant = imresize_bicubic(torch.full((7, 7), 0.3, dtype=torch.float64), (224, 224))
    torch.testing.assert_close(constant, torch.full((224, 224), 0.3, dtype=torch.float64))
    # PIL's bicubic is the same kernel; only the border treatment differs (PIL truncates and renormalises)
    small = np.random.default_rng(0).random((7, 9)).astype(np.float32)
    pil = np.asarray(Image.fromarray(small, mode="F").resize((288, 224), Image.Resampling.BICUBIC))
    ours = imresize_bicubic(torch.from_numpy(small), (224, 288)).numpy()
    np.testing.assert_allclose(ours[64:160, 64:224], pil[64:160, 64:224], atol=1e-5)
    assert np.abs(ours[:8] - pil[:8]).max() > 1e-3  # the borders do differ


def test_rescale_matches_matlab_rescale() -> None:
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]]])
    torch.testing.assert_close(rescale(maps)[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert rescale(maps)[1].abs().sum() == 0  # constant map -> lower bound 0


def test_options_and_selection() -> None:
    model = make_tiny_cnn(seed=3, num_classes=10)
    x = uint8_batch(1, seed=2)
    default = ADVISE(model, preprocessing=PREP).explain(x)
    largest = ADVISE(model, preprocessing=PREP, selection="largest").explain(x)
    groups = largest.extras["images"][0]["groups"]
    assert largest.extras["selected"][0] == max(groups, key=lambda key: groups[key]["units"])
    torch.testing.assert_close(largest.maps[0], largest.layer_maps[largest.extras["selected"][0]][0])
    assert default.extras["avx"] == largest.extras["avx"]  # same groups, same AVX; only the choice differs
    normalized = ADVISE(model, preprocessing=PREP, normalize_activations=True).explain(x)
    assert normalized.extras["peak_histogram"] != default.extras["peak_histogram"]
    bilinear = ADVISE(model, preprocessing=PREP, upsample="bilinear").explain(x)
    assert not torch.allclose(bilinear.maps, default.maps)
    monotone = ADVISE(model, preprocessing=PREP, avx_miss_penalty="monotone", avx_drop_score="target_class")
    assert monotone.avx_options == AVXOptions(miss_penalty="monotone", drop_score="target_class")
    params = monotone.params()
    assert params["avx_miss_penalty"] == "monotone" and params["kde_convention"] == "matlab"


def test_batch_equals_single_images() -> None:
    model = make_tiny_cnn(seed=4, num_classes=10)
    x = uint8_batch(2, seed=5)
    explainer = ADVISE(model, preprocessing=PREP)
    both = explainer.explain(x)
    for b in range(2):
        single = explainer.explain(x[b : b + 1])
        torch.testing.assert_close(both.maps[b], single.maps[0], atol=1e-5, rtol=1e-5)
        assert both.extras["images"][b]["groups"].keys() == single.extras["images"][0]["groups"].keys()
        for key, group_map in single.layer_maps.items():
            torch.testing.assert_close(both.layer_maps[key][b], group_map[0], atol=1e-5, rtol=1e-5)
    json.dumps(both.summary()["extras"])  # JSON-able


def test_explicit_target_explains_that_class() -> None:
    model = make_tiny_cnn(seed=3, num_classes=10)
    x = uint8_batch(1, seed=2)
    logits = model(x)
    second = int(logits.argsort(dim=1, descending=True)[0, 1])
    explanation = ADVISE(model, preprocessing=PREP).explain(x, targets=second)
    classes = explanation.extras["images"][0]["classes"]
    assert classes == [second, int(logits.argmax())]  # runner-up = best class other than the target


def test_registry_and_bad_arguments() -> None:
    model = make_tiny_cnn()
    assert get_method("advise") is ADVISE
    assert isinstance(create("advise", model, selection="largest"), ADVISE)
    with pytest.raises(ValueError, match="selection"):
        ADVISE(model, selection="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="upsample"):
        ADVISE(model, upsample="nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="miss_penalty"):
        ADVISE(model, avx_miss_penalty="harsh")
    with pytest.raises(ValueError, match="one feature layer"):
        ADVISE(model, layers="blocks").explain(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"h\*w >= 3"):
        ADVISE(model, layers="block3").explain(torch.randn(1, 3, 4, 4))  # 1 x 1 feature maps
    with pytest.raises(ValueError, match="paper layer"):
        paper_layer("mobilenet_v2")


@pytest.mark.slow
def test_default_layers_versus_the_paper() -> None:
    """'last' vs the paper's layers (spec 3.1) on torchvision/timm models (random weights)."""
    import timm
    import torchvision.models as tvm

    from convlens.core.layers import describe_layers

    cases = [
        ("alexnet", tvm.alexnet(weights=None), (3, 224, 224), "features.11", "features.10", (256, 13, 13)),
        ("vgg16", tvm.vgg16(weights=None), (3, 224, 224), "features.29", "features.28", (512, 14, 14)),
        ("resnet50", tvm.resnet50(weights=None), (3, 224, 224), "layer4", "layer4", (2048, 7, 7)),
        ("xception", timm.create_model("legacy_xception", pretrained=False), (3, 299, 299), "act4", "conv4",
         (2048, 10, 10)),
    ]
    for name, model, shape, default, paper, feature_shape in cases:
        model.eval()
        assert resolve_layers(model, "last", shape) == [default], name
        assert paper_layer(name) == paper
        infos = describe_layers(model, shape)
        assert infos[paper].shape == feature_shape, name
        modules = dict(model.named_modules())
        if name in ("alexnet", "vgg16"):  # the paper's layer is the convolution, 'last' its ReLU
            assert isinstance(modules[paper], torch.nn.Conv2d)
            assert isinstance(modules[default], torch.nn.ReLU)
        if name == "xception":  # paper: separable conv output before BN/ReLU; 'last': after them
            assert type(modules[paper]).__name__ == "SeparableConv2d"


@pytest.mark.slow
def test_efficientnet_lite0_chelsea_end_to_end() -> None:
    from skimage import data

    from convlens.models import load

    loaded = load("efficientnet_lite0")
    image = Image.fromarray(data.chelsea())
    x = loaded.preprocessing(image)[None]
    explanation = ADVISE(loaded).explain(x)
    info = explanation.extras["images"][0]
    assert loaded.class_names[info["classes"][0]] in ("tabby", "tiger cat", "Egyptian cat")
    assert explanation.layers == ["bn2"]
    assert len(info["groups"]) >= 2 and sum(info["peak_histogram"].values()) == 1280
    best = info["groups"][info["selected"]]
    assert best["avx"] == max(g["avx"] for g in info["groups"].values()) and 0 < best["avx"] <= 1
    # the selected map re-scored through the public protocol API: same masked image, same raw similarity
    selected_map = explanation.layer_maps[info["selected"]]
    rescored = avx_protocol(loaded, image, selected_map, torch.rand_like(selected_map), class_id=info["classes"][0])
    assert float(rescored.masked_score[0]) == pytest.approx(best["masked_score"], abs=1e-5)
    assert bool(rescored.hit[0]) == best["hit"]
    if best["penalty"] == "none":
        assert float(rescored.ssim[0]) == pytest.approx(best["ssim"], abs=1e-6)
    assert info["classes"][1] != info["classes"][0]


@pytest.mark.slow
def test_cli_explain_with_advise(tmp_path: Path) -> None:
    from skimage import data
    from typer.testing import CliRunner

    from convlens.cli.main import app

    Image.fromarray(data.chelsea()).save(tmp_path / "chelsea.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["explain", str(tmp_path / "chelsea.png"), "--method", "advise", "--out",
                                      str(out), "--per-block", "--param", "advise.selection=avx"])
    assert result.exit_code == 0, result.output
    record = json.loads(next(out.rglob("result.json")).read_text())
    advise = record["results"][0]
    assert advise["method"] == "advise" and advise["extras"]["selected"][0].startswith("R=")
    assert [b["name"] for b in advise["block_images"]] == sorted(
        (b["name"] for b in advise["block_images"]), key=lambda n: int(n[2:]))
    html = (out / "index.html").read_text()
    assert "R=" in html and "advise details" in html
