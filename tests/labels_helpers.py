"""Shared pieces of the label-pipeline tests: a deterministic toy embedder and a study-export writer."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convlens.labels.text import words

PLAY_FIELDS = (
    "play_id", "participant_id", "round_id", "cluster_id", "image_id", "layer", "layer_depth", "n_layers",
    "cluster_index", "true_class", "gold", "outcome", "level", "guessed_class", "correct", "description",
    "language", "score", "started_at", "ended_at",
)
ROUND_FIELDS = (
    "round_id", "cluster_id", "image_id", "image_name", "layer", "layer_depth", "n_layers", "cluster_index",
    "cluster_weight", "fmap_count", "true_class", "gold", "inv_run",
)


class ToyEmbedder:
    """Sentence vector = sum of its words' vectors (from ``table``; unknown words: ``other``).

    Every similarity in a test can be worked out by hand from the table.
    """

    name = "toy"

    def __init__(self, table: dict[str, Sequence[float]], other: Sequence[float] | None = None) -> None:
        self.table = {k: np.asarray(v, dtype=np.float64) for k, v in table.items()}
        dim = len(next(iter(self.table.values())))
        self.other = np.asarray(other if other is not None else [0.0] * (dim - 1) + [1.0], dtype=np.float64)
        self.calls: list[list[str]] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        rows = []
        for text in texts:
            tokens = words(text)
            rows.append(sum((self.table.get(t, self.other) for t in tokens), np.zeros_like(self.other)))
        return np.stack(rows) if rows else np.zeros((0, len(self.other)))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": "test", "weights_sha256": None}


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else value


def write_export(
    directory: Path, rounds: list[dict[str, Any]], plays: list[dict[str, Any]], study: dict[str, Any] | None = None
) -> Path:
    """Write study.json, rounds.csv and plays.csv like `convlens study export --format csv`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "study.json").write_text(json.dumps(study or {"study_id": "test", "classes": []}))
    for name, fields, rows in (("rounds", ROUND_FIELDS, rounds), ("plays", PLAY_FIELDS, plays)):
        with (directory / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _cell(v) for k, v in row.items()})
    return directory


def make_round(
    image: str, depth: int, index: int, true_class: str, weight: float = 20.0, n_layers: int = 3, run: str = "run",
    gold: bool = False, cluster_id: str | None = None, layer: str | None = None,
) -> dict[str, Any]:
    layer = layer or f"L{depth}"
    return {
        "round_id": f"r-{image}-{depth}-{index}", "cluster_id": cluster_id or f"{image}:{layer}:{index}",
        "image_id": image, "image_name": f"{image}.png", "layer": layer, "layer_depth": depth, "n_layers": n_layers,
        "cluster_index": index, "cluster_weight": weight, "fmap_count": 4, "true_class": true_class, "gold": gold,
        "inv_run": run,
    }


def make_play(play_id: str, round_row: dict[str, Any], outcome: str, level: int, description: str = "",
              guessed: str | None = None, participant: str | None = None, language: str = "en") -> dict[str, Any]:
    if guessed is None:
        guessed = round_row["true_class"] if outcome == "win" else ""
    correct = None if outcome not in ("win", "lose") else outcome == "win"
    return {
        "play_id": play_id, "participant_id": participant or f"u-{play_id}", "round_id": round_row["round_id"],
        "cluster_id": round_row["cluster_id"], "image_id": round_row["image_id"], "layer": round_row["layer"],
        "layer_depth": round_row["layer_depth"], "n_layers": round_row["n_layers"],
        "cluster_index": round_row["cluster_index"], "true_class": round_row["true_class"], "gold": round_row["gold"],
        "outcome": outcome, "level": level, "guessed_class": guessed, "correct": correct, "description": description,
        "language": language, "score": 0, "started_at": "", "ended_at": "",
    }


# A tiny study for the output-folder tests: one class, two layers, a few words the toy embedder knows, one
# description that a spreadsheet would run as a formula (it must come back exactly, and be inert in the CSVs).
TINY_TABLE = {"fins": [1, 0, 0], "scales": [0, 1, 0], "water": [0, 0.8, 0.2]}
FORMULA = '=HYPERLINK("http://example.com/x","fins")'


def tiny_export(directory: Path, study_id: str = "tiny") -> Path:
    """A study export of two rounds (layers L0 and L1 of image A, class tench) and six plays."""
    rounds = [make_round("A", depth, 0, "tench", n_layers=2) for depth in range(2)]
    words = {0: ["fins", "the fins", FORMULA], 1: ["scales", "water", "-scales"]}
    plays = [make_play(f"p{depth}{k}", rounds[depth], "win", k, text)
             for depth in range(2) for k, text in enumerate(words[depth])]
    return write_export(directory, rounds, plays, {"study_id": study_id, "classes": ["tench"]})
