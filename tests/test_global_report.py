"""The global report's pieces by hand: group maps and their smoothing (global_maps), and the labelled
cluster maps of a hand-written labels folder — best-label groups with their top-3 labels, the layer's full
merge with its top-6, and every group's top-10 list (the authors' previews and detail view)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from convlens.core.outputs import OutputFolder
from convlens.labels.files import (
    CLUSTER_COLUMNS,
    FORMAT_VERSION,
    GROUP_COLUMNS,
    LABELS_FOLDER,
    SCORE_COLUMNS,
    csv_text,
)
from convlens.labels.scores import ClusterStats, LabelScore, full_merge
from convlens.reports.global_maps import group_map, smooth
from convlens.reports.global_report import build_global

# --- group_map and smooth ---------------------------------------------------------------------------------


def test_group_map_is_the_weighted_mean_by_hand() -> None:
    a, b = np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[0.0, 0.0], [0.0, 3.0]])
    np.testing.assert_allclose(group_map([a, b], [1.0, 3.0]), [[0.25, 0.0], [0.0, 2.25]])  # (1 a + 3 b) / 4
    np.testing.assert_allclose(group_map([a, b], [0.0, 0.0]), [[0.5, 0.0], [0.0, 1.5]])  # no weight: plain mean
    np.testing.assert_allclose(group_map([b], [7.0]), b)


def _kernel(t: int) -> float:
    """Normalised Gaussian weight at offset t for sigma 1, truncate 5.5 (radius int(5.5 + 0.5) = 6)."""
    total = sum(math.exp(-s * s / 2) for s in range(-6, 7))
    return math.exp(-t * t / 2) / total if abs(t) <= 6 else 0.0


def test_smooth_by_hand() -> None:
    """An impulse in the corner of a 13 x 13 map: with scipy's "reflect" border the blur is separable,
    B(i, j) = (k_i + k_{i+1}) (k_j + k_{j+1}) (the mirror image sits one pixel outside), the maximum at
    (0, 0) and 0 at the far corner; min-max divides by B(0, 0)."""
    impulse = np.zeros((13, 13))
    impulse[0, 0] = 1.0
    out = smooth(impulse)

    def expected(i: int, j: int) -> float:
        return (_kernel(i) + _kernel(i + 1)) * (_kernel(j) + _kernel(j + 1)) / (_kernel(0) + _kernel(1)) ** 2

    for i, j in [(0, 0), (0, 1), (2, 3), (5, 5), (6, 0), (12, 12)]:
        assert out[i, j] == pytest.approx(expected(i, j), abs=1e-12), (i, j)
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_array_equal(smooth(np.full((4, 4), 2.5)), np.zeros((4, 4)))  # constant: all zeros


# --- the labelled cluster maps on a page ------------------------------------------------------------------

C0 = {"fins": 4.0, "scales": 3.0, "water": 2.0, "net": 1.0}
C1 = {"hand": 8.0, "grass": 6.0, "boat": 4.0, "rod": 2.0, "hook": 1.2, "reed": 0.8, "mud": 0.4, "sky": 0.2}
WEIGHTS = {"T:L0:0": 30.0, "T:L0:1": 10.0}
# full merge, sum w s / sum w over 40: fins 3, scales 2.25, hand 2, water 1.5, grass 1.5 (ties alphabetical),
# boat 1, net 0.75, rod 0.5, hook 0.3, reed 0.2 | mud 0.1, sky 0.05 (11th and 12th: not in the top 10)
FULL = [("fins", 3.0), ("scales", 2.25), ("hand", 2.0), ("grass", 1.5), ("water", 1.5), ("boat", 1.0),
        ("net", 0.75), ("rod", 0.5), ("hook", 0.3), ("reed", 0.2), ("mud", 0.1), ("sky", 0.05)]


def _labels_folder(folder: Path) -> Path:
    clusters = [[cid, "tench", "T", "T.png", "L0", 0, 1, k, WEIGHTS[cid], 4, 2, 0, 0, 1, 5, best, f"T:L0:g{k}", "run"]
                for k, (cid, best) in enumerate([("T:L0:0", "fins"), ("T:L0:1", "hand")])]
    scores = [[cid, "tench", "T", "L0", 0, 1, label, 1, 0.0, 1, 0, s, label == max(table, key=table.get)]
              for cid, table in (("T:L0:0", C0), ("T:L0:1", C1)) for label, s in table.items()]
    groups = [[f"T:L0:g{k}", "best", "tench", "T", "L0", 0, 1, cid, WEIGHTS[cid], 4, 2, 0, 0, best, "", "run"]
              for k, (cid, best) in enumerate([("T:L0:0", "fins"), ("T:L0:1", "hand")])]
    groups.append(["T:L0:f0", "full", "tench", "T", "L0", 0, 1, "T:L0:0; T:L0:1", 40.0, 8, 4, 0, 0, "", "", "run"])
    ranked = {"T:L0:g0": sorted(C0.items(), key=lambda x: -x[1]), "T:L0:g1": sorted(C1.items(), key=lambda x: -x[1]),
              "T:L0:f0": FULL}
    group_labels = [[gid, "full" if gid.endswith("f0") else "best", rank, label, s]
                    for gid, items in ranked.items() for rank, (label, s) in enumerate(items, 1)]
    files = {"clusters.csv": csv_text(CLUSTER_COLUMNS, clusters), "label_scores.csv": csv_text(SCORE_COLUMNS, scores),
             "groups.csv": csv_text(GROUP_COLUMNS, groups),
             "group_labels.csv": csv_text(("group_id", "merge", "rank", "label", "strength"), group_labels),
             "agreement.csv": "scope\n"}
    files |= {"audit.csv": "play_id\n", "text_clusters.csv": "class\n"}
    manifest = {"format_version": FORMAT_VERSION, "study": {"study_id": "hand"}, "inv_runs": {}, "csv_cells": "raw",
                "embedder": {"name": "toy"}, "settings": {"wrong_rule": "authors"}, "translator": None,
                "counts": {"plays": 12, "status": {"labelled": 12}}}
    with OutputFolder(folder, LABELS_FOLDER) as target:  # sealed like `convlens labels` seals its folder
        for name, text in files.items():
            (target.path / name).write_text(text)
        target.seal(manifest)
    return folder


def test_full_merge_and_top_10_are_rendered(tmp_path: Path) -> None:
    # the hand-made full-merge strengths are what the project's merge computes from the cluster scores
    stats = [ClusterStats(cid, "tench", "T", "L0", 0, 1, WEIGHTS[cid], 4,
                          scores={k: LabelScore(k, 1, 0.0, 1, 0, v) for k, v in table.items()})
             for cid, table in (("T:L0:0", C0), ("T:L0:1", C1))]
    (merged,) = full_merge(stats)
    assert merged.strengths == [(label, pytest.approx(s)) for label, s in FULL]
    build_global(_labels_folder(tmp_path / "labels"), tmp_path / "global", n_bootstrap=10)
    page = (tmp_path / "global" / "tench" / "index.html").read_text()
    assert page.count("<figure") == 3 and "full merge: all 2 clusters of the layer" in page
    blocks = re.findall(r"<figure.*?</figure>", page, flags=re.S)
    figures = [re.findall(r'<span class="text">(.*?)</span>', f) for f in blocks]
    details = [[(label, float(s)) for label, s in re.findall(r"<li>(\S+) <span>([\d.]+)</span></li>", f)]
               for f in blocks]
    # best groups first (heaviest first), then the full merge: top-3 previews, top-6 for the full merge
    assert figures == [["fins 4.00", "scales 3.00", "water 2.00"], ["hand 8.00", "grass 6.00", "boat 4.00"],
                       [f"{label} {s:.2f}" for label, s in FULL[:6]]]
    assert details[0] == [(label, s) for label, s in sorted(C0.items(), key=lambda x: -x[1])]  # 4 labels: all
    assert details[1] == [(label, s) for label, s in sorted(C1.items(), key=lambda x: -x[1])]  # 8 labels: all
    assert details[2] == [(label, pytest.approx(s, abs=5e-4)) for label, s in FULL[:10]]  # 12 labels: top 10
    assert "mud" not in page.split("full merge: all")[1] and "w = 40.0 %" in blocks[2]
