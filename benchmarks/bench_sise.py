"""SISE / Ada-SISE benchmark: cost vs the model's forward cost, vs RISE and Score-CAM, fast mode fidelity, memory.

Measured side by side in one run on EfficientNet-Lite0 (pretrained) and ResNet-50 (random weights: fine for
timing) on the same photos (scikit-image's chelsea, coffee, astronaut, rocket; ``--images N``):

1. SISE wall time vs (masked forwards x the best per-image forward time of the bare model, measured in
   the same run at the same batch size, channels-last, inference mode, best of several repeats before
   and after) — target ratio <= 1.15;
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
from convlens.methods.adasise import AdaSISE
from convlens.methods.rise import RISE
from convlens.methods.scorecam import ScoreCAM
from convlens.methods.sise import SISE, fuse_visualization_maps
from convlens.models import load

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
FUSIONS = ("paper", "code", "simple")
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


def per_image_forward_seconds(model: torch.nn.Module, x: torch.Tensor, batch: int, repeats: int) -> float:
    """Best per-image time of the bare model on ``batch`` copies of ``x`` (channels-last, inference mode)."""
    inputs = x[None].expand(batch, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    model.to(memory_format=torch.channels_last)
    best = float("inf")
    try:
        with torch.inference_mode():
            model(inputs)
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(inputs)
                best = min(best, time.perf_counter() - t0)
    finally:
        model.to(memory_format=torch.contiguous_format)
    return best / batch


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


def bench_model(name: str, n_images: int, quick: bool, batch_arg: int, repeats: int) -> dict[str, Any]:
    loaded = load(name)
    model = loaded.module.eval()
    photos = [getattr(skimage.data, p)() for p in PHOTOS[:n_images]]
    xs = [loaded.preprocessing(Image.fromarray(p)) for p in photos]
    batches = (batch_arg,) if batch_arg else (16, 32, 64)
    rates = {b: per_image_forward_seconds(model, xs[0], b, repeats) for b in batches}
    batch = min(rates, key=rates.get)
    result: dict[str, Any] = {"model": name, "batch": batch, "per_batch": rates, "images": [], "quick": quick}
    t_forward = [rates[batch]]

    for index, x in enumerate(xs):
        row: dict[str, Any] = {"image": PHOTOS[index]}
        with PeakRSS() as memory:
            sise, wall, cpu = timed(lambda x=x: SISE(loaded, batch_size=batch).explain(x))
        t_forward.append(per_image_forward_seconds(model, x, batch, repeats))
        row["sise"] = {
            "wall": wall,
            "cpu": cpu,
            "masked": sum(sise.extras["masked_forwards"]),
            "kept": sum(v[0] for v in sise.extras["kept_masks"].values()),
            "constant": sum(v[0] for v in sise.extras["constant_masks"].values()),
            "memory_gb": memory.growth_gb,
            "target": int(sise.targets[0]),
        }
        ada, wall, cpu = timed(lambda x=x: AdaSISE(loaded, batch_size=batch).explain(x))
        row["adasise"] = {
            "wall": wall,
            "masked": sum(ada.extras["masked_forwards"]),
            "kept": sum(v[0] for v in ada.extras["kept_masks"].values()),
        }
        row["fast"] = {}
        for scores in ("gp", "medoid"):
            fast, wall, cpu = timed(
                lambda x=x, s=scores: SISE(loaded, batch_size=batch, fast=True, fast_scores=s).explain(x)
            )
            row["fast"][scores] = {
                "wall": wall,
                "masked": sum(fast.extras["masked_forwards"]),
                "r": {f: pearson(refuse(fast, f), refuse(sise, f)) for f in FUSIONS},
            }
        assert torch.allclose(refuse(sise, "paper"), sise.maps[0])  # the re-fusion reproduces the run
        result["images"].append(row)
        print(name, row, flush=True)

    # baselines on the first image
    x, target = xs[0], result["images"][0]["sise"]["target"]
    last = resolve_layers(model, "last", tuple(x.shape))[0]
    n_rise = 512 if quick and name in QUICK_CAM_LAYER else 4000
    _, wall, _ = timed(lambda: RISE(loaded, n_masks=n_rise, batch_size=batch).explain(x, target))
    result["rise"] = {"wall": wall * 4000 / n_rise, "measured_masks": n_rise}
    cam_layer = QUICK_CAM_LAYER.get(name, last) if quick else last
    scale = 1.0
    if cam_layer != last:  # Score-CAM's forwards = the layer's channels; the per-forward cost is the model's
        shapes = describe_layers(model, tuple(x.shape))
        scale = shapes[last].shape[0] / shapes[cam_layer].shape[0]
    _, wall, _ = timed(lambda: ScoreCAM(loaded, layers=cam_layer, batch_size=batch).explain(x, target))
    result["scorecam"] = {"wall": wall * scale, "layer": cam_layer, "scale": scale}
    result["pgc_scorecam"] = {"wall": pgc_scorecam_seconds(model, cam_layer, x, target, batch) * scale}
    t_forward.append(per_image_forward_seconds(model, x, batch, repeats))
    result["t_forward"] = min(t_forward)
    print(name, {k: v for k, v in result.items() if k != "images"}, flush=True)
    return result


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    cost_rows, method_rows, ada_rows, fast_rows = [], [], [], []
    memory_line = ""
    for res in results:
        model, t_fwd = res["model"], res["t_forward"]
        for row in res["images"]:
            s = row["sise"]
            cost_rows.append(
                [
                    model,
                    row["image"],
                    f"{s['kept']} / {s['constant']} / {s['masked']}",
                    f"{s['wall']:.1f}",
                    f"{s['masked'] * t_fwd:.1f}",
                    f"{s['wall'] / (s['masked'] * t_fwd):.3f}",
                    f"{s['cpu'] / (s['masked'] * t_fwd * torch.get_num_threads()):.3f}",
                ]
            )
            a = row["adasise"]
            ada_rows.append(
                [
                    model,
                    row["image"],
                    f"{s['kept']} -> {a['kept']}",
                    f"{s['masked']} -> {a['masked']}",
                    f"{s['wall']:.1f} -> {a['wall']:.1f}",
                    f"{1 - a['wall'] / s['wall']:.0%}",
                ]
            )
            for scores, f in row["fast"].items():
                fast_rows.append(
                    [
                        model,
                        row["image"],
                        scores,
                        f"{s['kept']} / {s['masked']} -> {f['masked']}",
                        f"{s['kept'] / max(f['masked'], 1):.2f}x / {s['masked'] / max(f['masked'], 1):.2f}x",
                        " / ".join(f"{f['r'][k]:.3f}" for k in FUSIONS),
                        f"{f['wall']:.1f}",
                    ]
                )
        first = res["images"][0]["sise"]
        rise, cam, pgc = res["rise"], res["scorecam"], res["pgc_scorecam"]
        note_rise = "" if rise["measured_masks"] == 4000 else f" (extrapolated from {rise['measured_masks']} masks)"
        note_cam = "" if cam["scale"] == 1 else f" (extrapolated from {cam['layer']} x{cam['scale']:.0f})"
        method_rows.append(
            [
                model,
                f"{first['wall']:.1f}",
                f"{rise['wall']:.1f}{note_rise}",
                f"{cam['wall']:.1f}{note_cam}",
                f"{pgc['wall']:.1f}{note_cam}",
                f"{first['wall'] / rise['wall']:.2f}",
                f"{first['wall'] / cam['wall']:.2f} / {first['wall'] / pgc['wall']:.2f}",
            ]
        )
        if model == "resnet50":
            memory_line = (
                f"Peak memory of SISE on ResNet-50 (RSS growth during the call, batch {res['batch']}): "
                f"**{max(r['sise']['memory_gb'] for r in res['images']):.2f} GB** (target <= 2.5 GB)."
            )
    fwd_line = "; ".join(
        f"{r['model']}: batch {r['batch']}, {r['t_forward'] * 1000:.1f} ms/image "
        f"(at 16/32/64: {', '.join(f'{v * 1000:.0f}' for v in r['per_batch'].values())} ms)"
        for r in results
    )
    mode = "quick" if args.quick else "full"
    return "\n\n".join(
        [
            "## SISE and Ada-SISE (`benchmarks/bench_sise.py`)",
            machine_line() + f" · {mode} run · EfficientNet-Lite0 (pretrained), ResNet-50 (random weights)",
            f"Best per-image forward time of the bare model (same run): {fwd_line}.",
            "**SISE cost vs the model's forward cost** (masks: kept by Eq. 7 / constant maps not scored, since "
            "their Omega is the zero mask / masked forwards run; ratio = SISE wall time / (masked forwards x best "
            "per-image forward time), target <= 1.15; the CPU ratio uses process CPU time over all threads):",
            markdown_table(
                [
                    "model",
                    "image",
                    "masks kept / constant / forwards",
                    "SISE s",
                    "forwards x t_fwd s",
                    "ratio",
                    "CPU ratio",
                ],
                cost_rows,
            ),
            "**SISE vs RISE (4000 masks) vs Score-CAM** (last block; first image; seconds; paper on a T4 with "
            "ResNet-50: SISE/RISE = 0.35, SISE/Score-CAM = 0.51):",
            markdown_table(
                [
                    "model",
                    "SISE",
                    "RISE 4000",
                    "Score-CAM convlens",
                    "Score-CAM pytorch-grad-cam",
                    "SISE/RISE",
                    "SISE/Score-CAM (convlens / pgc)",
                ],
                method_rows,
            ),
            "**Ada-SISE vs SISE** (mu = 0; paper: up to 30 % faster):",
            markdown_table(["model", "image", "kept masks", "masked forwards", "seconds", "time saved"], ada_rows),
            "**fast=True** (fast_factor 2: one medoid scored per group of ~2 similar masks per block; the other "
            "masks get a Gaussian-process-interpolated score (`gp`) or their medoid's (`medoid`)). Forwards: "
            "the paper's count (Eq. 7 kept) / full convlens SISE -> fast; Pearson r of the final map vs full "
            "SISE for fusion paper / code / simple:",
            markdown_table(
                [
                    "model",
                    "image",
                    "scores",
                    "forwards",
                    "fewer (vs paper / vs full)",
                    "r paper / code / simple",
                    "fast s",
                ],
                fast_rows,
            ),
            memory_line,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="ResNet-50: one image, extrapolated RISE/Score-CAM")
    parser.add_argument("--images", type=int, default=2, help="photos per model (1-4)")
    parser.add_argument("--batch-size", type=int, default=0, help="0 = the best of 16/32/64")
    parser.add_argument("--models", default="efficientnet_lite0,resnet50")
    args = parser.parse_args()
    if not 1 <= args.images <= len(PHOTOS):
        parser.error(f"--images must be 1..{len(PHOTOS)}")
    torch.manual_seed(0)
    results = []
    for name in args.models.split(","):
        n_images = 1 if args.quick and name == "resnet50" else args.images
        results.append(bench_model(name, n_images, args.quick, args.batch_size, repeats=3))
    body = report(results, args)
    print(body)
    write_section("sise", body)


if __name__ == "__main__":
    main()
