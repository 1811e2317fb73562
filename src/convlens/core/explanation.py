"""The explanation result: data that saves, renders and feeds metrics without re-computation."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convlens.core.files import atomic_directory  # noqa: F401 - its old home; import it from core.files
from convlens.core.maps import minmax_normalize

__all__ = ["Explanation"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


@dataclass
class Explanation:
    """Saliency maps for a batch of images.

    Attributes:
        maps: (B, H, W) raw final maps at input resolution (not normalised).
        targets: (B,) explained class ids.
        scores: (B,) the model's score of the target on the unmasked input.
        method: registry name of the method.
        params: the method's parameters (for reproducibility).
        layer_maps: per layer (or per SISE block) (B, H, W) maps, in the order the method used them.
        layers: the layer names the method used.
        timings: seconds per phase (``total`` always present).
        forward_passes / backward_passes: images passed through the model, summed over the batch (a batch of B
            images counts B per pass).
        extras: method-specific data (e.g. kept masks per block, AVX parts).
    """

    maps: torch.Tensor
    targets: torch.Tensor
    scores: torch.Tensor
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    layer_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    forward_passes: int = 0
    backward_passes: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    @property
    def normalized(self) -> torch.Tensor:
        """Final maps min-max normalised to [0, 1] per image."""
        return minmax_normalize(self.maps.float())

    def to_numpy(self, normalized: bool = False) -> np.ndarray:
        """(B, H, W) float32 array of the final maps."""
        maps = self.normalized if normalized else self.maps
        return maps.detach().float().cpu().numpy()

    def select(self, index: int) -> Explanation:
        """The explanation of one image of the batch."""
        return Explanation(
            maps=self.maps[index : index + 1],
            targets=self.targets[index : index + 1],
            scores=self.scores[index : index + 1],
            method=self.method,
            params=dict(self.params),
            layer_maps={k: v[index : index + 1] for k, v in self.layer_maps.items()},
            layers=list(self.layers),
            timings=dict(self.timings),
            forward_passes=self.forward_passes,
            backward_passes=self.backward_passes,
            extras=dict(self.extras),
        )

    def overlay(self, image: Any, index: int = 0, alpha: float = 0.5, colormap: str = "jet") -> Any:
        """PIL image of the normalised map over ``image`` (PIL image or (H, W, 3) uint8 array)."""
        from convlens.core.overlay import overlay_map

        return overlay_map(image, self.normalized[index].cpu().numpy(), alpha=alpha, colormap=colormap)

    def summary(self, index: int = 0, class_names: list[str] | None = None) -> dict[str, Any]:
        """JSON-ready description of image ``index`` (everything but the arrays)."""
        target = int(self.targets[index])
        return {
            "method": self.method,
            "target": target,
            "target_name": class_names[target] if class_names and target < len(class_names) else None,
            "score": float(self.scores[index]),
            "params": _jsonable(self.params),
            "layers": list(self.layers),
            "timings": {k: round(float(v), 6) for k, v in self.timings.items()},
            "forward_passes": self.forward_passes,
            "backward_passes": self.backward_passes,
            "map_shape": list(self.maps.shape[1:]),
            "extras": _jsonable(self.extras),
        }

    def save(
        self,
        directory: str | os.PathLike[str],
        image: Any = None,
        index: int = 0,
        class_names: list[str] | None = None,
        stem: str | None = None,
    ) -> dict[str, str]:
        """Write ``<stem>.npy`` (raw map), ``<stem>.png`` (overlay, if ``image`` is given),
        ``<stem>_layers.npz`` (per-layer maps) and ``<stem>.json``. Returns the written file names."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stem = stem or self.method
        files: dict[str, str] = {}
        np.save(directory / f"{stem}.npy", self.maps[index].detach().float().cpu().numpy())
        files["map"] = f"{stem}.npy"
        if self.layer_maps:
            np.savez_compressed(
                directory / f"{stem}_layers.npz",
                **{k: v[index].detach().float().cpu().numpy() for k, v in self.layer_maps.items()},
            )
            files["layer_maps"] = f"{stem}_layers.npz"
        if image is not None:
            self.overlay(image, index).save(directory / f"{stem}.png")
            files["overlay"] = f"{stem}.png"
        info = self.summary(index, class_names) | {"files": files}
        (directory / f"{stem}.json").write_text(json.dumps(info, indent=2))
        files["json"] = f"{stem}.json"
        return files
