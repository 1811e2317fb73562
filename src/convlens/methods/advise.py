"""ADVISE: ADaptive feature relevance and VISual Explanations (Dehshibi et al., The Visual Computer 2024).

Follows the official MATLAB code (``imADVISE.m``, ``iComputeSum.m``, ``ADVISEkernel.m``,
``iCalculateCAMmetrics.m``; spec section 3):

1. one forward: softmax probabilities and the feature map ``A`` (K x h x w) of one layer; ``c1`` = the
   explained class (the predicted one by default), ``c2`` = the best other class (runner-up);
2. relevance of unit k: ``R_k`` = number of peaks (``findpeaks``) of the locally adaptive bandwidth KDE
   (Shimazaki & Shinomoto 2010, :func:`convlens.methods.kde.ssvkernel`) of its ``Z = h*w`` *raw*
   activation values on the grid ``linspace(0, 1, Z)``; 0 where the KDE fails;
3. gradients ``G1 = d p_c1 / dA`` and ``G2 = d p_c2 / dA`` of the softmax *probabilities* (one batched
   forward + backward of the image twice);
4. for every peak count r = min R .. max R with a non-empty group ``S_r = {k : R_k = r}``:
   ``M1 = ReLU(sum_{k in S_r} w1_k A_k)`` with ``w1_k = (1/Z) sum_ij G1_kij`` (Grad-CAM weights within the
   group), likewise ``M2``; both rescaled to [0, 1] and bicubic-upsampled (MATLAB ``imresize``);
   groups whose ``M1`` is all zero are skipped;
5. each group's maps go through the AVX protocol (:mod:`convlens.methods.avx`; one forward of
   the image masked by ``M1 >= 0.5``); the group with the highest AVX is the explanation.

The result keeps every evaluated group's map (``layer_maps["R=r"]``), the peak-count histogram, the AVX
parts per group and both the full timings and the code's own reported time (KDE time / number of groups).

Code quirks (spec 3.7) as explicit options, defaults = the code:

* ``normalize_activations=False``: the KDE sees raw activations, so only values inside [0, 1] count;
  ``True`` min-max normalises each unit first (the "natural" reading of per-unit relevance).
* ``score="softmax"``: gradients of the probability, not the logit (``score="logit"`` for the latter).
* AVX: binary 0.5 mask, max-class Average Drop, the code's miss penalty, NaN correlation failing the
  check (``avx_mask``, ``avx_drop_score``, ``avx_miss_penalty``, ``avx_nan_correlation``).
* ``selection="avx"``: the final map is chosen by the evaluation metric itself (so ADVISE's own AVX is a
  maximum over groups); ``selection="largest"`` picks the largest group instead (a selection that does
  not look at the metric, for fair AVX comparisons).
* timing: ``extras["code_time_s"]`` is the code's figure (KDE only, divided by the number of groups);
  ``Explanation.timings`` has every phase.
* ``kde_convention="matlab"`` (ADVISEkernel.m) or ``"adaptivekde"`` (the PyPI port), ``kde_min_distinct``
  (``2`` = the spec's "< 2 distinct in-range values fail"; ADVISEkernel.m fits a single distinct value).

Layer: one layer, the core's ``"last"`` by default. The paper's layers are AlexNet ``conv5`` and VGG16
``conv5_3`` *before* their ReLU, ResNet-50's last ReLU and Xception's last separable convolution before
BN/ReLU; ``"last"`` gives the post-ReLU outputs for AlexNet (``features.11``) and VGG16
(``features.29``), the same layer for ResNet-50 (``layer4``) and the post-BN-ReLU ``act4`` for timm's
``legacy_xception``. :func:`paper_layer` returns the paper's layer names for these architectures.

Masked image: the code masks the uint8 image and re-runs the network's own input normalisation; here
the image the model sees is recovered as ``round(255 * preprocessing.denormalize(x))`` (exact for inputs
made by the preprocessing from 8-bit images) and the masked image goes through
``preprocessing.normalize`` (masked pixels are black).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from convlens.core.hooks import forward_with_grads
from convlens.core.layers import LayerSpec
from convlens.core.maps import upsample
from convlens.core.targets import OutputAdapter, ScoreKind, class_scores
from convlens.methods.avx import AVXOptions, avx_protocol
from convlens.methods.base import Explainer, MethodOutput
from convlens.methods.kde import KDEConvention, count_peaks, linspace_like_numpy, ssvkernel
from convlens.models.preprocessing import IMAGENET_PREPROCESSING, Preprocessing

__all__ = ["ADVISE", "PAPER_LAYERS", "imresize_bicubic", "paper_layer", "rescale", "unit_relevance"]

UpsampleMode = Literal["bicubic_matlab", "bicubic", "bilinear"]
Selection = Literal["avx", "largest"]

# feature layers of imMain.m l.22-56 (spec 3.1) in torchvision / timm module names
PAPER_LAYERS: dict[str, str] = {
    "alexnet": "features.10",  # MATLAB layer 14 'conv5', before relu5 (13 x 13 x 256)
    "vgg16": "features.28",  # MATLAB layer 30 'conv5_3', before relu5_3 (14 x 14 x 512)
    "resnet50": "layer4",  # MATLAB 'activation_49_relu': output of the last bottleneck, after its ReLU (7 x 7 x 2048)
    "legacy_xception": "conv4",  # Keras 'block14_sepconv2' before BN and ReLU (10 x 10 x 2048 at 299 x 299)
}


def paper_layer(model_name: str) -> str:
    """The feature layer the ADVISE paper/code uses for ``model_name`` (torchvision ``alexnet``, ``vgg16``,
    ``resnet50``; timm ``legacy_xception`` — also accepted as ``xception`` or ``timm:legacy_xception``)."""
    key = model_name.strip().lower().removeprefix("timm:")
    key = {"xception": "legacy_xception"}.get(key, key)
    if key not in PAPER_LAYERS:
        raise ValueError(
            f"no ADVISE paper layer for {model_name!r}: the paper used {', '.join(PAPER_LAYERS)}; pass layers=NAME"
        )
    return PAPER_LAYERS[key]


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """MATLAB ``imresize``'s cubic convolution kernel (Keys, a = -0.5)."""
    absx = x.abs()
    absx2, absx3 = absx**2, absx**3
    return (1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1) + (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * (
        (absx > 1) & (absx <= 2)
    )


def _resize_matrix(in_length: int, out_length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(out, in) weights of MATLAB ``imresize(..., 'bicubic')`` along one axis (``contributions`` of imresize.m:
    ``u = x/scale + 0.5 (1 - 1/scale)``, 4-tap cubic kernel, weights normalised, symmetric boundary).
    Down-scaling widens the kernel (MATLAB's antialiasing)."""
    scale = out_length / in_length
    width = 4.0 / scale if scale < 1 else 4.0
    x = torch.arange(1, out_length + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - width / 2)
    taps = math.ceil(width) + 2
    indices = left[:, None] + torch.arange(taps, dtype=torch.float64)[None]
    distance = u[:, None] - indices
    weights = scale * _cubic(scale * distance) if scale < 1 else _cubic(distance)
    weights = weights / weights.sum(1, keepdim=True)
    mirror = torch.cat([torch.arange(in_length), torch.arange(in_length - 1, -1, -1)])
    source = mirror[torch.remainder(indices.long() - 1, 2 * in_length)]
    matrix = torch.zeros(out_length, in_length, dtype=torch.float64)
    matrix.scatter_add_(1, source, weights)
    return matrix.to(device=device, dtype=dtype)


def imresize_bicubic(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """MATLAB ``imresize(map, size, 'bicubic')`` of (..., h, w) maps (separable; float64 inside).

    Differs from ``torch.nn.functional.interpolate(mode="bicubic")`` (Keys a = -0.75, clamped border) in the
    kernel (a = -0.5, as PIL's bicubic) and the border (mirrored samples, renormalised weights).
    """
    rows = _resize_matrix(maps.shape[-2], size[0], torch.float64, maps.device)
    cols = _resize_matrix(maps.shape[-1], size[1], torch.float64, maps.device)
    return (rows @ maps.double() @ cols.T).to(maps.dtype if maps.is_floating_point() else torch.float32)


def rescale(maps: torch.Tensor) -> torch.Tensor:
    """MATLAB ``rescale`` over the last two dims: ``(m - min) / (max - min)``; a constant map becomes 0."""
    flat = maps.flatten(-2)
    low = flat.amin(-1, keepdim=True)
    spread = flat.amax(-1, keepdim=True) - low
    scaled = torch.where(spread > 0, (flat - low) / torch.where(spread > 0, spread, 1), 0.0)
    return scaled.view_as(maps)


def unit_relevance(
    activations: torch.Tensor,
    n_bandwidths: int = 10,
    convention: KDEConvention = "matlab",
    min_distinct: int | None = None,
    normalize: bool = False,
    return_fitted: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """ADVISE relevance ``R_k`` (imADVISE.m l.30-45): peaks of the adaptive KDE of each unit's values.

    Args:
        activations: (B, K, h, w) feature maps.
        n_bandwidths: M of the KDE (``kernelRepeat = 10``).
        convention, min_distinct: see :func:`convlens.methods.kde.ssvkernel`.
        normalize: min-max normalise every unit to [0, 1] first (not in the code: it uses raw values).
        return_fitted: also return the (B, K) mask of units whose KDE produced a density.

    Returns:
        (B, K) peak counts (0 where the KDE fails), and the fitted mask if asked.
    """
    batch, channels = activations.shape[:2]
    rows = activations.detach().flatten(2).reshape(batch * channels, -1).double()
    if normalize:
        low = rows.amin(1, keepdim=True)
        spread = rows.amax(1, keepdim=True) - low
        rows = torch.where(spread > 0, (rows - low) / torch.where(spread > 0, spread, 1), rows)
    grid = linspace_like_numpy(0.0, 1.0, rows.shape[1], torch.float64, rows.device)
    result = ssvkernel(rows, grid, n_bandwidths=n_bandwidths, convention=convention, min_distinct=min_distinct)
    peaks = torch.where(result.valid, count_peaks(result.density), 0).view(batch, channels)
    return (peaks, result.valid.view(batch, channels)) if return_fitted else peaks


class ADVISE(Explainer):
    """ADVISE (Dehshibi et al. 2024): units grouped by the number of modes of their adaptive-bandwidth KDE;
    one Grad-CAM-style map per group; the group with the best AVX score is the explanation.

    Args (beyond :class:`~convlens.methods.base.Explainer`'s):
        n_bandwidths: M of the KDE (code: 10).
        kde_convention: ``"matlab"`` (ADVISEkernel.m) or ``"adaptivekde"`` (PyPI port).
        kde_min_distinct: fail units with fewer distinct in-range values (None: the convention's rule).
        normalize_activations: min-max normalise units before the KDE (code: False).
        upsample: ``"bicubic_matlab"`` (imresize), ``"bicubic"`` (torch) or ``"bilinear"``.
        selection: ``"avx"`` (code) or ``"largest"`` (the group with most units).
        preprocessing: the model's input normalisation (taken from a LoadedModel; default ImageNet).
        avx_mask, avx_drop_score, avx_miss_penalty, avx_nan_correlation: the AVX protocol's options
            (:class:`convlens.methods.avx.AVXOptions`).
    """

    name: ClassVar[str] = "advise"
    paper: ClassVar[str] = "Dehshibi et al., ADVISE, The Visual Computer 40(8):5407-5419, 2024 (arXiv 2203.01289)"
    default_score = "softmax"
    default_layers = "last"

    def __init__(
        self,
        model: Any,
        layers: LayerSpec | None = None,
        score: ScoreKind | None = None,
        output_adapter: OutputAdapter | None = None,
        batch_size: int = 64,
        class_names: Sequence[str] | None = None,
        n_bandwidths: int = 10,
        kde_convention: KDEConvention = "matlab",
        kde_min_distinct: int | None = None,
        normalize_activations: bool = False,
        upsample: UpsampleMode = "bicubic_matlab",
        selection: Selection = "avx",
        preprocessing: Preprocessing | None = None,
        avx_mask: str = "binary",
        avx_drop_score: str = "max_class",
        avx_miss_penalty: str = "code",
        avx_nan_correlation: str = "fails_check",
    ) -> None:
        loaded_preprocessing = getattr(model, "preprocessing", None)
        if not isinstance(loaded_preprocessing, Preprocessing):
            loaded_preprocessing = None
        super().__init__(model, layers, score, output_adapter, batch_size, class_names)

        if upsample not in ("bicubic_matlab", "bicubic", "bilinear"):
            raise ValueError(f"upsample={upsample!r}: use 'bicubic_matlab', 'bicubic' or 'bilinear'")
        if selection not in ("avx", "largest"):
            raise ValueError(f"selection={selection!r}: use 'avx' or 'largest'")
        if kde_convention not in ("matlab", "adaptivekde"):
            raise ValueError(f"kde_convention={kde_convention!r}: use 'matlab' or 'adaptivekde'")
        if n_bandwidths < 2:
            raise ValueError(f"n_bandwidths must be >= 2, got {n_bandwidths}")
        self.n_bandwidths = n_bandwidths
        self.kde_convention: KDEConvention = kde_convention
        self.kde_min_distinct = kde_min_distinct
        self.normalize_activations = bool(normalize_activations)
        self.upsample_mode: UpsampleMode = upsample
        self.selection: Selection = selection
        self.preprocessing = preprocessing or loaded_preprocessing or IMAGENET_PREPROCESSING
        self.avx_options = AVXOptions(
            mask=avx_mask,  # type: ignore[arg-type]
            drop_score=avx_drop_score,  # type: ignore[arg-type]
            miss_penalty=avx_miss_penalty,  # type: ignore[arg-type]
            nan_correlation=avx_nan_correlation,  # type: ignore[arg-type]
        )

    def params(self) -> dict[str, Any]:
        return super().params() | {
            "n_bandwidths": self.n_bandwidths,
            "kde_convention": self.kde_convention,
            "kde_min_distinct": self.kde_min_distinct,
            "normalize_activations": self.normalize_activations,
            "upsample": self.upsample_mode,
            "selection": self.selection,
            "avx_mask": self.avx_options.mask,
            "avx_drop_score": self.avx_options.drop_score,
            "avx_miss_penalty": self.avx_options.miss_penalty,
            "avx_nan_correlation": self.avx_options.nan_correlation,
        }

    def _upsample(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.upsample_mode == "bicubic_matlab":
            return imresize_bicubic(maps, size)
        if self.upsample_mode == "bicubic":
            return F.interpolate(maps[:, None].float(), size=size, mode="bicubic", align_corners=False)[:, 0]
        return upsample(maps, size)

    def _explain(self, x: torch.Tensor, class_ids: torch.Tensor, logits: torch.Tensor) -> MethodOutput:

        layers = self.layers_for(x)
        if len(layers) != 1:
            raise ValueError(
                f"ADVISE uses one feature layer, got {len(layers)} ({', '.join(layers)}): pass layers=NAME"
            )
        layer = layers[0]
        batch = x.shape[0]
        size = (x.shape[-2], x.shape[-1])
        probabilities = torch.softmax(logits.float(), dim=1)
        others = probabilities.clone()
        others[torch.arange(batch), class_ids] = -1.0
        runner_up = others.argmax(dim=1)  # c2: top-2 class (the best class other than the explained one)
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        targets = torch.cat([class_ids, runner_up])
        _, acts, grads = forward_with_grads(
            self.model, torch.cat([x, x]), [layer], lambda lg: class_scores(lg, targets, self.score),
            self.output_adapter,
        )
        activations = acts[layer][:batch].float()
        grad_top1, grad_top2 = grads[layer][:batch].float(), grads[layer][batch:].float()
        if activations.ndim != 4 or activations.shape[2] * activations.shape[3] < 3:
            raise ValueError(
                f"layer {layer!r} gives {tuple(activations.shape)}: ADVISE needs (B, K, h, w) maps with h*w >= 3 "
                "(the KDE grid has h*w points); pick an earlier layer"
            )
        timings["forward_backward"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        relevance, fitted = unit_relevance(
            activations, self.n_bandwidths, self.kde_convention, self.kde_min_distinct, self.normalize_activations,
            return_fitted=True,
        )
        timings["kde"] = time.perf_counter() - t0

        weights_top1 = grad_top1.mean(dim=(2, 3))  # (B, K) Grad-CAM weights, restricted to groups below
        weights_top2 = grad_top2.mean(dim=(2, 3))
        maps = torch.zeros((batch, *size), device=x.device)
        group_maps: dict[int, torch.Tensor] = {}
        extras_images: list[dict[str, Any]] = []
        avx_forwards = 0
        t_maps = t_avx = 0.0
        for b in range(batch):
            t0 = time.perf_counter()
            r_b = relevance[b]
            peak_values = list(range(int(r_b.min()), int(r_b.max()) + 1))
            member = torch.stack([r_b == r for r in peak_values]).float()  # (P, K) group membership
            counts = member.sum(1)
            cam1 = torch.relu(torch.einsum("pk,khw->phw", member * weights_top1[b], activations[b]))
            cam2 = torch.relu(torch.einsum("pk,khw->phw", member * weights_top2[b], activations[b]))
            scaled1, scaled2 = rescale(cam1), rescale(cam2)
            evaluated = [i for i in range(len(peak_values)) if counts[i] > 0 and float(scaled1[i].sum()) > 0]
            t_maps += time.perf_counter() - t0
            histogram = {str(r): int(c) for r, c in zip(peak_values, counts.tolist(), strict=True) if c > 0}
            info: dict[str, Any] = {
                "classes": [int(class_ids[b]), int(runner_up[b])],
                "peak_histogram": histogram,
                "kde_failed_units": int((~fitted[b]).sum()),  # no density: R = 0 (they join group R=0)
                "groups": {},
                "selected": None,
            }
            if not evaluated:  # no group gives a non-zero map: fall back to Grad-CAM over all units
                cam = torch.relu(torch.einsum("k,khw->hw", weights_top1[b], activations[b]))
                maps[b] = self._upsample(rescale(cam)[None], size)[0].to(maps.dtype)
                info["fallback"] = "no peak group gives a non-zero map: Grad-CAM over all units"
                extras_images.append(info)
                continue
            t0 = time.perf_counter()
            up1 = self._upsample(scaled1[evaluated], size)
            up2 = self._upsample(scaled2[evaluated], size)
            t_maps += time.perf_counter() - t0
            t0 = time.perf_counter()
            image = self.preprocessing.denormalize(x[b].detach().float().cpu())
            result = avx_protocol(
                self.model, image, up1.cpu(), up2.cpu(), class_id=int(class_ids[b]),
                reference_score=float(probabilities[b, class_ids[b]]), preprocessing=self.preprocessing,
                options=self.avx_options, output_adapter=self.output_adapter, batch_size=self.batch_size,
            )
            avx_forwards += 1 + len(evaluated)
            t_avx += time.perf_counter() - t0
            if self.selection == "avx":
                best = int(torch.argmax(torch.nan_to_num(result.avx, nan=-math.inf)))  # first maximum, like MATLAB max
            else:
                best = int(torch.argmax(counts[evaluated]))
            for j, i in enumerate(evaluated):
                r = peak_values[i]
                group_maps.setdefault(r, torch.zeros((batch, *size), device=x.device))[b] = up1[j].to(x.device)
                info["groups"][f"R={r}"] = {"units": int(counts[i])} | result.parts(j)
            info["selected"] = f"R={peak_values[evaluated[best]]}"
            info["code_time_s"] = timings["kde"] / batch / len(evaluated)
            maps[b] = up1[best].to(maps.dtype)
            extras_images.append(info)
        timings["maps"] = t_maps
        timings["avx"] = t_avx
        layer_maps = {f"R={r}": group_maps[r] for r in sorted(group_maps)}
        extras: dict[str, Any] = {
            "layer": layer,
            "selected": [info["selected"] for info in extras_images],
            "avx": [{k: round(v["avx"], 4) for k, v in info["groups"].items()} for info in extras_images],
            "peak_histogram": [info["peak_histogram"] for info in extras_images],
            "images": extras_images,
        }
        return MethodOutput(
            maps=maps,
            layer_maps=layer_maps,
            extras=extras,
            forward_passes=2 * batch + avx_forwards,
            backward_passes=2 * batch,
            timings=timings,
        )
