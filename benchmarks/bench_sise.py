"""SISE / Ada-SISE benchmark: cost vs the model's forward cost, vs RISE and Score-CAM, fast mode fidelity, memory.

Measured side by side in one run on EfficientNet-Lite0 (pretrained) and ResNet-50 (random weights: fine for
timing) on the same photos (scikit-image's chelsea, coffee, astronaut, rocket; ``--images N``):

1. SISE wall time vs (masked forwards x the best per-image forward time of the bare model, measured in
   the same run at the same batch size, channels-last, inference mode, best of several repeats before
   and after) — target ratio <= 1.15; and, robust to a shared machine's changing load, the best of 3 SISE
   calls vs the best of the bare model's runs of the same number of forwards, alternated with them (after
   one untimed warm-up explanation);
2. SISE vs RISE (4000 masks) vs Score-CAM (convlens and pytorch-grad-cam's ScoreCAM with ``batch_size``
   set) on the last block — the paper's ratios on a T4: SISE/RISE = 0.35, SISE/Score-CAM = 0.51 (ResNet-50);
3. Ada-SISE vs SISE: kept masks, forwards, time (paper: up to 30 % faster);
4. ``fast=True``: forwards saved and the Pearson r of its final map vs full SISE's, for the three fusion
   modes (the cascades are recomputed from the same per-block maps);
5. peak memory (RSS growth above the level before the call, sampled every 5 ms) of SISE on ResNet-50 —
   target <= 2.5 GB.

``--quick`` (for shared 2-core machines): the first image only for ResNet-50, and ResNet-50's RISE and
Score-CAM times are extrapolated from runs on fewer masks (RISE: 512 of 4000) or a narrower layer
(Score-CAM: ``layer1``, 256 channels, scaled to ``layer4``'s 2048) — the table says so.

Usage: python benchmarks/bench_sise.py [--quick] [--images 2] [--batch-size 0 (= best)]
"""

from __future__ import annotations

import argparse
import gc
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import skimage.data
import torch
from PIL import Image

from _sections import machine_line, markdown_table, write_section
from convlens.core.explanation import Explanation
from convlens.core.layers import describe_layers, resolve_layers
from convlens.core.maps import minmax_exact
from convlens.methods.adasise import AdaSISE
from convlens.methods.rise import RISE
from convlens.methods.scorecam import ScoreCAM
from convlens.methods.sise import SISE, SISEParams, fuse_visualization_maps
from convlens.methods.sise_scoring import attribution_masks
from convlens.models import load

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
FUSIONS = ("paper", "code", "simple")
NOISE = (0.001, 0.01, 0.03)  # absolute std of Gaussian noise added to the mask scores (probabilities)
QUICK_CAM_LAYER = {"resnet50": "layer1"}  # --quick: Score-CAM timed on this layer, scaled by channel count


class PeakRSS:
    """Peak resident-set growth of this process during the body (a thread samples RSS every 5 ms)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.process = psutil.Process()
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.start = self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth_gb(self) -> float:
        return (self.peak - self.start) / 2**30


def per_image_forward_seconds(
    model: torch.nn.Module, x: torch.Tensor, batch: int, repeats: int, reduce: Callable[[list[float]], float] = min
) -> float:
    """Per-image time of the bare model on ``batch`` copies of ``x`` (channels-last, inference mode): the best
    (or ``reduce``) of ``repeats`` timed forwards after one warm-up."""
    inputs = x[None].expand(batch, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    model.to(memory_format=torch.channels_last)
    times = []
    try:
        with torch.inference_mode():
            model(inputs)
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(inputs)
                times.append(time.perf_counter() - t0)
    finally:
        model.to(memory_format=torch.contiguous_format)
    return reduce(times) / batch


def bare_model_seconds(model: torch.nn.Module, x: torch.Tensor, n_forwards: int, batch: int) -> float:
    """Wall time of the bare model for ``n_forwards`` copies of ``x`` in batches of ``batch`` (channels-last,
    inference mode, the batch copied into place each time like the engine does): SISE's ideal cost."""
    inputs = x[None].expand(batch, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    buffer = torch.empty_like(inputs)
    model.to(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for start in range(0, n_forwards, batch):
                n = min(batch, n_forwards - start)
                buffer[:n].copy_(inputs[:n])
                model(buffer[:n])
            return time.perf_counter() - t0
    finally:
        model.to(memory_format=torch.contiguous_format)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, process CPU seconds)."""
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - w0, time.process_time() - c0


def refuse(explanation: Explanation, fusion: str) -> torch.Tensor:
    """The final map of ``explanation`` (image 0) re-fused from its per-block maps with another fusion."""
    skipped = set(explanation.extras["skipped_blocks"][0])
    maps = [explanation.layer_maps[name][0] for name in explanation.layers if name not in skipped]
    return fuse_visualization_maps(maps, fusion)[0]


def noise_sensitivity(
    explainer: SISE, x: torch.Tensor, explanation: Explanation, sigmas: tuple[float, ...] = NOISE, seeds: int = 3
) -> dict[float, dict[str, list[float]]]:
    """Pearson r of the final map vs the clean one when every mask score gets N(0, sigma^2) noise.

    Re-uses the run's per-mask scores and its own phase-2 maps (no forwards); tells how much score error
    each fusion cascade tolerates — the yardstick for fast mode's approximate scores.
    """
    size = tuple(x.shape[-2:])
    selections = explainer.select_feature_maps(x)[0]
    skipped = set(explanation.extras["skipped_blocks"][0])
    contributions = {}
    for sel in selections:
        if sel.layer not in skipped:
            masks = attribution_masks(sel.activations, size).flatten(1)
            contributions[sel.layer] = masks / (masks.sum(1, keepdim=True) + 1e-6)

    def final(noise: dict[str, torch.Tensor], fusion: str) -> torch.Tensor:
        maps = []
        for layer, c_m in contributions.items():
            scores = torch.tensor(explanation.extras["mask_scores"][layer][0]) + noise[layer]
            maps.append(minmax_exact((scores @ c_m).view(size)))
        return fuse_visualization_maps(maps, fusion)[0]

    zero = {layer: torch.zeros(c.shape[0]) for layer, c in contributions.items()}
    clean = {f: final(zero, f) for f in FUSIONS}
    torch.testing.assert_close(clean["paper"], explanation.maps[0], atol=1e-4, rtol=1e-3)
    generator = torch.Generator().manual_seed(0)
    out: dict[float, dict[str, list[float]]] = {}
    for sigma in sigmas:
        out[sigma] = {f: [] for f in FUSIONS}
        for _ in range(seeds):
            noise = {layer: sigma * torch.randn(c.shape[0], generator=generator) for layer, c in contributions.items()}
            for f in FUSIONS:
                out[sigma][f].append(pearson(final(noise, f), clean[f]))
    return out


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


def pgc_scorecam_seconds(model: torch.nn.Module, layer: str, x: torch.Tensor, target: int, batch: int) -> float:
    from pytorch_grad_cam import ScoreCAM as PGCScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = dict(model.named_modules())[layer]
    t0 = time.perf_counter()
    with PGCScoreCAM(model=model, target_layers=[module]) as cam:
        cam.batch_size = batch
        cam(input_tensor=x[None], targets=[ClassifierOutputTarget(target)])
    return time.perf_counter() - t0


def make_explainers(loaded: Any, batch: int, x: torch.Tensor) -> dict[str, SISE]:
    """One explainer per configuration, as the CLI does; layer discovery (one dummy forward per model and input
    size) and a warm-up explanation (first autograd pass, allocator) happen before any clock starts."""
    explainers = {
        "sise": SISE(loaded, batch_size=batch, keep_mask_scores=True),
        "adasise": AdaSISE(loaded, batch_size=batch),
        "gp": SISE(loaded, batch_size=batch, fast=True, fast_scores="gp"),
        "medoid": SISE(loaded, batch_size=batch, fast=True, fast_scores="medoid"),
    }
    for explainer in explainers.values():
        explainer.layers_for(x[None])
    SISE(loaded, mu=1.0, batch_size=batch).explain(x)  # warm-up, untimed
    return explainers


def bench_sise_calls(explainers: dict[str, SISE], model: torch.nn.Module, x: torch.Tensor, batch: int,
                     sise_repeats: int) -> tuple[Explanation, dict[str, Any], float]:
    """Full SISE and fast SISE (default fast_factor) calls alternated with bare-model runs of full SISE's
    forwards (robust to a changing load): the last full explanation, the row of its best call (and fast
    mode's best call), and the best bare-model time per forward."""
    explainer = explainers["sise"]
    n_masked = sum(sel.n_scored for sel in explainer.select_feature_maps(x)[0])
    bare_runs, sise_runs, fast_runs, peaks = [bare_model_seconds(model, x, n_masked, batch)], [], [], []
    for _ in range(sise_repeats):
        with PeakRSS() as memory:
            sise, wall, cpu = timed(lambda: explainer.explain(x))
        sise_runs.append((wall, sise.timings["masked_forwards"], cpu))
        peaks.append(memory.growth_gb)
        fast, fast_wall, _ = timed(lambda: explainers["gp"].explain(x))
        fast_runs.append(fast_wall)
        bare_runs.append(bare_model_seconds(model, x, n_masked, batch))
    wall, masked_phase, cpu = min(sise_runs)
    row = {
        "wall": wall,
        "bare_model": min(bare_runs),
        "runs": {"sise": [round(r[0], 2) for r in sise_runs], "fast": [round(f, 2) for f in fast_runs],
                 "bare": [round(b, 2) for b in bare_runs]},
        "cpu": cpu,
        "masked_phase": masked_phase,
        "masked": sum(sise.extras["masked_forwards"]),
        "kept": sum(v[0] for v in sise.extras["kept_masks"].values()),
        "constant": sum(v[0] for v in sise.extras["constant_masks"].values()),
        "memory_gb": max(peaks),
        "target": int(sise.targets[0]),
        "fast_wall": min(fast_runs),
        "fast_masked": sum(fast.extras["masked_forwards"]),
    }
    return sise, row, min(bare_runs) / n_masked


def bench_image(name: str, photo: str, explainers: dict[str, SISE], model: torch.nn.Module, x: torch.Tensor,
                batch: int, repeats: int, sise_repeats: int) -> tuple[dict[str, Any], list[float]]:
    """SISE, Ada-SISE and both fast modes on one photo: the row and the per-forward times measured on the way."""
    row: dict[str, Any] = {"image": photo}
    sise, row["sise"], bare_forward = bench_sise_calls(explainers, model, x, batch, sise_repeats)
    t_forward = [bare_forward, per_image_forward_seconds(model, x, batch, repeats)]
    ada, wall, _ = timed(lambda: explainers["adasise"].explain(x))
    row["adasise"] = {
        "wall": wall,
        "masked": sum(ada.extras["masked_forwards"]),
        "kept": sum(v[0] for v in ada.extras["kept_masks"].values()),
    }
    row["fast"] = {}
    for scores in ("gp", "medoid"):
        fast, wall, _ = timed(lambda s=scores: explainers[s].explain(x))
        row["fast"][scores] = {
            "wall": row["sise"]["fast_wall"] if scores == "gp" else wall,
            "masked": sum(fast.extras["masked_forwards"]),
            "r": {f: pearson(refuse(fast, f), refuse(sise, f)) for f in FUSIONS},
        }
    assert torch.allclose(refuse(sise, "paper"), sise.maps[0])  # the re-fusion reproduces the run
    if name == "efficientnet_lite0":
        row["noise"] = noise_sensitivity(explainers["sise"], x, sise)
    return row, t_forward


def bench_baselines(name: str, loaded: Any, x: torch.Tensor, target: int, quick: bool, batch: int
                    ) -> dict[str, dict[str, Any]]:
    """RISE (4000 masks) and Score-CAM (convlens, pytorch-grad-cam) on the last block (first image)."""
    model = loaded.module
    last = resolve_layers(model, "last", tuple(x.shape))[0]
    n_rise = 512 if quick and name in QUICK_CAM_LAYER else 4000
    _, wall, _ = timed(lambda: RISE(loaded, n_masks=n_rise, batch_size=batch).explain(x, target))
    result: dict[str, dict[str, Any]] = {"rise": {"wall": wall * 4000 / n_rise, "measured_masks": n_rise}}
    cam_layer = QUICK_CAM_LAYER.get(name, last) if quick else last
    # Score-CAM's forwards = the layer's channels; the per-forward cost is the model's
    shapes = describe_layers(model, tuple(x.shape))
    scale = shapes[last].shape[0] / shapes[cam_layer].shape[0]
    _, wall, _ = timed(lambda: ScoreCAM(loaded, layers=cam_layer, batch_size=batch).explain(x, target))
    result["scorecam"] = {"wall": wall * scale, "layer": cam_layer, "scale": scale, "forwards": shapes[last].shape[0]}
    result["pgc_scorecam"] = {"wall": pgc_scorecam_seconds(model, cam_layer, x, target, batch) * scale}
    return result


def bench_model(
    name: str, n_images: int, quick: bool, batch_arg: int, repeats: int, sise_repeats: int
) -> dict[str, Any]:
    loaded = load(name)
    model = loaded.module.eval()
    photos = [getattr(skimage.data, p)() for p in PHOTOS[:n_images]]
    xs = [loaded.preprocessing(Image.fromarray(p)) for p in photos]
    batches = (batch_arg,) if batch_arg else (16, 32, 64)
    rates = {b: per_image_forward_seconds(model, xs[0], b, repeats) for b in batches}
    batch = min(rates, key=rates.get)
    result: dict[str, Any] = {"model": name, "batch": batch, "per_batch": rates, "images": [], "quick": quick}
    t_forward = [rates[batch]]
    explainers = make_explainers(loaded, batch, xs[0])
    for index, x in enumerate(xs):
        row, forward_times = bench_image(name, PHOTOS[index], explainers, model, x, batch, repeats, sise_repeats)
        t_forward += forward_times
        result["images"].append(row)
        print(name, row, flush=True)
    x = xs[0]
    result |= bench_baselines(name, loaded, x, result["images"][0]["sise"]["target"], quick, batch)
    t_forward.append(per_image_forward_seconds(model, x, batch, repeats))
    result["t_forward"] = min(t_forward)
    print(name, {k: v for k, v in result.items() if k != "images"}, flush=True)
    return result


COST_HEADER = ["model", "image", "masks kept / constant / forwards", "SISE s", "masked phase s", "forwards x t_fwd s",
               "ratio", "masked-phase ratio", "ratio vs bare model run"]
COST_TEXT = (
    "**SISE cost vs the model's forward cost.** Masks: kept by Eq. 7 / constant maps not scored (their "
    "Omega is the zero mask, so skipping them is exact) / masked forwards run. Ratio = SISE wall time / "
    "(masked forwards x best per-image forward time), target <= 1.15. The masked-phase ratio leaves out "
    "the fixed per-image cost (the target-score forward and phase 2's forward + backward, at batch 1). "
    "SISE times are the best of 3 calls (ResNet-50 in --quick: 2). On a shared machine the best forward "
    "time is rarely what a long run gets: the last column divides by the best of the bare model's runs "
    "of the same number of forwards (same batch size, same image), alternated with the SISE calls."
)
METHODS_HEADER = ["model", "SISE", "RISE 4000", "Score-CAM convlens", "Score-CAM pytorch-grad-cam", "SISE/RISE",
                  "SISE/Score-CAM (convlens / pgc)", "forwards SISE / RISE / Score-CAM"]
METHODS_TEXT = (
    "**SISE vs RISE (4000 masks) vs Score-CAM** (last block; first image; seconds). Paper, T4, ResNet-50: "
    "SISE/RISE = 0.35, SISE/Score-CAM = 0.51."
)
FAST_TEXT = (
    f"**fast=True** (default fast_factor {SISEParams().fast_factor:g}: per block, one medoid scored per group of "
    f"~{SISEParams().fast_factor:g} similar masks; the other masks get a Gaussian-process-interpolated score (`gp`, "
    "the default) or their medoid's (`medoid`)). Goal (issue 24): >= 5x faster than full SISE (mu = 0) with an "
    "EBPG within 0.01 on the real photos (section `load`). Forwards: the paper's "
    "count (Eq. 7 kept) / full convlens SISE -> fast. Seconds: `gp` is the best of the calls alternated with "
    "full SISE's (same number of calls), `medoid` a single call. Pearson r of the final map vs full SISE's, "
    "for fusion paper / code / simple (re-fused from the same per-block maps); localisation quality on real "
    "photos is in the `localisation` section."
)
NOISE_TEXT = (
    "**How much score error each fusion tolerates**: Pearson r of the final map vs the clean one when "
    "every mask score (a softmax probability) gets Gaussian noise of std sigma (3 seeds, no forwards)."
)


def image_rows(model: str, t_fwd: float, row: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """One photo's rows of the cost, Ada-SISE, fast-mode and noise tables."""
    s, a, image = row["sise"], row["adasise"], row["image"]
    ideal = s["masked"] * t_fwd
    tables: dict[str, list[list[Any]]] = {"cost": [], "ada": [], "fast": [], "noise": []}
    tables["cost"].append([
        model, image, f"{s['kept']} / {s['constant']} / {s['masked']}", f"{s['wall']:.1f}", f"{s['masked_phase']:.1f}",
        f"{ideal:.1f}", f"**{s['wall'] / ideal:.3f}**", f"{s['masked_phase'] / ideal:.3f}",
        f"{s['wall'] / s['bare_model']:.3f}",
    ])
    tables["ada"].append([model, image, f"{s['kept']} -> {a['kept']}", f"{s['masked']} -> {a['masked']}",
                          f"{s['wall']:.1f} -> {a['wall']:.1f}", f"{1 - a['wall'] / s['wall']:.0%}"])
    for scores, f in row["fast"].items():
        n = max(f["masked"], 1)
        fewer = f"{s['kept'] / n:.2f}x / {s['masked'] / n:.2f}x ({n / s['masked']:.2f} of full)"
        r = " / ".join(f"{f['r'][k]:.3f}" for k in FUSIONS)
        tables["fast"].append([model, image, scores, f"{s['kept']} / {s['masked']} -> {f['masked']}", fewer, r,
                               f"{s['wall']:.1f} -> {f['wall']:.1f}", f"**{s['wall'] / f['wall']:.2f}x**"])
    for sigma, by_fusion in row.get("noise", {}).items():
        tables["noise"].append([model, image, sigma, *(f"{np.mean(v):.3f} (min {np.min(v):.3f})"
                                                       for v in by_fusion.values())])
    return tables


def methods_row(res: dict[str, Any]) -> list[Any]:
    """A model's row of the SISE vs RISE vs Score-CAM table."""
    first, first_forwards = res["images"][0]["sise"]["wall"], res["images"][0]["sise"]["masked"]
    rise, cam, pgc = res["rise"], res["scorecam"], res["pgc_scorecam"]
    note_rise = "" if rise["measured_masks"] == 4000 else f" (extrapolated from {rise['measured_masks']} masks)"
    note_cam = "" if cam["scale"] == 1 else f" (extrapolated from {cam['layer']} x{cam['scale']:.0f})"
    return [res["model"], f"{first:.1f}", f"{rise['wall']:.1f}{note_rise}", f"{cam['wall']:.1f}{note_cam}",
            f"{pgc['wall']:.1f}{note_cam}", f"{first / rise['wall']:.2f}",
            f"{first / cam['wall']:.2f} / {first / pgc['wall']:.2f}", f"{first_forwards} / 4000 / {cam['forwards']}"]


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    tables: dict[str, list[list[Any]]] = {"cost": [], "ada": [], "fast": [], "noise": []}
    memory_line = ""
    for res in results:
        for row in res["images"]:
            for key, rows in image_rows(res["model"], res["t_forward"], row).items():
                tables[key] += rows
        if res["model"] == "resnet50":
            peak = max(r["sise"]["memory_gb"] for r in res["images"])
            memory_line = (
                f"Peak memory of SISE on ResNet-50 (RSS growth during the call, batch {res['batch']}): "
                f"**{peak:.2f} GB** (target <= 2.5 GB)."
            )
    fwd_line = "; ".join(
        f"{r['model']}: batch {r['batch']}, {r['t_forward'] * 1000:.1f} ms/image "
        f"(by batch size: {', '.join(f'{b}: {v * 1000:.0f}' for b, v in r['per_batch'].items())} ms)"
        for r in results
    )
    sections = [
        "## SISE and Ada-SISE (`benchmarks/bench_sise.py`)",
        machine_line() + f" · {'quick' if args.quick else 'full'} run · EfficientNet-Lite0 (pretrained), "
        f"ResNet-50 (random weights: no pretrained weights on this machine; fine for timing) · {args.threads} torch "
        f"thread(s) · load average {args.load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on "
        f"{os.cpu_count()} cores",
        f"Best per-image forward time of the bare model (same run, channels-last, inference mode): {fwd_line}.",
        COST_TEXT, markdown_table(COST_HEADER, tables["cost"]),
        METHODS_TEXT, markdown_table(METHODS_HEADER, [methods_row(res) for res in results]),
        "**Ada-SISE vs SISE** (mu = 0). Paper: up to 30 % faster.",
        markdown_table(["model", "image", "kept masks", "masked forwards", "seconds", "time saved"], tables["ada"]),
        FAST_TEXT,
        markdown_table(["model", "image", "scores", "forwards", "fewer (vs paper / vs full)",
                        "r paper / code / simple", "full -> fast s", "speed-up"], tables["fast"]),
    ]
    if tables["noise"]:
        sections += [NOISE_TEXT, markdown_table(["model", "image", "sigma", *(f"r {f}" for f in FUSIONS)],
                                                tables["noise"])]
    return "\n\n".join([*sections, memory_line])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="ResNet-50: one image, extrapolated RISE/Score-CAM")
    parser.add_argument("--images", type=int, default=2, help="photos per model (1-4)")
    parser.add_argument("--batch-size", type=int, default=0, help="0 = the best of 16/32/64")
    parser.add_argument("--models", default="efficientnet_lite0,resnet50")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the same for every method)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.load_before = os.getloadavg()[0]
    if not 1 <= args.images <= len(PHOTOS):
        parser.error(f"--images must be 1..{len(PHOTOS)}")
    torch.manual_seed(0)
    results = []
    for name in args.models.split(","):
        n_images = 1 if args.quick and name == "resnet50" else args.images
        sise_repeats = 2 if args.quick and name == "resnet50" else 3
        results.append(bench_model(name, n_images, args.quick, args.batch_size, repeats=3, sise_repeats=sise_repeats))
    body = report(results, args)
    print(body)
    write_section("sise", body)


if __name__ == "__main__":
    main()
