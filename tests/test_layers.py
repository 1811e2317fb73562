"""Layer discovery: the SISE "last layer of every block" rule on real architectures (random weights)."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision.models as tvm
from torch import nn

from convlens.core.layers import describe_layers, find_block_layers, resolve_layers


def test_resnet50_blocks_are_the_sise_layers() -> None:
    model = tvm.resnet50(weights=None).eval()
    blocks = resolve_layers(model, "blocks")
    assert blocks == ["relu", "layer1", "layer2", "layer3", "layer4"]
    infos = describe_layers(model)
    assert sum(infos[name].shape[0] for name in blocks) == 3904  # the SISE paper's feature-map count
    assert resolve_layers(model, "last") == ["layer4"]


def test_vgg16_blocks_are_the_relus_before_each_maxpool() -> None:
    model = tvm.vgg16(weights=None).eval()
    blocks = find_block_layers(model)
    assert blocks == ["features.3", "features.8", "features.15", "features.22", "features.29"]
    for name in blocks:
        index = int(name.split(".")[1])
        assert isinstance(model.features[index], nn.ReLU)
        assert isinstance(model.features[index + 1], nn.MaxPool2d)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("alexnet", ["features.1", "features.4", "features.11"]),
        ("mobilenet_v3_large", ["features.1", "features.3", "features.6", "features.12", "features.16"]),
        (
            "densenet121",
            ["features.relu0", "features.transition1.conv", "features.transition2.conv",
             "features.transition3.conv", "features.norm5"],
        ),
        ("convnext_tiny", ["features.1", "features.3", "features.5", "features.7"]),
    ],
)
def test_torchvision_architectures(name: str, expected: list[str]) -> None:
    model = tvm.get_model(name, weights=None).eval()
    blocks = find_block_layers(model)
    assert blocks == expected
    infos = describe_layers(model)
    areas = [infos[b].area for b in blocks]
    assert areas == sorted(areas, reverse=True) and len(set(areas)) == len(areas)  # one layer per resolution


def test_efficientnet_lite0_blocks() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    assert find_block_layers(model) == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "bn2"]


def test_custom_cnn(tiny_cnn: nn.Module) -> None:
    assert resolve_layers(tiny_cnn, "blocks", (3, 32, 32)) == ["block1", "block2", "block3"]
    assert resolve_layers(tiny_cnn, "last", (3, 32, 32)) == ["block3"]


def test_explicit_names_and_modules(tiny_cnn: nn.Module) -> None:
    assert resolve_layers(tiny_cnn, "block2.0") == ["block2.0"]
    assert resolve_layers(tiny_cnn, ["block1", tiny_cnn.block3]) == ["block1", "block3"]
    with pytest.raises(ValueError, match="did you mean"):
        resolve_layers(tiny_cnn, "blok2")
    with pytest.raises(ValueError, match="not part of the model"):
        resolve_layers(tiny_cnn, nn.Conv2d(1, 1, 1))


def test_model_without_conv_layers_is_refused() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(ValueError, match="no convolutional layer"):
        resolve_layers(mlp, "blocks", (3, 8, 8))


def test_discovery_restores_training_flag(tiny_cnn: nn.Module) -> None:
    tiny_cnn.train()
    find_block_layers(tiny_cnn, (3, 32, 32))
    assert tiny_cnn.training and all(m.training for m in tiny_cnn.modules())
    assert all(not m._forward_hooks for m in tiny_cnn.modules())
    tiny_cnn.eval()
    with torch.no_grad():
        assert torch.isfinite(tiny_cnn(torch.zeros(1, 3, 32, 32))).all()
