"""Score-CAM (Wang et al., CVPR-W 2020)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from convlens.core.engine import MaskedForwardEngine
from convlens.core.hooks import LayerCapture
from convlens.core.maps import minmax_normalize, upsample
from convlens.core.params import MethodParams
from convlens.core.threads import limit_threads
from convlens.methods.base import Explainer, MethodOutput, combine_layer_maps

__all__ = ["ChannelMasks", "ScoreCAM", "ScoreCAMParams"]

MASK_EPS = 1e-8  # the normalisation epsilon of the authors' code (and pytorch-grad-cam's)


@dataclass(frozen=True)
class ScoreCAMParams(MethodParams):
    """Score-CAM has no knobs of its own (its layers and score are explainer arguments)."""

    method = "scorecam"


class ChannelMasks:
    """The masks ``H^k`` of Algorithm 1 that are not all zero, in chunks of exactly ``batch_size`` (the last
    may be shorter), generated at input resolution chunk by chunk; :attr:`zero` lists the channels whose
    mask is all zero (a spatially constant map: ``H^k = (A - min) / (max - min + eps) = 0``).

    Args:
        maps: (K, h, w) activation maps of one image.
        size: the input size (H, W).
        batch_size: masks per yielded chunk.
    """

    def __init__(self, maps: torch.Tensor, size: tuple[int, int], batch_size: int) -> None:
        self.maps = maps
        self.size = size
        self.batch_size = batch_size
        self.zero: list[int] = []
        self.scored: list[int] = []

    def __iter__(self) -> Iterator[torch.Tensor]:
        pending: list[torch.Tensor] = []
        count = 0
        for start in range(0, self.maps.shape[0], self.batch_size):
            masks = minmax_normalize(upsample(self.maps[start : start + self.batch_size], self.size), eps=MASK_EPS)
            nonzero = masks.flatten(1).amax(1) > 0
            index = torch.arange(start, start + masks.shape[0], device=masks.device)
            self.zero += index[~nonzero].tolist()
            self.scored += index[nonzero].tolist()
            pending.append(masks[nonzero])
            count += int(nonzero.sum())
            while count >= self.batch_size:
                stacked = torch.cat(pending)
                yield stacked[: self.batch_size, None]
                pending, count = [stacked[self.batch_size :]], count - self.batch_size
        if self.zero:  # the zero image, scored once for every all-zero mask: one more mask, all zeros
            pending.append(torch.zeros((1, *self.size), device=self.maps.device, dtype=pending[0].dtype))
            count += 1
        if count:
            yield torch.cat(pending)[:, None]


def same_image_groups(x: torch.Tensor) -> list[list[int]]:
    """Row indices of ``x`` (B, C, H, W) grouped by equal images, in first-appearance order (a batch of
    ``expand``-ed copies of one image, as the evaluation passes to explain one image for several classes,
    is one group): the masked forwards of a group are shared."""
    if x.shape[0] > 1 and x.stride(0) == 0:
        return [list(range(x.shape[0]))]
    groups: list[list[int]] = []
    for b in range(x.shape[0]):
        for group in groups:
            if torch.equal(x[group[0]], x[b]):
                group.append(b)
                break
        else:
            groups.append([b])
    return groups


class ScoreCAM(Explainer):
    """Score-CAM (Algorithm 1): each activation map ``A^k`` is up-sampled and min-max normalised to a
    mask ``H^k``; the model scores ``X ⊙ H^k`` (``S^c_k = f^c(X ⊙ H^k)``, the logit by default); the
    weights are ``alpha^c = softmax_k(S^c)`` and the map is ``ReLU(sum_k alpha_k^c A^k)``.

    The masks are streamed through the masked-forward engine in chunks of ``batch_size`` (the K x C x
    H x W tensor of masked inputs never exists). The baseline term ``f(X_b)`` of the CIC score is a
    constant shift that the softmax removes, so it is not computed.

    A spatially constant activation map (an all-zero ReLU/ReLU6 channel: 30-65 % of EfficientNet-Lite0's
    ``bn2`` on photos) gives the all-zero mask, so ``X ⊙ H^k`` is the same input — the zero image — for
    every such channel: it is scored once and that score is every such channel's ``S^c_k`` (exact by
    construction; ``extras["zero_masks"]`` counts them per layer and image, and
    ``forward_passes`` counts one forward per image that has any). The zero image is the last mask of the
    image's mask stream (no forward of its own).

    Rows of the batch that hold the same image (the evaluation explains one image for each of its classes
    as a batch of copies) share the activations and every masked forward: ``forward_passes`` counts them
    once, and each row's map is bitwise the map of that image and class explained alone.
    """

    name = "scorecam"
    paper = "Wang et al., Score-CAM, CVPR Workshops 2020"
    Params = ScoreCAMParams
    default_score = "logit"

    def _channel_scores(self, engine: MaskedForwardEngine, image: torch.Tensor, maps: torch.Tensor,
                        class_ids: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, int]:
        """``S^c_k`` of every channel of one image for each of its classes (K, T), and the number of
        all-zero masks (they share one forward of the zero image, the stream's last mask)."""
        masks = ChannelMasks(maps, size, self.batch_size)
        scored = engine.run(image, masks, class_ids)
        scores = torch.empty((maps.shape[0], scored.shape[1]), device=scored.device, dtype=scored.dtype)
        n_scored = len(masks.scored)
        scores[torch.as_tensor(masks.scored, dtype=torch.long, device=scored.device)] = scored[:n_scored]
        if masks.zero:
            scores[torch.as_tensor(masks.zero, dtype=torch.long, device=scored.device)] = scored[n_scored]
        return scores, len(masks.zero)

    def _explain(self, x: torch.Tensor, class_ids: torch.Tensor, logits: torch.Tensor) -> MethodOutput:
        """Rows holding the same image (one image explained for several classes) share its activations
        and masked forwards: one engine run scores all their classes."""
        layers = self.layers_for(x)
        size = (x.shape[-2], x.shape[-1])
        groups = same_image_groups(x)
        firsts = [group[0] for group in groups]
        t0 = time.perf_counter()
        with LayerCapture(self.model, layers) as cap, torch.inference_mode():
            self.model(x if len(groups) == x.shape[0] else x[firsts])
            acts = {n: cap.activations[n].float() for n in layers}
        t1 = time.perf_counter()
        engine = MaskedForwardEngine(
            self.model, score=self.score, batch_size=self.batch_size, output_adapter=self.output_adapter
        )
        per_layer: dict[str, torch.Tensor] = {}
        zero_masks: dict[str, list[int]] = {}
        for name in layers:
            maps: list[torch.Tensor] = [torch.empty(0)] * x.shape[0]
            zero_masks[name] = [0] * x.shape[0]
            for g, group in enumerate(groups):
                a = acts[name][g]  # K x h x w
                scores, n_zero = self._channel_scores(engine, x[group[0]], a, class_ids[group], size)
                with limit_threads():  # small operations (see convlens.core.threads)
                    for t, b in enumerate(group):
                        weights = torch.softmax(scores[:, t].float().contiguous(), dim=0)
                        maps[b] = torch.relu(torch.einsum("k,khw->hw", weights, a))
                        zero_masks[name][b] = n_zero
            per_layer[name] = torch.stack(maps)
        final, upsampled = combine_layer_maps(per_layer, size)
        return MethodOutput(
            maps=final,
            layer_maps=upsampled if len(layers) > 1 else {},
            extras={"zero_masks": zero_masks},
            forward_passes=engine.forward_passes + len(groups),
            timings={"activations": t1 - t0, "masked_forwards": time.perf_counter() - t1},
        )

    def params(self) -> dict[str, Any]:
        return super().params() | {"layers": self.layer_spec}
