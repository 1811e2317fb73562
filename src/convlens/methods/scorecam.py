"""Score-CAM (Wang et al., CVPR-W 2020)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from convlens.core.engine import MaskedForwardEngine
from convlens.core.hooks import LayerCapture
from convlens.core.maps import minmax_normalize, upsample
from convlens.core.params import MethodParams
from convlens.methods.base import Explainer, MethodOutput, combine_layer_maps

__all__ = ["ScoreCAM", "ScoreCAMParams"]


@dataclass(frozen=True)
class ScoreCAMParams(MethodParams):
    """Score-CAM has no knobs of its own (its layers and score are explainer arguments)."""

    method = "scorecam"


class ScoreCAM(Explainer):
    """Score-CAM (Algorithm 1): each activation map ``A^k`` is up-sampled and min-max normalised to a
    mask ``H^k``; the model scores ``X ⊙ H^k`` (``S^c_k = f^c(X ⊙ H^k)``, the logit by default); the
    weights are ``alpha^c = softmax_k(S^c)`` and the map is ``ReLU(sum_k alpha_k^c A^k)``.

    The masks are streamed through the masked-forward engine in chunks of ``batch_size`` (the K x C x
    H x W tensor of masked inputs never exists). The baseline term ``f(X_b)`` of the CIC score is a
    constant shift that the softmax removes, so it is not computed.
    """

    name = "scorecam"
    paper = "Wang et al., Score-CAM, CVPR Workshops 2020"
    Params = ScoreCAMParams
    default_score = "logit"

    def _explain(self, x: torch.Tensor, class_ids: torch.Tensor, logits: torch.Tensor) -> MethodOutput:
        layers = self.layers_for(x)
        size = (x.shape[-2], x.shape[-1])
        t0 = time.perf_counter()
        with LayerCapture(self.model, layers) as cap, torch.inference_mode():
            self.model(x)
            acts = {n: cap.activations[n].float() for n in layers}
        t1 = time.perf_counter()
        engine = MaskedForwardEngine(
            self.model, score=self.score, batch_size=self.batch_size, output_adapter=self.output_adapter
        )
        per_layer: dict[str, torch.Tensor] = {}
        for name in layers:
            maps = []
            for b in range(x.shape[0]):
                a = acts[name][b]  # K x h x w
                step = self.batch_size

                def chunk(i: int, a: torch.Tensor = a, step: int = step) -> torch.Tensor | None:
                    part = a[i * step : (i + 1) * step]
                    if part.shape[0] == 0:
                        return None
                    return minmax_normalize(upsample(part, size), eps=1e-8)[:, None]

                scores = engine.run(x[b], chunk, class_ids[b])[:, 0]
                weights = torch.softmax(scores.float(), dim=0)
                maps.append(torch.relu(torch.einsum("k,khw->hw", weights, a)))
            per_layer[name] = torch.stack(maps)
        final, upsampled = combine_layer_maps(per_layer, size)
        return MethodOutput(
            maps=final,
            layer_maps=upsampled if len(layers) > 1 else {},
            forward_passes=engine.forward_passes + x.shape[0],
            timings={"activations": t1 - t0, "masked_forwards": time.perf_counter() - t1},
        )

    def params(self) -> dict[str, Any]:
        return super().params() | {"layers": self.layer_spec}
