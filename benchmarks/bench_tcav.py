"""TCAV benchmark: time per (class, concept, layer) with and without the caches, the synthetic check, calibration.

On the synthetic exact-ground-truth benchmark (both shipped CNNs, two layers each, all four classes, the
class-object and the unrelated-distractor concepts of ``convlens.tcav.concept_sets``):

* timing (synthetic-vgg): plain Captum ``TCAV.interpret`` (DefaultClassifier, its on-disk activations),
  then ``TCAVRunner`` without the activation cache (activations recomputed for every CAV), with it and a
  cold CAV cache, and with a warm CAV cache (a second run: every CAV loaded) — the same CAVs each time
  (concept vs N random sets, all random pairs for the null);
* the synthetic check's table for both CNNs at the default N = 20 random runs;
* calibration: random sets posing as concepts (K per class) and the share called significant at
  alpha 0.05 (no correction) by the paper's test (Student t-test of the N concept-vs-random sign counts
  against all random-vs-random sign counts, as tensorflow/tcav computes it) and by this package's test
  (Crawford-Howell t-test of the concept's mean against the random sets' own means) on the sign count
  and on the magnitude; the same rates for the class objects (power) and the distractors.

With ``--study`` it instead measures ``convlens tcav`` on a study-derived labels folder and writes its own
section: a study of INV explanations of synthetic-vgg (four deepest conv layers) on ``--study-images``
test images of each of the four classes, played by a simulated crowd over the real API whose planted
concept of a round follows how much of the class object the round's cluster map reveals at 13 %
("wheels" >= 30 %, "grass" <= 8 %, "edges" otherwise; the same crowd as ``tests/test_tcav_study_crowd.py``),
labelled by ``convlens labels``; then ``convlens tcav`` with its defaults (time per (class, concept,
layer), cold and warm CAV cache), with ``--random-pool study``, and, through the library, with random
sets from the other classes' regions only — the verdicts of the planted concepts under each pool.

Usage: ``python benchmarks/bench_tcav.py [--runs 20] [--images 40] [--pseudo 4] [--quick] [--no-write]``;
``python benchmarks/bench_tcav.py --study [--study-images 12] [--no-write]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from captum.concept import TCAV, Concept
from scipy import stats
from torch.utils.data import DataLoader

from _sections import machine_line, markdown_table, write_section
from convlens.models.synthetic import SYNTHETIC_PREPROCESSING, load_synthetic_model
from convlens.tcav.cav import ActivationStore, CAVCache
from convlens.tcav.concept_sets import ConceptSet, SyntheticConcepts, synthetic_class_inputs, synthetic_concepts
from convlens.tcav.runner import TCAVReport, TCAVRunner, layer_sensitivities, tcav_magnitude, tcav_score
from convlens.tcav.stats import compare_to_null, pseudo_concept_means

LAYERS = {"synthetic-vgg": ["features.16", "features.20"], "synthetic-resnet": ["layer2", "layer3"]}
INPUTS = 20  # test images per class (the X_k whose gradients are tested)


def _captum_plain(name: str, data: SyntheticConcepts, inputs: dict[int, torch.Tensor], runs: int, n: int) -> float:
    """Seconds for Captum's own TCAV on the same experimental sets (no statistics), fresh directories."""
    model = load_synthetic_model(name).module
    randoms = data.random.runs(n, runs)
    concepts: dict[str, Concept] = {}

    def concept(s: ConceptSet) -> Concept:
        if s.digest not in concepts:
            concepts[s.digest] = Concept(len(concepts), f"c{len(concepts)}", DataLoader(s.images, batch_size=64))
        return concepts[s.digest]

    pairs = [[concept(randoms[i]), concept(randoms[j])] for i in range(runs) for j in range(i + 1, runs)]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tcav = TCAV(model, LAYERS[name], model_id=name, save_path=tmp + "/")
        start = time.perf_counter()
        for k, x in inputs.items():
            sets = [[concept(c), concept(r)] for c in data.for_class(k) for r in randoms]
            tcav.interpret(x, sets + pairs, target=k)
        return time.perf_counter() - start


def _ours(name: str, data: SyntheticConcepts, inputs: dict[int, torch.Tensor], runs: int, **kwargs: object) -> tuple[
    TCAVReport, float
]:
    loaded = load_synthetic_model(name)
    runner = TCAVRunner(loaded.module, LAYERS[name], model_name=name, class_names=loaded.class_names,
                        random_runs=runs, **kwargs)  # type: ignore[arg-type]
    start = time.perf_counter()
    report = runner.run(inputs, {k: data.for_class(k) for k in inputs}, data.random)
    return report, time.perf_counter() - start


def _timing(data: SyntheticConcepts, inputs: dict[int, torch.Tensor], runs: int, n: int, cache: Path,
            captum: bool) -> tuple[list[list[object]], dict[str, TCAVReport]]:
    name = "synthetic-vgg"
    rows: list[list[object]] = []
    tests = len(inputs) * 2 * len(LAYERS[name])
    if captum:
        seconds = _captum_plain(name, data, inputs, runs, n)
        rows.append(["Captum TCAV.interpret (DefaultClassifier, AV files per concept)", seconds, seconds / tests,
                     "—", "—", "—"])
    variants = {
        "TCAVRunner, no activation cache, no CAV cache": {"reuse_activations": False},
        "TCAVRunner, activation cache, cold CAV cache": {"cache_dir": cache},
        "TCAVRunner, activation cache, warm CAV cache (2nd run)": {"cache_dir": cache},
    }
    reports: dict[str, TCAVReport] = {}
    for label, kwargs in variants.items():
        report, seconds = _ours(name, data, inputs, runs, **kwargs)
        reports[label] = report
        phases = ", ".join(f"{k} {v:.2f}" for k, v in report.timings.items() if v >= 0.005)
        rows.append([label, seconds, seconds / tests, report.counts["images_forwarded"],
                     f"{report.counts['cavs_trained']} / {report.counts['cavs_loaded']}", phases])
    return rows, reports


def _check_rows(report: TCAVReport) -> list[list[object]]:
    rows: list[list[object]] = []
    for t in report.tests:
        role = "class object" if t.concept == t.class_name else "distractor"
        rows.append([report.model, t.class_name, f"{t.concept} ({role})", t.layer, t.tcav_mean, t.random_mean,
                     f"{t.magnitude.value:.3f}", f"{t.comparison.effect_size:.1f}", f"{t.comparison.p:.2g}",
                     f"{t.p_holm:.2g}", t.verdict])
    return rows


def _pair_scores(sens: np.ndarray, randoms: list[ConceptSet], layer: str, cavs: CAVCache) -> tuple[np.ndarray, ...]:
    n = len(randoms)
    sign, magnitude = np.zeros((n, n)), np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                v, _ = cavs.direction(randoms[i], randoms[j], layer)
                sign[i, j], magnitude[i, j] = tcav_score(sens, v), tcav_magnitude(sens, v)
    return sign, magnitude


def _calibrate(name: str, data: SyntheticConcepts, inputs: dict[int, torch.Tensor], runs: int, n: int,
               pseudo: int, cache: Path) -> dict[str, dict[str, list[bool]]]:
    """Rejections at alpha 0.05 per concept role and test (recomputed from the public pieces)."""
    module = load_synthetic_model(name).module
    randoms = data.random.runs(n, runs)
    roles = {k: {"class object": [data.class_objects[k]], "distractor": [data.distractors[k]],
                 "random set as concept": [data.random.draw(n, 1000 + 10 * k + j) for j in range(pseudo)]}
             for k in inputs}
    store = ActivationStore(module, LAYERS[name])
    store.add([*randoms, *(s for by_role in roles.values() for sets in by_role.values() for s in sets)])
    cavs = CAVCache(store, model_name=name, save_path=cache)  # the runner's CAV files: loaded, not retrained
    out: dict[str, dict[str, list[bool]]] = {}
    for k, x in inputs.items():
        sens = layer_sensitivities(module, x, LAYERS[name], k)
        for layer in LAYERS[name]:
            sign, magnitude = _pair_scores(sens[layer], randoms, layer, cavs)
            pooled = sign[~np.eye(runs, dtype=bool)]
            null_sign, null_magnitude = pseudo_concept_means(sign), pseudo_concept_means(magnitude)
            for role, sets in roles[k].items():
                for s in sets:
                    vs = [cavs.direction(s, r, layer)[0] for r in randoms]
                    scores = np.array([tcav_score(sens[layer], v) for v in vs])
                    magnitudes = np.array([tcav_magnitude(sens[layer], v) for v in vs])
                    tests = {
                        "paper: t-test of N scores vs all random-pair scores": stats.ttest_ind(scores, pooled).pvalue,
                        "ours, sign count": compare_to_null(scores.mean(), null_sign).p,
                        "ours, magnitude (default)": compare_to_null(magnitudes.mean(), null_magnitude).p,
                    }
                    for test, p in tests.items():
                        out.setdefault(test, {}).setdefault(role, []).append(bool(p < 0.05))
    return out


def _calibration_rows(results: dict[str, dict[str, dict[str, list[bool]]]]) -> list[list[object]]:
    rows: list[list[object]] = []
    for name, by_test in results.items():
        for test, by_role in by_test.items():
            cells = [f"{100 * np.mean(v):.0f} % ({sum(v)}/{len(v)})" for v in by_role.values()]
            rows.append([name, test, *cells])
    return rows


# --- study-derived run ---------------------------------------------------------------------------------------

STUDY_LAYERS = ["features.9", "features.13", "features.16", "features.20"]
GROUND_TRUTH = (
    "Ground truth: the class object decides the class; \"wheels\" regions show it, \"grass\" regions (next to) "
    "none of it, \"edges\" some of it. So \"wheels\" must not come out used (-) and \"grass\" not used (+). "
    "Random sets from the other classes only carry those classes' evidence, which pushes the class down: "
    "regions without the class object can then come out used (+). The study pool holds the class's own "
    "regions too (a quarter here), which dilutes that; the class pool compares a label with its class's own "
    "regions, so its directions are relative to them (\"grass\" negative, \"wheels\" positive).")
PLANTED = ("wheels", "grass", "edges")  # the class object, next to none of it, some of it


def _study_inv(root: Path, per_class: int) -> dict[str, np.ndarray]:
    """INV runs of the first ``per_class`` test images of every class; image id -> class-object mask."""
    import hashlib

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


def _study_plan(study: Path, run: Path, masks: dict[str, np.ndarray]) -> object:
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


def _cli(*args: str) -> float:
    from typer.testing import CliRunner

    from convlens.cli.main import app

    start = time.perf_counter()
    result = CliRunner().invoke(app, list(args))
    if result.exit_code != 0:
        raise RuntimeError(f"convlens {' '.join(args)}: {result.output}")
    return time.perf_counter() - start


def _study_labels(root: Path, per_class: int) -> tuple[Path, dict[str, float]]:
    """INV runs -> study -> simulated crowd -> ``convlens labels``; seconds per step."""
    from convlens.crowd.play import simulate
    from convlens.study.batch.create import CreateOptions, create_study
    from convlens.study.web.app import create_app

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    masks = _study_inv(root / "run", per_class)
    seconds["INV"] = time.perf_counter() - start
    create_study(root / "study", [root / "run"], CreateOptions(plays_per_round=1, rounds_per_player=40))
    plan = _study_plan(root / "study", root / "run", masks)
    server = create_app(root / "study", None, rate_limit_ip="1000000/minute", rate_limit_participant="1000000/minute",
                        rate_limit_consent="1000000/minute")  # 1000 participants from one address
    start = time.perf_counter()
    try:
        simulate(root / "study", plan, participants=1000, app=server, concurrent=4)
    finally:
        server.state.engine.dispose()
    seconds["crowd"] = time.perf_counter() - start
    seconds["labels"] = _cli("labels", str(root / "study"), "--out", str(root / "labels"), "--bootstrap", "100")
    return root / "labels", seconds


def _other_classes(labels: Path, runs: int) -> TCAVReport:
    """The default construction, but every class's random sets drawn from the *other* classes' regions."""
    from convlens.inv.reveal import reveal_image
    from convlens.labels.files import read_labels
    from convlens.tcav.concept_sets import RandomSets
    from convlens.tcav.study_concepts import build_study_concepts, model_input

    loaded = load_synthetic_model("synthetic-vgg")
    concepts = build_study_concepts(read_labels(labels), model_input(loaded.preprocessing), reveal_image,
                                    random_runs=runs)
    pools = {k: RandomSets(torch.cat([r.pool for j, r in concepts.random_sets.items() if j != k]), seed=0)
             for k in concepts.concepts}
    runner = TCAVRunner(loaded.module, STUDY_LAYERS, model_name="synthetic-vgg", class_names=concepts.class_names,
                        random_runs=runs)
    return runner.run(concepts.class_inputs, concepts.concepts, pools)


def _csv_tests(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="", encoding="utf-8") as handle:
        return [r for r in csv.DictReader(handle) if r["layer"]]


def _verdict_rows(by_pool: dict[str, list[dict[str, str]]]) -> list[list[object]]:
    rows: list[list[object]] = []
    for pool, tests in by_pool.items():
        for name in sorted({t["class"] for t in tests}):
            for concept in PLANTED:
                mine = [t for t in tests if t["class"] == name and t["concept"] == concept]
                if not mine:
                    continue
                cells = [f"{float(t['effect_size']):+.1f} ({float(t['p_value']):.2g}) {t['verdict']}" for t in mine]
                rows.append([pool, name, concept, mine[0]["n_concept_images"], *cells])
    return rows


def _report_rows(report: TCAVReport) -> list[dict[str, str]]:
    return [{k: str(v) for k, v in row.items()} for row in report.rows()]


def _study_timing_row(label: str, out: Path, seconds: float) -> list[object]:
    manifest = json.loads((out / "tcav.json").read_text())
    tests, counts = manifest["counts"]["tests"], manifest["counts"]
    phases = ", ".join(f"{k} {v:.2f}" for k, v in manifest["timings"].items()
                       if k not in ("total", "per_test") and v >= 0.005)
    return [label, tests, seconds, manifest["timings"]["total"], manifest["timings"]["total"] / tests,
            f"{counts['cavs_trained']} / {counts['cavs_loaded']}", phases]


def _study_section(per_class: int, runs: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        labels, steps = _study_labels(root, per_class)
        timing, by_pool = [], {}
        for label, pool, out in (("default (--random-pool class), cold CAV cache", "class", "class"),
                                 ("default, warm CAV cache (2nd run)", "class", "class"),
                                 ("--random-pool study, cold CAV cache", "study", "study")):
            seconds = _cli("tcav", str(labels), "--out", str(root / out), "--random-pool", pool, "--random-runs",
                           str(runs), "--no-place")
            timing.append(_study_timing_row(label, root / out, seconds))
            by_pool[f"{pool} (CLI)"] = _csv_tests(root / out / "tcav.csv")
        by_pool["other classes only (library)"] = _report_rows(_other_classes(labels, runs))
        manifest = json.loads((root / "class" / "tcav.json").read_text())
    return _render_study(per_class, runs, steps, timing, by_pool, manifest)


def _render_study(per_class: int, runs: int, steps: dict[str, float], timing: list[list[object]],
                  by_pool: dict[str, list[dict[str, str]]], manifest: dict) -> str:
    sizes = {name: {c: v["size"] for c, v in info["concepts"].items()}
             for name, info in manifest["concepts"]["classes"].items()}
    return "\n".join([
        "## TCAV on a study's own concepts (`benchmarks/bench_tcav.py --study`)", "", machine_line(), "",
        f"Study: synthetic-vgg, INV at {', '.join(STUDY_LAYERS)}, {per_class} test images x 4 classes, one "
        "simulated play per cluster round (planted concept by the share of the class object the cluster "
        "reveals), `convlens labels` (all-MiniLM-L6-v2). Steps before TCAV (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()) + ".", "",
        f"`convlens tcav` with N = {runs}, concept sizes {manifest['concepts']['sizes']}, every INV layer; "
        f"concept sizes used: {sizes}; skipped: {len(manifest['concepts']['skipped'])} "
        "(labels with too few regions, reasons in tcav.json).", "",
        "### Time per (class, concept, layer)", "",
        markdown_table(["run", "tests", "command s", "TCAV s", "s per test", "CAVs trained / loaded",
                        "phases (s)"], timing),
        "", "Command seconds include loading the model and rendering the regions. With the class pool every class "
        "pays its own random-vs-random null (N(N-1)/2 CAVs per layer and size); the study pool's null is shared "
        "by every class.", "",
        "### Verdicts of the planted concepts by random pool (z (Holm p) verdict per layer)", "",
        markdown_table(["random pool", "class", "concept", "size", *STUDY_LAYERS], _verdict_rows(by_pool)),
        "", GROUND_TRUTH,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="random runs N (the runner's default is 20)")
    parser.add_argument("--images", type=int, default=40, help="patches per concept set")
    parser.add_argument("--pseudo", type=int, default=4, help="random sets posing as concepts, per class")
    parser.add_argument("--quick", action="store_true", help="N = 10, 2 pseudo-concepts, no Captum baseline")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    parser.add_argument("--study", action="store_true", help="only the study-derived run (its own section)")
    parser.add_argument("--study-images", type=int, default=12, help="test images per class in the study")
    args = parser.parse_args()
    if args.study:
        warnings.filterwarnings("ignore", category=UserWarning)
        torch.set_num_threads(1)
        body = _study_section(args.study_images, args.runs)
        print(body)
        if not args.no_write:
            write_section("tcav-study", body)
        return
    if args.quick:
        args.runs, args.pseudo = 10, 2
    warnings.filterwarnings("ignore", category=UserWarning)
    # scipy on the paper's test when all N concept scores are equal (e.g. all 1.0)
    warnings.filterwarnings("ignore", category=RuntimeWarning, message="Precision loss")
    torch.set_num_threads(1)
    data = synthetic_concepts(SYNTHETIC_PREPROCESSING, n_images=args.images, seed=0)
    inputs = synthetic_class_inputs(SYNTHETIC_PREPROCESSING, count=INPUTS, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        timing, reports = _timing(data, inputs, args.runs, args.images, cache, captum=not args.quick)
        check = {"synthetic-vgg": reports["TCAVRunner, activation cache, cold CAV cache"]}
        check["synthetic-resnet"] = _ours("synthetic-resnet", data, inputs, args.runs, cache_dir=cache)[0]
        calibration = {name: _calibrate(name, data, inputs, args.runs, args.images, args.pseudo, cache)
                       for name in LAYERS}
    body = _render(args, timing, check, calibration)
    print(body)
    if not args.no_write:
        write_section("tcav", body)


def _render(args: argparse.Namespace, timing: list[list[object]], check: dict[str, TCAVReport],
            calibration: dict[str, dict[str, dict[str, list[bool]]]]) -> str:
    tests = len(LAYERS["synthetic-vgg"]) * 2 * 4
    roles = next(iter(next(iter(calibration.values())).values()))
    return "\n".join([
        "## TCAV (`benchmarks/bench_tcav.py`)", "", machine_line(), "",
        f"Synthetic benchmark, 4 classes x 2 concepts (class object, unrelated distractor) x 2 layers = {tests} "
        f"tests per CNN; {args.images} patches per concept, N = {args.runs} random sets of the same size, "
        f"{INPUTS} test images per class, 1 torch thread. Every variant trains the same CAVs: per layer "
        f"{args.runs * (args.runs - 1) // 2} random pairs (the null) + {args.runs} per concept.", "",
        "### Time per (class, concept, layer), synthetic-vgg", "",
        markdown_table(["variant", "total s", "s per test", "images forwarded", "CAVs trained / loaded",
                        "phases (s)"], timing),
        "", "With the activation cache every distinct image is forwarded once; without it, the 80 images of "
        "each CAV's two sets are forwarded again for every CAV. Captum's row has no statistics; its "
        "DefaultClassifier runs sklearn's full-batch `fit` (more epochs than the mini-batch stopping rule) and "
        "it writes and reads activation files per concept. One run on a shared 2-core machine.", "",
        f"### Synthetic check (N = {args.runs}, statistic: magnitude; z = effect size in null SDs)", "",
        markdown_table(["model", "class", "concept", "layer", "TCAV mean", "random mean", "magnitude", "z", "p",
                        "Holm p", "verdict"], [r for report in check.values() for r in _check_rows(report)]),
        "", "### Calibration: share of tests with p < 0.05 (uncorrected)", "",
        f"{args.pseudo} random sets per class posing as concepts (a correct test calls ~5 % or fewer "
        "significant), the class objects (power) and the distractors, both layers.", "",
        markdown_table(["model", "test", *roles], _calibration_rows(calibration)),
    ])


if __name__ == "__main__":
    main()
