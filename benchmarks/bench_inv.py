"""INV benchmark: seconds per image and per step, and what faster embeddings do to the clusters.

For EfficientNet-Lite0 (pretrained, offline) and VGG16 (random weights), on scikit-image's chelsea and
coffee at 224x224, with INV's default nine layers:

* the paper's pipeline (sklearn t-SNE) with its per-step breakdown: forward+backward, weights, PCA,
  2-D embedding, clustering (6 Ward fits + silhouettes), cluster maps;
* faster options side by side in the same run: openTSNE (Barnes-Hut, one thread), the first two PCA
  components instead of t-SNE, and sklearn t-SNE with the nine layers in ``n_jobs`` threads;
* their effect on the clusters: adjusted Rand index between each option's partition of the kept maps
  (before weak-cluster removal) and the sklearn t-SNE partition, averaged over layers and images, and
  how often the chosen k agrees;
* the baseline for those numbers: the paper pipeline re-run on the very same kept maps (must give
  ARI 1: deterministic) and on the maps multiplied by (1 + 1e-6 N(0, 1)) — float-level noise, the size
  of the differences between two torch thread counts.

Usage: ``python benchmarks/bench_inv.py [--images 2] [--jobs 2] [--no-write]``.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import skimage.data
import torch
from PIL import Image

from _sections import machine_line, markdown_table, write_section
from convlens.core.hooks import LayerCapture
from convlens.inv import INV, InvExplanation
from convlens.inv.clustering import cluster_feature_maps
from convlens.models import load

STEPS = ("forward_backward", "weights", "pca", "embedding", "clustering", "maps")


def _images(count: int) -> list[Image.Image]:
    return [Image.fromarray(f()) for f in (skimage.data.chelsea, skimage.data.coffee)][:count]


def _explain(model: object, x: torch.Tensor, **kwargs: object) -> tuple[InvExplanation, float]:
    inv = INV(model, **kwargs)
    start = time.perf_counter()
    explanation = inv.explain(x)
    return explanation, time.perf_counter() - start


def _agreement(reference: InvExplanation, other: InvExplanation) -> tuple[list[float], list[bool]]:
    from sklearn.metrics import adjusted_rand_score

    aris, same_k = [], []
    for a, b in zip(reference.layers, other.layers, strict=True):
        assert np.array_equal(a.kept_channels, b.kept_channels)  # same weights and pruning
        if len(a.kept_channels) > 3:
            aris.append(float(adjusted_rand_score(a.labels, b.labels)))
            same_k.append(a.n_clusters == b.n_clusters)
    return aris, same_k


def _sensitivity(loaded: object, x: torch.Tensor, reference: InvExplanation, relative: float) -> tuple[
    list[float], list[bool]
]:
    """Re-cluster each layer's kept maps multiplied by (1 + relative * N(0, 1)) with the paper pipeline:
    how much the sklearn t-SNE clusters themselves move under float-level noise (the baseline for ARI)."""
    from sklearn.metrics import adjusted_rand_score

    names = [layer.name for layer in reference.layers]
    with LayerCapture(loaded.module, names) as capture, torch.no_grad():
        loaded.module(x)
        acts = {n: capture.activations[n][0].double().numpy() for n in names}
    rng = np.random.default_rng(0)
    aris, same_k = [], []
    for layer in reference.layers:
        maps = acts[layer.name][layer.kept_channels]
        if len(maps) <= 3:
            continue
        result = cluster_feature_maps(maps * (1 + relative * rng.standard_normal(maps.shape)))
        aris.append(float(adjusted_rand_score(layer.labels, result.labels)))
        same_k.append(result.n_clusters == layer.n_clusters)
    return aris, same_k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help="1 (chelsea) or 2 (chelsea, coffee)")
    parser.add_argument("--jobs", type=int, default=2, help="threads for the n_jobs variant")
    parser.add_argument(
        "--torch-threads", type=int, default=1,
        help="torch intra-op threads for the forward/backward (1: stable timings on a shared machine)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.manual_seed(0)
    torch.set_num_threads(args.torch_threads)
    models = {"efficientnet_lite0": load("efficientnet_lite0"), "vgg16 (random)": load("vgg16")}
    variants = {
        "sklearn t-SNE (paper), 1 thread": {"embedding": "tsne", "n_jobs": 1},
        f"sklearn t-SNE, {args.jobs} layer threads": {"embedding": "tsne", "n_jobs": args.jobs},
        "openTSNE, 1 thread": {"embedding": "opentsne", "n_jobs": 1},
        "PCA 2-D (no t-SNE), 1 thread": {"embedding": "pca", "n_jobs": 1},
    }
    speed_rows: list[list[object]] = []
    step_rows: list[list[object]] = []
    layer_rows: list[list[object]] = []
    notes: list[str] = []
    reference_variant = next(iter(variants))
    names = list(variants)
    summary: dict[str, dict[str, tuple]] = {m: {} for m in models}
    for model_name, loaded in models.items():
        xs = [loaded.preprocessing(image)[None] for image in _images(args.images)]
        _explain(loaded, xs[0], embedding="pca", layers=["last"])  # warm-up: imports, first-call costs
        reference: list[InvExplanation] = []
        base_seconds = 0.0
        for variant, kwargs in variants.items():
            seconds, steps = [], {s: 0.0 for s in STEPS}
            aris: list[float] = []
            same_k: list[bool] = []
            for i, x in enumerate(xs):
                explanation, elapsed = _explain(loaded, x, **kwargs)
                seconds.append(elapsed)
                for step in STEPS:
                    steps[step] += explanation.timings[step] / len(xs)
                if variant == reference_variant:
                    reference.append(explanation)
                    if i == 0:
                        for layer in explanation.layers:
                            layer_rows.append([
                                model_name, layer.name, f"{layer.num_channels} @ {layer.feature_size[0]}²",
                                len(layer.kept_channels), layer.n_clusters, len(layer.clusters),
                                round(layer.timings["embedding"], 2),
                            ])
                else:
                    a, k = _agreement(reference[i], explanation)
                    aris += a
                    same_k += k
            mean_seconds = float(np.mean(seconds))
            speedup = base_seconds / mean_seconds if base_seconds else 1.0
            summary[model_name][variant] = (speedup, float(np.mean(aris or [1.0])))
            if not base_seconds:
                base_seconds = mean_seconds
                total_steps = sum(steps.values())
                dominant = max(steps, key=steps.get)
                summary[model_name]["dominant"] = (dominant, 100 * steps[dominant] / total_steps)
                step_rows.append([model_name] + [round(steps[s], 2) for s in STEPS] + [
                    f"{dominant} ({100 * steps[dominant] / total_steps:.0f} %)"
                ])
            speed_rows.append([
                model_name, variant, round(mean_seconds, 2), f"{base_seconds / mean_seconds:.2f}x",
                f"{np.mean(aris):.3f} (min {np.min(aris):.2f})" if aris else "1 (reference)",
                f"{np.mean(same_k) * 100:.0f} %" if same_k else "100 %",
            ])
            print(speed_rows[-1], flush=True)
        for relative in (0.0, 1e-6):
            aris, same_k = [], []
            for i, x in enumerate(xs):
                a, k = _sensitivity(loaded, x, reference[i], relative)
                aris += a
                same_k += k
            label = "identical" if relative == 0 else f"x (1 + {relative:g} N(0,1))"
            summary[model_name][f"noise {relative:g}"] = (0.0, float(np.mean(aris)))
            speed_rows.append([
                model_name, f"sklearn t-SNE again, kept maps {label} (baseline)", "—", "—",
                f"{np.mean(aris):.3f} (min {np.min(aris):.2f})", f"{np.mean(same_k) * 100:.0f} %",
            ])
            print(speed_rows[-1], flush=True)
    speed = markdown_table(
        ["model", "embedding", "s / image", "speed-up", "ARI vs paper clusters (mean over layers)", "same k"],
        speed_rows,
    )
    steps_table = markdown_table(["model", *STEPS, "dominant step"], step_rows)
    layers_table = markdown_table(
        ["model", "layer", "maps", "kept", "k", "clusters kept", "t-SNE s"], layer_rows
    )
    notes.append(
        f"{args.images} image(s) (scikit-image chelsea, coffee) at 224x224, INV's default nine layers, one "
        f"forward + one backward per image with {args.torch_threads} torch thread(s); steps are seconds per "
        "image summed over the nine layers (sklearn t-SNE pipeline, one thread). ARI: adjusted Rand index "
        "of each option's partition of the kept maps "
        "(before weak-cluster removal) against the sklearn t-SNE partition; layers with <= 3 kept maps skipped."
    )
    reading = []
    for model_name, values in summary.items():
        dominant, share = values["dominant"]
        threads, opentsne, pca = (values[n] for n in names[1:])
        reading.append(
            f"{model_name}: {dominant} takes {share:.0f} % of the step time. Layer threads: {threads[0]:.2f}x with "
            f"identical clusters (ARI {threads[1]:.2f}); openTSNE: {opentsne[0]:.2f}x, ARI {opentsne[1]:.2f}; "
            f"PCA 2-D: {pca[0]:.1f}x, ARI {pca[1]:.2f}; the paper pipeline against itself on maps perturbed "
            f"by 1e-6: ARI {values['noise 1e-06'][1]:.2f}."
        )
    dominants = {values["dominant"][0] for values in summary.values()}
    gaps = [values[names[2]][1] - values["noise 1e-06"][1] for values in summary.values()]
    closeness = (
        "about as much as" if max(abs(g) for g in gaps) < 0.1 else "less than" if min(gaps) > 0 else "more than"
    )
    load_average = os.getloadavg()[0]
    reading.append(
        f"Dominant step: {', '.join(sorted(dominants))}. Layer threads never change the clusters, but their "
        f"speed-up needs free cores: this run shared {os.cpu_count()} cores with other jobs (load average "
        f"{load_average:.1f} at the end), so the thread rows are a lower bound, not a scaling measurement. openTSNE "
        f"moves the clusters {closeness} float-level noise moves the paper pipeline's own clusters; PCA 2-D is "
        "a fast coarse preview."
    )
    body = "\n\n".join([
        "## INV layer-wise explanations (`benchmarks/bench_inv.py`)",
        machine_line(),
        notes[0],
        "### Seconds per image and effect on the clusters\n\n" + speed,
        "### Per-step breakdown (paper pipeline)\n\n" + steps_table,
        "### Reading\n\n" + "\n\n".join(reading),
        "### Layers (first image, paper pipeline)\n\n" + layers_table,
    ])
    print(body)
    if not args.no_write:
        write_section("inv", body)


if __name__ == "__main__":
    main()
