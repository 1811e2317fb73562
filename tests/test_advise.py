"""ADVISE against a literal re-computation of imADVISE.m (independent of convlens: its own hook and
autograd, the literal KDE port of tests/_kde_reference.py, MATLAB imresize through PIL, AVX written out
with numpy and piq), MATLAB imresize by hand, layers vs the paper."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import piq
import pytest
import torch
from PIL import Image
from scipy.signal import find_peaks

from convlens.core.layers import resolve_layers
from convlens.core.params import ParamError
from convlens.methods import create, get_method
from convlens.methods.advise import ADVISE, ADVISEParams, paper_layer, unit_relevance
from convlens.metrics.advise_protocol import AVXOptions, avx_protocol
from convlens.models.preprocessing import Preprocessing
from convlens.numerics.kde import ssvkernel
from convlens.numerics.resize import imresize_bicubic

PREP = Preprocessing(size=32, resize=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def uint8_batch(n: int, seed: int = 0) -> torch.Tensor:
    """Model inputs made from 8-bit images (so the image the model sees is recovered exactly)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.float32)
    images[:, 6:20, 10:26] = rng.integers(150, 256, (n, 1, 1, 3))  # a bright patch
    return PREP.normalize(torch.from_numpy(images / 255.0).permute(0, 3, 1, 2))


def matlab_imresize(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """MATLAB ``imresize(m, size, 'bicubic')`` for integer up-scaling with PIL: PIL's bicubic is the same
    kernel (Keys, a = -0.5) on the same pixel-centre grid but renormalises truncated taps at the border, where
    MATLAB mirrors the image; padding 2 mirrored pixels first (the kernel's reach) and cropping the result
    makes PIL's output MATLAB's."""
    h, w = maps.shape[-2:]
    scale_y, scale_x = size[0] // h, size[1] // w
    assert (scale_y * h, scale_x * w) == tuple(size), "integer scales only"
    out = []
    for m in maps.reshape(-1, h, w):
        padded = np.pad(m.astype(np.float32), 2, mode="symmetric")
        big = Image.fromarray(padded, mode="F").resize(((w + 4) * scale_x, (h + 4) * scale_y), Image.Resampling.BICUBIC)
        out.append(np.asarray(big)[2 * scale_y : 2 * scale_y + size[0], 2 * scale_x : 2 * scale_x + size[1]])
    return np.stack(out).reshape(*maps.shape[:-2], *size)


def literal_avx(model: torch.nn.Module, image: np.ndarray, maps1: np.ndarray, maps2: np.ndarray, c: int,
                y_c: float) -> list[float]:
    """iCalculateCAMmetrics.m written out for each map pair (image: (H, W, 3) 0..255): class sensitivity
    check, masked image ``I .* uint8(M1)``, top-5 hit, max-class Average Drop, SSIM / FSIMc (piq, as MATLAB's
    ssim without down-sampling and FeatureSIM.m), MSE / 255^2, the miss penalty and the harmonic mean."""
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None].float()  # noqa: E731
    values = []
    for m1, m2 in zip(maps1, maps2, strict=True):
        r = np.nan if np.ptp(m1) == 0 or np.ptp(m2) == 0 else np.corrcoef(m1.ravel(), m2.ravel())[0, 1]
        check = bool(-0.55 <= r <= 0.55)
        masked = image * np.clip(np.floor(m1 + 0.5), 0, 1)[..., None]  # uint8 cast: round half up
        with torch.no_grad():
            x = PREP.normalize(torch.from_numpy(masked / 255.0).permute(2, 0, 1).float())
            probs = torch.softmax(model(x[None]), dim=1)[0].double().numpy()
        hit, o_c = c in np.argsort(-probs)[:5], probs.max()
        ad = max(0.0, y_c - o_c) / y_c
        ssim = float(piq.ssim(as_tensor(masked), as_tensor(image), data_range=255.0, downsample=False))
        fsim = float(piq.fsim(as_tensor(masked), as_tensor(image), data_range=255.0, chromatic=True))
        mse = np.mean((masked - image) ** 2) / 255**2
        if not hit and check:
            d = 1 - abs(y_c - o_c)
            ad, ssim, fsim, mse = ad * d, ssim * d, fsim * d, mse * d
        elif not hit:
            ad, ssim, fsim, mse = 1.0, 0.0, 0.0, 1.0
        with np.errstate(divide="ignore"):
            values.append(float(4 / np.sum(1 / np.array([ssim, fsim, 1 - mse, 1 - ad]))))
    return values


def literal_advise(model: torch.nn.Module, x: torch.Tensor, layer: str, kde_reference: ModuleType) -> dict:
    """imADVISE.m step by step for one image: own hook, one autograd call per class, loops over groups.

    The KDE is the literal port of ADVISEkernel.m. Where its golden-section search compares two costs equal
    within rounding, which density it ends at is decided by float noise (see test_kde.py); there it takes
    the port's density at the stiffness convlens ended at, after proving that convlens's density is the
    port's at that stiffness and that the port's own search could have gone there
    (``kde_reference.assert_matches``)."""
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
    rows = a.reshape(k, -1).numpy()
    tin = np.linspace(0, 1, h * w)
    densities = kde_reference.assert_matches(ssvkernel(torch.from_numpy(rows), torch.from_numpy(tin)), rows, tin,
                                             "matlab")["densities"]
    peaks = np.array([0 if d is None else len(find_peaks(d)[0]) for d in densities])
    image = (torch.round(PREP.denormalize(x) * 255)).permute(1, 2, 0).double().numpy()
    groups: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
    for r in range(peaks.min(), peaks.max() + 1):
        members = np.flatnonzero(peaks == r)
        if members.size == 0:
            continue
        cams = []
        for grad in (grad1, grad2):
            cam = sum(float(grad[i].double().mean()) * a[i] for i in members)
            cam = torch.clamp(cam, min=0)
            low, high = float(cam.min()), float(cam.max())
            cams.append(((cam - low) / (high - low) if high > low else torch.zeros_like(cam)).numpy())
        if cams[0].sum() <= 0:
            continue
        groups[r] = (matlab_imresize(cams[0], (32, 32)), matlab_imresize(cams[1], (32, 32)), members.size)
    order = sorted(groups)
    avx = literal_avx(model, image, np.stack([groups[r][0] for r in order]), np.stack([groups[r][1] for r in order]),
                      c1, float(probabilities[c1].detach()))
    best = order[int(np.argmax(avx))]
    failed = sum(d is None for d in densities)
    return {"classes": [c1, c2], "peaks": peaks, "groups": groups, "avx": avx, "best": best, "order": order,
            "failed": failed}


def test_matches_literal_recomputation(make_model, kde_reference) -> None:
    model = make_model(seed=3, num_classes=10, width=8)
    x = uint8_batch(2, seed=1)
    explainer = ADVISE(model, preprocessing=PREP)
    explanation = explainer.explain(x)
    assert explanation.layers == ["block3"]
    for b in range(2):
        expected = literal_advise(model, x[b], "block3", kde_reference)
        info = explanation.extras["images"][b]
        assert info["classes"] == expected["classes"]
        histogram = {str(r): int((expected["peaks"] == r).sum()) for r in np.unique(expected["peaks"])}
        assert info["peak_histogram"] == histogram
        assert info["kde_failed_units"] == expected["failed"]
        assert sorted(info["groups"]) == [f"R={r}" for r in expected["order"]]
        for j, r in enumerate(expected["order"]):
            up1, _, units = expected["groups"][r]
            torch.testing.assert_close(explanation.layer_maps[f"R={r}"][b], torch.from_numpy(up1).float(), atol=1e-4,
                                       rtol=1e-4)
            parts = info["groups"][f"R={r}"]
            assert parts["units"] == units
            assert parts["avx"] == pytest.approx(expected["avx"][j], abs=1e-4)
        assert info["selected"] == f"R={expected['best']}"
        best_map = torch.from_numpy(expected["groups"][expected["best"]][0]).float()
        torch.testing.assert_close(explanation.maps[b], best_map, atol=1e-4, rtol=1e-4)
        best_avx = max(g["avx"] for g in info["groups"].values())
        assert info["groups"][info["selected"]]["avx"] == best_avx
    # per image: 1 logits forward + 1 forward for both gradients (one backward per class) + one AVX forward per
    # group (the unmasked image's score y_c comes from the logits forward, as imADVISE.m reuses its first predict)
    n_groups = sum(len(info["groups"]) for info in explanation.extras["images"])
    assert explanation.forward_passes == 2 + 2 + n_groups
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
    # PIL's bicubic on a mirror-padded copy is MATLAB's, borders included
    small = np.random.default_rng(0).random((7, 9)).astype(np.float32)
    ours = imresize_bicubic(torch.from_numpy(small), (224, 288)).numpy()
    np.testing.assert_allclose(ours, matlab_imresize(small, (224, 288)), atol=1e-5)
    plain_pil = np.asarray(Image.fromarray(small, mode="F").resize((288, 224), Image.Resampling.BICUBIC))
    assert np.abs(ours[:8] - plain_pil[:8]).max() > 1e-3  # without the padding the borders differ


def test_options_and_selection(make_model) -> None:
    model = make_model(seed=3, num_classes=10)
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


def test_batch_equals_single_images(make_model) -> None:
    model = make_model(seed=4, num_classes=10)
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


def test_explicit_target_explains_that_class(make_model) -> None:
    model = make_model(seed=3, num_classes=10)
    x = uint8_batch(1, seed=2)
    logits = model(x)
    second = int(logits.argsort(dim=1, descending=True)[0, 1])
    explanation = ADVISE(model, preprocessing=PREP).explain(x, targets=second)
    classes = explanation.extras["images"][0]["classes"]
    assert classes == [second, int(logits.argmax())]  # runner-up = best class other than the target


def test_registry_and_bad_arguments(make_model) -> None:
    model = make_model()
    assert get_method("advise") is ADVISE
    assert isinstance(create("advise", model, selection="largest"), ADVISE)
    with pytest.raises(ValueError, match="one feature layer"):
        ADVISE(model, layers="blocks").explain(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"h\*w >= 3"):
        ADVISE(model, layers="block3").explain(torch.randn(1, 3, 4, 4))  # 1 x 1 feature maps
    with pytest.raises(ValueError, match="paper layer"):
        paper_layer("mobilenet_v2")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"selection": "best"}, "advise.selection: must be one of 'avx', 'largest', got 'best'"),
        ({"upsample": "nearest"},
         "advise.upsample: must be one of 'bicubic_matlab', 'bicubic', 'bilinear', got 'nearest'"),
        ({"avx_miss_penalty": "harsh"},
         "advise.avx_miss_penalty: must be one of 'code', 'monotone', 'none', got 'harsh'"),
        ({"n_bandwidths": 1}, "advise.n_bandwidths: must be >= 2, got 1"),
        ({"kde_min_distinct": 0}, "advise.kde_min_distinct: must be >= 1, got 0"),
        ({"kde_convention": "R"}, "advise.kde_convention: must be one of 'matlab', 'adaptivekde', got 'R'"),
        ({"normalize_activations": "perhaps"}, "advise.normalize_activations: expected true or false, got 'perhaps'"),
    ],
)
def test_params_check_their_ranges(make_model, kwargs, message) -> None:
    with pytest.raises(ParamError) as info:
        ADVISE(make_model(), **kwargs)
    assert str(info.value) == message


def test_params_record_and_build_the_avx_options(make_model) -> None:
    explainer = create("advise", make_model(), avx_mask="soft", kde_min_distinct="2", n_bandwidths=5)
    assert list(explainer.params()) == ["score", "batch_size", *ADVISEParams.names()]
    assert explainer.params()["kde_min_distinct"] == 2 and explainer.params()["n_bandwidths"] == 5
    assert explainer.avx_options == AVXOptions(mask="soft")
    assert {spec.name: spec.range for spec in ADVISEParams.describe()}["n_bandwidths"] == ">= 2"


@pytest.mark.slow
def test_default_layers_versus_the_paper() -> None:
    """'last' vs the paper's layers (imMain.m l.22-56) on torchvision/timm models (random weights)."""
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
    result = CliRunner().invoke(app, ["explain", str(tmp_path / "chelsea.png"), "--methods", "advise", "--out",
                                      str(out), "--per-block", "--param", "advise.selection=avx"])
    assert result.exit_code == 0, result.output
    record = json.loads(next(out.rglob("result.json")).read_text())
    advise = record["results"][0]
    assert advise["method"] == "advise" and advise["extras"]["selected"][0].startswith("R=")
    assert [b["name"] for b in advise["block_images"]] == sorted(
        (b["name"] for b in advise["block_images"]), key=lambda n: int(n[2:]))
    html = (out / "index.html").read_text()
    assert "R=" in html and "advise details" in html


def test_fsimc_against_one_reference_is_piq_fsim() -> None:
    """FSIMc of several masked images against one original (its phase congruency computed once) is piq.fsim on
    the pairs, to float32 rounding: the original's FFTs run on a batch of one here and on a batch of G in piq,
    which may round the last bit differently (bit-equal at some sizes, not at others, depending on the FFT
    kernels)."""
    import piq

    from convlens.numerics.avx import fsimc_against

    g = torch.Generator().manual_seed(3)
    for height, width in ((224, 224), (70, 90), (600, 520)):
        original = torch.randint(0, 256, (3, height, width), generator=g).float()
        masked = original[None] * (torch.rand(4, 1, height, width, generator=g) > 0.5)
        expected = piq.fsim(masked, original.expand_as(masked), data_range=255.0, reduction="none", chromatic=True)
        torch.testing.assert_close(fsimc_against(masked, original), expected, rtol=1e-6, atol=0)


def test_phase_congruency_and_ssim_against_one_reference_are_piqs_bit_for_bit() -> None:
    """The AVX terms with what depends only on the filter bank or the reference image computed once: the same
    numbers as piq 0.8's ``_phase_congruency`` and ``ssim`` (downsample off), bit for bit."""
    from piq.fsim import _phase_congruency

    from convlens.numerics.avx import _log_gabor_filters, _phase, _ssim_against, _ssim_reference_terms

    g = torch.Generator().manual_seed(5)
    for height, width, count in ((224, 224, 3), (70, 90, 1), (64, 80, 4)):
        luminance = torch.rand(count, 1, height, width, generator=g) * 255
        filters = _log_gabor_filters((height, width), luminance.dtype, luminance.device)
        expected = _phase_congruency(luminance, filters=filters, scales=4, orientations=4, k=2.0)
        for _ in range(2):  # the second call takes the filter terms from the cache
            assert torch.equal(_phase(luminance), expected)
        original = torch.randint(0, 256, (3, height, width), generator=g).float()
        masked = original[None] * (torch.rand(count, 1, height, width, generator=g) > 0.5)
        expected_ssim = piq.ssim(masked, original.expand_as(masked), data_range=255.0, reduction="none",
                                 downsample=False)
        assert torch.equal(_ssim_against(masked, _ssim_reference_terms(original)), expected_ssim)


def test_masked_similarity_over_several_chunks_is_piq() -> None:
    """SSIM and FSIMc of 11 masked images in chunks of 4 (the reference's FSIM terms computed once for all chunks)
    are piq's on the pairs (FSIMc to float32 rounding, see above); MSE_n is the literal mean squared error / 255^2."""
    import piq

    from convlens.numerics.avx import masked_similarity

    g = torch.Generator().manual_seed(4)
    original = torch.randint(0, 256, (3, 64, 80), generator=g).float()
    masked = original[None] * (torch.rand(11, 1, 64, 80, generator=g) > 0.4)
    ssim, fsimc, mse = masked_similarity(masked, original, chunk=4)
    pairs = original.expand_as(masked)
    expected = piq.fsim(masked, pairs, data_range=255.0, reduction="none", chromatic=True).double()
    torch.testing.assert_close(fsimc, expected, rtol=1e-6, atol=0)
    expected_ssim = piq.ssim(masked, pairs, data_range=255.0, reduction="none", downsample=False).double()
    torch.testing.assert_close(ssim, expected_ssim, rtol=1e-6, atol=0)
    literal = [float(((m.double() - original.double()) ** 2).mean()) / 255.0**2 for m in masked]
    torch.testing.assert_close(mse, torch.tensor(literal, dtype=torch.float64))
