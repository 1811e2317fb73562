"""Exact-ground-truth benchmark: the evaluation suite on the synthetic data with the two committed CNNs.

For each model (``synthetic-vgg``, ``synthetic-resnet``; trained by ``python tools/train_synthetic.py``)
the same ``--images`` split-test images are explained by each method for their ground-truth class and scored
with the ground-truth metrics (the object's exact mask) and the model-truth metrics, all in one run through
``convlens.runners.evaluate`` (the code behind ``convlens evaluate``). Mean and 95 % percentile-bootstrap CI
per method; the models' test accuracy comes from their training record and is re-measured here.

Usage: python benchmarks/bench_evaluate.py [--images 50] [--rise-masks 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from _sections import machine_line, write_section
from convlens.data.synthetic import generate_batch
from convlens.methods.registry import METHODS
from convlens.models.synthetic import SYNTHETIC_MODELS, evaluate_accuracy, load_synthetic_model, synthetic_model_info
from convlens.runners.evaluate import EvaluationConfig, EvaluationResult, run_evaluation

WANTED_METHODS = ("gradcam", "gradcampp", "scorecam", "rise", "sise")
EXTRA_METHODS = ("layercam", "adasise", "advise")  # other registered methods, same images and metrics
METRICS = ("ebpg", "miou", "bbox", "pointing_game", "drop", "increase", "insertion", "deletion")
SANITY = ("mprt_spearman_abs", "mprt_spearman", "mprt_ssim", "random_logit")
PERCENT = ("ebpg", "miou", "bbox", "pointing_game", "insertion", "deletion")  # shown x100 like the papers' tables


def _cell(stats: dict[str, float], scale: float, digits: int = 1) -> str:
    mean, low, high = stats["mean"], stats["ci_low"], stats["ci_high"]
    if not math.isfinite(mean):
        return "—"
    nan = f" ({stats['nan_count']} NaN)" if stats["nan_count"] else ""
    if not math.isfinite(low):
        return f"{scale * mean:.{digits}f}{nan}"
    return f"{scale * mean:.{digits}f} [{scale * low:.{digits}f}, {scale * high:.{digits}f}]{nan}"


def _table(summary: list[dict[str, object]], methods: list[str], metrics: tuple[str, ...], digits: int) -> list[str]:
    index = {(s["method"], s["metric"]): s for s in summary}
    arrows = {"higher": "↑", "lower": "↓"}
    header = ["method", *[f"{m} {arrows[index[(methods[0], m)]['direction']]}" for m in metrics], "s / image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        scale = [100.0 if m in PERCENT else 1.0 for m in metrics]
        cells = [_cell(index[(method, m)], k, digits) for m, k in zip(metrics, scale, strict=True)]  # type: ignore[arg-type]
        cells.append(f"{index[(method, 'seconds')]['mean']:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _intro(args: argparse.Namespace) -> list[str]:
    return [
        "## Exact-ground-truth benchmark (`benchmarks/bench_evaluate.py`)",
        "",
        machine_line(),
        "",
        f"Synthetic benchmark (`convlens.data.synthetic`): 64x64 images, the class (4 classes) is decided by one "
        f"textured object among 2-4 distractors that share its shape or its texture, on clutter; ground truth = the "
        f"object's exact mask. The first {args.images} split-test images (seed 0), each explained for its label "
        f"with `convlens evaluate` defaults: RISE with {args.rise_masks} masks (s = 7, p = 0.5), SISE mu = 0 with "
        "the paper's Otsu fusion, Grad-CAM/Grad-CAM++/Score-CAM/LayerCAM on the last block, Ada-SISE and ADVISE "
        "with their defaults. EBPG, mIoU (top 20 %), Bbox, "
        "pointing game (no tolerance), insertion (blur substrate) and deletion (zeros) AUC with step = 64 px "
        "(one row), all x100; Drop% and Increase% with the top 15 % kept; softmax probabilities. Mean [95 % "
        f"percentile-bootstrap CI]; ↑ higher / ↓ lower is better. {args.threads} torch thread(s).",
        "",
        "Reading the table: the objects cover 2-8 % of the image, so the SISE paper's top-20 % binarisation "
        "(819 px) contains (almost) the whole object for every method and mIoU ≈ |G| / 819 is nearly the same "
        "for all of them here; Bbox (top-|G| pixels) is the informative overlap measure. The models are very confident "
        "(Drop% near 0). All maps are non-negative, so signed and absolute Spearman coincide in the sanity table.",
        "",
    ]


def _runs(
    model_name: str, methods: list[str], args: argparse.Namespace
) -> tuple[list[str], list[str], EvaluationResult, EvaluationResult, float]:
    """Metric and sanity table lines, the two runs' results and the main run's wall time, for one model."""
    config = EvaluationConfig(
        model=model_name, methods=methods, data="synthetic", metrics=list(METRICS), limit=args.images,
        out=args.out / model_name, method_params={"rise": {"n_masks": args.rise_masks}}, n_samples=4,
    )
    start = time.perf_counter()
    result = run_evaluation(config, show_progress=True)
    wall = time.perf_counter() - start
    lines = _table(result.summary, methods, METRICS, 1)
    extra = [m for m in EXTRA_METHODS if m in METHODS]
    if extra:
        extra_config = EvaluationConfig(
            model=model_name, methods=extra, data="synthetic", metrics=list(METRICS), limit=args.images,
            out=args.out / f"{model_name}-extra", n_samples=4,
        )
        lines += _table(run_evaluation(extra_config, show_progress=True).summary, extra, METRICS, 1)[2:]
    sanity_config = EvaluationConfig(
        model=model_name, methods=methods, data="synthetic", metrics=list(SANITY), limit=args.sanity_images,
        out=args.out / f"{model_name}-sanity", method_params={"rise": {"n_masks": args.sanity_rise_masks}},
        n_samples=0,
    )
    sanity = run_evaluation(sanity_config, show_progress=True)
    return lines, _table(sanity.summary, methods, SANITY, 3), result, sanity, wall


def _model_section(
    model_name: str, methods: list[str], args: argparse.Namespace, test_set: tuple[np.ndarray, np.ndarray]
) -> list[str]:
    record = synthetic_model_info()[model_name]
    accuracy = evaluate_accuracy(load_synthetic_model(model_name).module, *test_set)
    lines, sanity_lines, result, sanity, wall = _runs(model_name, methods, args)
    print("\n".join(lines + sanity_lines))
    return [
        f"### {model_name} — test accuracy {100 * record['test_accuracy']:.2f} % on {record['test_size']} "
        f"split-test images (training record, seed {record['seed']}); re-measured now: {100 * accuracy:.2f} %",
        "",
        f"{result.n_images} images, {record['parameters']} parameters, trained {record['epochs']} epochs on "
        f"{record['train_size']} images in {record['training_s']:.0f} s on CPU. s / image = the method's "
        f"explanation time per image (metrics excluded); this run took {wall:.0f} s "
        "(records of an identical earlier run are reused).",
        "",
        *lines,
        "",
        f"Sanity checks on the first {sanity.n_images} images (RISE with {args.sanity_rise_masks} masks): "
        "cascading randomisation of every conv/BN/linear layer from the logits down (mean similarity over the "
        "cascade to the trained model's map; Spearman of |maps|, signed Spearman, SSIM) and the random-logit "
        "test (SSIM to the map of a random other class). Lower = more sensitive to the model / the class = "
        "better; s / image includes the re-explanations.",
        "",
        *sanity_lines,
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--rise-masks", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sanity-images", type=int, default=20)
    parser.add_argument("--sanity-rise-masks", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "evaluate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m for m in WANTED_METHODS if m in METHODS]
    test_pixels, test_labels, _ = generate_batch(0, 2000, seed=0, split="test")
    sections = _intro(args)
    for model_name in SYNTHETIC_MODELS:
        sections += _model_section(model_name, methods, args, (test_pixels, test_labels))
    write_section("evaluate", "\n".join(sections))


if __name__ == "__main__":
    main()
