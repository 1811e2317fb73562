"""The Explanation result saves what it holds; atomic directories leave nothing behind on error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from convlens.core.explanation import atomic_directory
from convlens.methods.gradcam import GradCAM


def test_save_round_trip(tmp_path, tiny_cnn, tiny_images) -> None:
    result = GradCAM(tiny_cnn, layers="blocks").explain(tiny_images, 2)
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    files = result.save(tmp_path, image=image, index=1, class_names=list("abcde"))
    np.testing.assert_allclose(np.load(tmp_path / files["map"]), result.maps[1].numpy())
    layers = np.load(tmp_path / files["layer_maps"])
    assert sorted(layers.files) == ["block1", "block2", "block3"]
    meta = json.loads((tmp_path / files["json"]).read_text())
    assert meta["target"] == 2 and meta["target_name"] == "c" and meta["method"] == "gradcam"
    assert Image.open(tmp_path / files["overlay"]).size == (32, 32)
    normalized = result.normalized
    assert float(normalized.amin()) >= 0 and float(normalized.amax()) <= 1
    torch.testing.assert_close(torch.from_numpy(result.to_numpy(normalized=True)), normalized)


def test_atomic_directory(tmp_path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (target / "done.txt").read_text() == "ok"
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
