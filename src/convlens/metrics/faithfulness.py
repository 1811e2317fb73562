"""Model-truth (faithfulness) metrics: does removing or keeping what the map points at change the score?

* :class:`DropPercent` / :class:`IncreasePercent` — SISE's protocol (top-15 % of the map kept);
* :class:`InsertionAUC` / :class:`DeletionAUC` — RISE's causal metrics (blur substrate for insertion,
  zeros for deletion, ``step`` pixels per step).

Every perturbed forward goes through the core :class:`~convlens.core.engine.MaskedForwardEngine`
(streamed chunks, one pre-allocated buffer, inference mode): the image ``x`` is never copied per mask.
Called directly, all metrics take ``(model, x, saliency, class_ids)`` with ``x`` the preprocessed batch
(B, C, H, W), ``saliency`` (B, H, W) maps (bilinearly resized to the input if needed) and one class per
image, and return one float64 score per image whose dataset mean is the published number.
``evaluate(context)`` scores the context's model, image, map and class; there a baseline or substrate
``"black"`` becomes the black pixel of the context model's input space.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, Self

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from convlens.core.engine import MaskedForwardEngine
from convlens.core.maps import minmax_normalize, upsample
from convlens.core.targets import OutputAdapter, ScoreKind
from convlens.metrics.base import Direction, Metric, MetricCategory, top_fraction_mask
from convlens.metrics.context import MetricContext, MetricValue

__all__ = [
    "CausalCurve",
    "DeletionAUC",
    "DropPercent",
    "IncreasePercent",
    "InsertionAUC",
    "ModelTruthMetric",
    "Substrate",
    "rise_blur",
    "rise_gaussian_kernel",
]

Substrate = float | torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | Literal["blur"]


def rise_gaussian_kernel(size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's blur kernel ``gkern(klen=11, nsig=5)`` (Petsiuk et al. 2018, evaluation code): a unit impulse
    in a ``size x size`` grid smoothed by ``scipy.ndimage.gaussian_filter(sigma)`` (reflecting borders, so the
    kernel sums to 1). Returns a (size, size) float32 tensor."""
    impulse = np.zeros((size, size))
    impulse[size // 2, size // 2] = 1.0
    return torch.from_numpy(gaussian_filter(impulse, sigma).astype(np.float32))


def rise_blur(x: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's insertion substrate: each channel of the (preprocessed) image convolved with
    :func:`rise_gaussian_kernel` with zero padding of ``size // 2`` (as ``conv2d(x, kern, padding=klen//2)``
    in the authors' code). Accepts (C, H, W) or (B, C, H, W)."""
    squeeze = x.ndim == 3
    batch = x[None] if squeeze else x
    channels = batch.shape[1]
    kernel = rise_gaussian_kernel(size, sigma).to(batch)[None, None].expand(channels, 1, size, size)
    out = F.conv2d(batch, kernel, padding=size // 2, groups=channels)
    return out[0] if squeeze else out


class ModelTruthMetric(Metric):
    """Base of perturbation metrics: holds the engine settings.

    Args:
        score: which score of the class the model is judged by (``softmax`` probability by default, as in
            the papers; ``sigmoid`` for multi-label models; ``logit``).
        batch_size: perturbed inputs per forward pass.
        output_adapter: maps the raw model output to (B, classes) logits.
    """

    category: ClassVar[MetricCategory] = MetricCategory.MODEL_TRUTH
    run_settings: ClassVar[tuple[str, ...]] = ("score", "batch_size")
    fill_attribute: ClassVar[str] = "baseline"  # what removed pixels become

    def __init__(self, score: ScoreKind = "softmax", batch_size: int = 64, output_adapter: OutputAdapter | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.score: ScoreKind = score
        self.batch_size = batch_size
        self.output_adapter = output_adapter

    def in_context(self, context: MetricContext) -> Self:
        """This metric with a ``"black"`` baseline/substrate resolved to the black pixel of the context
        model's input space (a copy; this object is left as it is)."""
        fill = getattr(self, self.fill_attribute, None)
        if not (isinstance(fill, str) and fill == "black"):
            return self
        resolved = copy.copy(self)
        setattr(resolved, self.fill_attribute, context.black)
        return resolved

    def engine(self, model: nn.Module) -> MaskedForwardEngine:
        return MaskedForwardEngine(
            model, score=self.score, batch_size=self.batch_size, output_adapter=self.output_adapter
        )

    @staticmethod
    def _prepare(
        x: torch.Tensor, saliency: torch.Tensor | np.ndarray, class_ids: torch.Tensor | Sequence[int] | int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"expected preprocessed images (B, C, H, W), got {tuple(x.shape)}")
        maps = torch.as_tensor(saliency).detach().float().cpu()
        if maps.ndim == 2:
            maps = maps[None]
        if maps.ndim != 3 or maps.shape[0] != x.shape[0]:
            raise ValueError(f"expected {x.shape[0]} saliency maps (B, H, W), got {tuple(maps.shape)}")
        if not torch.isfinite(maps).all():
            raise ValueError("saliency maps contain NaN or infinite values")
        maps = upsample(maps, (x.shape[-2], x.shape[-1]))
        ids = torch.as_tensor(class_ids).long().reshape(-1)
        if ids.numel() == 1 and x.shape[0] > 1:
            ids = ids.expand(x.shape[0])
        if ids.numel() != x.shape[0]:
            raise ValueError(f"got {ids.numel()} class ids for {x.shape[0]} images")
        return x, maps, ids


class _KeepTopFraction(ModelTruthMetric):
    """Shared core of Drop% and Increase%: scores of the image and of the image masked to the map."""

    def __init__(
        self,
        keep_fraction: float | None = 0.15,
        baseline: float | torch.Tensor = 0.0,
        score: ScoreKind = "softmax",
        batch_size: int = 64,
        output_adapter: OutputAdapter | None = None,
    ) -> None:
        super().__init__(score, batch_size, output_adapter)
        if keep_fraction is not None and not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1] or None, got {keep_fraction}")
        self.keep_fraction = keep_fraction
        self.baseline = baseline

    def evaluate(self, context: MetricContext) -> MetricValue:
        metric = self.in_context(context)
        return MetricValue(float(metric(context.model, context.x, context.saliency, [context.target])[0]))

    def explanation_masks(self, maps: torch.Tensor) -> torch.Tensor:
        """T(I): the binary top-``keep_fraction`` mask, or (``keep_fraction=None``) the min-max normalised map
        itself (Chattopadhay et al.'s original ``E^c ⊙ I``)."""
        if self.keep_fraction is None:
            return minmax_normalize(maps.float())
        return top_fraction_mask(maps, self.keep_fraction).float()

    def scores(
        self, model: nn.Module, x: torch.Tensor, saliency: torch.Tensor | np.ndarray, class_ids: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(original, masked) scores per image: ``Psi(I)`` and ``Psi(I ⊙ T(I))``."""
        x, maps, ids = self._prepare(x, saliency, class_ids)
        if isinstance(self.baseline, str):
            raise ValueError(
                f"baseline {self.baseline!r}: pass a number or a tensor in the model's input space, e.g. the "
                "normalised black preprocessing.normalize(torch.zeros(3, 1, 1)) (convlens evaluate maps 'black')"
            )
        keep = self.explanation_masks(maps)
        engine = self.engine(model)
        original, masked = torch.empty(x.shape[0], dtype=torch.float64), torch.empty(x.shape[0], dtype=torch.float64)
        for b in range(x.shape[0]):
            masks = torch.stack([torch.ones_like(keep[b]), keep[b]])[:, None]
            pair = engine.run(x[b], masks, ids[b], baseline=self.baseline)[:, 0].double().cpu()
            original[b], masked[b] = pair[0], pair[1]
        return original, masked


class DropPercent(_KeepTopFraction):
    r"""Drop% (Chattopadhay et al., Grad-CAM++, WACV 2018, "Average Drop", as modified by SISE,
    Sattarzadeh et al., AAAI-21, "Experiments").

    .. math:: \mathrm{Drop\%} = \frac{100}{K}\sum_{i=1}^K
              \frac{\max\big(0,\ \Psi(I_i) - \Psi(I_i \odot T(I_i))\big)}{\Psi(I_i)}

    with ``T(I)`` the binary mask of the top-15 % pixels of the map (``keep_fraction``; ``None`` uses the
    min-max normalised map itself, the Grad-CAM++ original) and ``Psi`` the class's softmax probability.
    The per-image value is ``100 max(0, y - o) / y``; lower is better. Masked-out pixels become
    ``baseline`` (0 in the model's input space by default, i.e. the image is multiplied by T after
    preprocessing, as torch-cam and the Grad-CAM++ formula do; ``convlens evaluate`` also accepts
    ``drop.baseline=black`` for a black pixel).
    """

    name: ClassVar[str] = "drop"
    direction: ClassVar[Direction] = Direction.LOWER

    def __call__(
        self, model: nn.Module, x: torch.Tensor, saliency: torch.Tensor | np.ndarray, class_ids: object
    ) -> torch.Tensor:
        original, masked = self.scores(model, x, saliency, class_ids)
        return 100.0 * torch.clamp(original - masked, min=0) / original


class IncreasePercent(_KeepTopFraction):
    r"""Increase% (Increase in Confidence, Chattopadhay et al., Grad-CAM++, WACV 2018; SISE Table 1).

    .. math:: \mathrm{Increase\%} = \frac{100}{K}\sum_{i=1}^K \mathbb{1}\big[\Psi(I_i \odot T(I_i)) > \Psi(I_i)\big]

    the percentage of images whose class score increases when only the top-15 % of the map is kept (same
    masking as :class:`DropPercent`). The SISE paper prints ``sum_i sign(...)`` without 1/K; it is read as
    this percentage. Per-image value: 100 or 0; higher is better.
    """

    name: ClassVar[str] = "increase"
    direction: ClassVar[Direction] = Direction.HIGHER

    def __call__(
        self, model: nn.Module, x: torch.Tensor, saliency: torch.Tensor | np.ndarray, class_ids: object
    ) -> torch.Tensor:
        original, masked = self.scores(model, x, saliency, class_ids)
        return 100.0 * (masked > original).double()


@dataclass
class CausalCurve:
    """Insertion or deletion curves: ``fractions`` (n+1,) of pixels changed, ``scores`` (B, n+1) and the
    per-image ``auc`` (B,)."""

    fractions: torch.Tensor
    scores: torch.Tensor
    auc: torch.Tensor


class _CausalMetric(ModelTruthMetric):
    """RISE's insertion/deletion game (Petsiuk et al., BMVC 2018, Sec. 4.1 and the authors' ``CausalMetric``).

    Pixels are ranked by decreasing saliency (stable sort: ties go to the first pixel in row-major order).
    With ``n = ceil(HW / step)`` steps, point ``i = 0..n`` scores the image with the first ``min(i * step, HW)``
    ranked pixels changed (all channels). The AUC is RISE's normalised trapezoid over the step index,
    ``(sum_i s_i - s_0/2 - s_n/2) / n`` (``spacing="rise"``), or a trapezoid over the actual fraction of
    changed pixels (``spacing="fraction"``, torch-cam's choice); the two agree when ``step`` divides HW.
    ``step=None`` uses the image width (RISE used 224 for 224 x 224 images).
    """

    direction: ClassVar[Direction] = Direction.HIGHER
    default_substrate: ClassVar[Substrate] = 0.0
    insertion: ClassVar[bool] = False
    fill_attribute: ClassVar[str] = "substrate"

    def __init__(
        self,
        step: int | None = None,
        substrate: Substrate | None = None,
        spacing: Literal["rise", "fraction"] = "rise",
        score: ScoreKind = "softmax",
        batch_size: int = 64,
        output_adapter: OutputAdapter | None = None,
    ) -> None:
        super().__init__(score, batch_size, output_adapter)
        if step is not None and step < 1:
            raise ValueError(f"step must be >= 1 pixel, got {step}")
        if spacing not in ("rise", "fraction"):
            raise ValueError(f"spacing must be 'rise' or 'fraction', got {spacing!r}")
        self.step = step
        self.substrate: Substrate = self.default_substrate if substrate is None else substrate
        self.spacing = spacing

    def _substrate(self, image: torch.Tensor) -> torch.Tensor | float:
        if isinstance(self.substrate, str):
            if self.substrate == "black":
                raise ValueError(
                    "substrate 'black' depends on the model's normalisation: pass the normalised black image, e.g. "
                    "preprocessing.normalize(torch.zeros(3, 1, 1)) (convlens evaluate does this for you)"
                )
            if self.substrate != "blur":
                raise ValueError(f"unknown substrate {self.substrate!r}: use 'blur', a number, a tensor or a callable")
            return rise_blur(image)
        if callable(self.substrate) and not isinstance(self.substrate, torch.Tensor):
            return self.substrate(image)
        return self.substrate

    def curve(
        self, model: nn.Module, x: torch.Tensor, saliency: torch.Tensor | np.ndarray, class_ids: object
    ) -> CausalCurve:
        """Curves and AUCs for a batch."""
        x, maps, ids = self._prepare(x, saliency, class_ids)
        height, width = x.shape[-2:]
        n_pixels = height * width
        step = self.step or width
        n_steps = -(-n_pixels // step)
        counts = torch.clamp(torch.arange(n_steps + 1) * step, max=n_pixels)
        fractions = counts.double() / n_pixels
        engine = self.engine(model)
        insertion = self.insertion
        batch_size = self.batch_size
        all_scores = torch.empty((x.shape[0], n_steps + 1), dtype=torch.float64)
        for b in range(x.shape[0]):
            flat = maps[b].reshape(-1)
            order = torch.argsort(flat, descending=True, stable=True)
            ranks = torch.empty_like(order)
            ranks[order] = torch.arange(n_pixels)
            ranks = ranks.reshape(1, 1, height, width)

            def chunk(i: int, ranks: torch.Tensor = ranks, batch_size: int = batch_size) -> torch.Tensor | None:
                part = counts[i * batch_size : (i + 1) * batch_size]
                if part.numel() == 0:
                    return None
                changed = ranks < part.view(-1, 1, 1, 1)  # (n, 1, H, W): the first `count` ranked pixels
                keep_original = changed if insertion else ~changed
                return keep_original.float()

            image = x[b]
            substrate = self._substrate(image)
            all_scores[b] = engine.run(image, chunk, ids[b], baseline=substrate)[:, 0].double().cpu()
        if self.spacing == "rise":
            auc = (all_scores.sum(1) - all_scores[:, 0] / 2 - all_scores[:, -1] / 2) / n_steps
        else:
            auc = torch.trapezoid(all_scores, fractions, dim=1)
        return CausalCurve(fractions=fractions, scores=all_scores, auc=auc)

    def __call__(
        self, model: nn.Module, x: torch.Tensor, saliency: torch.Tensor | np.ndarray, class_ids: object
    ) -> torch.Tensor:
        return self.curve(model, x, saliency, class_ids).auc

    def evaluate(self, context: MetricContext) -> MetricValue:
        """The AUC, with the curve (class score after each step) kept for the report."""
        metric = self.in_context(context)
        curve = metric.curve(context.model, context.x, context.saliency, [context.target])
        return MetricValue(float(curve.auc[0]), tuple(curve.scores[0].tolist()))


class InsertionAUC(_CausalMetric):
    r"""Insertion AUC (Petsiuk et al., RISE, BMVC 2018, Sec. 4.1): starting from a blurred image
    (``substrate="blur"``: RISE's 11 x 11, sigma 5 Gaussian, :func:`rise_blur`), the most salient pixels are
    restored from the original ``step`` at a time; the score is the area under the class-probability curve
    (higher is better).

    .. math:: \mathrm{AUC} = \frac{1}{n}\Big(\sum_{i=0}^{n} p_i - \frac{p_0 + p_n}{2}\Big),\quad
              p_i = \Psi\big(\tilde I + (I - \tilde I) \odot M_i\big)

    with ``M_i`` the top-``min(i * step, HW)`` pixels of the map and ``Ĩ`` the blurred image.
    """

    name: ClassVar[str] = "insertion"
    direction: ClassVar[Direction] = Direction.HIGHER
    default_substrate: ClassVar[Substrate] = "blur"
    insertion: ClassVar[bool] = True


class DeletionAUC(_CausalMetric):
    r"""Deletion AUC (Petsiuk et al., RISE, BMVC 2018, Sec. 4.1): the most salient pixels are set to the
    substrate (0 in the model's input space — ``torch.zeros_like`` of the preprocessed image in the authors'
    code) ``step`` at a time; the score is the area under the class-probability curve (lower is better).

    .. math:: \mathrm{AUC} = \frac{1}{n}\Big(\sum_{i=0}^{n} p_i - \frac{p_0 + p_n}{2}\Big),\quad
              p_i = \Psi\big(I \odot (1 - M_i) + b \odot M_i\big)
    """

    name: ClassVar[str] = "deletion"
    direction: ClassVar[Direction] = Direction.LOWER
    default_substrate: ClassVar[Substrate] = 0.0
    insertion: ClassVar[bool] = False
