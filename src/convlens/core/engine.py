"""The masked-forward engine: scores of ``baseline + (x - baseline) ⊙ m`` for a stream of masks.

RISE, Score-CAM, SISE and the perturbation metrics (Drop%, insertion/deletion, AVX) all spend their
time here. The engine

* streams masks in chunks of ``batch_size`` (a tensor of masks, an iterable of chunks, or a callable
  producing chunk ``i``): the N x C x H x W tensor of masked inputs never exists;
* writes each masked chunk into one pre-allocated buffer (``torch.mul(..., out=)``), so the hot loop
  allocates nothing but the model's own activations;
* runs under ``torch.inference_mode`` in eval mode (the model's flags are restored), optionally with
  channels-last memory format (faster convolutions on recent CPUs and GPUs), bf16/fp16 autocast and a
  compiled model (:mod:`convlens.core.acceleration`: off unless asked);
* returns only the requested target scores (N x T), and optionally hands each chunk with its scores
  to ``on_chunk`` for streaming accumulation (RISE's saliency sum).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from convlens.core.acceleration import autocast, engine_forward, engine_precision, to_device
from convlens.core.hooks import eval_mode
from convlens.core.targets import OutputAdapter, ScoreKind, adapt_output, class_scores

__all__ = ["MaskSource", "MaskedForwardEngine", "channels_last_model", "report_progress"]

MaskSource = torch.Tensor | Iterable[torch.Tensor]
ChunkCallback = Callable[[torch.Tensor, torch.Tensor], None]

ProgressCallback = Callable[[int], None]
_progress: contextvars.ContextVar[ProgressCallback | None] = contextvars.ContextVar("engine_progress", default=None)


@contextlib.contextmanager
def report_progress(callback: Callable[[int], None]) -> Iterator[None]:
    """Within the body, every engine calls ``callback(n)`` after scoring a chunk of n masked inputs
    (progress bars in the CLI without threading callbacks through every method)."""
    token = _progress.set(callback)
    try:
        yield
    finally:
        _progress.reset(token)


@contextlib.contextmanager
def channels_last_model(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Convert 4-D parameters to channels-last for the body and back to their own strides afterwards.

    Exactly back: a (C, 1, k, k) depthwise weight is "contiguous" in both layouts, so ``.contiguous()``
    would keep the channels-last strides, which select other convolution kernels (results 1 ulp apart).
    """
    if not enabled:
        yield model
        return
    strides = [(p, p.stride()) for p in model.parameters() if p.ndim == 4]
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        for p, stride in strides:
            if p.data.stride() != stride:
                p.data = torch.empty_strided(p.shape, stride, dtype=p.dtype, device=p.device).copy_(p.data)


def _one_image(x: torch.Tensor) -> torch.Tensor:
    """``x`` as (C, H, W): one image, given as (C, H, W) or (1, C, H, W)."""
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"the engine scores masks of one image; got a batch of {x.shape[0]}")
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"expected an image of shape (C, H, W), got {tuple(x.shape)}")
    return x


@dataclass
class MaskedForwardEngine:
    """Score masked copies of one image.

    Args:
        model: the classifier.
        score: which score of the target classes to return (``logit``/``softmax``/``sigmoid``).
        batch_size: masked inputs per forward pass.
        output_adapter: maps the raw model output to (B, classes) logits.
        channels_last: use channels-last memory format (default: on for CPU and CUDA).
        autocast: fp16 autocast on CUDA (ignored on CPU); ``precision`` says more.
        precision: ``fp32`` / ``bf16`` / ``fp16`` autocast of the masked forwards (default: the ambient
            :func:`convlens.core.acceleration.accelerated` setting, fp32 unless asked).
        compile: ``torch.compile`` the model for the masked forwards (True or a mode; default: ambient, off).
    """

    model: nn.Module
    score: ScoreKind = "softmax"
    batch_size: int = 64
    output_adapter: OutputAdapter | None = None
    channels_last: bool = True
    autocast: bool = False
    precision: str | None = None
    compile: bool | str | None = None
    forward_passes: int = field(default=0, init=False)

    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def _chunks(self, masks: MaskSource | Callable[[int], torch.Tensor | None]) -> Iterator[torch.Tensor]:
        if isinstance(masks, torch.Tensor):
            if masks.ndim == 3:
                masks = masks[:, None]
            for start in range(0, masks.shape[0], self.batch_size):
                yield masks[start : start + self.batch_size]
        elif callable(masks):
            i = 0
            while (chunk := masks(i)) is not None:
                yield from self._chunks(chunk)
                i += 1
        else:
            for chunk in masks:
                yield from self._chunks(chunk)

    def run(
        self,
        x: torch.Tensor,
        masks: MaskSource | Callable[[int], torch.Tensor | None],
        class_ids: torch.Tensor | int | list[int],
        baseline: torch.Tensor | float = 0.0,
        on_chunk: ChunkCallback | None = None,
    ) -> torch.Tensor:
        """Scores (N, T) of ``class_ids`` for every mask.

        Args:
            x: one image, (C, H, W) or (1, C, H, W), already preprocessed for the model.
            masks: (N, 1|C, H, W) or (N, H, W) tensor, an iterable of such chunks, or a callable
                ``chunk(i)`` returning the i-th chunk or None when done. Values are usually in [0, 1].
            class_ids: target classes T (int or 1-D).
            baseline: what masked-out pixels become (0 in the model's input space by default; a tensor
                broadcastable to x, e.g. a blurred image or the dataset mean).
            on_chunk: called as ``on_chunk(mask_chunk, scores_chunk)`` for streaming accumulation.
        """
        device = self._device()
        x = _one_image(x).to(device)
        ids = torch.as_tensor(class_ids, device=device).long().reshape(-1)
        delta = x
        base = None
        if not (isinstance(baseline, float | int) and baseline == 0):
            base = torch.as_tensor(baseline, device=device, dtype=x.dtype).expand_as(x).contiguous()
            delta = x - base
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        buffer = torch.empty((self.batch_size, *x.shape), device=device, dtype=x.dtype).to(
            memory_format=memory_format
        )
        precision = engine_precision(self.precision, self.autocast, device)
        forward = engine_forward(self.model, self.compile)
        progress = _progress.get()
        outputs: list[torch.Tensor] = []
        # parameters change memory format outside inference mode, so they never become inference tensors
        with eval_mode(self.model), channels_last_model(self.model, self.channels_last), torch.inference_mode():
            for chunk in self._chunks(masks):
                chunk = to_device(chunk, device, x.dtype)  # pinned, asynchronous from CPU to CUDA
                n = chunk.shape[0]
                if n > buffer.shape[0]:
                    buffer = torch.empty((n, *x.shape), device=device, dtype=x.dtype).to(
                        memory_format=memory_format
                    )
                batch = buffer[:n]
                torch.mul(delta, chunk, out=batch)
                if base is not None:
                    batch.add_(base)
                with autocast(device, precision):
                    logits = adapt_output(forward(batch), self.output_adapter)
                scores = class_scores(logits.float(), ids.expand(n, -1), self.score)
                self.forward_passes += n
                if on_chunk is not None:
                    on_chunk(chunk, scores)
                if progress is not None:
                    progress(n)
                outputs.append(scores)
        if not outputs:
            return torch.empty((0, ids.numel()), device=device)
        return torch.cat(outputs)
