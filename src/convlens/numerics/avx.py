"""The AVX protocol's maths ("XAIValue", Dehshibi et al., The Visual Computer 2024): no model involved.

The official ADVISE code (``iCalculateCAMmetrics.m``) scores a map ``M1`` of the explained class ``c`` and a
map ``M2`` of the runner-up, both in [0, 1] at image resolution, on the image ``I`` (uint8 RGB, the pixels
the model sees). This module holds every step that needs no forward pass (the forwards of the masked image
are :func:`convlens.methods.advise_avx.avx_protocol`'s):

1. class sensitivity ``R = Pearson(M1, M2)``, ``check = (-0.55 <= R <= 0.55)`` — :func:`class_sensitivity`;
2. masked image ``Ĩ = I .* uint8(M1)``, i.e. the pixels with ``M1 >= 0.5`` — :func:`avx_mask`;
3. ``SSIM(Ĩ, I)``, ``FSIMc(Ĩ, I)`` (Zhang et al., IEEE TIP 2011) and ``MSE_n = MSE(Ĩ, I) / 255^2`` —
   :func:`masked_similarity`;
4. on a miss (``c`` not in the top-5 classes on ``Ĩ``) the terms are penalised — :func:`apply_miss_penalty`;
5. ``AVX = 4 / (1/SSIM + 1/FSIMc + 1/(1 - MSE_n) + 1/(1 - AD))``, the harmonic mean — :func:`harmonic_avx`.

Each quirk of the code is an :class:`AVXOptions` field whose default is the code's behaviour, so the
protocol can be run as published or with a quirk removed.
What depends only on the reference image (SSIM means/variances, FSIMc terms) or the size (the log-Gabor
bank) is computed once per image with piq's own steps, bit for bit (tested against piq).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from convlens.core.targets import ScoreKind
from convlens.core.threads import limit_threads

__all__ = [
    "AVXOptions",
    "DropScore",
    "MaskMode",
    "MissPenalty",
    "NanCorrelation",
    "apply_miss_penalty",
    "as_maps",
    "avx_mask",
    "class_sensitivity",
    "fsimc_against",
    "harmonic_avx",
    "masked_similarity",
]

MaskMode = Literal["binary", "soft"]
DropScore = Literal["max_class", "target_class"]
MissPenalty = Literal["code", "monotone", "none"]
NanCorrelation = Literal["fails_check", "passes_check"]


@dataclass(frozen=True)
class AVXOptions:
    """Choices of the AVX protocol; every default is the official code's behaviour
    (iCalculateCAMmetrics.m).

    Attributes:
        mask: ``"binary"``: ``Ĩ = I * (M1 >= mask_threshold)`` (the uint8 cast of the code rounds the map);
            ``"soft"``: ``Ĩ = I * clip(M1, 0, 1)``.
        mask_threshold: threshold of the binary mask (0.5 = rounding).
        drop_score: ``"max_class"``: ``o_c`` = max softmax probability on ``Ĩ`` (code);
            ``"target_class"``: ``o_c`` = probability of the explained class (the usual Average Drop).
        miss_penalty: ``"code"`` also multiplies the two *error* terms AD and MSE_n by ``d < 1``, which
            lowers the errors and so *raises* AVX; ``"monotone"`` multiplies the four quality terms SSIM,
            FSIMc, 1 - MSE_n, 1 - AD by ``d``; ``"none"`` (:func:`apply_miss_penalty`).
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


def as_maps(maps: Any, name: str) -> torch.Tensor:
    """``maps`` as a (G, H, W) float64 tensor of finite values in about [0, 1] (one clear error otherwise)."""
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


@limit_threads()
def masked_similarity(masked: torch.Tensor, original: torch.Tensor, chunk: int = 8
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(SSIM, FSIMc, MSE / 255^2)`` of masked images (G, 3, H, W) against the original (3, H, W), 0..255.

    From ``piq``: ``piq.ssim`` (Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03, per channel and averaged,
    without piq's default 2x down-sampling: MATLAB's ``ssim`` does not down-sample) and FSIMc as
    ``piq.fsim(chromatic=True)`` (a port of FeatureSIM.m with its ``round(min(H, W)/256)`` average pooling),
    both with ``data_range=255``. On one torch thread (:mod:`convlens.core.threads`): a few hundred small
    operations per chunk.
    """
    ssim_values, fsim_values = [], []
    terms = fsim_reference_terms(original.float())  # once per image, whatever the number of chunks
    ssim_terms = _ssim_reference_terms(original.float())
    for start in range(0, masked.shape[0], chunk):
        part = masked[start : start + chunk].float()
        ssim_values.append(_ssim_against(part, ssim_terms))
        fsim_values.append(fsimc_against(part, original.float(), terms))
    mse = ((masked.double() - original.double()) ** 2).flatten(1).mean(1) / 255.0**2
    return torch.cat(ssim_values).double(), torch.cat(fsim_values).double(), mse.clamp(0, 1)


@dataclass(frozen=True)
class FSIMReference:
    """The reference image's FSIMc terms: its YIQ channels, phase congruency and gradient magnitude."""

    yiq: torch.Tensor
    phase_congruency: torch.Tensor
    gradient: torch.Tensor


def _fsim_kernels(like: torch.Tensor) -> torch.Tensor:
    from piq.functional import scharr_filter

    scharr = scharr_filter(device=like.device, dtype=like.dtype)
    return torch.stack([scharr, scharr.transpose(-1, -2)])


def _yiq(images: torch.Tensor) -> torch.Tensor:
    """piq's rescaling to [0, 255] (kept for bit-equal results), down-sampling and YIQ conversion."""
    from piq.functional import rgb2yiq

    x = images / 255.0 * 255
    return rgb2yiq(torch.nn.functional.avg_pool2d(x, max(1, round(min(x.shape[-2:]) / 256))))


@dataclass(frozen=True)
class _SSIMReference:
    """The reference image's terms of ``piq.ssim`` (divided by the data range 255): its local means, the
    squares of them and its local variances under piq's 11 x 11 Gaussian window (sigma 1.5)."""

    image: torch.Tensor  # (1, 3, H, W) in [0, 1]
    kernel: torch.Tensor
    mu: torch.Tensor
    mu_squared: torch.Tensor
    sigma_squared: torch.Tensor


def _ssim_reference_terms(reference: torch.Tensor) -> _SSIMReference:
    from piq.functional import gaussian_filter

    y = reference[None] / 255.0
    kernel = gaussian_filter(11, 1.5, device=y.device, dtype=y.dtype).repeat(y.shape[1], 1, 1, 1)
    mu = F.conv2d(y, weight=kernel, stride=1, padding=0, groups=y.shape[1])
    mu_squared = mu**2
    sigma_squared = F.conv2d(y**2, weight=kernel, stride=1, padding=0, groups=y.shape[1]) - mu_squared
    return _SSIMReference(y, kernel, mu, mu_squared, sigma_squared)


def _ssim_against(images: torch.Tensor, terms: _SSIMReference) -> torch.Tensor:
    """``piq.ssim(images, reference, data_range=255, downsample=False, reduction="none")`` for G images (G, 3,
    H, W), 0..255, against one reference whose terms are computed once (piq's ``_ssim_per_channel``, K1 = 0.01,
    K2 = 0.03; Wang et al., IEEE TIP 2004)."""
    c1, c2 = 0.01**2, 0.03**2
    x = images / 255.0
    groups = x.shape[1]
    mu_x = F.conv2d(x, weight=terms.kernel, stride=1, padding=0, groups=groups)
    mu_xx = mu_x**2
    mu_xy = mu_x * terms.mu
    sigma_xx = F.conv2d(x**2, weight=terms.kernel, stride=1, padding=0, groups=groups) - mu_xx
    sigma_xy = F.conv2d(x * terms.image, weight=terms.kernel, stride=1, padding=0, groups=groups) - mu_xy
    cs = (2.0 * sigma_xy + c2) / (sigma_xx + terms.sigma_squared + c2)
    ss = (2.0 * mu_xy + c1) / (mu_xx + terms.mu_squared + c1) * cs
    return ss.mean(dim=(-1, -2)).mean(1)


@dataclass(frozen=True)
class _FilterTerms:
    """What piq's ``_phase_congruency`` derives from its filter bank alone (the same for every image of a
    size): the bank, the mean squared filter value at the smallest scale and the sums of the filters'
    spatial responses that scale the noise estimate."""

    filters: torch.Tensor
    em_n: torch.Tensor
    sum_an2: torch.Tensor
    sum_ai_aj: torch.Tensor


@functools.lru_cache(maxsize=8)
def _filter_terms(size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> _FilterTerms:
    """piq 0.8's filter-only steps of ``_phase_congruency`` (4 scales, 4 orientations), once per image size."""
    height, width = size
    filters = _log_gabor_filters(size, dtype, device)
    filters_ifft = torch.fft.ifft2(filters).real * math.sqrt(height * width)
    em_n = (filters.view(1, 4, 4, height, width)[:, :, :1, ...] ** 2).sum(dim=[-2, -1], keepdims=True)
    filters_ifft = filters_ifft.view(1, 4, 4, height, width)
    sum_an2 = torch.sum(filters_ifft**2, dim=-3, keepdim=True)
    sum_ai_aj = torch.zeros(1, 4, 1, height, width, dtype=dtype, device=device)
    for s in range(3):
        sum_ai_aj = sum_ai_aj + (filters_ifft[:, :, s : s + 1] * filters_ifft[:, :, s + 1 :]).sum(dim=-3, keepdim=True)
    sum_an2 = torch.sum(sum_an2, dim=[-1, -2], keepdim=True)
    sum_ai_aj = torch.sum(sum_ai_aj, dim=[-1, -2], keepdim=True)
    return _FilterTerms(filters, em_n, sum_an2, sum_ai_aj)


def _phase(luminance: torch.Tensor, k: float = 2.0) -> torch.Tensor:
    """Phase congruency of (N, 1, H, W) luminance images: piq 0.8's ``_phase_congruency`` (Kovesi's PC_2 with
    4 scales and 4 orientations, as FSIM uses it) step for step, with its filter-only terms computed once per
    image size (:func:`_filter_terms`) instead of once per call."""
    eps = torch.finfo(luminance.dtype).eps
    n, _, height, width = luminance.shape
    terms = _filter_terms((height, width), luminance.dtype, luminance.device)
    imagefft = torch.fft.fft2(luminance)
    even_odd = torch.view_as_real(torch.fft.ifft2(imagefft * terms.filters)).view(n, 4, 4, height, width, 2)
    an = torch.sqrt(torch.sum(even_odd**2, dim=-1))  # amplitude of each filter's response
    sum_e = even_odd[..., 0].sum(dim=2, keepdims=True)
    sum_o = even_odd[..., 1].sum(dim=2, keepdims=True)
    x_energy = torch.sqrt(sum_e**2 + sum_o**2) + eps
    mean_e = sum_e / x_energy
    mean_o = sum_o / x_energy
    even = even_odd[..., 0]
    odd = even_odd[..., 1]
    energy = (even * mean_e + odd * mean_o - torch.abs(even * mean_o - odd * mean_e)).sum(dim=2, keepdim=True)
    # noise: median energy^2 at the smallest scale -> Rayleigh parameter -> threshold T (Kovesi; piq's constants)
    abs_eo = torch.sqrt(torch.sum(even_odd[:, :, :1, ...] ** 2, dim=-1)).reshape(n, 4, 1, 1, height * width)
    median_e2n = torch.median(abs_eo**2, dim=-1, keepdim=True).values
    mean_e2n = -median_e2n / math.log(0.5)
    noise_power = mean_e2n / terms.em_n
    noise_energy2 = 2 * noise_power * terms.sum_an2 + 4 * noise_power * terms.sum_ai_aj
    tau = torch.sqrt(noise_energy2 / 2)
    noise_energy = tau * math.sqrt(math.pi / 2)
    noise_energy_sigma = torch.sqrt((2 - math.pi / 2) * tau**2)
    threshold = (noise_energy + k * noise_energy_sigma) / 1.7
    energy = torch.max(energy - threshold, torch.zeros_like(threshold))
    energy_all = energy.sum(dim=[1, 2]) + eps
    an_all = an.sum(dim=[1, 2]) + eps
    return (energy_all / an_all).unsqueeze(1)


def fsim_reference_terms(reference: torch.Tensor) -> FSIMReference:
    """The FSIMc terms of a reference image (3, H, W), 0..255, for :func:`fsimc_against`."""
    from piq.functional import gradient_map

    yiq = _yiq(reference[None])
    luminance = yiq[:, :1]
    return FSIMReference(yiq, _phase(luminance), gradient_map(luminance, _fsim_kernels(luminance)))


def fsimc_against(images: torch.Tensor, reference: torch.Tensor, terms: FSIMReference | None = None
                  ) -> torch.Tensor:
    """``piq.fsim(images, reference, data_range=255, chromatic=True, reduction="none")`` for G images (G, 3, H, W)
    against one reference (3, H, W), 0..255, with the reference's phase congruency, gradient and chromatic
    channels computed once (``terms``, from :func:`fsim_reference_terms`) instead of once per image (piq's own
    steps and constants, Zhang et al. 2011)."""
    from piq.functional import gradient_map, similarity_map

    terms = terms if terms is not None else fsim_reference_terms(reference)
    x_yiq, y_yiq = _yiq(images), terms.yiq
    x_lum = x_yiq[:, :1]
    pc_x, pc_y = _phase(x_lum), terms.phase_congruency
    gradient_similarity = similarity_map(gradient_map(x_lum, _fsim_kernels(x_lum)), terms.gradient, 160)
    pc_max = torch.where(pc_x > pc_y, pc_x, pc_y)
    score = gradient_similarity * similarity_map(pc_x, pc_y, 0.85) * pc_max
    chroma = similarity_map(x_yiq[:, 1:2], y_yiq[:, 1:2], 200) * similarity_map(x_yiq[:, 2:], y_yiq[:, 2:], 200)
    score = score * torch.abs(chroma) ** 0.03
    return score.sum(dim=[1, 2, 3]) / pc_max.sum(dim=[1, 2, 3])


@functools.lru_cache(maxsize=8)
def _log_gabor_filters(size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """piq's FSIM filter bank for one image size (its defaults: 4 scales, 4 orientations, ...), built once."""
    from piq.fsim import _construct_filters

    return _construct_filters(torch.empty((1, 1, *size), dtype=dtype, device=device), 4, 4, 6, 2, 0.55, 1.2)


def harmonic_avx(ssim: torch.Tensor, fsimc: torch.Tensor, mse_n: torch.Tensor, average_drop: torch.Tensor
                 ) -> torch.Tensor:
    """``AVX = 4 / (1/SSIM + 1/FSIMc + 1/(1 - MSE_n) + 1/(1 - AD))`` (a zero term gives AVX = 0)."""
    terms = torch.stack([ssim, fsimc, 1 - mse_n, 1 - average_drop]).double()
    return 4.0 / (1.0 / terms).sum(0)  # torch: 1/0 = inf, 4/inf = 0


def apply_miss_penalty(values: dict[str, torch.Tensor], hit: torch.Tensor, check: torch.Tensor,
                       factor: torch.Tensor, mode: MissPenalty) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The miss penalty (iCalculateCAMmetrics.m l.61-74) on the values ``ssim``, ``fsimc``, ``mse_n`` and
    ``average_drop`` of G maps: on a miss that passes the class-sensitivity check, ``"code"`` multiplies all
    four by ``factor`` (``d = 1 - |y_c - o_c|``), ``"monotone"`` the quality terms SSIM, FSIMc, 1 - MSE_n and
    1 - AD; a miss that fails the check gets AD = 1, SSIM = 0, FSIMc = 0, MSE_n = 1 (AVX = 0); ``"none"``
    applies neither. Returns the penalised values and a label per map: ``"none"``, ``"scaled"`` or ``"hard"``."""
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
