"""The AVX protocol run on a model: ADVISE selects its map with it, and the AVX metrics wrap it.

``avx_protocol`` reproduces ``iCalculateCAMmetrics.m`` of the official ADVISE code (Dehshibi et al., The
Visual Computer 2024) for G candidate map pairs of one image: it runs the model on the image and on the
image masked by each map (hit: the explained class ``c`` is among the top-5 classes on ``Ĩ``; Average
Drop ``AD = max(0, y_c - o_c) / y_c`` with ``o_c`` the **maximum** softmax probability on ``Ĩ`` over all
classes) and combines the result with the model-free steps of :mod:`convlens.numerics.avx` (masking,
class sensitivity, SSIM / FSIMc / MSE_n, miss penalty, harmonic mean).

The masked image goes through the model's own preprocessing (convlens: ``Preprocessing.normalize`` of
``Ĩ / 255``, i.e. masked pixels become black, not the mean colour), as the code re-runs the network's
input normalisation on the masked uint8 image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from convlens.core.engine import MaskedForwardEngine
from convlens.core.hooks import eval_mode
from convlens.core.targets import OutputAdapter, adapt_output, class_scores
from convlens.models.preprocessing import IMAGENET_PREPROCESSING, Preprocessing
from convlens.numerics.avx import (
    AVXOptions,
    apply_miss_penalty,
    as_maps,
    avx_mask,
    class_sensitivity,
    harmonic_avx,
    masked_similarity,
)

__all__ = ["AVXResult", "avx_protocol", "display_image_uint8"]


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


def _model_and_preprocessing(model: Any, preprocessing: Preprocessing | None) -> tuple[nn.Module, Preprocessing]:
    if hasattr(model, "module") and isinstance(model.module, nn.Module):  # LoadedModel
        return model.module, preprocessing or model.preprocessing
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a LoadedModel, got {type(model).__name__}")
    return model, preprocessing or IMAGENET_PREPROCESSING


def _checked_maps(map_top1: Any, map_top2: Any, original: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top1 = as_maps(map_top1, "map_top1")
    top2 = as_maps(map_top2, "map_top2")
    if top1.shape != top2.shape:
        raise ValueError(f"map_top1 {tuple(top1.shape)} and map_top2 {tuple(top2.shape)} differ in shape")
    if tuple(top1.shape[-2:]) != tuple(original.shape[-2:]):
        raise ValueError(
            f"maps are {tuple(top1.shape[-2:])} but the image is {tuple(original.shape[-2:])}: upsample the maps to "
            "the model input size (the image the model sees)"
        )
    return top1, top2


def _reference(module: nn.Module, x: torch.Tensor, class_id: int | None, reference_score: float | None,
               options: AVXOptions, output_adapter: OutputAdapter | None, num_classes: int | None = None
               ) -> tuple[int, float, int]:
    """The explained class ``c``, its score ``y_c`` on the unmasked image and the number of classes (no forward
    when the caller knows all three)."""
    if class_id is not None and reference_score is not None and num_classes is not None:
        if not 0 <= int(class_id) < num_classes:
            raise ValueError(f"class_id {class_id} is out of range: the model has {num_classes} classes")
        if reference_score <= 0:
            raise ValueError(f"the reference score y_c must be > 0 (Average Drop divides by it), got {reference_score}")
        return int(class_id), float(reference_score), int(num_classes)
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
    return c, y_c, n_classes


def _masked_probabilities(engine: MaskedForwardEngine, x: torch.Tensor, masks: torch.Tensor, prep: Preprocessing,
                          n_classes: int) -> torch.Tensor:
    """(G, C) class scores of the masked images: the 0-255 image times each mask, through the model's own
    normalisation (masked pixels black, i.e. 0, not the mean colour)."""
    black = prep.normalize(torch.zeros(tuple(x.shape))).to(x.device)
    classes = torch.arange(n_classes, device=x.device)
    return engine.run(x, masks[:, None].float(), classes, baseline=black).double().cpu()


def avx_protocol(
    model: Any,
    image: Any,
    map_top1: Any,
    map_top2: Any,
    *,
    class_id: int | None = None,
    reference_score: float | None = None,
    preprocessing: Preprocessing | None = None,
    options: AVXOptions | None = None,
    output_adapter: OutputAdapter | None = None,
    batch_size: int = 32,
    num_classes: int | None = None,
) -> AVXResult:
    """Run the AVX protocol (iCalculateCAMmetrics.m) on G candidate map pairs of one image.

    Args:
        model: classifier (``nn.Module`` or :class:`~convlens.models.LoadedModel`, whose preprocessing is used).
        image: the image the model sees (see :func:`display_image_uint8`).
        map_top1: (H, W) or (G, H, W) maps of the explained class in [0, 1] (ADVISE: rescaled, bicubic-upsampled).
        map_top2: maps of the runner-up class, same shape (class sensitivity only).
        class_id: explained class ``c``; default the model's top-1 class on ``image``.
        reference_score: ``y_c``; default the model's probability of ``c`` on ``image``.
        preprocessing: normalisation of the (masked) 0-255 image; default the LoadedModel's or ImageNet's.
        options: the protocol's choices (default ``AVXOptions()``: the official code).
        output_adapter: maps the model's raw output to logits.
        batch_size: masked images per forward pass.
        num_classes: the model's number of classes; with ``class_id`` and ``reference_score`` it spares the
            forward of the unmasked image (ADVISE knows all three).

    Returns:
        :class:`AVXResult` with one entry per map pair; forward passes: 1 + G (G when the forward is spared).
    """
    options = options if options is not None else AVXOptions()
    module, prep = _model_and_preprocessing(model, preprocessing)
    original = display_image_uint8(image, prep)
    top1, top2 = _checked_maps(map_top1, map_top2, original)
    device = next(module.parameters(), torch.empty(0)).device
    x = prep.normalize((original / 255.0).float()).to(device)
    c, y_c, n_classes = _reference(module, x, class_id, reference_score, options, output_adapter, num_classes)

    masks = avx_mask(top1, options)  # (G, H, W)
    engine = MaskedForwardEngine(module, score=options.score, batch_size=batch_size, output_adapter=output_adapter)
    probabilities = _masked_probabilities(engine, x, masks, prep, n_classes)
    hit = (probabilities.topk(min(options.top_k, n_classes), dim=1).indices == c).any(1)
    masked_score = probabilities.amax(1) if options.drop_score == "max_class" else probabilities[:, c]
    average_drop = torch.clamp(y_c - masked_score, min=0) / y_c

    ssim, fsimc, mse_n = masked_similarity(original[None] * masks[:, None], original)
    sensitivity, check = class_sensitivity(top1, top2, options)
    raw = {"ssim": ssim, "fsimc": fsimc, "mse_n": mse_n, "average_drop": average_drop}
    penalised, labels = apply_miss_penalty(raw, hit, check, 1 - torch.abs(y_c - masked_score), options.miss_penalty)
    return AVXResult(
        avx=harmonic_avx(penalised["ssim"], penalised["fsimc"], penalised["mse_n"], penalised["average_drop"]),
        ssim=penalised["ssim"], fsimc=penalised["fsimc"], mse_n=penalised["mse_n"],
        average_drop=penalised["average_drop"], class_sensitivity=sensitivity, sensitivity_check=check, hit=hit,
        masked_score=masked_score, reference_score=y_c, class_id=c, penalty=labels, raw=raw,
    )
