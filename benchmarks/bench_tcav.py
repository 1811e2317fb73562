"""TCAV benchmark: what a test costs cold and warm, the 1,800-test projection, reproducibility, and power and false
positives per random pool, on the synthetic exact-ground-truth benchmark (both shipped CNNs).

* cost (synthetic-vgg, 4 classes x 2 concepts x 2 layers): Captum's ``TCAV.interpret``, the mini-batch SGD solver
  convlens used before, the batched L2-SVM without the activation cache, with a cold CAV cache and with a warm
  one (every CAV loaded), cold and warm repeated side by side; and one test alone (1 class x 1 concept x 1 layer);
* the 1,800-test projection: a study-shaped workload (20 labels of sizes 10/20/40 per class, 9 layers, the study
  pool, N random runs) measured on 2 classes, cold and warm, and scaled to 10 classes;
* the synthetic check with both solvers side by side (the verdicts the new solver changed);
* reproducibility: CAV directions and verdicts across solver seeds, and verdicts across data seeds;
* power and false positives per random pool (random boxes without class objects, boxes of the class's images,
  boxes of every class's images) over seeds, and the paper's two-sample t-test against this package's test.

With ``--study`` it measures ``convlens tcav`` on a simulated study instead (``_tcav_study.py``, its own section).

Usage: ``python benchmarks/bench_tcav.py [--runs 20] [--images 40] [--seeds 4] [--quick] [--no-write]``;
``python benchmarks/bench_tcav.py --study [--study-images 12] [--seeds 4] [--no-write]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from captum.concept import TCAV, Concept
from PIL import Image
from scipy import stats
from torch.utils.data import DataLoader

from _sections import machine_line, markdown_table, write_section
from convlens.data.synthetic import SyntheticShapes
from convlens.models.synthetic import SYNTHETIC_PREPROCESSING, load_synthetic_model
from convlens.tcav.cav import ActivationStore, CAVCache, MiniBatchSGDClassifier
from convlens.tcav.concept_sets import (
    ConceptSet,
    RandomSets,
    SyntheticConcepts,
    _crop,
    _paste,
    synthetic_class_inputs,
    synthetic_concepts,
)
from convlens.tcav.runner import TCAVReport, TCAVRunner, layer_sensitivities
from convlens.tcav.stats import compare_to_null, pseudo_concept_means

LAYERS = {"synthetic-vgg": ["features.16", "features.20"], "synthetic-resnet": ["layer2", "layer3"]}
INPUTS = 20  # test images per class (the X_k whose gradients are tested)
PROJECTION_LAYERS = ["features.2", "features.4", "features.6", "features.9", "features.11", "features.13",
                     "features.16", "features.18", "features.20"]
REPEATS = 3  # cold/warm pairs side by side


# --- data ----------------------------------------------------------------------------------------------------


def _data(images: int, seed: int) -> tuple[SyntheticConcepts, dict[int, torch.Tensor]]:
    """Fresh concept sets and inputs (their digests are computed again by each run that uses them)."""
    return (synthetic_concepts(SYNTHETIC_PREPROCESSING, n_images=images, seed=seed),
            synthetic_class_inputs(SYNTHETIC_PREPROCESSING, count=INPUTS, seed=seed))


def _class_boxes(per_class: int, seed: int) -> dict[int, torch.Tensor]:
    """Boxes of an object's size at random places of each class's images (the class object sometimes in them),
    pasted on the grey canvas: the synthetic benchmark's "regions of a class"."""
    dataset = SyntheticShapes(size=20000, seed=seed, split="val")
    rng = np.random.default_rng([seed, 11])
    boxes: dict[int, list[np.ndarray]] = defaultdict(list)
    for index in range(20000):
        item = dataset.generate(index)
        if len(boxes[item.label]) < per_class:
            r = int(rng.integers(7, 11))
            cy, cx = (int(v) for v in rng.integers(r + 1, item.pixels.shape[0] - r - 1, 2))
            boxes[item.label].append(_paste(_crop(item.pixels, cy, cx, r), rng, dataset.image_size))
        if len(boxes) == 4 and all(len(v) == per_class for v in boxes.values()):
            break
    return {k: torch.stack([SYNTHETIC_PREPROCESSING(Image.fromarray(p, "RGB")) for p in v])
            for k, v in sorted(boxes.items())}


def _runner(name: str, runs: int, layers: list[str] | None = None, **kwargs: Any) -> TCAVRunner:
    loaded = load_synthetic_model(name)
    return TCAVRunner(loaded.module, layers or LAYERS[name], model_name=name, class_names=loaded.class_names,
                      random_runs=runs, **kwargs)


def _timed(runner: TCAVRunner, inputs: dict, concepts: dict, pools: Any) -> tuple[TCAVReport, float]:
    start = time.perf_counter()
    report = runner.run(inputs, concepts, pools)
    return report, time.perf_counter() - start


# --- cost ----------------------------------------------------------------------------------------------------


def _captum_plain(args: argparse.Namespace) -> float:
    """Seconds for Captum's own TCAV on the same experimental sets (no statistics), fresh directories."""
    name = "synthetic-vgg"
    data, inputs = _data(args.images, 0)
    model = load_synthetic_model(name).module
    randoms = data.random.runs(args.images, args.runs)
    concepts: dict[str, Concept] = {}

    def concept(s: ConceptSet) -> Concept:
        if s.digest not in concepts:
            concepts[s.digest] = Concept(len(concepts), f"c{len(concepts)}", DataLoader(s.images, batch_size=64))
        return concepts[s.digest]

    pairs = [[concept(randoms[i]), concept(randoms[j])] for i in range(args.runs) for j in range(i + 1, args.runs)]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tcav = TCAV(model, LAYERS[name], model_id=name, save_path=tmp + "/")
        start = time.perf_counter()
        for k, x in inputs.items():
            tcav.interpret(x, [[concept(c), concept(r)] for c in data.for_class(k) for r in randoms] + pairs, target=k)
        return time.perf_counter() - start


def _row(label: str, report: TCAVReport, seconds: float, tests: int) -> list[object]:
    phases = ", ".join(f"{k} {v:.2f}" for k, v in report.timings.items() if v >= 0.005)
    return [label, seconds, seconds / tests, report.counts["images_forwarded"],
            f"{report.counts['cavs_trained']} / {report.counts['cavs_loaded']}", phases]


def _cost(args: argparse.Namespace, tmp: Path) -> tuple[list[list[object]], dict[str, Any]]:
    """The cost table (synthetic-vgg), the cold/warm medians, and the reports of both solvers."""
    name, tests = "synthetic-vgg", 4 * 2 * len(LAYERS["synthetic-vgg"])
    rows: list[list[object]] = []
    if not args.quick:
        seconds = _captum_plain(args)
        rows.append(["Captum TCAV.interpret (DefaultClassifier, AV files per concept)", seconds, seconds / tests,
                     "—", "—", "—"])
    data, inputs = _data(args.images, 0)
    sgd, seconds = _timed(_runner(name, args.runs, classifier=MiniBatchSGDClassifier(), cache_dir=tmp / "sgd"),
                          inputs, {k: data.for_class(k) for k in inputs}, data.random)
    rows.append(_row("mini-batch SGD solver (before), cold CAV cache", sgd, seconds, tests))
    data, inputs = _data(args.images, 0)
    report, seconds = _timed(_runner(name, args.runs, reuse_activations=False), inputs,
                             {k: data.for_class(k) for k in inputs}, data.random)
    rows.append(_row("L2-SVM, no activation cache, no CAV cache", report, seconds, tests))
    cold, warm, svm = [], [], None
    for repeat in range(REPEATS):  # cold, then warm, side by side
        for phase, times in (("cold", cold), ("warm", warm)):
            data, inputs = _data(args.images, 0)
            report, seconds = _timed(_runner(name, args.runs, cache_dir=tmp / f"svm{repeat}"), inputs,
                                     {k: data.for_class(k) for k in inputs}, data.random)
            times.append(seconds)
            if repeat == 0:
                svm = svm or report
                rows.append(_row(f"L2-SVM, activation cache, {phase} CAV cache" + (" (2nd run)" if phase == "warm"
                                                                                   else ""), report, seconds, tests))
    alone = _one_test(args, tmp)
    medians = {"cold": statistics.median(cold), "warm": statistics.median(warm),
               "ratio": statistics.median(c / w for c, w in zip(cold, warm, strict=True)), **alone}
    return rows, {"medians": medians, "svm": svm, "sgd": sgd}


def _one_test(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """One test alone (class 0, its class object, the last layer): cold and warm, repeated; the SGD solver cold."""
    found: dict[str, list[float]] = defaultdict(list)
    for repeat in range(REPEATS):
        for label, kwargs in (("cold", {}), ("warm", {}), ("sgd", {"classifier": MiniBatchSGDClassifier()})):
            if label == "sgd" and repeat:
                continue
            data, inputs = _data(args.images, 0)
            folder = tmp / ("one-sgd" if label == "sgd" else f"one{repeat}")
            runner = _runner("synthetic-vgg", args.runs, ["features.20"], cache_dir=folder, **kwargs)
            found[label].append(_timed(runner, {0: inputs[0]}, {0: [data.class_objects[0]]}, data.random)[1])
    return {"one cold": statistics.median(found["cold"]), "one warm": statistics.median(found["warm"]),
            "one sgd": found["sgd"][0],
            "one ratio": statistics.median(c / w for c, w in zip(found["cold"], found["warm"], strict=True))}


def _projection(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """A study-shaped workload on 2 classes (20 labels of sizes 10/20/40, 9 layers, study pool), cold and warm."""
    boxes = _class_boxes(200, 0)
    rng = np.random.default_rng(3)
    sizes = (10, 20, 40)
    concepts = {k: [ConceptSet(f"label-{j}", boxes[k][np.sort(rng.choice(200, sizes[j % 3], replace=False))])
                    for j in range(20)] for k in (0, 1)}
    inputs = synthetic_class_inputs(SYNTHETIC_PREPROCESSING, count=INPUTS, seed=0)
    pool = RandomSets(torch.cat(list(boxes.values())), seed=0)
    found = {}
    for phase in ("cold", "warm"):
        runner = _runner("synthetic-vgg", args.runs, PROJECTION_LAYERS, cache_dir=tmp / "projection")
        report, seconds = _timed(runner, {k: inputs[k] for k in concepts}, concepts, pool)
        found[phase] = seconds
        found[f"{phase} trained"] = report.counts["cavs_trained"]
        found[f"{phase} loaded"] = report.counts["cavs_loaded"]
    found["tests"] = len(report.tests)
    found["cache MB"] = sum(f.stat().st_size for f in (tmp / "projection").rglob("*.pkl")) / 2**20
    return found


# --- the synthetic check, both solvers -----------------------------------------------------------------------


def _check_rows(pairs: dict[str, tuple[TCAVReport, TCAVReport]]) -> tuple[list[list[object]], dict[str, int]]:
    rows: list[list[object]] = []
    agree: dict[str, int] = defaultdict(int)
    for model, (svm, sgd) in pairs.items():
        before = {(t.class_id, t.concept, t.layer): t for t in sgd.tests}
        for t in svm.tests:
            old = before[t.class_id, t.concept, t.layer]
            role = "class object" if t.concept == t.class_name else "distractor"
            agree[role] += t.verdict == old.verdict
            agree[f"{role} n"] += 1
            rows.append([model, t.class_name, f"{t.concept} ({role})", f"{t.layer} ({t.layer_role})",
                         f"{t.magnitude.effect_size:+.1f}", f"{t.p_holm:.2g}", t.verdict,
                         f"{t.cav_accuracy:.2f}", f"{t.tcav_mean:.2f}",
                         f"{old.magnitude.effect_size:+.1f} ({old.p_holm:.2g}) {old.verdict}"])
    return rows, agree


# --- reproducibility -----------------------------------------------------------------------------------------


def _cosines(vectors: list[np.ndarray]) -> list[float]:
    unit = [v / np.linalg.norm(v, axis=1, keepdims=True) for v in vectors]
    return [float(x) for i in range(len(unit)) for j in range(i + 1, len(unit)) for x in (unit[i] * unit[j]).sum(1)]


def _reproducibility(args: argparse.Namespace, seeds: int) -> list[list[object]]:
    """Directions of the same pairs trained with other solver seeds; verdicts of the synthetic check with them."""
    name, layer = "synthetic-vgg", LAYERS["synthetic-vgg"][-1]
    data, inputs = _data(args.images, 0)
    randoms = data.random.runs(args.images, args.runs)
    pairs = [(data.class_objects[k], r) for k in range(4) for r in randoms[:5]] + [
        (randoms[0], r) for r in randoms[1:11]]
    module = load_synthetic_model(name).module
    rows: list[list[object]] = []
    for label, make in (("mini-batch SGD (before)", lambda s: MiniBatchSGDClassifier(seed=s)),
                        ("L2-SVM (now)", lambda s: None)):
        vectors, verdicts = [], []
        for seed in range(seeds):
            store = ActivationStore(module, [layer])
            vectors.append(CAVCache(store, make(seed), name, seed=seed).directions(pairs, layer)[0])
            report = _runner(name, args.runs, classifier=make(seed), seed=seed).run(
                inputs, {k: data.for_class(k) for k in inputs}, data.random)
            verdicts.append([t.verdict for t in report.tests])
        cos = _cosines(vectors)
        same = [np.mean([a == b for a, b in zip(verdicts[0], v, strict=True)]) for v in verdicts[1:]]
        identical = all(np.array_equal(vectors[0], v) for v in vectors[1:])
        rows.append([label, f"{np.mean(cos):.4f} (min {min(cos):.4f})", "yes" if identical else "no",
                     f"{100 * np.mean(same):.0f} %"])
    return rows


# --- power and false positives per pool, calibration ----------------------------------------------------------


def _pools(args: argparse.Namespace, seeds: int) -> tuple[dict[str, dict[str, list[str]]], dict]:
    """Verdicts per pool and role over seeds and both CNNs (pseudo-concepts drawn from the pool, tested alone)."""
    found: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    by_seed: dict[int, dict[tuple, str]] = {}
    for seed in range(seeds):
        data, inputs = _data(args.images, seed)
        boxes = _class_boxes(200, seed)
        pools: dict[str, Any] = {
            "random boxes without class objects": data.random,
            "boxes of the class's images": {k: RandomSets(boxes[k], seed=seed) for k in boxes},
            "boxes of every class's images": RandomSets(torch.cat([b[:50] for b in boxes.values()]), seed=seed),
        }
        by_seed[seed] = {}
        for name in LAYERS:
            for design, pool in pools.items():
                real = _runner(name, args.runs).run(inputs, {k: data.for_class(k) for k in inputs}, pool)
                pseudo = {k: [ConceptSet(f"pseudo-{j}", (pool[k] if isinstance(pool, dict) else pool).draw(
                    args.images, 5000 + 10 * k + j).images) for j in range(args.pseudo)] for k in inputs}
                fake = _runner(name, args.runs).run(inputs, pseudo, pool)
                for t in real.tests:
                    role = "class object" if t.concept == t.class_name else f"distractor, {t.layer_role} layer"
                    found[design][role].append(t.verdict)
                    if design == "random boxes without class objects":
                        by_seed[seed][name, t.class_id, role, t.layer] = t.verdict
                for t in fake.tests:
                    found[design]["pseudo"].append(t.verdict)
                    found[design]["pseudo p"].append(t.comparison.p)
    return found, by_seed


def _pool_rows(found: dict[str, dict[str, list[Any]]]) -> list[list[object]]:
    def share(values: list[str], verdict: str) -> str:
        hits = sum(v == verdict for v in values)
        return f"{100 * hits / len(values):.0f} % ({hits}/{len(values)})"

    rows = []
    for design, by in found.items():
        p = np.array(by["pseudo p"])
        rows.append([design, share(by["class object"], "used (+)"), share(by["distractor, last layer"], "used (+)"),
                     share(by["distractor, earlier layer"], "used (+)"),
                     f"{100 * np.mean(p < 0.05):.1f} % ({int((p < 0.05).sum())}/{len(p)})",
                     share([v.removesuffix(" (+)").removesuffix(" (-)") for v in by["pseudo"]], "used")])
    return rows


def _seed_agreement(by_seed: dict[int, dict[tuple, str]]) -> list[list[object]]:
    rows = []
    for role in ("class object", "distractor, last layer", "distractor, earlier layer"):
        same = [v == by_seed[0][key] for seed in list(by_seed)[1:] for key, v in by_seed[seed].items()
                if key[2] == role]
        rows.append([role, f"{100 * np.mean(same):.0f} % ({sum(same)}/{len(same)})" if same else "—"])
    return rows


def _calibrate(args: argparse.Namespace) -> list[list[object]]:
    """Share of p < 0.05 (uncorrected) by the paper's test (Student t-test of the N concept-vs-random sign counts
    against all random-vs-random sign counts, as tensorflow/tcav computes it) and this package's test."""
    data, inputs = _data(args.images, 0)
    rows = []
    for name, layers in LAYERS.items():
        module = load_synthetic_model(name).module
        randoms = data.random.runs(args.images, args.runs)
        roles = {k: {"class object": [data.class_objects[k]], "distractor": [data.distractors[k]],
                     "random set as concept": [data.random.draw(args.images, 1000 + 10 * k + j)
                                               for j in range(args.pseudo)]} for k in inputs}
        cavs = CAVCache(ActivationStore(module, layers), model_name=name)
        out: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for k, x in inputs.items():
            sens = layer_sensitivities(module, x, layers, k)
            for layer in layers:
                i, j = np.triu_indices(args.runs, 1)
                null = cavs.directions([(randoms[a], randoms[b]) for a, b in zip(i, j, strict=True)], layer,
                                       accuracy=False)[0]
                d, norms = sens[layer] @ null.T, np.linalg.norm(null, axis=1)
                sign, magnitude = np.zeros((args.runs,) * 2), np.zeros((args.runs,) * 2)
                sign[i, j], sign[j, i] = (d > 0).mean(0), (d < 0).mean(0)
                magnitude[i, j] = d.mean(0) / norms
                magnitude[j, i] = -magnitude[i, j]
                pooled = sign[~np.eye(args.runs, dtype=bool)]
                for role, sets in roles[k].items():
                    for s in sets:
                        vectors = cavs.directions([(s, r) for r in randoms], layer, accuracy=False)[0]
                        scores, magnitudes = (sens[layer] @ vectors.T > 0).mean(0), (
                            (sens[layer] @ vectors.T).mean(0) / np.linalg.norm(vectors, axis=1))
                        tests = {
                            "paper: t-test of N scores vs all random-pair scores": stats.ttest_ind(scores,
                                                                                                    pooled).pvalue,
                            "ours, sign count": compare_to_null(scores.mean(), pseudo_concept_means(sign)).p,
                            "ours, magnitude (default)": compare_to_null(magnitudes.mean(),
                                                                         pseudo_concept_means(magnitude)).p,
                        }
                        for test, p in tests.items():
                            out[test][role].append(bool(p < 0.05))
        for test, by_role in out.items():
            rows.append([name, test, *[f"{100 * np.mean(v):.0f} % ({sum(v)}/{len(v)})" for v in by_role.values()]])
    return rows


# --- the section -----------------------------------------------------------------------------------------------


def _render(args: argparse.Namespace, cost: list[list[object]], found: dict[str, Any], projection: dict[str, float],
            check: tuple[list[list[object]], dict[str, int]], reproducibility: list[list[object]],
            pools: list[list[object]], agreement: list[list[object]], calibration: list[list[object]],
            load: tuple[float, float]) -> str:
    m, tests = found["medians"], 4 * 2 * len(LAYERS["synthetic-vgg"])
    per_test_cold = projection["cold"] / projection["tests"]
    rows, agree = check
    return "\n".join([
        "## TCAV (`benchmarks/bench_tcav.py`)", "",
        machine_line() + f" · load average {load[0]:.1f} before, {load[1]:.1f} after, {os.cpu_count()} cores", "",
        f"Synthetic benchmark, 4 classes x 2 concepts (class object, unrelated distractor) x 2 layers = {tests} tests "
        f"per CNN; {args.images} patches per concept, N = {args.runs} random sets of the same size, {INPUTS} test "
        f"images per class, 1 torch thread. Every variant trains the same CAVs: per layer "
        f"{args.runs * (args.runs - 1) // 2} random pairs (the null) + {args.runs} per concept.", "",
        "### Time per (class, concept, layer), synthetic-vgg", "",
        markdown_table(["variant", "total s", "s per test", "images forwarded", "CAVs trained / loaded",
                        "phases (s)"], cost),
        "", f"Side by side, {REPEATS} cold/warm pairs (medians): cold {m['cold']:.2f} s, warm {m['warm']:.2f} s, "
        f"**cold / warm = {m['ratio']:.2f}** (goal <= 3). One test alone (class 0, its class object, the last layer, "
        f"{args.runs * (args.runs - 1) // 2 + args.runs} CAVs): cold {m['one cold']:.2f} s, warm "
        f"{m['one warm']:.2f} s, **cold / warm = {m['one ratio']:.2f}**; the mini-batch SGD solver took "
        f"{m['one sgd']:.1f} s cold. The L2-SVM solves all missing CAVs of a layer and size in one batched Newton "
        "solve from the Gram matrix of their rows; the files are written on a background thread.", "",
        "### The 1,800-test projection", "",
        f"A study-shaped workload on synthetic-vgg: 2 classes x 20 labels (sizes 10, 20, 40) x 9 layers = "
        f"{projection['tests']} tests, the study pool (random boxes of every class), N = {args.runs}: cold "
        f"{projection['cold']:.0f} s ({projection['cold trained']} CAVs trained; {projection['cold loaded']} read "
        f"back from the cache after leaving the memory budget), warm {projection['warm']:.0f} s "
        f"({projection['warm loaded']} CAVs loaded); "
        f"{per_test_cold:.3f} s per test cold. Scaled to 10 classes x 20 labels x 9 layers = 1,800 tests: "
        f"**{1800 * per_test_cold / 60:.1f} min cold** (goal <= 10 min on 2 cores), "
        f"{1800 * projection['warm'] / projection['tests'] / 60:.1f} min warm — an upper bound, as the study "
        f"pool's null is shared by every class. The CAV cache took {projection['cache MB']:.0f} MB for these "
        f"{projection['tests']} tests.", "",
        f"### Synthetic check (N = {args.runs}; the statistic tested is the magnitude; z = effect size in null SDs)",
        "",
        markdown_table(["model", "class", "concept", "layer (role)", "z (tested)", "Holm p", "verdict",
                        "CAV accuracy", "sign count (not tested)", "mini-batch SGD before: z (Holm p) verdict"], rows),
        "", f"Verdicts unchanged by the new solver: class objects {agree['class object']}/{agree['class object n']}, "
        f"distractors {agree['distractor']}/{agree['distractor n']}. Only the last layer has a known answer for "
        "distractors (never used (+)); at earlier layers a distractor may share low-level features with the class.",
        "",
        f"### Reproducibility ({args.seeds} solver seeds, synthetic-vgg, {LAYERS['synthetic-vgg'][-1]})", "",
        markdown_table(["solver", "cosine of a CAV between seeds: mean (min)", "bit-identical CAVs",
                        "synthetic-check verdicts equal to seed 0's"], reproducibility),
        "", "Across data seeds (other concept patches and random sets; the L2-SVM, random boxes without class "
        "objects): verdicts equal to seed 0's.", "",
        markdown_table(["concept", "same verdict as seed 0"], agreement),
        "", f"### Power and false positives per random pool ({args.seeds} seeds x 2 CNNs)", "",
        f"Share of tests with each verdict after Holm; {args.pseudo} random sets per class posing as concepts, drawn "
        "from the pool and tested alone (a correct test calls about 5 % significant before correction).", "",
        markdown_table(["random pool", "class object used (+): power", "distractor, last layer, used (+)",
                        "distractor, earlier layer, used (+)", "random sets p < 0.05 (uncorrected)",
                        "random sets used after Holm"], pools),
        "", "### Calibration: share of tests with p < 0.05 (uncorrected), seed 0", "",
        f"{args.pseudo} random sets per class posing as concepts (a correct test calls ~5 % or fewer significant), "
        "the class objects (power) and the distractors, both layers.", "",
        markdown_table(["model", "test", "class object", "distractor", "random set as concept"], calibration),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="random runs N (the runner's default is 20)")
    parser.add_argument("--images", type=int, default=40, help="patches per concept set")
    parser.add_argument("--pseudo", type=int, default=4, help="random sets posing as concepts, per class")
    parser.add_argument("--seeds", type=int, default=4, help="seeds for reproducibility and power")
    parser.add_argument("--quick", action="store_true", help="N = 10, 2 seeds, 2 pseudo-concepts, no Captum run")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    parser.add_argument("--study", action="store_true", help="only the study-derived run (its own section)")
    parser.add_argument("--study-images", type=int, default=12, help="test images per class in the study")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=RuntimeWarning, message="Precision loss")  # the paper's test, ties
    torch.set_num_threads(1)
    if args.quick:
        args.runs, args.pseudo, args.seeds = 10, 2, 2
    load_before = os.getloadavg()[0]
    if args.study:
        from _tcav_study import study_section

        body = study_section(args.study_images, args.runs, args.seeds)
        name = "tcav-study"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cost, found = _cost(args, Path(tmp))
            projection = _projection(args, Path(tmp))
        resnet_svm = _runner("synthetic-resnet", args.runs)
        resnet_sgd = _runner("synthetic-resnet", args.runs, classifier=MiniBatchSGDClassifier())
        data, inputs = _data(args.images, 0)
        sets = {k: data.for_class(k) for k in inputs}
        check = _check_rows({"synthetic-vgg": (found["svm"], found["sgd"]),
                             "synthetic-resnet": (resnet_svm.run(inputs, sets, data.random),
                                                  resnet_sgd.run(inputs, sets, data.random))})
        reproducibility = _reproducibility(args, args.seeds)
        pool_found, by_seed = _pools(args, args.seeds)
        body = _render(args, cost, found, projection, check, reproducibility, _pool_rows(pool_found),
                       _seed_agreement(by_seed), _calibrate(args), (load_before, os.getloadavg()[0]))
        name = "tcav"
    print(body)
    if not args.no_write:
        write_section(name, body)


if __name__ == "__main__":
    main()
