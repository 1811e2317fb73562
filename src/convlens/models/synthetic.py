"""The two small CNNs trained on the synthetic benchmark (:mod:`convlens.data.synthetic`), and loading of
their committed weights.

* ``synthetic-vgg`` — VGG-style: stacks of 3x3 conv + BN + ReLU, 2x2 max-pooling between stages
  (64 -> 32 -> 16 -> 8), global average pooling and one linear layer.
* ``synthetic-resnet`` — ResNet-style: a 3x3 stem and three basic residual blocks with stride 2
  (64 -> 32 -> 16 -> 8), global average pooling and one linear layer.

The weights (``weights/*.pt``, plain state_dicts read with ``torch.load(weights_only=True)``), the
class names in output order, the training seed, recipe and test accuracy (``weights/synthetic_models.json``,
like torchvision's weight metadata) are produced by ``python tools/train_synthetic.py`` in a source
checkout (the trainer generates its data with :mod:`convlens.data.synthetic`, a layer above this one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convlens.models.preprocessing import Preprocessing
from convlens.models.zoo import LoadedModel, load_state_dict

__all__ = [
    "SYNTHETIC_MODELS",
    "SYNTHETIC_PREPROCESSING",
    "WEIGHTS_DIR",
    "SyntheticResNet",
    "SyntheticVGG",
    "build_synthetic_model",
    "evaluate_accuracy",
    "load_synthetic_model",
    "synthetic_model_info",
    "to_model_input",
]

WEIGHTS_DIR = Path(__file__).parent / "weights"
# the generator's 64x64 images are used as they are: scale to [0, 1], then (x - 0.5) / 0.5
SYNTHETIC_PREPROCESSING = Preprocessing(size=64, resize=64, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
NUM_CLASSES = 4  # the benchmark's four (shape, texture) classes


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SyntheticVGG(nn.Module):
    """VGG-style CNN: [conv8] pool [conv16 x2] pool [conv32 x2] pool [conv32] GAP linear."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, ...] = (8, 16, 32, 32)) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        self.features = nn.Sequential(
            *_conv_bn_relu(3, w1), nn.MaxPool2d(2),
            *_conv_bn_relu(w1, w2), *_conv_bn_relu(w2, w2), nn.MaxPool2d(2),
            *_conv_bn_relu(w2, w3), *_conv_bn_relu(w3, w3), nn.MaxPool2d(2),
            *_conv_bn_relu(w3, w4),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(w4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): conv-BN-ReLU-conv-BN plus a (projected) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class SyntheticResNet(nn.Module):
    """ResNet-style CNN: 3x3 stem (8) and basic blocks 16/s2, 32/s2, 32/s2; GAP; linear."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, ...] = (8, 16, 32, 32)) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        self.conv1 = nn.Conv2d(3, w1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(w1, w2, stride=2)
        self.layer2 = BasicBlock(w2, w3, stride=2)
        self.layer3 = BasicBlock(w3, w4, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


SYNTHETIC_MODELS: dict[str, type[nn.Module]] = {"synthetic-vgg": SyntheticVGG, "synthetic-resnet": SyntheticResNet}


def build_synthetic_model(name: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    """A freshly initialised benchmark model."""
    if name not in SYNTHETIC_MODELS:
        raise ValueError(f"unknown synthetic model {name!r}; choose one of {', '.join(SYNTHETIC_MODELS)}")
    return SYNTHETIC_MODELS[name](num_classes)


def synthetic_model_info() -> dict[str, Any]:
    """Training record (seed, recipe, test accuracy per model) stored next to the weights."""
    path = WEIGHTS_DIR / "synthetic_models.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train the models with `python tools/train_synthetic.py`")
    return json.loads(path.read_text())


def load_synthetic_model(name: str, weights: str | Path | None = None) -> LoadedModel:
    """Load a benchmark model with its committed weights (``torch.load(weights_only=True)``) and the class
    names recorded with them."""
    class_names = list(synthetic_model_info()[name]["class_names"]) if name in SYNTHETIC_MODELS else []
    module = build_synthetic_model(name, len(class_names))
    path = Path(weights) if weights is not None else WEIGHTS_DIR / f"{name.replace('-', '_')}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"weights for {name} not found at {path}: train them with `python tools/train_synthetic.py`"
        )
    module.load_state_dict(load_state_dict(path), strict=True)
    return LoadedModel(name, module.eval(), SYNTHETIC_PREPROCESSING, class_names, True, str(path))


def to_model_input(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float, the benchmark preprocessing ``(x / 255 - 0.5) / 0.5``."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    return (x - 0.5) / 0.5


@torch.inference_mode()
def evaluate_accuracy(model: nn.Module, pixels: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on (N, H, W, 3) uint8 images with class ids ``labels``."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(to_model_input(pixels[start : start + batch_size]))
        correct += int((logits.argmax(1).numpy() == labels[start : start + batch_size]).sum())
    return correct / len(labels)
