"""``bench_tcav.py --study``: TCAV on a simulated study's own concepts — cost of ``convlens tcav`` cold and warm,
and power and false alarms of each random pool over seeds.

The study: INV explanations of synthetic-vgg (four deepest conv layers) on ``per_class`` test images of each of
the four classes, played by a simulated crowd over the real API whose planted concept of a round follows how
much of the class object the round's cluster map reveals at 13 % ("wheels" >= 30 %, "grass" <= 8 %, "edges"
otherwise; the crowd of ``tests/test_tcav_study_crowd.py``), labelled by ``convlens labels``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _sections import machine_line, markdown_table
from convlens.models.synthetic import SYNTHETIC_PREPROCESSING, load_synthetic_model
from convlens.tcav.concept_sets import ConceptSet, RandomSets, tensor_digest
from convlens.tcav.runner import TCAVRunner

STUDY_LAYERS = ["features.9", "features.13", "features.16", "features.20"]
PLANTED = ("wheels", "grass", "edges")  # the class object, next to none of it, some of it
POOLS = ("study", "class", "class-others", "other classes only")
PSEUDO = 4  # random sets posing as concepts, per class and seed
GROUND_TRUTH = (
    "Ground truth: the class object decides the class; \"wheels\" regions show it, \"grass\" regions (next to) "
    "none of it, \"edges\" some of it. So \"wheels\" used (+) is a hit and used (-) an error, \"grass\" used (+) a "
    "false alarm. Against the class's own regions (class, class-others) \"grass\" used (-) is the expected "
    "relative direction (less class evidence than the class's regions at large), not an error. Random sets "
    "from the other classes only carry those classes' evidence, which pushes the class down, so regions "
    "without the class object come out used (+): that design is measured, not offered.")


def _inv(root: Path, per_class: int) -> dict[str, np.ndarray]:
    """INV runs of the first ``per_class`` test images of every class; image id -> class-object mask."""
    from PIL import Image

    from convlens.data.synthetic import SyntheticShapes
    from convlens.inv import INV

    inv = INV(load_synthetic_model("synthetic-vgg"), layers=STUDY_LAYERS)
    dataset = SyntheticShapes(size=1000, seed=0, split="test")
    masks: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(range(4), 0)
    for index in range(1000):
        item = dataset.generate(index)
        if counts[item.label] >= per_class:
            continue
        counts[item.label] += 1
        image = Image.fromarray(item.pixels)
        explanation = inv.explain(SYNTHETIC_PREPROCESSING(image)[None], target=item.label,
                                  image_id=hashlib.sha256(item.pixels.tobytes()).hexdigest())
        explanation.save(root / f"img{index:03d}" / "inv", image=image)
        masks[explanation.image_id] = item.mask
    return masks


def _plan(study: Path, run: Path, masks: dict[str, np.ndarray]) -> object:
    from convlens.crowd.players import CrowdModel, CrowdPlan, PlantedRound
    from convlens.inv import load_inv_explanation
    from convlens.inv.reveal import binary_mask, upsample_nearest
    from convlens.study.store.config import load_rounds

    rounds = [r for r in load_rounds(study) if not r.gold]
    explanations = {e.image_id: e for e in (load_inv_explanation(f) for f in run.glob("*/inv"))}
    names = sorted({r.true_class for r in rounds})
    model = CrowdModel(concepts_per_class=3, trends=False, other=0.0, typo=0.0, synonym=0.0, inflection=0.0,
                       describe=1.0, correct=(0.85, 0.87, 0.9, 0.92, 0.95, 0.95), skill=0.0, resign=0.0,
                       resign_last=0.0, clarity=(0.95, 0.95))
    plan = CrowdPlan(0, model, {name: list(PLANTED) for name in names}, {}, {}, {}, names)
    for r in rounds:
        mask = masks[r.image_id]
        cluster_map = explanations[r.image_id].cluster(r.cluster_id).feature_map
        shown = binary_mask(upsample_nearest(cluster_map, mask.shape), 13.0) > 0
        share = float((shown & mask).sum() / shown.sum())
        concept = PLANTED[0] if share >= 0.3 else PLANTED[1] if share <= 0.08 else PLANTED[2]
        plan.rounds[r.round_id] = PlantedRound(r.round_id, r.cluster_id or "", r.true_class, r.layer_depth or 0,
                                               r.n_layers, concept, 0.95)
    return plan


def cli(*args: str) -> float:
    """Seconds of ``convlens ARGS`` (in process; RuntimeError with its output when it fails)."""
    from typer.testing import CliRunner

    from convlens.cli.main import app

    start = time.perf_counter()
    result = CliRunner().invoke(app, list(args))
    if result.exit_code != 0:
        raise RuntimeError(f"convlens {' '.join(args)}: {result.output}")
    return time.perf_counter() - start


def study_labels(root: Path, per_class: int) -> tuple[Path, dict[str, float]]:
    """INV runs -> study -> simulated crowd -> ``convlens labels``; seconds per step."""
    from convlens.crowd.play import simulate
    from convlens.study.batch.create import CreateOptions, create_study
    from convlens.study.web.app import create_app

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    masks = _inv(root / "run", per_class)
    seconds["INV"] = time.perf_counter() - start
    create_study(root / "study", [root / "run"], CreateOptions(plays_per_round=1, rounds_per_player=40))
    plan = _plan(root / "study", root / "run", masks)
    server = create_app(root / "study", None, rate_limit_ip="1000000/minute", rate_limit_participant="1000000/minute",
                        rate_limit_consent="1000000/minute")  # 1000 participants from one address
    start = time.perf_counter()
    try:
        simulate(root / "study", plan, participants=1000, app=server, concurrent=4)
    finally:
        server.state.engine.dispose()
    seconds["crowd"] = time.perf_counter() - start
    seconds["labels"] = cli("labels", str(root / "study"), "--out", str(root / "labels"), "--bootstrap", "100")
    return root / "labels", seconds


def _timing_row(label: str, out: Path, seconds: float) -> list[object]:
    manifest = json.loads((out / "tcav.json").read_text())
    tests, counts = manifest["counts"]["tests"], manifest["counts"]
    phases = ", ".join(f"{k} {v:.2f}" for k, v in manifest["timings"].items()
                       if k not in ("total", "per_test") and v >= 0.005)
    return [label, tests, seconds, manifest["timings"]["total"], manifest["timings"]["total"] / tests,
            f"{counts['cavs_trained']} / {counts['cavs_loaded']}", phases]


def _designs(labels: Path, runs: int, seed: int) -> tuple[Any, dict[str, tuple[dict, dict]]]:
    """Concepts and random pools of every design, for one seed (concept samples and random sets)."""
    from convlens.inv.reveal import reveal_image
    from convlens.labels.files import read_labels
    from convlens.tcav.study_concepts import build_study_concepts, model_input

    folder = read_labels(labels)
    to_input = model_input(load_synthetic_model("synthetic-vgg").preprocessing)
    built = {pool: build_study_concepts(folder, to_input, reveal_image, random_runs=runs, seed=seed, random_pool=pool)
             for pool in ("study", "class", "class-others")}
    designs = {pool: (c.concepts, c.random_sets) for pool, c in built.items()}
    base = built["class"]
    designs["other classes only"] = (base.concepts, {k: RandomSets(torch.cat([
        r.pool for j, r in base.random_sets.items() if j != k]), seed=seed) for k in base.concepts})
    return base, designs


def _pseudo(concepts: dict, pools: dict, class_pools: dict, seed: int) -> tuple[dict, dict]:
    """Random sets posing as concepts (drawn from the class's pool, or the design's), with the design's pools."""
    sets, chosen = {}, {}
    for k in concepts:
        pool = pools[k]
        source = class_pools[k] if isinstance(pool, dict) else pool
        sets[k] = [ConceptSet(f"pseudo-{j}", source.draw(20, 5000 + 10 * k + j).images) for j in range(PSEUDO)]
        if isinstance(pool, dict):  # class-others: the class's regions without the pseudo-concept's own
            chosen[k] = {s.name: RandomSets(torch.stack([t for t in source.pool if tensor_digest(t) not in
                                                         set(s.image_digests)]), seed=seed) for s in sets[k]}
        else:
            chosen[k] = pool
    return sets, chosen


def _power(labels: Path, runs: int, seeds: int) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per design, the rows of every planted concept's and pseudo-concept's test, over ``seeds`` seeds."""
    loaded = load_synthetic_model("synthetic-vgg")
    found: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for seed in range(seeds):
        base, designs = _designs(labels, runs, seed)
        for design, (concepts, pools) in designs.items():
            pseudo, pseudo_pools = _pseudo(concepts, pools, base.random_sets, seed)
            for kind, sets, chosen in (("real", concepts, pools), ("pseudo", pseudo, pseudo_pools)):
                runner = TCAVRunner(loaded.module, STUDY_LAYERS, model_name="synthetic-vgg",
                                    class_names=base.class_names, random_runs=runs)
                start = time.perf_counter()
                report = runner.run(base.class_inputs, sets, chosen)
                found[design]["seconds"].append({"s": time.perf_counter() - start})
                for test in report.tests:
                    found[design]["pseudo" if kind == "pseudo" else test.concept].append(test.row())
    return found


def _share(rows: list[dict[str, Any]], verdict: str) -> str:
    hits = sum(r["verdict"] == verdict for r in rows)
    return f"{100 * hits / len(rows):.0f} % ({hits}/{len(rows)})" if rows else "—"


def _power_rows(found: dict[str, dict[str, list[dict[str, Any]]]]) -> list[list[object]]:
    rows: list[list[object]] = []
    for design in POOLS:
        by = found[design]
        pseudo = by["pseudo"]
        uncorrected = sum(float(r["p"]) < 0.05 for r in pseudo)
        rows.append([design, _share(by["wheels"], "used (+)"), _share(by["wheels"], "used (-)"),
                     _share(by["grass"], "used (+)"), _share(by["grass"], "used (-)"), _share(by["edges"], "used (+)"),
                     f"{100 * uncorrected / len(pseudo):.1f} % ({uncorrected}/{len(pseudo)})",
                     _share(pseudo, "used (+)") + " / " + _share(pseudo, "used (-)"),
                     f"{np.mean([float(r['effect_size']) for r in by['wheels']]):+.2f}",
                     f"{np.median([s['s'] for s in by['seconds']]):.1f}"])
    return rows


def _verdict_rows(rows: list[dict[str, str]]) -> list[list[object]]:
    table: list[list[object]] = []
    for name in sorted({t["class"] for t in rows}):
        for concept in PLANTED:
            mine = [t for t in rows if t["class"] == name and t["concept"] == concept]
            if mine:
                table.append([name, concept, mine[0]["n_concept_images"], *[
                    f"{float(t['effect_size']):+.1f} ({float(t['p_value']):.2g}) {t['verdict']}" for t in mine]])
    return table


def study_section(per_class: int, runs: int, seeds: int) -> str:
    import os

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        labels, steps = study_labels(root, per_class)
        timing = []
        for label, pool, out in (("default (--random-pool study), cold CAV cache", "study", "tcav-study"),
                                 ("default, warm CAV cache (2nd run)", "study", "tcav-study"),
                                 ("--random-pool class, cold CAV cache", "class", "tcav-class")):
            seconds = cli("tcav", str(labels), "--out", str(root / out), "--random-pool", pool, "--random-runs",
                          str(runs), "--no-place")
            timing.append(_timing_row(label, root / out, seconds))
        with (root / "tcav-study" / "tcav.csv").open(newline="", encoding="utf-8") as handle:
            verdicts = [r for r in csv.DictReader(handle) if r["layer"]]
        manifest = json.loads((root / "tcav-study" / "tcav.json").read_text())
        found = _power(labels, runs, seeds)
    ratio, command = timing[0][3] / timing[1][3], timing[0][2] / timing[1][2]
    return "\n".join([
        "## TCAV on a study's own concepts (`benchmarks/bench_tcav.py --study`)", "",
        machine_line() + f" · load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, "
        f"{os.cpu_count()} cores", "",
        f"Study: synthetic-vgg, INV at {', '.join(STUDY_LAYERS)}, {per_class} test images x 4 classes, one simulated "
        "play per cluster round (planted concept by the share of the class object the cluster reveals), `convlens "
        "labels` (all-MiniLM-L6-v2). Steps before TCAV (s): " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
        + f". `convlens tcav` with N = {runs}, concept sizes {manifest['concepts']['sizes']}, every INV layer.", "",
        "### Time per (class, concept, layer)", "",
        markdown_table(["run", "tests", "command s", "TCAV s", "s per test", "CAVs trained / loaded", "phases (s)"],
                       timing),
        "", f"Cold / warm: {ratio:.2f} for the TCAV run, {command:.2f} for the command (which also loads the model "
        "and renders the regions either way). The study pool's random-vs-random null is shared by every class; the "
        "class pool pays one per class.", "",
        f"### Power and false alarms per random pool ({seeds} seeds of concept samples and random sets)", "",
        f"Share of (class, layer) tests with each verdict after Holm; pseudo-concepts: {PSEUDO} random sets of 20 "
        "regions per class posing as concepts (drawn from the class's regions for class-others), tested alone "
        "(a correct test calls about 5 % significant before correction).", "",
        markdown_table(["random pool", "wheels used (+): power", "wheels used (-)", "grass used (+): false alarm",
                        "grass used (-)", "edges used (+)", "pseudo p < 0.05 (uncorrected)", "pseudo used (+) / (-)",
                        "mean z of wheels", "s per run"], _power_rows(found)),
        "", GROUND_TRUTH, "",
        "### Verdicts of the planted concepts, default pool (z (Holm p) verdict per layer)", "",
        markdown_table(["class", "concept", "size", *STUDY_LAYERS], _verdict_rows(verdicts)),
    ])
