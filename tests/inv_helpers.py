"""INV runs of synthetic benchmark images, saved as ``convlens explain --methods inv`` saves them (for study tests)."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np


def synthetic_inv_runs(root: Path, layers: list[str], per_class: int, classes: tuple[int, ...] = (0, 1),
                       size: int = 400) -> dict[str, np.ndarray]:
    """INV on ``synthetic-vgg`` at ``layers`` for the first ``per_class`` test images of each of ``classes``,
    saved under ``root/img<index>/inv``; returns image id -> the image's exact class-object mask."""
    from PIL import Image

    from convlens.data.synthetic import SyntheticShapes
    from convlens.inv import INV
    from convlens.models.synthetic import SYNTHETIC_PREPROCESSING, load_synthetic_model

    inv = INV(load_synthetic_model("synthetic-vgg"), layers=layers)
    dataset = SyntheticShapes(size=size, seed=0, split="test")
    masks: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(classes, 0)
    for index in range(size):
        item = dataset.generate(index)
        if counts.get(item.label, per_class) >= per_class:
            continue
        counts[item.label] += 1
        image = Image.fromarray(item.pixels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            explanation = inv.explain(SYNTHETIC_PREPROCESSING(image)[None], target=item.label,
                                      image_id=hashlib.sha256(item.pixels.tobytes()).hexdigest())
        explanation.save(root / f"img{index:03d}" / "inv", image=image)
        masks[explanation.image_id] = item.mask
    return masks
