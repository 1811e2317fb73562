"""What an evaluation writes from its records: the report's sample overlays, the tables and the report.

Under the run directory:

* ``per_image.csv`` — one row per (image, target class, method) with every metric;
* ``summary.csv`` / ``summary.md`` / ``summary.json`` — mean and 95 % percentile-bootstrap CI per method
  and metric;
* ``bad_images.csv`` — images that could not be used, with the reason (skipped, not fatal);
* ``report.html`` (+ ``report_files/``) — bar charts, insertion/deletion curves, the sample overlays of
  ``samples/`` (:mod:`convlens.reports.evaluate_report`).

Everything here is a function of the store's records, so the tables are the same whichever engine, order
or number of interruptions produced them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convlens.core.files import atomic_write_text
from convlens.metrics.base import Direction, MetricAccumulator
from convlens.metrics.registry import metric_class
from convlens.models.zoo import LoadedModel
from convlens.runners.evaluate_item import SampleImages
from convlens.runners.evaluate_setup import EvaluationConfig
from convlens.runners.store import OUTPUT_FILES, OUTPUT_FOLDERS, ResultsStore, atomic_save_image

__all__ = [
    "OUTPUT_FILES",
    "OUTPUT_FOLDERS",
    "EvaluationResult",
    "mean_curves",
    "summarise",
    "summary_markdown",
    "table_rows",
    "write_outputs",
    "write_samples",
]


@dataclass
class EvaluationResult:
    """What a run produced: the summary rows, counts, and the written files."""

    summary: list[dict[str, Any]]
    n_images: int
    n_records: int
    bad_images: list[dict[str, Any]]
    files: dict[str, Path]
    interrupted: bool = False


def write_samples(directory: Path, key: str, samples: SampleImages) -> None:
    """The image the model sees, the explained classes' ground truth and each method's overlays (PNG)."""
    from PIL import Image

    from convlens.core.overlay import overlay_map

    for method, normalised in samples.maps.items():
        for t_index, target in enumerate(samples.targets):
            atomic_save_image(directory / method / f"{key}_t{target}.png", overlay_map(samples.display,
                                                                                     normalised[t_index]))
    atomic_save_image(directory / "input" / f"{key}.png", samples.display)
    for target, mask in samples.masks.items():
        mask_image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
        atomic_save_image(directory / "input" / f"{key}_mask{target}.png", mask_image)


# ----------------------------------------------------------------------------------------------- tables
def table_rows(store: ResultsStore, methods: Sequence[str], metric_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (image, target, method), in dataset order, then target, then method order."""
    rows = []
    for method in methods:
        for record in store.records(method):
            for target in record["targets"]:
                row = {
                    "id": record["id"], "index": record["index"], "method": method, "target": target["target"],
                    "target_name": target["target_name"], "predicted": target["predicted"],
                    "correct": target["correct"], "probability": target["probability"],
                    "seconds": round(record["seconds"], 6),
                }
                for name in metric_names:
                    value = target["metrics"].get(name)
                    row[name] = float("nan") if value is None else value
                rows.append(row)
    rows.sort(key=lambda r: (r["index"], r["target"], methods.index(r["method"])))
    return rows


def summarise(rows: list[dict[str, Any]], methods: Sequence[str], metric_names: Sequence[str]) -> list[dict[str, Any]]:
    """Mean, 95 % bootstrap CI, n and NaN count per (method, metric), in the given orders."""
    summary = []
    for method in methods:
        for name in [*metric_names, "seconds"]:
            accumulator = MetricAccumulator(name)
            for row in rows:
                if row["method"] == method:
                    accumulator.update(row[name])
            stats = accumulator.summary()
            direction = Direction.LOWER if name == "seconds" else metric_class(name).direction
            summary.append({"method": method, "metric": name, "direction": direction.value, **stats})
    return summary


def _fmt(value: float, digits: int = 2) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def summary_markdown(summary: list[dict[str, Any]], methods: Sequence[str], metric_names: Sequence[str]) -> str:
    """Methods as rows, metrics as columns: ``mean [CI low, CI high]`` (percent metrics as published)."""
    arrows = {"higher": "↑", "lower": "↓"}
    columns = [*metric_names, "seconds"]
    index = {(s["method"], s["metric"]): s for s in summary}
    header = "| method | " + " | ".join(
        f"{c} {arrows[index[(methods[0], c)]['direction']]}" for c in columns
    ) + " | n |"
    lines = [header, "|---" * (len(columns) + 2) + "|"]
    for method in methods:
        cells = []
        for c in columns:
            s = index[(method, c)]
            digits = 3 if c == "seconds" else (2 if c in ("drop", "increase") else 4)
            cells.append(f"{_fmt(s['mean'], digits)} [{_fmt(s['ci_low'], digits)}, {_fmt(s['ci_high'], digits)}]")
        n = index[(method, columns[0])]["n"] + index[(method, columns[0])]["nan_count"]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """Rows as CSV (NaN as an empty cell), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def mean_curves(store: ResultsStore, methods: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """Mean insertion/deletion curve per method (over all targets)."""
    sums: dict[str, dict[str, np.ndarray]] = {}
    counts: dict[str, dict[str, int]] = {}
    for method in methods:
        for record in store.records(method):
            for target in record["targets"]:
                for name, curve in target.get("curves", {}).items():
                    values = np.asarray(curve, dtype=np.float64)
                    current = sums.setdefault(name, {}).get(method)
                    if current is not None and current.shape != values.shape:
                        continue  # curves of differently sized inputs cannot be averaged point-wise
                    sums[name][method] = values if current is None else current + values
                    counts.setdefault(name, {})[method] = counts.get(name, {}).get(method, 0) + 1
    return {
        name: {m: (total / counts[name][m]).tolist() for m, total in per_method.items()}
        for name, per_method in sums.items()
    }


# ----------------------------------------------------------------------------------------------- all
def write_outputs(
    config: EvaluationConfig, store: ResultsStore, loaded: LoadedModel, interrupted: bool
) -> EvaluationResult:
    """Tables (CSV, Markdown, JSON) and the HTML report from every record in the store."""
    out = Path(config.out)
    methods, metric_names = list(config.methods), list(config.metrics)
    rows = table_rows(store, methods, metric_names)
    summary = summarise(rows, methods, metric_names)
    files = {
        "per_image": out / "per_image.csv", "summary_csv": out / "summary.csv", "summary_md": out / "summary.md",
        "bad_images": out / "bad_images.csv", "report": out / "report.html",
    }
    write_csv(files["per_image"], rows, [
        "id", "index", "method", "target", "target_name", "predicted", "correct", "probability", "seconds",
        *metric_names,
    ])
    write_csv(files["summary_csv"], summary, ["method", "metric", "direction", "mean", "ci_low", "ci_high", "n",
                                              "nan_count"])
    bad = store.bad()
    write_csv(files["bad_images"], bad, ["id", "reason"])
    done_images = len({r["index"] for r in rows})
    header = (
        f"# convlens evaluate\n\nmodel `{config.model}`, data `{config.data}` ({done_images} images evaluated, "
        f"{len(bad)} skipped as unusable), targets: {config.targets}. Mean [95 % bootstrap CI] per method; "
        "↑ higher is better, ↓ lower is better; drop/increase in %.\n\n"
    )
    atomic_write_text(files["summary_md"], header + summary_markdown(summary, methods, metric_names))
    from convlens.reports.evaluate_report import write_evaluation_report

    write_evaluation_report(
        files["report"], config=asdict(config) | {"out": str(config.out)}, summary=summary, rows=rows,
        curves=mean_curves(store, methods), samples_dir=out / "samples", methods=methods,
        metric_names=metric_names, bad_images=bad, model_info={"name": loaded.name, "source": loaded.source},
    )
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=True) + "\n")
    return EvaluationResult(summary, done_images, len(rows), bad, files, interrupted)
