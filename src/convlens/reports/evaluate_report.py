"""The ``convlens evaluate`` HTML report: summary table, a bar chart per metric (mean and 95 % CI),
mean insertion/deletion curves, sample overlays, skipped images and the run's settings.

Plots are PNG files drawn with matplotlib (Agg) into ``report_files/`` next to the page; the page is a
Jinja2 template with autoescaping on, so image ids, class names and paths from the data are escaped.
Every file is written atomically (a temporary file renamed over it), so a killed run never leaves a
truncated page or plot.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from convlens.core.files import atomic_write_bytes, atomic_write_text

__all__ = ["plot_curves", "plot_metric_bars", "write_evaluation_report"]


def _environment() -> Environment:
    return Environment(loader=PackageLoader("convlens.reports", "templates"), autoescape=select_autoescape(["html"]))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_metric_bars(path: Path, summary_by_metric: dict[str, list[dict[str, Any]]]) -> None:
    """One panel per metric: a bar per method (mean) with its 95 % bootstrap CI as an error bar; one PNG."""
    plt = _pyplot()
    names = list(summary_by_metric)
    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    n_methods = len(next(iter(summary_by_metric.values())))
    width = max(2.6, 0.55 * n_methods + 1.2)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, 2.7 * rows), dpi=90, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, metric in zip(axes.flat, names, strict=False):
        stats = summary_by_metric[metric]
        methods = [s["method"] for s in stats]
        means = [s["mean"] if math.isfinite(s["mean"]) else 0.0 for s in stats]
        lower = [m - s["ci_low"] if math.isfinite(s["ci_low"]) else 0.0 for m, s in zip(means, stats, strict=True)]
        upper = [s["ci_high"] - m if math.isfinite(s["ci_high"]) else 0.0 for m, s in zip(means, stats, strict=True)]
        ax.bar(methods, means, yerr=[lower, upper], capsize=3, color="#4c78a8")
        arrow = "↑" if stats[0]["direction"] == "higher" else "↓"
        ax.set_title(f"{metric} {arrow}", fontsize=10)
        ax.tick_params(axis="x", labelrotation=35, labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _save_figure(fig: Any, path: Path) -> None:
    """``fig.savefig(path)`` as PNG, atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def plot_curves(path: Path, curves: dict[str, dict[str, list[float]]]) -> None:
    """Mean insertion and deletion curves of each method against the fraction of pixels changed; one PNG."""
    plt = _pyplot()
    names = sorted(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.0), dpi=90, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=True):
        for method, values in curves[name].items():
            n = len(values) - 1
            ax.plot([i / n for i in range(n + 1)], values, label=method, linewidth=1.4)
        ax.set_xlabel("fraction of pixels " + ("inserted" if name == "insertion" else "deleted"), fontsize=8)
        ax.set_ylabel("class score", fontsize=8)
        ax.set_title(f"{name} (mean curve)", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _samples(samples_dir: Path, page_dir: Path, methods: Sequence[str]) -> list[dict[str, Any]]:
    inputs = samples_dir / "input"
    if not inputs.is_dir():
        return []
    rows = []
    for image in sorted(p for p in inputs.glob("*.png") if "_mask" not in p.name):
        key = image.stem
        masks = sorted(inputs.glob(f"{key}_mask*.png"))
        overlays: dict[str, list[str]] = {}
        for method in methods:
            overlays[method] = [_relative(p, page_dir) for p in sorted((samples_dir / method).glob(f"{key}_t*.png"))]
        rows.append({
            "key": key, "input": _relative(image, page_dir), "masks": [_relative(m, page_dir) for m in masks],
            "overlays": overlays,
        })
    return rows


def _fmt(value: Any, digits: int) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def write_evaluation_report(
    path: Path,
    config: dict[str, Any],
    summary: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    curves: dict[str, dict[str, list[float]]],
    samples_dir: Path,
    methods: Sequence[str],
    metric_names: Sequence[str],
    bad_images: list[dict[str, Any]],
    model_info: dict[str, str],
) -> None:
    """Write ``report.html`` and its plots (``report_files/``) atomically enough for a rerun to replace them."""
    page_dir = path.parent
    files = page_dir / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    index = {(s["method"], s["metric"]): s for s in summary}
    columns = [*metric_names, "seconds"]
    bars = files / "metrics.png"
    plot_metric_bars(bars, {metric: [index[(m, metric)] for m in methods] for metric in columns})
    charts = [{"metric": "all metrics", "src": _relative(bars, page_dir)}]
    curve_plots = []
    if curves:
        chart = files / "curves.png"
        plot_curves(chart, curves)
        curve_plots.append({"name": "insertion and deletion", "src": _relative(chart, page_dir)})
    table = []
    for method in methods:
        cells = []
        for metric in [*metric_names, "seconds"]:
            s = index[(method, metric)]
            digits = 3 if metric == "seconds" else 4
            cells.append({
                "mean": _fmt(s["mean"], digits), "ci": f"[{_fmt(s['ci_low'], digits)}, {_fmt(s['ci_high'], digits)}]",
                "nan": s["nan_count"],
            })
        table.append({"method": method, "cells": cells})
    directions = {m: index[(methods[0], m)]["direction"] for m in [*metric_names, "seconds"]}
    accuracy_values = [r["correct"] for r in rows if r["method"] == methods[0] and r["correct"] is not None]
    html = _environment().get_template("evaluate.html").render(
        title="convlens evaluate",
        model=model_info,
        config_json=json.dumps(config, indent=2, default=str),
        columns=[*metric_names, "seconds"],
        directions=directions,
        table=table,
        charts=charts,
        curve_plots=curve_plots,
        samples=_samples(samples_dir, page_dir, methods),
        methods=list(methods),
        bad_images=bad_images,
        n_rows=len([r for r in rows if r["method"] == methods[0]]),
        accuracy=(sum(accuracy_values) / len(accuracy_values)) if accuracy_values else None,
    )
    atomic_write_text(path, html)
