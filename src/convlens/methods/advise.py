"""ADVISE: ADaptive feature relevance and VISual Explanations (Dehshibi et al., The Visual Computer 2024).

ADVISE groups the units of one layer by how many modes their activations have and explains the class by
the group whose map scores best. It follows the official MATLAB code (``imADVISE.m``, ``iComputeSum.m``,
``ADVISEkernel.m``, ``iCalculateCAMmetrics.m``):

1. one forward: probabilities and the feature maps ``A`` (K x h x w) of one layer; ``c1`` = the explained
   class (the predicted one by default), ``c2`` = the runner-up (imADVISE.m l.12-27);
2. relevance ``R_k`` = number of peaks of the locally adaptive bandwidth KDE
   (:func:`convlens.numerics.kde.ssvkernel`) of unit k's ``Z = h*w`` raw values on ``linspace(0, 1, Z)``;
   0 where the KDE fails (l.30-45);
3. gradients ``G1``, ``G2`` of the *probabilities* of ``c1`` and ``c2`` (one forward, one backward per class, l.50-53);
4. per peak count r with units ``S_r = {k : R_k = r}``: ``M1 = ReLU(sum_{k in S_r} w1_k A_k)``, ``w1_k`` the
   spatial mean of ``G1_k`` (Grad-CAM within the group, iComputeSum.m), likewise ``M2``; both rescaled to
   [0, 1] and bicubic-upsampled (MATLAB ``imresize``, l.79-85); groups with an all-zero ``M1`` are skipped;
5. the group with the highest AVX (:func:`convlens.methods.advise_avx.avx_protocol`) is the explanation.

Why the code: the paper leaves these steps open and its figures come from the code, so every quirk of the
code is an option of :class:`ADVISEParams` whose default is the code's behaviour.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from convlens.core.hooks import LayerCapture
from convlens.core.maps import minmax_exact, upsample
from convlens.core.params import MethodParams, param
from convlens.core.targets import adapt_output, class_scores
from convlens.core.threads import limit_threads
from convlens.methods.advise_avx import AVXResult, avx_protocol
from convlens.methods.base import Explainer, MethodOutput
from convlens.models.preprocessing import IMAGENET_PREPROCESSING, Preprocessing
from convlens.numerics.avx import AVXOptions, DropScore, MaskMode, MissPenalty, NanCorrelation
from convlens.numerics.kde import KDEConvention, linspace_like_numpy, ssvkernel
from convlens.numerics.peaks import count_peaks
from convlens.numerics.resize import imresize_bicubic

__all__ = ["ADVISE", "PAPER_LAYERS", "ADVISEParams", "PeakGroups", "paper_layer", "unit_relevance"]

UpsampleMode = Literal["bicubic_matlab", "bicubic", "bilinear"]
Selection = Literal["avx", "largest"]

# feature layers of imMain.m l.22-56 in torchvision / timm module names
PAPER_LAYERS: dict[str, str] = {
    "alexnet": "features.10",  # MATLAB layer 14 'conv5', before relu5 (13 x 13 x 256)
    "vgg16": "features.28",  # MATLAB layer 30 'conv5_3', before relu5_3 (14 x 14 x 512)
    "resnet50": "layer4",  # MATLAB 'activation_49_relu': output of the last bottleneck, after its ReLU (7 x 7 x 2048)
    "legacy_xception": "conv4",  # Keras 'block14_sepconv2' before BN and ReLU (10 x 10 x 2048 at 299 x 299)
}


@dataclass(frozen=True)
class ADVISEParams(MethodParams):
    """ADVISE's knobs; every default is the official code's behaviour (its quirks made explicit).

    ``normalize_activations=False``: the KDE sees raw activations, so only values in [0, 1] count (``True``
    is the "natural" reading of per-unit relevance). ``selection="avx"`` chooses the final map by the
    evaluation metric itself, so ADVISE's own AVX is a maximum over groups; ``"largest"`` does not look at
    the metric (for fair AVX comparisons). ``kde_min_distinct=2`` fails units with one distinct in-range
    value, which ADVISEkernel.m fits. The ``avx_*`` options: see :class:`~convlens.numerics.avx.AVXOptions`.
    """

    method = "advise"
    n_bandwidths: int = param(10, "M, bandwidths examined by the adaptive KDE (code: kernelRepeat = 10)", ge=2)
    kde_convention: KDEConvention = param("matlab", "KDE as ADVISEkernel.m ('matlab') or the PyPI port adaptivekde")
    kde_min_distinct: int | None = param(None, "fail units with fewer distinct in-range values (None: no rule)", ge=1)
    normalize_activations: bool = param(False, "min-max normalise every unit before the KDE (code: raw values)")
    upsample: UpsampleMode = param("bicubic_matlab", "group-map up-sampling: MATLAB imresize, torch bicubic, bilinear")
    selection: Selection = param("avx", "final map: the group with the best AVX (code) or the largest group")
    avx_mask: MaskMode = param("binary", "AVX masked image: M1 >= 0.5 (the code's uint8 cast) or the soft map")
    avx_drop_score: DropScore = param("max_class", "AVX Average Drop: max class on the masked image (code) or c1")
    avx_miss_penalty: MissPenalty = param("code", "AVX miss penalty: the code's, monotone, or none")
    avx_nan_correlation: NanCorrelation = param("fails_check", "an undefined class sensitivity fails the check")

    def avx_options(self) -> AVXOptions:
        """The AVX protocol's options these parameters choose."""
        return AVXOptions(mask=self.avx_mask, drop_score=self.avx_drop_score, miss_penalty=self.avx_miss_penalty,
                          nan_correlation=self.avx_nan_correlation)


def paper_layer(model_name: str) -> str:
    """The feature layer the ADVISE paper/code uses for ``model_name`` (torchvision ``alexnet``, ``vgg16``,
    ``resnet50``; timm ``legacy_xception`` — also accepted as ``xception`` or ``timm:legacy_xception``).

    The paper's layers are AlexNet ``conv5`` and VGG16 ``conv5_3`` *before* their ReLU, ResNet-50's last ReLU
    and Xception's last separable convolution before BN/ReLU. ADVISE's default ``layers="last"`` gives the
    post-ReLU outputs for AlexNet (``features.11``) and VGG16 (``features.29``), the same layer for ResNet-50
    (``layer4``) and the post-BN-ReLU ``act4`` for timm's ``legacy_xception``."""
    key = model_name.strip().lower().removeprefix("timm:")
    key = {"xception": "legacy_xception"}.get(key, key)
    if key not in PAPER_LAYERS:
        raise ValueError(
            f"no ADVISE paper layer for {model_name!r}: the paper used {', '.join(PAPER_LAYERS)}; pass layers=NAME"
        )
    return PAPER_LAYERS[key]


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
        convention, min_distinct: see :func:`convlens.numerics.kde.ssvkernel`.
        normalize: min-max normalise every non-constant unit to [0, 1] first (not in the code: it uses raw
            values); a constant unit keeps its value.
        return_fitted: also return the (B, K) mask of units whose KDE produced a density.

    Returns:
        (B, K) peak counts (0 where the KDE fails), and the fitted mask if asked.
    """
    batch, channels = activations.shape[:2]
    rows = activations.detach().flatten(2).reshape(batch * channels, -1).double()
    if normalize:
        constant = rows.amax(1, keepdim=True) == rows.amin(1, keepdim=True)
        rows = torch.where(constant, rows, minmax_exact(rows, dims=1))
    grid = linspace_like_numpy(0.0, 1.0, rows.shape[1], torch.float64, rows.device)
    result = ssvkernel(rows, grid, n_bandwidths=n_bandwidths, convention=convention, min_distinct=min_distinct)
    peaks = torch.where(result.valid, count_peaks(result.density), 0).view(batch, channels)
    return (peaks, result.valid.view(batch, channels)) if return_fitted else peaks


@dataclass
class PeakGroups:
    """One image's units grouped by their KDE peak count ``R`` (imADVISE.m l.61-100, iComputeSum.m).

    Attributes:
        peak_values: the peak counts r = min R .. max R.
        counts: (P,) units per peak count.
        maps_top1: (P, h, w) ``rescale(ReLU(sum_{k in S_r} w1_k A_k))`` per group (explained class).
        maps_top2: the same with the runner-up's weights ``w2``.
        evaluated: indices of the groups with units and a non-zero ``maps_top1`` (the AVX candidates).
    """

    peak_values: list[int]
    counts: torch.Tensor
    maps_top1: torch.Tensor
    maps_top2: torch.Tensor
    evaluated: list[int]

    @classmethod
    @limit_threads()
    def of(cls, relevance: torch.Tensor, activations: torch.Tensor, weights_top1: torch.Tensor,
           weights_top2: torch.Tensor) -> PeakGroups:
        """Groups from (K,) peak counts, (K, h, w) activations and (K,) Grad-CAM weights of both classes."""
        peak_values = list(range(int(relevance.min()), int(relevance.max()) + 1))
        member = torch.stack([relevance == r for r in peak_values]).float()  # (P, K) group membership
        counts = member.sum(1)
        cam1 = torch.relu(torch.einsum("pk,khw->phw", member * weights_top1, activations))
        cam2 = torch.relu(torch.einsum("pk,khw->phw", member * weights_top2, activations))
        scaled1, scaled2 = minmax_exact(cam1), minmax_exact(cam2)  # MATLAB rescale
        evaluated = [i for i in range(len(peak_values)) if counts[i] > 0 and float(scaled1[i].sum()) > 0]
        return cls(peak_values, counts, scaled1, scaled2, evaluated)

    def histogram(self) -> dict[str, int]:
        """Units per peak count (non-empty groups only), JSON-ready."""
        return {str(r): int(c) for r, c in zip(self.peak_values, self.counts.tolist(), strict=True) if c > 0}


class ADVISE(Explainer):
    """ADVISE (Dehshibi et al. 2024): units grouped by the number of modes of their adaptive-bandwidth KDE;
    one Grad-CAM-style map per group; the group with the best AVX score is the explanation.

    Masked images: the code masks the uint8 image and re-runs the network's input normalisation; here the
    image the model sees is recovered as ``round(255 * preprocessing.denormalize(x))`` (exact for inputs
    made by the preprocessing from 8-bit images) and the masked image goes through ``preprocessing.normalize``
    (masked pixels are black). The result keeps every evaluated group's map (``layer_maps["R=r"]``), the
    peak-count histogram, the AVX parts per group, and besides the full timings the code's own reported time
    (``extras["code_time_s"]``: KDE time / number of groups).

    Args (beyond :class:`~convlens.methods.base.Explainer`'s and the knobs of :class:`ADVISEParams`):
        preprocessing: the model's input normalisation (taken from a LoadedModel; default ImageNet).
    """

    name: ClassVar[str] = "advise"
    paper: ClassVar[str] = "Dehshibi et al., ADVISE, The Visual Computer 40(8):5407-5419, 2024 (arXiv 2203.01289)"
    default_score = "softmax"
    default_layers = "last"
    Params: ClassVar[type[MethodParams]] = ADVISEParams
    config: ADVISEParams

    def __init__(self, model: Any, preprocessing: Preprocessing | None = None, **kwargs: Any) -> None:
        loaded_preprocessing = getattr(model, "preprocessing", None)
        if not isinstance(loaded_preprocessing, Preprocessing):
            loaded_preprocessing = None
        super().__init__(model, **kwargs)
        self.preprocessing = preprocessing or loaded_preprocessing or IMAGENET_PREPROCESSING

    @property
    def avx_options(self) -> AVXOptions:
        return self.config.avx_options()

    @limit_threads()
    def _upsample(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.config.upsample == "bicubic_matlab":
            return imresize_bicubic(maps, size)
        if self.config.upsample == "bicubic":
            return F.interpolate(maps[:, None].float(), size=size, mode="bicubic", align_corners=False)[:, 0]
        return upsample(maps, size)

    def _feature_maps(self, x: torch.Tensor, class_ids: torch.Tensor, runner_up: torch.Tensor
                      ) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1 and 3: the layer, its activations and the gradients of both classes' scores (B, K, h, w)."""
        layers = self.layers_for(x)
        if len(layers) != 1:
            raise ValueError(
                f"ADVISE uses one feature layer, got {len(layers)} ({', '.join(layers)}): pass layers=NAME"
            )
        layer = layers[0]
        with torch.enable_grad(), LayerCapture(self.model, [layer], keep_graph=True) as capture:
            logits = adapt_output(self.model(x.detach().clone().requires_grad_(True)), self.output_adapter)
            acts = capture.activations[layer]
            # one forward, one backward per class (imADVISE.m: dlgradient of each class's probability)
            grads = [torch.autograd.grad(class_scores(logits, ids, self.score).sum(), acts, retain_graph=True,
                                         allow_unused=True)[0] for ids in (class_ids, runner_up)]
        if grads[0] is None or grads[1] is None:
            raise ValueError(f"the target score does not depend on layer {layer!r}: pick a layer before the head")
        activations = acts.detach().float()
        if activations.ndim != 4 or activations.shape[2] * activations.shape[3] < 3:
            raise ValueError(
                f"layer {layer!r} gives {tuple(activations.shape)}: ADVISE needs (B, K, h, w) maps with h*w >= 3 "
                "(the KDE grid has h*w points); pick an earlier layer"
            )
        return layer, activations, grads[0].float(), grads[1].float()

    @limit_threads()
    def _fallback_map(self, activations: torch.Tensor, weights: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """No peak group gives a non-zero map: Grad-CAM over all units, rescaled and up-sampled."""
        cam = torch.relu(torch.einsum("k,khw->hw", weights, activations))
        return self._upsample(minmax_exact(cam)[None], size)[0]

    def _avx(self, x: torch.Tensor, up1: torch.Tensor, up2: torch.Tensor, class_id: int, reference: float,
             num_classes: int) -> AVXResult:
        """Step 5: the AVX protocol of the evaluated groups' maps on the image the model sees (the unmasked
        image's score y_c is step 1's, on ``x`` itself: no extra forward). The masked images are built from
        ``round(255 * denormalize(x))``; for an ``x`` made from 8-bit pixels (every image convlens loads) that is
        the same picture, so y_c and the masked scores o_c come from the same pixels; for an ``x`` resampled in
        float, y_c is the unrounded image's score."""
        image = self.preprocessing.denormalize(x.detach().float().cpu())
        return avx_protocol(
            self.model, image, up1.cpu(), up2.cpu(), class_id=class_id, reference_score=reference,
            preprocessing=self.preprocessing, options=self.avx_options, output_adapter=self.output_adapter,
            batch_size=self.batch_size, num_classes=num_classes,
        )

    def _best(self, groups: PeakGroups, result: AVXResult) -> int:
        """Position (among ``groups.evaluated``) of the selected group."""
        if self.config.selection == "avx":
            return int(torch.argmax(torch.nan_to_num(result.avx, nan=-math.inf)))  # first maximum, like MATLAB max
        return int(torch.argmax(groups.counts[groups.evaluated]))

    def _explain(self, x: torch.Tensor, class_ids: torch.Tensor, logits: torch.Tensor) -> MethodOutput:
        batch, size = x.shape[0], (x.shape[-2], x.shape[-1])
        probabilities = torch.softmax(logits.float(), dim=1)
        others = probabilities.clone()
        others[torch.arange(batch), class_ids] = -1.0
        runner_up = others.argmax(dim=1)  # c2: top-2 class (the best class other than the explained one)
        timings: dict[str, float] = {"maps": 0.0, "avx": 0.0}
        t0 = time.perf_counter()
        layer, activations, grad_top1, grad_top2 = self._feature_maps(x, class_ids, runner_up)
        timings["forward_backward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        relevance, fitted = unit_relevance(
            activations, self.config.n_bandwidths, self.config.kde_convention, self.config.kde_min_distinct,
            self.config.normalize_activations, return_fitted=True,
        )
        timings["kde"] = time.perf_counter() - t0
        weights_top1 = grad_top1.mean(dim=(2, 3))  # (B, K) Grad-CAM weights, restricted to groups below
        weights_top2 = grad_top2.mean(dim=(2, 3))
        maps = torch.zeros((batch, *size), device=x.device)
        group_maps: dict[int, torch.Tensor] = {}
        images: list[dict[str, Any]] = []
        for b in range(batch):
            t0 = time.perf_counter()
            groups = PeakGroups.of(relevance[b], activations[b], weights_top1[b], weights_top2[b])
            timings["maps"] += time.perf_counter() - t0
            info: dict[str, Any] = {
                "classes": [int(class_ids[b]), int(runner_up[b])],
                "peak_histogram": groups.histogram(),
                "kde_failed_units": int((~fitted[b]).sum()),  # no density: R = 0 (they join group R=0)
                "groups": {},
                "selected": None,
            }
            images.append(info)
            if not groups.evaluated:
                maps[b] = self._fallback_map(activations[b], weights_top1[b], size).to(maps.dtype)
                info["fallback"] = "no peak group gives a non-zero map: Grad-CAM over all units"
                continue
            up1, result, best = self._score_groups(x[b], groups, int(class_ids[b]), probabilities[b], timings)
            for j, i in enumerate(groups.evaluated):
                r = groups.peak_values[i]
                group_maps.setdefault(r, torch.zeros((batch, *size), device=x.device))[b] = up1[j].to(x.device)
                info["groups"][f"R={r}"] = {"units": int(groups.counts[i])} | result.parts(j)
            info["selected"] = f"R={groups.peak_values[groups.evaluated[best]]}"
            info["code_time_s"] = timings["kde"] / batch / len(groups.evaluated)
            maps[b] = up1[best].to(maps.dtype)
        return MethodOutput(
            maps=maps,
            layer_maps={f"R={r}": group_maps[r] for r in sorted(group_maps)},
            extras=self._extras(layer, images),
            forward_passes=batch + sum(len(info["groups"]) for info in images),
            backward_passes=2 * batch,
            timings={key: timings[key] for key in ("forward_backward", "kde", "maps", "avx")},
        )

    def _score_groups(self, x: torch.Tensor, groups: PeakGroups, class_id: int, probabilities: torch.Tensor,
                      timings: dict[str, float]) -> tuple[torch.Tensor, AVXResult, int]:
        """Steps 4-5 for one image (``probabilities``: its softmax, (C,)): the evaluated groups' up-sampled maps
        of the explained class, their AVX values and the position of the selected group."""
        t0 = time.perf_counter()
        size = (x.shape[-2], x.shape[-1])
        up1 = self._upsample(groups.maps_top1[groups.evaluated], size)
        up2 = self._upsample(groups.maps_top2[groups.evaluated], size)
        timings["maps"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        result = self._avx(x, up1, up2, class_id, float(probabilities[class_id]), probabilities.numel())
        timings["avx"] += time.perf_counter() - t0
        return up1, result, self._best(groups, result)

    @staticmethod
    def _extras(layer: str, images: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "layer": layer,
            "selected": [info["selected"] for info in images],
            "avx": [{k: round(v["avx"], 4) for k, v in info["groups"].items()} for info in images],
            "peak_histogram": [info["peak_histogram"] for info in images],
            "images": images,
        }
