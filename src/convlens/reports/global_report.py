"""``global``: a labels folder in, INV's global explanations out — trends per class, plots and pages.

:func:`build_global` is the library entry point behind ``convlens global LABELS_DIR --out DIR`` (a
benchmark calls it on a labels folder). It writes into ``out``:

* ``trends.csv`` — per class, label and layer depth: the mean label score and the number of clusters;
* ``slopes.csv`` — per class and label: least-squares slope over depth, 95 % bootstrap interval over
  images, direction, total score, its share of the class's score and its rank by it, images, and the
  TCAV columns (see below);
* ``global.json`` — manifest (labels folder, embedder, settings, notes, ``csv_cells``, and every file's size
  and SHA-256: the folder is written as a whole, see :func:`build_global`);
* ``index.html`` (per class its top concepts by evidence, then those that rise or fade) and per class
  ``<class>/index.html``: the top concepts first, then ``top.png`` / ``rising.png`` / ``falling.png``
  (the six strongest concepts over depth; the six, by total score, whose slope interval lies above / below
  0, see :class:`~convlens.labels.trends.ClassTrends`; matplotlib), the table of all labels, and the layer-by-layer
  labelled cluster maps: for every image, every layer, every merged group its map with "w = <weight>%"
  and its top-3 labels with their strengths, then the layer's full merge (all its clusters) with its
  top-6 labels (the authors' previews), each with a top-10 list (their detail view), linked to the
  image's INV page.

TCAV slot ("used by the model"): ``tcav`` (or ``LABELS_DIR/tcav.csv``), with columns ``class, label`` (or
``concept``), ``layer``, ``significant`` (empty: not tested) and optionally ``direction``, ``p_value``,
``effect_size``, ``detectable_effect_size``, ``layer_role``, ``verdict``, gives each label's verdict in the
table and ``slopes.csv`` (:func:`tcav_verdict`); without it the column says "not tested".
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convlens.core.outputs import OutputFolder
from convlens.labels.export import optional_int
from convlens.labels.files import GLOBAL_FOLDER, SEP, LabelsFolder, csv_text, read_labels
from convlens.labels.trends import MIN_SHARE, ClassTrends, LabelTrend, global_explanations
from convlens.reports.global_maps import InvLocator, relative_link
from convlens.reports.html import template_environment

__all__ = ["GLOBAL_FOLDER", "GlobalResult", "build_global", "class_folders", "read_tcav", "slug"]

PREVIEW_LABELS = {"best": 3, "full": 6}  # labels under a map: the authors' previews (full merge: six)
DETAIL_LABELS = 10  # the authors' detail view ("first 10 features")
SLOPE_COLUMNS = ("class", "label", "slope", "ci_low", "ci_high", "direction", "ci_excludes_zero", "total_score",
                 "share", "rank_evidence", "n_images", "rank_rising", "rank_falling", "tcav_used_by_model")


@dataclass
class GlobalResult:
    """What :func:`build_global` computed and where it wrote it."""

    out: Path
    classes: dict[str, ClassTrends]
    tcav: dict[tuple[str, str], list[dict[str, str]]]
    notes: list[str] = field(default_factory=list)


def slug(name: str) -> str:
    """A file-system-safe folder name for a class."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:60] or "class"


def class_folders(names: Sequence[str]) -> dict[str, str]:
    """Each class's folder name: its :func:`slug`, with ``-2``, ``-3``, ... where two classes share a slug
    (even in letter case only) or a slug is one of the report's own file names."""
    taken = {name.lower() for name in GLOBAL_FOLDER.names}
    folders = {}
    for name in names:
        base = candidate = slug(name)
        number = 1
        while candidate.lower() in taken:
            number += 1
            candidate = f"{base}-{number}"
        taken.add(candidate.lower())
        folders[name] = candidate
    return folders


def read_tcav(path: Path | None) -> dict[tuple[str, str], list[dict[str, str]]]:
    """TCAV rows per (class, label) from a CSV (empty when ``path`` is None or missing). A ``tcav.csv`` in
    an output folder of ``convlens tcav`` is read only if the folder checks out (its manifest's hashes)."""
    if path is None or not path.is_file():
        return {}
    from convlens.core.outputs import verify_output_folder
    from convlens.tcav.study import TCAV_FOLDER

    if path.name == "tcav.csv" and (path.parent / TCAV_FOLDER.manifest).is_file():
        verify_output_folder(path.parent, TCAV_FOLDER)  # a cut or half-written tcav.csv is named, not read
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    found: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        label = row.get("label") or row.get("concept")
        if not row.get("class") or not label or "significant" not in row:
            raise ValueError(f"{path}: TCAV rows need class, label (or concept), layer and significant columns")
        found[(row["class"], label)].append(row)
    return dict(found)


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _details(row: dict[str, str], keys: Sequence[str]) -> str:
    """``key=value`` pairs, numbers to 3 significant digits."""
    shown = [(k, row[k]) for k in keys if row.get(k)]
    return ", ".join(f"{k}={v if _float(v) is None else format(_float(v), '.3g')}" for k, v in shown)


def tcav_verdict(rows: Sequence[dict[str, str]] | None) -> str:
    """'yes: layer (direction, p, effect)' per significant layer, an earlier layer marked as having no known
    answer; 'no evidence at this power (n layers tested, ...)' with the smallest p (never "not used": the test
    misses small effects); 'cannot test: <reason>'; 'not tested: <reason>' for a concept ``convlens tcav``
    skipped; or 'not tested'."""
    if not rows:
        return "not tested"
    tested = [r for r in rows if str(r.get("significant", "")).strip()]
    if not tested:
        untestable = next((r["verdict"] for r in rows if str(r.get("verdict", "")).startswith("cannot test")), "")
        if untestable:
            return untestable
        reason = next((r["verdict"] for r in rows if str(r.get("verdict", "")).startswith("skipped: ")), "")
        return f"not tested: {reason.removeprefix('skipped: ')}" if reason else "not tested"
    significant = [r for r in tested if str(r.get("significant", "")).strip().lower() in ("true", "1", "yes")]
    if not significant:
        bound = _float(tested[0].get("detectable_effect_size"))
        head = f"no evidence at this power ({len(tested)} layer{'s' if len(tested) != 1 else ''} tested" + (
            f"; |effect_size| >= {bound:.2g} is detected)" if bound is not None else ")")
        scored = [r for r in tested if _float(r.get("p_value")) is not None]
        if not scored:
            return head
        best = min(scored, key=lambda r: _float(r["p_value"]) or 0.0)
        extra = _details(best, ("direction", "effect_size"))
        return f"{head}: smallest {_details(best, ('p_value',))} at {best.get('layer', '?')}" + (
            f" ({extra})" if extra else "")
    parts = []
    for r in significant:
        extra = _details(r, ("direction", "p_value", "effect_size"))
        earlier = "earlier layer, no known answer" if r.get("layer_role") == "earlier" else ""
        details = "; ".join(part for part in (earlier, extra) if part)
        parts.append(f"{r.get('layer', '?')}" + (f" ({details})" if details else ""))
    return "yes: " + "; ".join(parts)


def _plot(trends: ClassTrends, chosen: Sequence[LabelTrend], title: str, path: Path, empty: str) -> None:
    """Mean label score per layer for ``chosen``; layer names under the depths, slanted so they never overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.6, 4.2), dpi=110)
    for trend in chosen:
        axes.plot(trends.depths, trend.means, marker="o", linewidth=2,
                  label=f"{trend.label}  ({100 * trends.share(trend):.0f} % of score, slope {trend.slope:+.2f})")
    names = [f"{d}: {name if len(name) <= 22 else name[:21] + '…'}"
             for d, name in zip(trends.depths, trends.layer_names, strict=True)]
    axes.set_xticks(trends.depths, names, fontsize=8, rotation=30, ha="right", rotation_mode="anchor")
    axes.set_xlabel("layer (depth: name)", fontsize=9)
    axes.set_ylabel("mean label score", fontsize=9)
    axes.set_title(title, fontsize=11)
    axes.grid(alpha=0.3)
    if chosen:
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        axes.text(0.5, 0.5, empty, ha="center", va="center", transform=axes.transAxes, fontsize=9, wrap=True)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _tables(result: GlobalResult, neutralised: bool) -> dict[str, str]:
    trends_rows, slope_rows = [], []
    for name, trends in result.classes.items():
        rising = {t.label: i for i, t in enumerate(trends.rising, 1)}
        falling = {t.label: i for i, t in enumerate(trends.falling, 1)}
        evidence = {t.label: i for i, t in enumerate(trends.by_evidence, 1)}
        for t in trends.trends:
            for depth, mean, count in zip(trends.depths, t.means, t.clusters_per_layer, strict=True):
                trends_rows.append([name, t.label, depth, trends.layer_names[depth], mean, count])
            slope_rows.append([name, t.label, t.slope, t.ci_low, t.ci_high, t.direction, t.interval_excludes_zero,
                               t.total_score, trends.share(t), evidence[t.label], t.n_images, rising.get(t.label, ""),
                               falling.get(t.label, ""),
                               tcav_verdict(result.tcav.get((name, t.label)))])
    return {
        "trends.csv": csv_text(("class", "label", "layer_depth", "layer", "mean_score", "n_clusters"), trends_rows,
                               neutralised=neutralised),
        "slopes.csv": csv_text(SLOPE_COLUMNS, slope_rows, neutralised=neutralised),
    }


def _group_entries(folder: LabelsFolder) -> dict[str, list[dict[str, Any]]]:
    """Merged groups per class (``merge`` "best" and "full"), with their labels by strength and member weights."""
    weights = {row["cluster_id"]: float(row["weight"] or 0) for row in folder.clusters}
    labels: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for row in sorted(folder.group_labels, key=lambda r: int(r["rank"])):
        labels[row["group_id"]].append((row["label"], float(row["strength"])))
    by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in folder.groups:
        if row["merge"] not in PREVIEW_LABELS:
            continue
        members = [(c, weights.get(c, 0.0)) for c in row["cluster_ids"].split(SEP) if c]
        by_class[row["class"]].append(row | {"members": members, "weight": float(row["weight"] or 0),
                                             "depth": optional_int(row["layer_depth"]) or 0,
                                             "labels": labels[row["group_id"]]})
    return by_class


def _group_view(group: dict[str, Any], locator: InvLocator, class_dir: Path) -> dict[str, Any]:
    """One group's map (drawn into ``class_dir/maps``), caption data, preview bars and top-10 list."""
    map_name = f"maps/{slug(group['group_id'])}.png"
    drawn = locator.render(group["inv_run"], group["image_id"], group["members"], class_dir / map_name)
    preview = group["labels"][:PREVIEW_LABELS[group["merge"]]]
    strongest = max([s for _, s in preview], default=0.0) or 1.0
    return {
        "id": group["group_id"], "merge": group["merge"], "weight": group["weight"],
        "map": map_name if drawn else None, "clusters": len(group["members"]), "shared": group["shared_labels"],
        "top": [{"label": label, "strength": s, "width": max(2.0, 100.0 * s / strongest)} for label, s in preview],
        "detail": [{"label": label, "strength": s} for label, s in group["labels"][:DETAIL_LABELS]],
    }


def _class_images(
    name: str, groups: list[dict[str, Any]], locator: InvLocator, class_dir: Path
) -> list[dict[str, Any]]:
    """Per image: its INV page link and, per depth, its best-label groups and its full-merge group."""
    images: dict[str, dict[str, Any]] = {}
    for group in sorted(groups, key=lambda g: (g["image_id"], g["depth"], g["merge"], -g["weight"])):
        if group["image_id"] not in images:
            page = locator.page(group["inv_run"], group["image_id"])
            input_name = f"maps/{slug(group['image_id'])}_input.png"
            images[group["image_id"]] = {
                "image_id": group["image_id"], "layers": {}, "page": relative_link(page, class_dir) if page else None,
                "input": input_name if locator.copy_input(group["inv_run"], group["image_id"], class_dir / input_name)
                else None,
            }
        layers = images[group["image_id"]]["layers"]
        layer = layers.setdefault(group["depth"], {"depth": group["depth"], "layer": group["layer"], "groups": [],
                                                   "full": []})
        layer["groups" if group["merge"] == "best" else "full"].append(_group_view(group, locator, class_dir))
    for image in images.values():
        image["layers"] = [image["layers"][d] for d in sorted(image["layers"])]
    return list(images.values())


def _trend_of(trends: ClassTrends) -> dict[str, str]:
    """label -> "rising" / "falling" by the overview's rule (at least ``MIN_SHARE`` of the class's score and an
    interval that excludes 0, or the slope's sign where the class has no interval), "rare" below the share,
    else "flat"."""
    found = {}
    for t in trends.trends:
        clear = t.interval_excludes_zero if trends.intervals else np.isfinite(t.slope) and t.slope != 0
        found[t.label] = ("rising" if t.slope > 0 else "falling") if clear else "flat"
        if trends.share(t) < MIN_SHARE:
            found[t.label] = "rare"
    return found


def _trend_text(trends: ClassTrends, kinds: dict[str, str]) -> dict[str, str]:
    """label -> the trend cell of the top-concepts table."""
    text = {}
    for t in trends.trends:
        if kinds[t.label] == "rare":
            text[t.label] = f"too rare for a trend (< {100 * MIN_SHARE:.0f} % of the score)"
        elif kinds[t.label] == "flat":
            text[t.label] = "no clear trend" if trends.intervals else "–"
        else:
            interval = f" [{t.ci_low:+.2f}, {t.ci_high:+.2f}]" if trends.intervals else " (no interval)"
            text[t.label] = f"{'rises' if kinds[t.label] == 'rising' else 'fades'}: slope {t.slope:+.2f}{interval}"
    return text


def _render_pages(result: GlobalResult, folder: LabelsFolder, locator: InvLocator) -> None:
    environment = template_environment()
    groups = _group_entries(folder)
    agreement = {row["class_name"]: row for row in folder.agreement if row.get("scope") == "class"}
    summaries = []
    folders = class_folders(list(result.classes))
    for name, trends in result.classes.items():
        class_dir = result.out / folders[name]
        (class_dir / "maps").mkdir(parents=True, exist_ok=True)
        evidence = "whose 95 % interval of the slope lies {} 0" if trends.intervals else "with a {} slope"
        _plot(trends, trends.top, f"{name}: strongest concepts (largest total score)", class_dir / "top.png",
              "no labels")
        _plot(trends, trends.rising, f"{name}: concepts that grow with depth", class_dir / "rising.png",
              "no concept " + evidence.format("above" if trends.intervals else "positive"))
        _plot(trends, trends.falling, f"{name}: concepts that fade with depth", class_dir / "falling.png",
              "no concept " + evidence.format("below" if trends.intervals else "negative"))
        rows, kinds = trends.by_evidence, _trend_of(trends)
        html = environment.get_template("global.html").render(
            class_name=name, trends=trends, rows=rows, manifest=folder.manifest, agreement=agreement.get(name),
            images=_class_images(name, groups.get(name, []), locator, class_dir),
            tcav={t.label: tcav_verdict(result.tcav.get((name, t.label))) for t in trends.trends},
            trend_of=kinds, trend_text=_trend_text(trends, kinds),
            tcav_present=bool(result.tcav), notes=trends.notes,
        )
        (class_dir / "index.html").write_text(html, encoding="utf-8")
        summaries.append({"name": name, "dir": folders[name], "trends": trends, "agreement": agreement.get(name)})
    html = environment.get_template("global_index.html").render(
        classes=summaries, manifest=folder.manifest, notes=result.notes + locator.notes, tcav_present=bool(result.tcav))
    (result.out / "index.html").write_text(html, encoding="utf-8")


def build_global(
    labels_dir: str | Path, out: str | Path, n_bootstrap: int = 1000, seed: int = 0,
    tcav: str | Path | None = None, inv_root: str | Path | None = None, *, raw_csv: bool = False,
) -> GlobalResult:
    """Global explanations of every class of a labels folder, written as a whole into ``out``.

    The folder is built aside and renamed into place (:class:`~convlens.core.outputs.OutputFolder`), only
    over a folder ``convlens global`` wrote; ``global.json`` records every file's size and SHA-256 (its
    class folders included) and whether the CSVs' text cells are neutralised (``csv_cells``, as in the
    labels folder; ``raw_csv`` leaves them as they are). Bad input (the labels folder does not check out, a
    missing TCAV file, ``out`` holding a user's files) raises a ``ValueError`` before anything is written.
    """
    folder = read_labels(labels_dir)
    tcav_path = Path(tcav) if tcav is not None else Path(labels_dir) / "tcav.csv"
    if tcav is not None and not tcav_path.is_file():
        raise ValueError(f"{tcav_path}: no such TCAV file")
    target = OutputFolder(out, GLOBAL_FOLDER)
    classes = global_explanations(folder, n_bootstrap=n_bootstrap, seed=seed)
    result = GlobalResult(Path(out), classes, read_tcav(tcav_path))
    if not classes:
        result.notes.append("the labels folder has no clusters: nothing to explain")
    runs = {name: Path(path) for name, path in folder.manifest.get("inv_runs", {}).items()}
    locator = InvLocator(runs, Path(inv_root) if inv_root is not None else None)
    with target:
        result.out = target.path  # pages link to INV runs relative to the folder beside the final one
        for name, text in _tables(result, neutralised=not raw_csv).items():
            (target.path / name).write_text(text, encoding="utf-8")
        _render_pages(result, folder, locator)
        result.notes.extend(locator.notes)
        manifest = {"format_version": 1, "labels": str(Path(labels_dir).resolve()),
                    "embedder": folder.manifest.get("embedder"), "bootstrap": {"n": n_bootstrap, "seed": seed},
                    "tcav": str(tcav_path) if result.tcav else None, "classes": list(classes),
                    "csv_cells": "raw" if raw_csv else "neutralised",
                    "notes": {"global": result.notes, **{n: t.notes for n, t in classes.items()}}}
        target.seal(manifest)
    result.out = Path(out)
    return result
