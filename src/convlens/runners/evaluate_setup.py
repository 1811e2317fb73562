"""Building an evaluation run: its settings, their validation, the dataset and the model.

Nothing here writes a file: every user error is found (one :class:`EvaluationError` with one clear
message) before the output folder is touched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from convlens.core.devices import DeviceError, check_device
from convlens.data.base import ImageDataset
from convlens.methods.registry import METHODS, get_method
from convlens.metrics.registry import get_metric_spec, metric_class
from convlens.models.zoo import LoadedModel
from convlens.runners.explain_image import file_digest
from convlens.runners.store import OutputFolderError, check_run_folder

__all__ = [
    "PRESETS",
    "EvaluationConfig",
    "EvaluationError",
    "align_labels",
    "build_dataset",
    "check_config",
    "check_dataset",
    "check_out",
    "load_evaluation_model",
    "load_model_for",
    "prepare_model",
    "weights_digest",
]

logger = logging.getLogger("convlens.evaluate")

# the SISE paper's Table 1 protocol: VOC 2007 test boxes, each annotated class explained
PRESETS: dict[str, dict[str, Any]] = {
    "sise-voc2007": {
        "data_format": "voc",
        "split": "test",
        "metrics": ["ebpg", "miou", "bbox", "drop", "increase"],
        "methods": ["gradcam", "gradcampp", "rise", "scorecam", "sise"],
        "targets": "label",
        "metric_score": "sigmoid",  # TorchRay's VOC models are multi-label (one sigmoid per class)
        # sampling methods score the explained class by its sigmoid too (Grad-CAM family: the logit)
        "method_params": {"rise": {"score": "sigmoid"}, "sise": {"score": "sigmoid"}, "adasise": {"score": "sigmoid"}},
        "needs_weights": True,
    },
}


class EvaluationError(ValueError):
    """A user error in the evaluation settings (one clear message)."""


@dataclass
class EvaluationConfig:
    """Everything that defines an evaluation run (see the ``convlens evaluate`` options)."""

    model: str
    methods: Sequence[str]
    data: str
    metrics: Sequence[str]
    out: Path
    weights: str | None = None
    data_format: Literal["auto", "synthetic", "folder", "csv", "voc", "xml", "coco"] = "auto"
    annotations: str | None = None
    images: str | None = None
    split: str = "test"
    limit: int | None = None
    synthetic_seed: int = 0
    targets: Literal["label", "predicted"] = "label"
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric_score: Literal["softmax", "sigmoid", "logit"] = "softmax"
    batch_size: int = 64
    device: str = "cpu"
    n_samples: int = 4
    overwrite: bool = False
    preset: str | None = None

    def settings(self, dataset: ImageDataset, weights_sha256: str | None = None) -> dict[str, Any]:
        """What determines the results (compared when resuming); ``weights_sha256``: the digest of the
        ``--weights`` file (:func:`weights_digest`), so that new weights at the same path are new settings."""
        return {
            "model": self.model, "weights": self.weights, "weights_sha256": weights_sha256,
            "methods": list(self.methods),
            "method_params": self.method_params, "metrics": list(self.metrics),
            "metric_params": self.metric_params, "metric_score": self.metric_score, "targets": self.targets,
            "data": dataset.describe(), "limit": self.limit, "batch_size": self.batch_size,
        }

    def method_kwargs(self, method: str) -> dict[str, Any]:
        """Keyword arguments of ``create(method, model, ...)``: the run's batch size, then the user's."""
        return {"batch_size": self.batch_size} | self.method_params.get(method, {})


# ----------------------------------------------------------------------------------------------- checks
def check_config(config: EvaluationConfig) -> torch.device:
    """Settings that need no data or model: counts, choices, names, device, output folder."""
    if config.limit is not None and config.limit < 1:
        raise EvaluationError(f"--limit must be >= 1, got {config.limit}")
    if config.batch_size < 1:
        raise EvaluationError(f"--batch-size must be >= 1, got {config.batch_size}")
    if config.n_samples < 0:
        raise EvaluationError(f"--samples must be >= 0, got {config.n_samples}")
    if config.targets not in ("label", "predicted"):
        raise EvaluationError(f"--target must be label or predicted, got {config.targets!r}")
    if config.metric_score not in ("softmax", "sigmoid", "logit"):
        raise EvaluationError(f"--metric-score must be softmax, sigmoid or logit, got {config.metric_score!r}")
    _check_names(config)
    check_out(Path(config.out))
    try:
        return check_device(config.device)
    except DeviceError as exc:
        raise EvaluationError(str(exc)) from None


def _check_names(config: EvaluationConfig) -> None:
    if not config.methods:
        raise EvaluationError("no methods given")
    if not config.metrics:
        raise EvaluationError("no metrics given")
    for method in config.methods:
        if method not in METHODS:
            try:
                get_method(method)
            except ValueError as exc:
                raise EvaluationError(str(exc)) from exc
    for metric in config.metrics:
        try:
            get_metric_spec(metric)
        except ValueError as exc:
            raise EvaluationError(str(exc)) from exc


def check_out(out: Path) -> None:
    """The output folder is a folder (or can become one) that this user may write into, and holds no file
    with the run's output names that convlens evaluate did not write (:func:`check_run_folder`)."""
    try:
        check_run_folder(out)
    except OutputFolderError as exc:
        raise EvaluationError(str(exc)) from exc
    existing = out
    while not existing.exists():
        parent = existing.parent
        if parent == existing:
            break
        existing = parent
    if existing.exists() and not existing.is_dir():
        raise EvaluationError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EvaluationError(f"--out {out}: no permission to write into {existing}")


def check_dataset(config: EvaluationConfig, dataset: ImageDataset) -> None:
    """Metrics that need ground truth need annotated data."""
    for metric in config.metrics:
        if "mask" in metric_class(metric).requires and not dataset.has_masks:
            raise EvaluationError(
                f"metric {metric!r} needs ground-truth boxes or masks, and {type(dataset).__name__} has none "
                "(use VOC/XML/COCO data or `--data synthetic`, or model-truth metrics such as drop, insertion)"
            )
    if config.targets == "label" and not dataset.class_names:
        logger.warning("the dataset has no labels: explaining the predicted class of every image")


# ----------------------------------------------------------------------------------------------- model
def weights_digest(weights: str | os.PathLike[str] | None) -> str | None:
    """SHA-256 of the ``--weights`` file (None without one; a missing file is the model loader's error)."""
    if weights is None or not Path(weights).is_file():
        return None
    path = Path(weights)
    try:
        return file_digest(path)
    except OSError as exc:
        raise EvaluationError(f"--weights {path}: cannot read it ({exc.strerror or exc})") from exc


def load_evaluation_model(
    name: str, weights: str | None = None, class_names: Sequence[str] | None = None
) -> LoadedModel:
    """``synthetic-vgg`` / ``synthetic-resnet`` (committed weights) or any :func:`convlens.models.load` name."""
    from convlens.models.synthetic import SYNTHETIC_MODELS, load_synthetic_model

    if name in SYNTHETIC_MODELS:
        return load_synthetic_model(name, weights)
    from convlens.models import load

    return load(name, weights=weights, class_names=class_names)


def load_model_for(config: EvaluationConfig, dataset: ImageDataset) -> LoadedModel:
    """The model named by the settings (clear errors for missing or mismatched weights)."""
    try:
        # annotated datasets (VOC, COCO, XML, synthetic) define the class list of models trained on them
        names = dataset.class_names if dataset.has_masks and dataset.class_names else None
        return load_evaluation_model(config.model, config.weights, names)
    except (FileNotFoundError, ValueError) as exc:
        raise EvaluationError(str(exc)) from exc


def prepare_model(loaded: LoadedModel, dataset: ImageDataset, device: torch.device) -> LoadedModel:
    """The model on ``device`` in eval mode, checked against the data's number of classes."""
    loaded.module.to(device).eval()
    if dataset.class_names and loaded.class_names and len(dataset.class_names) > len(loaded.class_names):
        raise EvaluationError(
            f"the data have {len(dataset.class_names)} classes but the model has {len(loaded.class_names)} outputs"
        )
    return loaded


# ----------------------------------------------------------------------------------------------- data
def build_dataset(config: EvaluationConfig) -> ImageDataset:
    """The dataset named by ``config.data`` / ``config.data_format`` (clear errors for missing data)."""
    fmt = config.data_format
    if config.data == "synthetic" or fmt == "synthetic":
        from convlens.data.synthetic import SyntheticShapes

        return SyntheticShapes(size=config.limit or 50, seed=config.synthetic_seed, split="test")
    path = Path(config.data)
    if not path.exists():
        raise EvaluationError(f"data not found: {path}")
    if fmt == "auto":
        fmt = _detect_format(path)
    try:
        return _open_dataset(fmt, path, config)
    except EvaluationError:
        raise
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as exc:
        raise EvaluationError(str(exc)) from exc


def _detect_format(path: Path) -> str:
    from convlens.data.voc import find_voc2007

    if path.is_file() and path.suffix.lower() == ".csv":
        return "csv"
    if path.is_file() and path.suffix.lower() == ".json":
        return "coco"
    if path.is_dir() and find_voc2007(path) is not None:
        return "voc"
    return "folder"


def _open_dataset(fmt: str, path: Path, config: EvaluationConfig) -> ImageDataset:
    if fmt == "voc":
        from convlens.data.voc import VOCDetection

        return VOCDetection(path, split=config.split)
    if fmt == "csv":
        from convlens.data.folders import CSVImageDataset

        return CSVImageDataset(path, root=config.images)
    if fmt == "coco":
        from convlens.data.coco import COCOInstances

        if config.images is None:
            raise EvaluationError("COCO data need --images DIR (the folder of the images named in the JSON)")
        return COCOInstances(path, config.images)
    if fmt == "xml":
        from convlens.data.voc import XMLBoxDataset

        if config.annotations is None or config.images is None:
            raise EvaluationError("XML box data need --images DIR and --annotations DIR (PATH = synset mapping)")
        return XMLBoxDataset(config.images, config.annotations, path)
    if fmt == "folder":
        from convlens.data.folders import ImageFolder

        return ImageFolder(path)
    raise EvaluationError(f"unknown data format {fmt!r}")


def align_labels(dataset: ImageDataset, loaded: LoadedModel) -> ImageDataset:
    """Folder/CSV labels are class *names*: re-index them by the model's class list (folder ``tabby`` must be
    the model's ``tabby``), so that the explained class is the model's own class id."""
    from convlens.data.folders import CSVImageDataset, ImageFolder

    if not loaded.class_names or dataset.class_names == loaded.class_names[: len(dataset.class_names)]:
        return dataset
    try:
        if isinstance(dataset, ImageFolder) and dataset.labelled:
            return ImageFolder(dataset.root, class_names=loaded.class_names)
        if isinstance(dataset, CSVImageDataset):
            return CSVImageDataset(dataset.csv_path, root=dataset.root, class_names=loaded.class_names)
    except ValueError as exc:
        raise EvaluationError(
            f"the data's labels must be the model's class names or ids ({exc}); or use --target predicted"
        ) from exc
    return dataset
