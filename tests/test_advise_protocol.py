"""The AVX protocol (iCalculateCAMmetrics.m) against hand computations, numpy and scikit-image."""

from __future__ import annotations

import numpy as np
import piq
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity
from torch import nn

from convlens.metrics.advise_protocol import (
    AVX,
    AverageDropMaxClass,
    AVXOptions,
    ClassSensitivity,
    MaskedFSIMc,
    MaskedSSIM,
    NormalizedMSE,
    TopKHit,
    avx_mask,
    avx_protocol,
    class_sensitivity,
    display_image_uint8,
    harmonic_avx,
)
from convlens.models.preprocessing import Preprocessing
from convlens.numerics.avx import apply_miss_penalty as _apply_miss_penalty

PREP = Preprocessing(size=32, resize=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class MeanColourClassifier(nn.Module):
    """logits = W [mean R, mean G, mean B, 1]: a classifier whose outputs the test can recompute in numpy."""

    def __init__(self, weight: np.ndarray) -> None:
        super().__init__()
        self.linear = nn.Linear(3, weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(weight[:, :3]).float())
            self.linear.bias.copy_(torch.from_numpy(weight[:, 3]).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))


def numpy_probabilities(weight: np.ndarray, image_hwc: np.ndarray) -> np.ndarray:
    x = (image_hwc / 255.0 - np.array(PREP.mean)) / np.array(PREP.std)
    logits = weight[:, :3] @ x.mean(axis=(0, 1)) + weight[:, 3]
    e = np.exp(logits - logits.max())
    return e / e.sum()


def make_case(seed: int = 0, n_classes: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    image[8:24, 8:24, 0] = 255  # a red square
    weight = rng.normal(0, 2, (n_classes, 4))
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    maps1 = np.stack([np.clip(1.2 - 2 * np.hypot(yy - 0.5, xx - 0.5), 0, 1), xx, np.full((32, 32), 0.7), yy * 0.4])
    maps2 = np.stack([1 - maps1[0], yy, xx, np.sin(7 * xx) * 0.5 + 0.5])
    return image, weight, maps1, maps2


def expected_protocol(image: np.ndarray, weight: np.ndarray, m1: np.ndarray, m2: np.ndarray) -> dict[str, float]:
    """Literal re-computation of iCalculateCAMmetrics.m (code defaults) for one map pair."""
    probs = numpy_probabilities(weight, image)
    c = int(np.argmax(probs))
    y_c = probs[c]
    # corrcoef of a constant map is NaN (numpy's rounding may leave ~1e-16 deviations: treat exactly)
    r = np.nan if np.ptp(m1) == 0 or np.ptp(m2) == 0 else np.corrcoef(m1.ravel(), m2.ravel())[0, 1]
    check = -0.55 <= r <= 0.55
    r = 0.0 if np.isnan(r) else r
    masked = image * np.clip(np.floor(m1 + 0.5), 0, 1)[..., None]  # uint8 cast: round half up, saturate
    masked_probs = numpy_probabilities(weight, masked)
    hit = c in np.argsort(-masked_probs)[:5]
    o_c = masked_probs.max()
    ad = max(0.0, y_c - o_c) / y_c
    ssim = structural_similarity(masked, image.astype(np.float64), gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=255, channel_axis=-1)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None].float()  # noqa: E731
    fsim = float(piq.fsim(to_t(masked), to_t(image.astype(np.float64)), data_range=255.0, chromatic=True))
    mse = np.mean((masked - image.astype(np.float64)) ** 2) / 255**2
    penalty = "none"
    if not hit:
        if check:
            d = 1 - abs(y_c - o_c)
            ad, ssim, fsim, mse = ad * d, ssim * d, fsim * d, mse * d
            penalty = "scaled"
        else:
            ad, ssim, fsim, mse = 1.0, 0.0, 0.0, 1.0
            penalty = "hard"
    with np.errstate(divide="ignore"):
        avx = 4 / np.sum(1 / np.array([ssim, fsim, 1 - mse, 1 - ad], dtype=np.float64))
    return {"avx": avx, "ssim": ssim, "fsimc": fsim, "mse_n": mse, "average_drop": ad, "class_sensitivity": r,
            "sensitivity_check": check, "hit": hit, "masked_score": o_c, "penalty": penalty, "class": c, "y_c": y_c}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_protocol_matches_literal_recomputation(seed: int) -> None:
    image, weight, maps1, maps2 = make_case(seed)
    model = MeanColourClassifier(weight)
    result = avx_protocol(model, image, torch.from_numpy(maps1), torch.from_numpy(maps2), preprocessing=PREP)
    assert len(result) == 4
    for g in range(4):
        expected = expected_protocol(image, weight, maps1[g], maps2[g])
        got = result.parts(g)
        assert result.class_id == expected["class"]
        assert result.reference_score == pytest.approx(expected["y_c"], rel=1e-5)
        assert got["hit"] == expected["hit"] and got["penalty"] == expected["penalty"]
        assert got["sensitivity_check"] == expected["sensitivity_check"]
        for name in ("avx", "fsimc", "mse_n", "average_drop", "class_sensitivity", "masked_score"):
            assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
        assert got["ssim"] == pytest.approx(expected["ssim"], abs=2e-3)  # piq vs scikit-image SSIM


def test_every_penalty_branch_is_reached() -> None:
    penalties = set()
    for seed in range(12):
        image, weight, maps1, maps2 = make_case(seed, n_classes=6)
        result = avx_protocol(MeanColourClassifier(weight), image, maps1, maps2, preprocessing=PREP,
                              options=AVXOptions(top_k=1))
        penalties |= set(result.penalty)
    assert penalties == {"none", "scaled", "hard"}


def test_miss_penalty_options_by_hand() -> None:
    values = {name: torch.tensor([0.4, 0.4, 0.4], dtype=torch.float64)
              for name in ("ssim", "fsimc", "mse_n", "average_drop")}
    hit = torch.tensor([True, False, False])
    check = torch.tensor([True, True, False])
    d = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    code, labels = _apply_miss_penalty(values, hit, check, d, "code")
    assert labels == ["none", "scaled", "hard"]
    assert code["ssim"].tolist() == [0.4, 0.2, 0.0]
    assert code["average_drop"].tolist() == [0.4, 0.2, 1.0]  # the code lowers the drop on a miss (quirk 5)
    assert code["mse_n"].tolist() == [0.4, 0.2, 1.0]
    monotone, _ = _apply_miss_penalty(values, hit, check, d, "monotone")
    assert monotone["average_drop"].tolist() == pytest.approx([0.4, 0.7, 1.0])  # 1 - (1 - 0.4) * 0.5
    assert monotone["mse_n"].tolist() == pytest.approx([0.4, 0.7, 1.0])
    assert monotone["fsimc"].tolist() == pytest.approx([0.4, 0.2, 0.0])
    none, labels_none = _apply_miss_penalty(values, hit, check, d, "none")
    assert none["ssim"].tolist() == [0.4, 0.4, 0.4] and labels_none == ["none"] * 3
    # AVX: the code's scaled miss scores *higher* than a hit with the same raw values; monotone scores lower
    avx_code = harmonic_avx(code["ssim"], code["fsimc"], code["mse_n"], code["average_drop"])
    avx_monotone = harmonic_avx(monotone["ssim"], monotone["fsimc"], monotone["mse_n"], monotone["average_drop"])
    assert avx_monotone[1] < avx_monotone[0]
    assert avx_code[2] == 0 and avx_monotone[2] == 0


def test_harmonic_mean_by_hand() -> None:
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert harmonic_avx(t(0.5), t(0.5), t(0.5), t(0.5)).item() == pytest.approx(0.5)
    # 4 / (1/0.8 + 1/0.4 + 1/0.9 + 1/0.5)
    assert harmonic_avx(t(0.8), t(0.4), t(0.1), t(0.5)).item() == pytest.approx(4 / (1.25 + 2.5 + 1 / 0.9 + 2))
    assert harmonic_avx(t(0.0), t(0.9), t(0.1), t(0.1)).item() == 0.0
    assert harmonic_avx(t(0.9), t(0.9), t(0.1), t(1.0)).item() == 0.0


def test_class_sensitivity_and_nan_rule() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 16, 16)), rng.random((3, 16, 16))
    b[1] = 0.6 * a[1] + 0.4 * b[1]
    r, check = class_sensitivity(torch.from_numpy(a), torch.from_numpy(b))
    expected = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(r.numpy(), expected, rtol=1e-10)
    assert check.tolist() == [abs(e) <= 0.55 for e in expected]
    constant = torch.full((1, 16, 16), 0.3, dtype=torch.float64)
    r_nan, check_nan = class_sensitivity(torch.from_numpy(a[:1]), constant)
    assert r_nan.item() == 0.0 and not check_nan.item()  # code: check before NaN -> 0
    _, check_pass = class_sensitivity(torch.from_numpy(a[:1]), constant, AVXOptions(nan_correlation="passes_check"))
    assert check_pass.item()
    assert ClassSensitivity()(a, b).numpy() == pytest.approx(np.nan_to_num(expected))


def test_binary_mask_is_the_uint8_cast() -> None:
    values = torch.linspace(-0.3, 1.3, 161, dtype=torch.float64).view(1, 7, 23)
    expected = np.clip(np.floor(values.numpy() + 0.5), 0, 1)  # MATLAB cast: round half away from zero, saturate
    assert np.array_equal(avx_mask(values).numpy(), expected)
    soft = avx_mask(values, AVXOptions(mask="soft"))
    assert float(soft.min()) == 0.0 and float(soft.max()) == 1.0


def test_full_map_keeps_the_image_and_scores_one() -> None:
    image, weight, _, _ = make_case(5)
    ones = np.ones((32, 32))
    result = avx_protocol(MeanColourClassifier(weight), image, ones, ones * 0.2 + np.eye(32) * 0.5, preprocessing=PREP)
    assert result.hit.item() and result.penalty == ["none"]
    assert result.ssim.item() == pytest.approx(1.0) and result.fsimc.item() == pytest.approx(1.0)
    assert result.mse_n.item() == 0.0 and result.average_drop.item() == pytest.approx(0.0, abs=1e-6)
    assert result.avx.item() == pytest.approx(1.0, abs=1e-5)


def test_options_change_the_right_terms() -> None:
    image, weight, maps1, maps2 = make_case(1)
    model = MeanColourClassifier(weight)
    base = avx_protocol(model, image, maps1, maps2, preprocessing=PREP, options=AVXOptions(miss_penalty="none"))
    target = avx_protocol(model, image, maps1, maps2, preprocessing=PREP,
                          options=AVXOptions(miss_penalty="none", drop_score="target_class"))
    probs = [numpy_probabilities(weight, image * np.clip(np.floor(m + 0.5), 0, 1)[..., None]) for m in maps1]
    np.testing.assert_allclose(target.masked_score.numpy(), [p[base.class_id] for p in probs], rtol=1e-5)
    assert (target.average_drop >= base.average_drop - 1e-12).all()  # o_c(target) <= max-class o_c
    soft = avx_protocol(model, image, maps1, maps2, preprocessing=PREP, options=AVXOptions(mask="soft"))
    assert not torch.allclose(soft.mse_n, base.mse_n)
    torch.testing.assert_close(soft.class_sensitivity, base.class_sensitivity)


def test_image_inputs_agree_and_use_the_preprocessing() -> None:
    image, weight, maps1, maps2 = make_case(2)
    model = MeanColourClassifier(weight)
    reference = avx_protocol(model, image, maps1, maps2, preprocessing=PREP)
    as_chw = avx_protocol(model, torch.from_numpy(image).permute(2, 0, 1), maps1, maps2, preprocessing=PREP)
    as_float = avx_protocol(model, torch.from_numpy(image).permute(2, 0, 1) / 255.0, maps1, maps2, preprocessing=PREP)
    big = Image.fromarray(image).resize((64, 64), Image.Resampling.NEAREST)  # display() brings it back to 32
    as_pil = avx_protocol(model, big, maps1, maps2, preprocessing=Preprocessing(size=32, resize=32,
                                                                               interpolation="nearest"))
    for other in (as_chw, as_float, as_pil):
        torch.testing.assert_close(other.avx, reference.avx)
    assert display_image_uint8(big, Preprocessing(size=32, resize=32, interpolation="nearest")).shape == (3, 32, 32)


def test_metric_classes_and_metadata() -> None:
    image, weight, maps1, maps2 = make_case(3)
    metric = AVX(preprocessing=PREP)
    result = metric(MeanColourClassifier(weight), image, maps1, maps2)
    assert AVX.metadata() == {"name": "avx", "direction": "higher", "category": "advise protocol"}
    assert ClassSensitivity.direction.value == "lower" and AverageDropMaxClass.direction.value == "lower"
    assert NormalizedMSE.direction.value == "lower" and MaskedSSIM.direction.value == "higher"
    torch.testing.assert_close(AverageDropMaxClass()(result), result.average_drop)
    torch.testing.assert_close(MaskedSSIM()(result, penalised=False), result.raw["ssim"])
    torch.testing.assert_close(MaskedFSIMc()(result), result.fsimc)
    assert TopKHit()(result).dtype == torch.bool


def test_bad_input_raises() -> None:
    image, weight, maps1, maps2 = make_case(0)
    model = MeanColourClassifier(weight)
    with pytest.raises(ValueError, match="normalise"):
        avx_protocol(model, image, maps1 * 10, maps2, preprocessing=PREP)
    with pytest.raises(ValueError, match="differ in shape"):
        avx_protocol(model, image, maps1, maps2[:2], preprocessing=PREP)
    with pytest.raises(ValueError, match="upsample"):
        avx_protocol(model, image, maps1[:, :16, :16], maps2[:, :16, :16], preprocessing=PREP)
    with pytest.raises(TypeError, match="image"):
        avx_protocol(model, "cat.png", maps1, maps2, preprocessing=PREP)
    with pytest.raises(ValueError, match="out of range"):
        avx_protocol(model, image, maps1, maps2, preprocessing=PREP, class_id=99)
    with pytest.raises(ValueError, match="miss_penalty"):
        AVXOptions(miss_penalty="harsh")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Module"):
        avx_protocol(object(), image, maps1, maps2)


def test_run_metrics_share_the_avx_parameters_and_take_only_declared_run_settings() -> None:
    from convlens.metrics.registry import create_metric, create_metrics

    metrics = create_metrics(
        ["avx", "avx_ssim", "class_sensitivity", "drop"],
        {"avx": {"mask": "soft", "top_k": 3}, "avx_ssim": {"top_k": 2}},
        {"score": "sigmoid", "batch_size": 8},
    )
    assert (metrics["avx"].options.mask, metrics["avx"].options.top_k, metrics["avx"].batch_size) == ("soft", 3, 8)
    assert (metrics["avx_ssim"].options.mask, metrics["avx_ssim"].options.top_k) == ("soft", 2)  # its own wins
    assert metrics["class_sensitivity"].options == metrics["avx"].options
    # the run's metric score is the perturbation metrics' setting, not the AVX protocol's (softmax, the code's)
    assert metrics["avx"].options.score == "softmax" and metrics["drop"].score == "sigmoid"
    assert create_metric("avx", options=AVXOptions(mask="soft")).options.mask == "soft"
    with pytest.raises(ValueError, match="not both"):
        create_metric("avx", options=AVXOptions(), mask="soft")
    with pytest.raises(ValueError, match="must be an AVXOptions"):
        create_metric("avx", options="soft")
    with pytest.raises(ValueError, match="does not accept"):
        create_metric("avx", nonsense=1)
