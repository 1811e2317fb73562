"""Targets: which class is explained for each sample, and which score of it.

* class ids are per sample; ``None``/``"auto"`` means the predicted class (arg-max);
* the score is the ``"logit"``, the ``"softmax"`` probability (single-label models) or the
  ``"sigmoid"`` probability (multi-label models);
* models that return tuples, dicts or objects with ``.logits`` go through an *output adapter* that
  returns the (B, classes) logits tensor.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

__all__ = [
    "SCORE_KINDS",
    "OutputAdapter",
    "ScoreKind",
    "TargetSpec",
    "adapt_output",
    "class_id_from_name",
    "class_scores",
    "resolve_targets",
]

ScoreKind = Literal["logit", "softmax", "sigmoid"]
SCORE_KINDS: tuple[str, ...] = ("logit", "softmax", "sigmoid")
OutputAdapter = Callable[[object], torch.Tensor]
TargetSpec = None | str | int | Sequence[int] | torch.Tensor


def adapt_output(output: object, adapter: OutputAdapter | None = None) -> torch.Tensor:
    """Turn a model's raw output into a (B, classes) logits tensor."""
    if adapter is not None:
        output = adapter(output)
    if isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(output, dict):
        if "logits" in output:
            logits = output["logits"]
        elif len(output) == 1:
            logits = next(iter(output.values()))
        else:
            raise TypeError(
                f"model returned a dict with keys {sorted(output)}: pass output_adapter=lambda o: o[KEY]"
            )
    elif hasattr(output, "logits"):
        logits = output.logits
    elif isinstance(output, list | tuple) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    else:
        raise TypeError(f"cannot read logits from a model output of type {type(output).__name__}")
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (batch, classes), got {tuple(logits.shape)}")
    return logits


def class_scores(logits: torch.Tensor, class_ids: torch.Tensor, kind: ScoreKind = "logit") -> torch.Tensor:
    """Score of ``class_ids`` in ``logits``.

    Args:
        logits: (B, classes).
        class_ids: (B,) one class per row, or (B, T) several classes per row.
        kind: ``"logit"``, ``"softmax"`` or ``"sigmoid"``.

    Returns:
        (B,) or (B, T) scores, same shape as ``class_ids``.
    """
    if kind == "logit":
        values = logits
    elif kind == "softmax":
        values = torch.softmax(logits.float(), dim=1)
    elif kind == "sigmoid":
        values = torch.sigmoid(logits.float())
    else:
        raise ValueError(f"unknown score kind {kind!r}; choose one of {SCORE_KINDS}")
    if class_ids.ndim == 1:
        return values.gather(1, class_ids[:, None].to(values.device))[:, 0]
    return values.gather(1, class_ids.to(values.device))


def resolve_targets(
    logits: torch.Tensor, targets: TargetSpec = None, class_names: Sequence[str] | None = None
) -> torch.Tensor:
    """Per-sample class ids (B,) from a target specification, validated against ``logits``.

    ``targets`` may be None/"auto" (predicted class), an int (same class for all), a class name
    (needs ``class_names``), or a sequence/tensor of B ints. Anything else (``3.7``, ``True``, a float
    tensor) is a TypeError that says what is accepted.
    """
    batch, n_classes = logits.shape
    if targets is None or (isinstance(targets, str) and targets == "auto"):
        return logits.argmax(dim=1)
    if isinstance(targets, str):
        targets = class_id_from_name(targets, class_names)
    if _is_class_id(targets):
        ids = torch.full((batch,), int(targets), dtype=torch.long)  # type: ignore[arg-type]
    else:
        ids = _class_id_sequence(targets)
        if ids.ndim != 1 or ids.numel() != batch:
            raise ValueError(f"got {ids.numel()} targets for a batch of {batch} images")
    bad = ids[(ids < 0) | (ids >= n_classes)]
    if bad.numel():
        raise ValueError(
            f"class id {int(bad[0])} is out of range: the model has {n_classes} classes (0..{n_classes - 1})"
        )
    return ids.to(logits.device)


_TARGETS_HELP = "None or 'auto' (predicted class), a class id (int), a class name, or one class id per image"


def _is_class_id(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _class_id_sequence(targets: object) -> torch.Tensor:
    """A (n,) long tensor of class ids from a tensor, array or sequence of integers; else TypeError."""
    if isinstance(targets, torch.Tensor | np.ndarray):
        tensor = torch.as_tensor(targets)
        if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
            raise TypeError(f"targets must be {_TARGETS_HELP}; got a {tensor.dtype} tensor (class ids are integers)")
        return tensor.long().reshape(-1) if tensor.ndim == 0 else tensor.long()
    if isinstance(targets, Sequence) and not isinstance(targets, str | bytes):
        wrong = next((t for t in targets if not _is_class_id(t)), None)
        if wrong is not None or not targets:
            shown = "an empty sequence" if not targets else f"{wrong!r} ({type(wrong).__name__}) among them"
            raise TypeError(f"targets must be {_TARGETS_HELP}; got {shown}")
        return torch.tensor([int(t) for t in targets], dtype=torch.long)
    raise TypeError(f"targets must be {_TARGETS_HELP}; got {targets!r} ({type(targets).__name__})")


def class_id_from_name(name: str, class_names: Sequence[str] | None) -> int:
    """Class id of ``name`` (an integer string, or a case-insensitive class name)."""
    if name.strip().lstrip("-").isdigit():
        return int(name)
    if not class_names:
        raise ValueError(f"class {name!r} given by name, but the model has no class names")
    lowered = [c.lower() for c in class_names]
    key = name.strip().lower()
    if key in lowered:
        return lowered.index(key)
    import difflib

    close = difflib.get_close_matches(key, lowered, n=3)
    hint = f"; did you mean {', '.join(repr(class_names[lowered.index(c)]) for c in close)}?" if close else ""
    raise ValueError(f"unknown class name {name!r}{hint}")
