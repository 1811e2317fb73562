"""Shared fixtures: tiny deterministic CNNs (no downloads), small images, and the helper modules.

Helper modules (``tests/_*.py``: independent re-computations shared by several test modules) are loaded
by path and handed out as fixtures, so no test module imports another one and the suite runs under
every ``--import-mode`` (prepend, append, importlib).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hypothesis import settings
from torch import nn

# No per-example deadline: on a loaded machine a 200 ms example is not a failure (the suite passes under load).
settings.register_profile("convlens", deadline=None)
settings.load_profile("convlens")


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


@pytest.fixture(scope="session")
def make_model() -> Callable[..., TinyCNN]:
    """The tiny CNN factory ``make_model(seed=0, num_classes=5, width=8)`` for tests that need several."""
    return make_tiny_cnn


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, thread oversubscription makes tiny forwards 20x slower.

    ``CONVLENS_TEST_THREADS=N`` runs these modules on N threads instead (to check that no result depends on it).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("CONVLENS_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


def load_helper(name: str) -> ModuleType:
    """``tests/<name>.py`` loaded by its path, once (independent of sys.path and the import mode)."""
    key = f"convlens_tests_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # before executing: dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="session")
def reference() -> ModuleType:
    """Plain-autograd re-computations for the CAM tests (``tests/_reference.py``)."""
    return load_helper("_reference")


@pytest.fixture(scope="session")
def sise_reference() -> ModuleType:
    """The literal, one-mask-at-a-time SISE of ``tests/_sise_reference.py`` (SISE and Ada-SISE tests)."""
    return load_helper("_sise_reference")


@pytest.fixture(scope="session")
def kde_reference() -> ModuleType:
    """adaptivekde and the literal ADVISEkernel.m port of ``tests/_kde_reference.py`` (KDE and ADVISE tests)."""
    return load_helper("_kde_reference")


@pytest.fixture(scope="session")
def socket_dir() -> Iterator[Path]:
    """A short folder for programs that put AF_UNIX sockets under TMPDIR (PostgreSQL, chromium, Ray): a socket
    path has at most 107 bytes, and the suite must pass with a long TMPDIR. World-traversable, so that a
    PostgreSQL run as the ``postgres`` user can reach its own folder inside."""
    folder = Path(tempfile.mkdtemp(prefix="cl-", dir="/tmp" if os.path.isdir("/tmp") else None))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
