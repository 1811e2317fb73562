"""RISE: Randomized Input Sampling for Explanation (Petsiuk et al., BMVC 2018)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from convlens.core.engine import MaskedForwardEngine
from convlens.core.params import MethodParams, param
from convlens.methods.base import Explainer, MethodOutput
from convlens.methods.scorecam import same_image_groups

__all__ = ["MASK_BLOCK", "RISE", "RISEParams", "rise_masks"]

MASK_BLOCK = 64
"""Masks are drawn from the seeded generator in blocks of this many, whatever ``batch_size``: the same seed
gives the same masks, so the same map, for every batch size (forwards are then cut to ``batch_size``)."""


@dataclass(frozen=True)
class RISEParams(MethodParams):
    """RISE's knobs; defaults are the paper's ImageNet settings (N = 4000, s = 7, p = 0.5)."""

    method = "rise"
    n_masks: int = param(4000, "number of random masks N (Eq. 6)", ge=1)
    grid_size: int = param(7, "side s of the coarse binary grid of a mask (Sec. 3.2)", ge=1)
    p: float = param(0.5, "probability that a grid cell is kept (Sec. 3.2)", gt=0, le=1)
    seed: int = param(0, "seed of the mask generator")


def rise_masks(
    n_masks: int,
    size: tuple[int, int],
    grid_size: int = 7,
    p: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RISE masks (Sec. 3.2): binary ``s x s`` grids with P(1) = p, bilinearly up-sampled to
    ``(s+1) * ceil(H/s)`` and cropped at a random offset in ``[0, cell)`` — smooth (N, 1, H, W) masks."""
    h, w = size
    cell_h, cell_w = math.ceil(h / grid_size), math.ceil(w / grid_size)
    grid = (torch.rand(n_masks, 1, grid_size, grid_size, generator=generator) < p).float()
    up = F.interpolate(
        grid, size=((grid_size + 1) * cell_h, (grid_size + 1) * cell_w), mode="bilinear", align_corners=False
    )
    dy = torch.randint(0, cell_h, (n_masks,), generator=generator).tolist()
    dx = torch.randint(0, cell_w, (n_masks,), generator=generator).tolist()
    masks = torch.stack([up[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(zip(dy, dx, strict=True))])
    return masks.clamp_(0.0, 1.0)  # bilinear rounding can overshoot 1 by an ulp


class RISE(Explainer):
    """RISE (Eq. 6): ``S(λ) ≈ 1/(N·p) Σ_i f(I ⊙ M_i) · M_i(λ)`` with N random smooth masks.

    Defaults from the paper: N = 4000 masks, s = 7 grid, p = 0.5, the softmax probability as score
    (:class:`RISEParams`). Masks are drawn in blocks of :data:`MASK_BLOCK` from a generator seeded with
    ``seed`` and accumulated on the fly: memory does not grow with N, and the map does not depend on
    ``batch_size``. Pass ``masks`` (N, 1, H, W) to use a fixed mask set instead
    (then ``n_masks`` is their number). Rows of a batch that hold the same image share their masked
    forwards (``forward_passes`` counts them once).
    """

    name = "rise"
    paper = "Petsiuk et al., RISE, BMVC 2018"
    uses_layers = False
    default_score = "softmax"
    Params: ClassVar[type[MethodParams]] = RISEParams
    config: RISEParams

    def __init__(self, model: Any, masks: torch.Tensor | None = None, **kwargs: Any) -> None:
        kwargs.pop("layers", None)
        super().__init__(model, **kwargs)
        self.fixed_masks = masks
        if masks is not None:
            self.config = self.config.replace(n_masks=int(masks.shape[0]))

    def _mask_stream(self, size: tuple[int, int]) -> torch.Tensor | Callable[[int], torch.Tensor | None]:
        if self.fixed_masks is not None:
            return self.fixed_masks if self.fixed_masks.ndim == 4 else self.fixed_masks[:, None]
        generator = torch.Generator().manual_seed(self.config.seed)
        n_masks, grid_size, p = self.config.n_masks, self.config.grid_size, self.config.p
        blocks = (
            rise_masks(min(MASK_BLOCK, n_masks - start), size, grid_size, p, generator)
            for start in range(0, n_masks, MASK_BLOCK)
        )
        pending: list[torch.Tensor] = []  # drawn, not yet handed out

        def chunk(i: int) -> torch.Tensor | None:
            """The next ``batch_size`` masks (fewer at the end), cut from the fixed-size blocks."""
            held = sum(len(block) for block in pending)
            while held < self.batch_size and (block := next(blocks, None)) is not None:
                pending.append(block)
                held += len(block)
            if not pending:
                return None
            masks = torch.cat(pending) if len(pending) > 1 else pending[0]
            pending[:] = [masks[self.batch_size :]] if len(masks) > self.batch_size else []
            return masks[: self.batch_size]

        return chunk

    def _explain(self, x: torch.Tensor, class_ids: torch.Tensor, logits: torch.Tensor) -> MethodOutput:
        """Rows holding the same image (one image explained for several classes) share one stream of
        masked forwards that scores all their classes; each row's map is bitwise its map alone."""
        size = (x.shape[-2], x.shape[-1])
        engine = MaskedForwardEngine(
            self.model, score=self.score, batch_size=self.batch_size, output_adapter=self.output_adapter
        )
        maps: list[torch.Tensor] = [torch.empty(0)] * x.shape[0]
        t0 = time.perf_counter()
        for group in same_image_groups(x):
            sums = [torch.zeros(size, device=x.device) for _ in group]

            def accumulate(masks: torch.Tensor, scores: torch.Tensor, accs: list[torch.Tensor] = sums) -> None:
                for t, acc in enumerate(accs):
                    acc.add_(torch.einsum("n,nhw->hw", scores[:, t].contiguous(), masks[:, 0]))

            engine.run(x[group[0]], self._mask_stream(size), class_ids[group], on_chunk=accumulate)
            for b, saliency in zip(group, sums, strict=True):
                maps[b] = saliency / (self.config.n_masks * self.config.p)
        return MethodOutput(
            maps=torch.stack(maps),
            forward_passes=engine.forward_passes,
            timings={"masked_forwards": time.perf_counter() - t0},
        )
