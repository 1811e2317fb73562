"""The ADVISE evaluation protocol: AVX ("XAIValue"), Dehshibi et al., The Visual Computer 2024.

This module computes the protocol; it lives in the methods layer because ADVISE itself selects its map
with it. :mod:`convlens.metrics.advise_protocol` wraps it as metrics (name, direction, category).

Reproduces ``iCalculateCAMmetrics.m`` of the official ADVISE code (spec section 3.4). For an image
``I`` (uint8 RGB, the pixels the model sees), a map ``M1`` of the explained (top-1) class ``c`` and a
map ``M2`` of the runner-up class, both in [0, 1] at image resolution:

1. class sensitivity ``R = Pearson(M1, M2)`` over all pixels; ``check = (-0.55 <= R <= 0.55)``
   (computed *before* NaN -> 0, so a NaN correlation fails the check); reported ``R`` has NaN -> 0;
2. masked image ``Ĩ = I .* uint8(M1)``: the uint8 cast rounds, so ``Ĩ`` keeps exactly the pixels with
   ``M1 >= 0.5``; ``Ĩ`` goes through the model's own preprocessing (convlens: ``Preprocessing.normalize``
   of ``Ĩ / 255``, i.e. masked pixels become black, not the mean colour);
3. hit iff ``c`` is among the top-5 classes of the model on ``Ĩ``;
4. Average Drop ``AD = max(0, y_c - o_c) / y_c`` with ``y_c`` the softmax probability of ``c`` on ``I``
   and ``o_c`` the **maximum** softmax probability on ``Ĩ`` over all classes;
5. ``SSIM(Ĩ, I)``, ``FSIMc(Ĩ, I)`` (Zhang et al., IEEE TIP 2011, colour variant), ``MSE_n = MSE(Ĩ, I) / 255^2``;
6. miss penalty: on a miss with ``check``, AD, SSIM, FSIMc and MSE_n are multiplied by
   ``d = 1 - |y_c - o_c|``; on a miss without ``check``: AD = 1, SSIM = 0, FSIMc = 0, MSE_n = 1;
7. ``AVX = 4 / (1/SSIM + 1/FSIMc + 1/(1 - MSE_n) + 1/(1 - AD))`` (harmonic mean; 0 under the hard penalty).

Each quirk of the code (spec 3.7) is an :class:`AVXOptions` field whose default is the code's behaviour:
``mask`` (binary 0.5 mask from the uint8 cast, or the soft map), ``drop_score`` (max-class ``o_c`` or the
target class's score), ``miss_penalty`` (``"code"`` also multiplies the two *error* terms AD and MSE_n by
``d < 1``, which lowers the errors and so *raises* AVX; ``"monotone"`` multiplies the four quality terms
SSIM, FSIMc, 1 - MSE_n, 1 - AD by ``d``; ``"none"``), ``nan_correlation`` (fails the check, as in the code).

Similarity measures come from ``piq``: ``piq.ssim`` (Gaussian window 11, sigma 1.5, K1 = 0.01,
K2 = 0.03, per channel and averaged, without piq's default 2x downsampling — MATLAB's ``ssim`` does not
downsample) and ``piq.fsim(chromatic=True)`` (port of FeatureSIM.m, including its ``round(min(H, W)/256)``
average pooling), both on the 0-255 images with ``data_range=255``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from convlens.core.engine import MaskedForwardEngine
from convlens.core.hooks import eval_mode
from convlens.core.targets import OutputAdapter, ScoreKind, adapt_output, class_scores
from convlens.models.preprocessing import IMAGENET_PREPROCESSING, Preprocessing

__all__ = [
    "AVXOptions",
    "AVXResult",
    "as_maps",
    "avx_mask",
    "avx_protocol",
    "class_sensitivity",
    "display_image_uint8",
    "harmonic_avx",
    "masked_similarity",
]

MaskMode = Literal["binary", "soft"]
DropScore = Literal["max_class", "target_class"]
MissPenalty = Literal["code", "monotone", "none"]
NanCorrelation = Literal["fails_check", "passes_check"]


@dataclass(frozen=True)
class AVXOptions:
    """Choices of the AVX protocol; every default is the official code's behaviour (spec 3.4, 3.7).

    Attributes:
        mask: ``"binary"``: ``Ĩ = I * (M1 >= mask_threshold)`` (the uint8 cast of the code rounds the map);
            ``"soft"``: ``Ĩ = I * clip(M1, 0, 1)``.
        mask_threshold: threshold of the binary mask (0.5 = rounding).
        drop_score: ``"max_class"``: ``o_c`` = max softmax probability on ``Ĩ`` (code);
            ``"target_class"``: ``o_c`` = probability of the explained class (the usual Average Drop).
        miss_penalty: see the module docstring (``"code"``, ``"monotone"``, ``"none"``).
        nan_correlation: ``"fails_check"``: an undefined Pearson correlation (constant map) fails the
            class-sensitivity check (code: the check is computed before NaN -> 0); ``"passes_check"``.
        sensitivity_band: the check is ``|R| <= sensitivity_band``.
        top_k: hit iff the explained class is among the top-k classes on ``Ĩ``.
        score: which probability the model's output becomes (``"softmax"``: the code's ``prob`` layer).
    """

    mask: MaskMode = "binary"
    mask_threshold: float = 0.5
    drop_score: DropScore = "max_class"
    miss_penalty: MissPenalty = "code"
    nan_correlation: NanCorrelation = "fails_check"
    sensitivity_band: float = 0.55
    top_k: int = 5
    score: ScoreKind = "softmax"

    def __post_init__(self) -> None:
        choices = {
            "mask": ("binary", "soft"),
            "drop_score": ("max_class", "target_class"),
            "miss_penalty": ("code", "monotone", "none"),
            "nan_correlation": ("fails_check", "passes_check"),
            "score": ("softmax", "sigmoid", "logit"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"AVXOptions.{name}={getattr(self, name)!r}: choose one of {allowed}")
        if self.top_k < 1:
            raise ValueError(f"AVXOptions.top_k must be >= 1, got {self.top_k}")
        if self.sensitivity_band < 0:
            raise ValueError(f"AVXOptions.sensitivity_band must be >= 0, got {self.sensitivity_band}")


@dataclass
class AVXResult:
    """AVX protocol values of G candidate maps of one image (all tensors are (G,), float64 or bool).

    ``ssim``, ``fsimc``, ``mse_n`` and ``average_drop`` are the values *after* the miss penalty (what
    enters AVX); the ``raw`` dict holds them before it. ``penalty`` is ``"none"``, ``"scaled"`` (miss with
    a passed check) or ``"hard"`` (miss with a failed check) per map.
    """

    avx: torch.Tensor
    ssim: torch.Tensor
    fsimc: torch.Tensor
    mse_n: torch.Tensor
    average_drop: torch.Tensor
    class_sensitivity: torch.Tensor
    sensitivity_check: torch.Tensor
    hit: torch.Tensor
    masked_score: torch.Tensor
    reference_score: float
    class_id: int
    penalty: list[str]
    raw: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.avx.shape[0])

    def parts(self, index: int = 0) -> dict[str, Any]:
        """JSON-ready values of map ``index``."""
        return {
            "avx": float(self.avx[index]),
            "ssim": float(self.ssim[index]),
            "fsimc": float(self.fsimc[index]),
            "mse_n": float(self.mse_n[index]),
            "average_drop": float(self.average_drop[index]),
            "class_sensitivity": float(self.class_sensitivity[index]),
            "sensitivity_check": bool(self.sensitivity_check[index]),
            "hit": bool(self.hit[index]),
            "masked_score": float(self.masked_score[index]),
            "penalty": self.penalty[index],
        }


# ----------------------------------------------------------------------------------------- building blocks
def display_image_uint8(image: Any, preprocessing: Preprocessing | None = None) -> torch.Tensor:
    """The image the model sees as a (3, H, W) float64 tensor of integer values 0..255.

    Accepts a PIL image (passed through ``preprocessing.display``: resize + centre crop), a uint8 array or
    tensor (H, W, 3) or (3, H, W) (used as is), or a float tensor (3, H, W) in [0, 1] (scaled by 255 and
    rounded, e.g. ``preprocessing.denormalize(x)``).
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        array = np.asarray((preprocessing or IMAGENET_PREPROCESSING).display(image), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).double()
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            f"image must be a PIL image, a uint8 array/tensor or a float tensor, got {type(image).__name__}"
        )
    if image.ndim != 3 or 3 not in (image.shape[0], image.shape[-1]):
        raise ValueError(f"image must have shape (H, W, 3) or (3, H, W), got {tuple(image.shape)}")
    chw = image if image.shape[0] == 3 else image.permute(2, 0, 1)
    if image.dtype == torch.uint8:
        return chw.double()
    if not image.is_floating_point():
        raise TypeError(f"image tensors must be uint8 or float in [0, 1], got {image.dtype}")
    if float(chw.min()) < -1e-6 or float(chw.max()) > 1 + 1e-6:
        raise ValueError("float images must be in [0, 1] (pass uint8 for 0..255 images)")
    return torch.round(chw.double().clamp(0, 1) * 255)


def as_maps(maps: Any, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps).double()
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3:
        raise ValueError(f"{name} must have shape (H, W) or (G, H, W), got {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if float(tensor.min()) < -0.5 or float(tensor.max()) > 1.5:
        raise ValueError(
            f"{name} must be maps in [0, 1] (the code rescales them; bicubic overshoot is fine): got values in "
            f"[{float(tensor.min()):.3g}, {float(tensor.max()):.3g}]; normalise first, e.g. explanation.normalized"
        )
    return tensor


def avx_mask(maps: torch.Tensor, options: AVXOptions = AVXOptions()) -> torch.Tensor:
    """Multiplicative mask of the masked image: ``M1 >= 0.5`` (uint8 cast of the code) or ``clip(M1, 0, 1)``."""
    if options.mask == "binary":
        return (maps >= options.mask_threshold).to(maps.dtype)
    return maps.clamp(0, 1)


def class_sensitivity(map_top1: torch.Tensor, map_top2: torch.Tensor, options: AVXOptions = AVXOptions()
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pearson correlation of the top-1 and top-2 class maps per pair (``corrcoef``), NaN -> 0, and the
    check ``|R| <= band`` (a NaN correlation fails it unless ``nan_correlation="passes_check"``).

    A constant map (e.g. the all-zero map of a group whose ReLU kills everything) has an undefined
    correlation; it is detected exactly (max == min) instead of trusting ~1e-16 rounding residues."""
    a = map_top1.flatten(1).double()
    b = map_top2.flatten(1).double()
    constant = (a.amax(1) == a.amin(1)) | (b.amax(1) == b.amin(1))  # zero variance: corrcoef is NaN
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    correlation = (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1))
    correlation = torch.where(constant, torch.nan, correlation)
    undefined = torch.isnan(correlation)
    check = (correlation >= -options.sensitivity_band) & (correlation <= options.sensitivity_band)
    if options.nan_correlation == "passes_check":
        check |= undefined
    return torch.nan_to_num(correlation, nan=0.0), check


def masked_similarity(masked: torch.Tensor, original: torch.Tensor, chunk: int = 8
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(SSIM, FSIMc, MSE / 255^2)`` of masked images (G, 3, H, W) against the original (3, H, W), 0..255."""
    import piq

    ssim_values, fsim_values = [], []
    for start in range(0, masked.shape[0], chunk):
        part = masked[start : start + chunk].float()
        reference = original.float().expand_as(part)
        ssim_values.append(piq.ssim(part, reference, data_range=255.0, reduction="none", downsample=False))
        fsim_values.append(piq.fsim(part, reference, data_range=255.0, reduction="none", chromatic=True))
    mse = ((masked.double() - original.double()) ** 2).flatten(1).mean(1) / 255.0**2
    return torch.cat(ssim_values).double(), torch.cat(fsim_values).double(), mse.clamp(0, 1)


def harmonic_avx(ssim: torch.Tensor, fsimc: torch.Tensor, mse_n: torch.Tensor, average_drop: torch.Tensor
                 ) -> torch.Tensor:
    """``AVX = 4 / (1/SSIM + 1/FSIMc + 1/(1 - MSE_n) + 1/(1 - AD))`` (a zero term gives AVX = 0)."""
    terms = torch.stack([ssim, fsimc, 1 - mse_n, 1 - average_drop]).double()
    return 4.0 / (1.0 / terms).sum(0)  # torch: 1/0 = inf, 4/inf = 0


def _apply_miss_penalty(values: dict[str, torch.Tensor], hit: torch.Tensor, check: torch.Tensor,
                        factor: torch.Tensor, mode: MissPenalty) -> tuple[dict[str, torch.Tensor], list[str]]:
    out = dict(values)
    scaled = ~hit & check
    hard = ~hit & ~check
    labels = ["hard" if h else "scaled" if s else "none" for s, h in zip(scaled.tolist(), hard.tolist(), strict=True)]
    if mode == "none":
        return out, ["none"] * len(labels)
    if mode == "code":  # iCalculateCAMmetrics.m l.61-70: all four values times d
        for name in ("average_drop", "ssim", "fsimc", "mse_n"):
            out[name] = torch.where(scaled, values[name] * factor, values[name])
    else:  # "monotone": the quality terms SSIM, FSIMc, 1 - MSE_n, 1 - AD times d
        out["ssim"] = torch.where(scaled, values["ssim"] * factor, values["ssim"])
        out["fsimc"] = torch.where(scaled, values["fsimc"] * factor, values["fsimc"])
        out["mse_n"] = torch.where(scaled, 1 - (1 - values["mse_n"]) * factor, values["mse_n"])
        out["average_drop"] = torch.where(scaled, 1 - (1 - values["average_drop"]) * factor, values["average_drop"])
    ones, zeros = torch.ones_like(factor), torch.zeros_like(factor)
    out["average_drop"] = torch.where(hard, ones, out["average_drop"])
    out["ssim"] = torch.where(hard, zeros, out["ssim"])
    out["fsimc"] = torch.where(hard, zeros, out["fsimc"])
    out["mse_n"] = torch.where(hard, ones, out["mse_n"])
    return out, labels


def _model_and_preprocessing(model: Any, preprocessing: Preprocessing | None) -> tuple[nn.Module, Preprocessing]:
    if hasattr(model, "module") and isinstance(model.module, nn.Module):  # LoadedModel
        return model.module, preprocessing or model.preprocessing
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a LoadedModel, got {type(model).__name__}")
    return model, preprocessing or IMAGENET_PREPROCESSING


# ----------------------------------------------------------------------------------------- the protocol
def avx_protocol(
    model: Any,
    image: Any,
    map_top1: Any,
    map_top2: Any,
    *,
    class_id: int | None = None,
    reference_score: float | None = None,
    preprocessing: Preprocessing | None = None,
    options: AVXOptions = AVXOptions(),
    output_adapter: OutputAdapter | None = None,
    batch_size: int = 32,
) -> AVXResult:
    """Run the AVX protocol (iCalculateCAMmetrics.m) on G candidate map pairs of one image.

    Args:
        model: classifier (``nn.Module`` or :class:`~convlens.models.LoadedModel`, whose preprocessing is used).
        image: the image the model sees (see :func:`display_image_uint8`): PIL image (cropped by
            ``preprocessing.display``), uint8 (H, W, 3)/(3, H, W), or float (3, H, W) in [0, 1].
        map_top1: (H, W) or (G, H, W) maps of the explained class in [0, 1] (ADVISE: rescaled, bicubic-upsampled).
        map_top2: maps of the runner-up class, same shape (class sensitivity only).
        class_id: explained class ``c``; default the model's top-1 class on ``image``.
        reference_score: ``y_c``; default the model's probability of ``c`` on ``image``.
        preprocessing: normalisation of the (masked) 0-255 image for the model; default the LoadedModel's
            or ImageNet's.
        options: the protocol's choices (defaults = the official code).
        output_adapter: maps the model's raw output to logits.
        batch_size: masked images per forward pass.

    Returns:
        :class:`AVXResult` with one entry per map pair; forward passes: 1 + G.
    """
    module, prep = _model_and_preprocessing(model, preprocessing)
    original = display_image_uint8(image, prep)
    top1 = as_maps(map_top1, "map_top1")
    top2 = as_maps(map_top2, "map_top2")
    if top1.shape != top2.shape:
        raise ValueError(f"map_top1 {tuple(top1.shape)} and map_top2 {tuple(top2.shape)} differ in shape")
    if tuple(top1.shape[-2:]) != tuple(original.shape[-2:]):
        raise ValueError(
            f"maps are {tuple(top1.shape[-2:])} but the image is {tuple(original.shape[-2:])}: upsample the maps to "
            "the model input size (the image the model sees)"
        )
    try:
        device = next(module.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    x = prep.normalize((original / 255.0).float()).to(device)
    with torch.inference_mode(), eval_mode(module):
        logits = adapt_output(module(x[None]), output_adapter).float()
    n_classes = logits.shape[1]
    c = int(logits.argmax(1)) if class_id is None else int(class_id)
    if not 0 <= c < n_classes:
        raise ValueError(f"class_id {c} is out of range: the model has {n_classes} classes")
    y_c = float(class_scores(logits, torch.tensor([c], device=logits.device), options.score)[0]) \
        if reference_score is None else float(reference_score)
    if y_c <= 0:
        raise ValueError(f"the reference score y_c must be > 0 (Average Drop divides by it), got {y_c}")

    # masked image: the 0-255 image times the mask, through the model's own normalisation (black = 0)
    masks = avx_mask(top1, options)  # (G, H, W)
    black = prep.normalize(torch.zeros_like(original).float()).to(device)
    engine = MaskedForwardEngine(module, score=options.score, batch_size=batch_size, output_adapter=output_adapter)
    all_classes = torch.arange(n_classes, device=device)
    probabilities = engine.run(x, masks[:, None].float(), all_classes, baseline=black).double().cpu()  # (G, C)
    k = min(options.top_k, n_classes)
    hit = (probabilities.topk(k, dim=1).indices == c).any(1)
    masked_score = probabilities.amax(1) if options.drop_score == "max_class" else probabilities[:, c]
    average_drop = torch.clamp(y_c - masked_score, min=0) / y_c

    masked = original[None] * masks[:, None]
    ssim, fsimc, mse_n = masked_similarity(masked, original)
    sensitivity, check = class_sensitivity(top1, top2, options)
    raw = {"ssim": ssim, "fsimc": fsimc, "mse_n": mse_n, "average_drop": average_drop}
    factor = 1 - torch.abs(y_c - masked_score)
    penalised, labels = _apply_miss_penalty(raw, hit, check, factor, options.miss_penalty)
    avx = harmonic_avx(penalised["ssim"], penalised["fsimc"], penalised["mse_n"], penalised["average_drop"])
    return AVXResult(
        avx=avx,
        ssim=penalised["ssim"],
        fsimc=penalised["fsimc"],
        mse_n=penalised["mse_n"],
        average_drop=penalised["average_drop"],
        class_sensitivity=sensitivity,
        sensitivity_check=check,
        hit=hit,
        masked_score=masked_score,
        reference_score=y_c,
        class_id=c,
        penalty=labels,
        raw=raw,
    )
