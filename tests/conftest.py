"""Shared fixtures: tiny deterministic CNNs (no downloads) and small images."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn


class TinyCNN(nn.Module):
    """Three conv blocks (16x16 -> 8x8 -> 4x4 -> 2x2 feature maps for 32x32 input) and a linear head.

    Layer discovery "blocks" gives ``block1, block2, block3``; in-place ReLUs on purpose.
    """

    def __init__(self, num_classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True)
        )
        self.pool2 = nn.MaxPool2d(2)
        self.block3 = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(inplace=True))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)
        return self.fc(torch.flatten(self.gap(x), 1))


def make_tiny_cnn(seed: int = 0, num_classes: int = 5, width: int = 8) -> TinyCNN:
    torch.manual_seed(seed)
    model = TinyCNN(num_classes, width)
    # non-trivial BatchNorm statistics so eval mode differs from train mode
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    return make_tiny_cnn()


@pytest.fixture
def tiny_images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, thread oversubscription makes tiny forwards 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
