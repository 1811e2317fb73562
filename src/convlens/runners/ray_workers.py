"""The callable classes a Ray Data actor pool runs (:mod:`convlens.runners.ray_engine`): one per worker.

Each class is built once per actor — its constructor receives the run's state (the model with its
explainers, or the evaluation's :class:`~convlens.runners.evaluate_item.ItemEvaluator`) deserialised
once, moves the model to the worker's device and sets the worker's torch threads — and is then called on
batches of rows ``{"position": int, "payload": bytes}``. It returns ``{"position", "result"}`` with each
result pickled. Nothing here writes into the run's output folder: results go back to the driver, which
stores them through the same store as the embedded engine. This module imports no Ray.
"""

from __future__ import annotations

import dataclasses
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convlens.core.engine import report_progress
from convlens.models import LoadedModel
from convlens.models.images import ImageLoadError
from convlens.runners.evaluate_item import ItemEvaluator
from convlens.runners.explain_image import ImageSettings, explain_image

__all__ = ["EvaluateWorker", "ExplainState", "ExplainWorker", "ImageOutcome", "explain_bytes"]


def _set_threads(threads: int) -> None:
    """The worker's torch intra-op threads, set explicitly (Ray reserves ``threads`` CPUs for the actor)."""
    torch.set_num_threads(max(1, int(threads)))


class EvaluateWorker:
    """``convlens evaluate`` on one worker: ``ItemEvaluator(item) -> ItemResult`` per row.

    Args:
        evaluator: the driver's evaluator, or its pickled state (``ItemEvaluator.__getstate__``: settings,
            dataset and model), from which the evaluator is built here once, for this worker's device.
        device: where this worker runs the model (``cpu`` or ``cuda``: Ray assigns the GPU).
        threads: torch intra-op threads of this worker.
    """

    def __init__(self, evaluator: ItemEvaluator | dict[str, Any], device: str, threads: int) -> None:
        _set_threads(threads)
        state = evaluator.__getstate__() if isinstance(evaluator, ItemEvaluator) else evaluator
        config = state["config"]
        if torch.device(device) != torch.device(config.device):
            config = dataclasses.replace(config, device=device)
        if isinstance(evaluator, ItemEvaluator) and config is evaluator.config:
            self.evaluator = evaluator  # already built for this device
            return
        state["loaded"].module.to(torch.device(device)).eval()
        self.evaluator = ItemEvaluator(config, state["dataset"], state["loaded"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [pickle.dumps(self.evaluator(pickle.loads(payload))) for payload in batch["payload"]]
        return {"position": np.asarray(batch["position"]), "result": _object_array(results)}


@dataclass
class ExplainState:
    """What every ``convlens explain`` worker needs: the model, its explainers (sharing the model: shipped
    as one object) and the settings every image shares."""

    loaded: LoadedModel
    explainers: dict[str, Any]
    settings: ImageSettings


@dataclass
class ImageOutcome:
    """One image explained on a worker: its folder's files (relative path -> bytes) and record, or the
    reason it is unusable (``error``, naming the worker's copy ``worker_path``); the masked forwards spent."""

    files: dict[str, bytes]
    record: dict[str, Any] | None
    error: str | None = None
    worker_path: str | None = None
    masked_forwards: int = 0


def explain_bytes(state: ExplainState, name: str, data: bytes, scratch: Path) -> ImageOutcome:
    """Explain one image given as its file's bytes (saved as ``name`` in a private folder under ``scratch``)
    with :func:`~convlens.runners.explain_image.explain_image`; the folder's files come back as bytes."""
    work = Path(tempfile.mkdtemp(prefix="image-", dir=scratch))
    try:
        source = work / "input" / name
        source.parent.mkdir()
        source.write_bytes(data)
        folder = work / "output"
        folder.mkdir()
        forwards = [0]
        try:
            with report_progress(lambda n: forwards.__setitem__(0, forwards[0] + n)):
                record = explain_image(source, state.loaded, state.explainers, state.settings, folder)
        except ImageLoadError as exc:
            return ImageOutcome({}, None, str(exc), str(source))
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return ImageOutcome(files, record, masked_forwards=forwards[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)


class ExplainWorker:
    """``convlens explain`` on one worker: rows ``{"position", "payload"}`` with ``payload`` the pickled
    ``(file name, file bytes)`` of an image; each result is a pickled :class:`ImageOutcome`.

    Args:
        state: the model, explainers and settings (deserialised once per actor).
        device: where this worker runs the model.
        threads: torch intra-op threads of this worker.
    """

    def __init__(self, state: ExplainState, device: str, threads: int) -> None:
        _set_threads(threads)
        state.loaded.module.to(torch.device(device)).eval()  # the explainers hold the same module
        self.state = state
        self.scratch = Path(tempfile.mkdtemp(prefix="convlens-ray-"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for payload in batch["payload"]:
            name, data = pickle.loads(payload)
            results.append(pickle.dumps(explain_bytes(self.state, name, data, self.scratch)))
        return {"position": np.asarray(batch["position"]), "result": _object_array(results)}

    def __del__(self) -> None:
        scratch = getattr(self, "scratch", None)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _object_array(values: list[bytes]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array
