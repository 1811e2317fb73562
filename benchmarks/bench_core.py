"""Foundation benchmark: model throughput, masked-forward engine throughput, Score-CAM vs pytorch-grad-cam.

Measured side by side in one run on EfficientNet-Lite0 (pretrained, chelsea):
1. per-image forward time of the bare model at the best batch size (channels-last, inference mode);
2. the engine's throughput on RISE masks (mask generation + masking + forward + scores) at that batch
   size — ratio engine/model, target >= 0.87;
3. convlens Score-CAM vs pytorch-grad-cam's ScoreCAM on the same (last, 1280-channel) layer, same batch
   size — target <= 0.6x, and the Pearson r of the two maps.

Usage: python benchmarks/bench_core.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import skimage.data
import torch
from PIL import Image

from _sections import machine_line, markdown_table, write_section
from convlens.core.engine import MaskedForwardEngine
from convlens.methods.rise import RISE, rise_masks
from convlens.methods.scorecam import ScoreCAM
from convlens.models import load


def model_throughput(model: torch.nn.Module, image: torch.Tensor, batch: int, repeats: int) -> float:
    """Images per second of the bare model (channels-last, inference mode), best of ``repeats``.

    The batch is the real photo repeated: random-normal inputs produce denormal activations in
    EfficientNet-Lite0 that slow the CPU by ~25 % and would flatter the engine/model ratio.
    """
    x = image[None].repeat(batch, 1, 1, 1).contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    best = float("inf")
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t0)
    model.to(memory_format=torch.contiguous_format)
    return batch / best


def engine_rate(model: torch.nn.Module, x: torch.Tensor, n_masks: int, batch: int, repeats: int) -> float:
    """Best masked inputs per second of the engine on RISE masks (generated chunk by chunk, as RISE does)."""
    rates = []
    for _ in range(repeats):
        engine = MaskedForwardEngine(model, score="softmax", batch_size=batch)
        generator = torch.Generator().manual_seed(0)

        def chunk(i: int, g: torch.Generator = generator) -> torch.Tensor | None:
            start = i * batch
            return None if start >= n_masks else rise_masks(min(batch, n_masks - start), (224, 224), 7, 0.5, g)

        t0 = time.perf_counter()
        engine.run(x, chunk, 282)
        rates.append(n_masks / (time.perf_counter() - t0))
    return max(rates)


def scorecam_versus_pgc(model: torch.nn.Module, x: torch.Tensor, batch: int) -> tuple[Any, float, float, float]:
    """convlens's Score-CAM on bn2 and pytorch-grad-cam's: (our explanation, our s, their s, Pearson r)."""
    from pytorch_grad_cam import ScoreCAM as PGCScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    t0 = time.perf_counter()
    ours = ScoreCAM(model, layers="bn2", batch_size=batch).explain(x, 282)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with PGCScoreCAM(model=model, target_layers=[model.bn2]) as cam:
        cam.batch_size = batch
        theirs = cam(input_tensor=x[None], targets=[ClassifierOutputTarget(282)])[0]
    theirs_s = time.perf_counter() - t0
    r = float(np.corrcoef(ours.normalized[0].numpy().ravel(), np.asarray(theirs).ravel())[0, 1])
    return ours, ours_s, theirs_s, r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer masks/repeats")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load("efficientnet_lite0")
    model = loaded.module.eval()
    x = loaded.preprocessing(Image.fromarray(skimage.data.chelsea()))

    repeats = 2 if args.quick else 3
    rates = {b: model_throughput(model, x, b, repeats) for b in (8, 16, 32, 64)}
    best_batch = max(rates, key=rates.get)
    model_rate = rates[best_batch]
    n_masks = 256 if args.quick else 1024
    masked_rate = engine_rate(model, x, n_masks, best_batch, repeats)
    t0 = time.perf_counter()
    RISE(model, n_masks=n_masks, batch_size=best_batch).explain(x, 282)
    rise_rate = n_masks / (time.perf_counter() - t0)
    ours, ours_s, theirs_s, r = scorecam_versus_pgc(model, x, best_batch)

    rows = [
        ["model forward, best batch", f"{best_batch}", f"{model_rate:.1f} img/s", "", ""],
        ["engine on RISE masks", f"{n_masks} masks", f"{masked_rate:.1f} img/s",
         f"{masked_rate / model_rate:.2f}", ">= 0.87"],
        ["RISE explainer end to end", f"{n_masks} masks", f"{rise_rate:.1f} img/s",
         f"{rise_rate / model_rate:.2f}", ""],
        ["Score-CAM convlens (bn2, 1280 ch)", f"{ours.forward_passes} fwd", f"{ours_s:.1f} s",
         f"{ours_s / theirs_s:.2f} x pgc", "<= 0.6"],
        ["Score-CAM pytorch-grad-cam 1.5.7", "1280 fwd", f"{theirs_s:.1f} s", "1.00", ""],
    ]
    batch_rows = [[b, f"{v:.1f}"] for b, v in rates.items()]
    body = "\n\n".join([
        "## Foundation: model, engine, Score-CAM (`benchmarks/bench_core.py`)",
        machine_line() + f" · EfficientNet-Lite0 (pretrained), chelsea, {'quick' if args.quick else 'full'} run",
        markdown_table(["what", "size", "measured", "ratio", "target"], rows),
        f"Score-CAM maps agree with pytorch-grad-cam: Pearson r = {r:.4f}.",
        "Model throughput by batch size (img/s, channels-last):\n\n" + markdown_table(["batch", "img/s"], batch_rows),
    ])
    print(body)
    write_section("core", body)


if __name__ == "__main__":
    main()
