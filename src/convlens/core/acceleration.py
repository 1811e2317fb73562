"""The GPU path of the masked-forward engine: mixed precision, batches sized from free memory, opt-in
``torch.compile``, pinned host-to-device copies.

Everything here is off by default (fp32, the method's batch size, no compilation): results do not change
unless a caller asks. The settings are *ambient* — ``with accelerated(precision="bf16", batch_size="auto"):``
around any explanation — so every method that scores masked inputs (RISE, Score-CAM, SISE, Ada-SISE,
ADVISE's AVX and the perturbation metrics) uses them without a knob of its own; an engine's explicit
``precision=`` / ``compile=`` wins over the ambient ones.

* **Precision** — ``"bf16"`` / ``"fp16"`` run the masked forwards under ``torch.autocast`` (CUDA; bf16 also
  on CPU); scores are computed in fp32 from the (B, classes) logits. The single forward + backward of the
  gradient phase stays fp32.
* **Batch size** — ``batch_size="auto"`` measures one probe forward's peak memory per masked input on the
  GPU and fills ``memory_fraction`` of the free memory (:func:`memory_batch_size`; capped); an int sets it.
* **Compilation** — ``compile=True`` (or a ``torch.compile`` mode such as ``"max-autotune-no-cudagraphs"``)
  compiles the model once per model and mode (static shapes: the full chunks and the last one); it pays on
  a GPU for thousands of forwards of one shape, not for a handful.
* **Pinned copies** — :func:`to_device` copies CPU tensors to a CUDA device through page-locked memory,
  asynchronously (RISE's masks are drawn on the CPU from a seeded generator, so they are the same on every
  device).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from convlens.core.hooks import eval_mode

__all__ = [
    "PRECISIONS",
    "Acceleration",
    "Precision",
    "accelerated",
    "autocast",
    "batch_from_memory",
    "compiled",
    "current_acceleration",
    "engine_forward",
    "engine_precision",
    "memory_batch_size",
    "to_device",
]

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Acceleration:
    """Ambient GPU-path settings (see the module docstring).

    Args:
        precision: ``fp32`` (default), ``bf16`` or ``fp16`` autocast of the masked forwards.
        compile: ``False``; ``True`` (``torch.compile`` default mode) or a mode name.
        batch_size: ``None`` (each method's own), ``"auto"`` (from free GPU memory) or an int.
        memory_fraction: the share of free GPU memory ``"auto"`` may fill.
        max_batch_size: the cap of ``"auto"``.
    """

    precision: Precision = "fp32"
    compile: bool | str = False
    batch_size: int | Literal["auto"] | None = None
    memory_fraction: float = 0.7
    max_batch_size: int = 1024

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch_size is not None and self.batch_size != "auto" and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be None, 'auto' or an integer >= 1, got {self.batch_size!r}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")


_DEFAULT = Acceleration()
_current: contextvars.ContextVar[Acceleration | None] = contextvars.ContextVar("acceleration", default=None)


def current_acceleration() -> Acceleration:
    """The settings in force (defaults outside :func:`accelerated`)."""
    return _current.get() or _DEFAULT


@contextlib.contextmanager
def accelerated(**settings: object) -> Iterator[Acceleration]:
    """Within the body, engines and explainers use these :class:`Acceleration` settings (unset ones are kept)."""
    chosen = replace(current_acceleration(), **settings)  # type: ignore[arg-type]
    token = _current.set(chosen)
    try:
        yield chosen
    finally:
        _current.reset(token)


def engine_precision(requested: str | None, legacy_autocast: bool, device: torch.device) -> Precision:
    """An engine's precision: its own, else fp16 for the former ``autocast=True`` flag on CUDA, else ambient."""
    if requested is not None:
        if requested not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
        return requested  # type: ignore[return-value]
    if legacy_autocast and device.type == "cuda":
        return "fp16"
    return current_acceleration().precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` for ``precision`` on ``device``'s type (a no-op for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"{precision} autocast runs on cuda or cpu, not {device.type}")
    return torch.autocast(device.type, dtype=dtype)


_COMPILED_ATTRIBUTE = "_convlens_compiled"


class _CompiledForms(dict):  # type: ignore[type-arg]
    """A model's compiled forward functions by ``mode:backend``, kept on the model itself: the compiled
    module refers to the model, so a cache outside it (even a ``WeakKeyDictionary``, whose values are strong
    references) would keep every model alive; on the model the two form a cycle that dies with it. A copy
    or pickle of the model (Ray ships models) gets an empty cache."""

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_CompiledForms, ())

    def __deepcopy__(self, memo: dict[int, object]) -> _CompiledForms:
        return _CompiledForms()


def compiled(model: nn.Module, mode: bool | str = True, backend: str = "inductor") -> Callable[..., object]:
    """``torch.compile(model)`` once per (model, mode, backend), static shapes; cached while the model lives
    (and collected with it: see :class:`_CompiledForms`)."""
    key = f"{mode}:{backend}"
    cache = model.__dict__.get(_COMPILED_ATTRIBUTE)
    if not isinstance(cache, _CompiledForms):
        cache = _CompiledForms()
        model.__dict__[_COMPILED_ATTRIBUTE] = cache  # a plain attribute: not a sub-module, not in state_dict
    if key not in cache:
        options = {"mode": mode} if isinstance(mode, str) else {}
        cache[key] = torch.compile(model, dynamic=False, backend=backend, **options)
    return cache[key]


def engine_forward(model: nn.Module, requested: bool | str | None) -> Callable[..., object]:
    """What an engine calls for a forward: the model, or its compiled version (own setting, else ambient)."""
    mode = current_acceleration().compile if requested is None else requested
    return compiled(model, mode) if mode else model


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` on ``device`` (and ``dtype``): a CPU tensor bound for CUDA goes through pinned memory, copied
    asynchronously; anything else is a plain ``.to``."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device=device, dtype=dtype)


def batch_from_memory(free_bytes: float, per_input_bytes: float, fraction: float, cap: int) -> int:
    """The largest batch whose inputs fit in ``fraction`` of ``free_bytes`` (at least 1, at most ``cap``)."""
    if per_input_bytes <= 0:
        return cap
    return max(1, min(cap, math.floor(fraction * free_bytes / per_input_bytes)))


_SIZES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], int]] = weakref.WeakKeyDictionary()


def memory_batch_size(
    model: nn.Module, sample: torch.Tensor, precision: str = "fp32", fraction: float = 0.7, cap: int = 1024,
    probe: int = 8,
) -> int | None:
    """Masked inputs per forward that fill ``fraction`` of the GPU's free memory (None off CUDA).

    One probe forward of ``probe`` copies of ``sample`` (C, H, W), as the engine runs it (inference mode,
    channels-last, autocast), gives the peak memory per input, plus the engine's fp32 input buffer; the
    result is cached per model, input shape and precision.
    """
    device = sample.device
    if device.type != "cuda":
        return None
    key = (tuple(sample.shape), precision, fraction, cap)
    sizes = _SIZES.setdefault(model, {})
    if key not in sizes:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        batch = sample.expand(probe, *sample.shape).contiguous(memory_format=torch.channels_last)
        with eval_mode(model), torch.inference_mode(), autocast(device, precision):
            model(batch)
        torch.cuda.synchronize(device)
        per_input = (torch.cuda.max_memory_allocated(device) - before) / probe + sample.numel() * 4
        free, _ = torch.cuda.mem_get_info(device)
        sizes[key] = batch_from_memory(free, per_input, fraction, cap)
    return sizes[key]
