"""Foundation benchmark: model throughput, masked-forward engine throughput, Score-CAM vs pytorch-grad-cam.

Measured side by side in one run on EfficientNet-Lite0 (pretrained, chelsea):
1. per-image forward time of the bare model at the best batch size (channels-last, inference mode);
2. the engine's throughput on RISE masks (mask generation + masking + forward + scores) at that batch
   size — ratio engine/model, target >= 0.87;
3. convlens Score-CAM vs pytorch-grad-cam's ScoreCAM on the same (last, 1280-channel) layer, each at its
   default batch size (64 / 16), alternated on real photos — target <= 0.6x; the maps against each other
   and against convlens's previous every-channel Score-CAM (r >= 0.9999).

Usage: python benchmarks/bench_core.py [--quick]
"""

from __future__ import annotations

import argparse
import os
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

PHOTOS = ("chelsea", "coffee", "astronaut")  # scikit-image photos (30-65 % constant bn2 channels)


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


def every_channel_scorecam(model: torch.nn.Module, x: torch.Tensor, target: int, batch: int) -> torch.Tensor:
    """Score-CAM on bn2 as convlens computed it before the zero masks were shared: every channel's mask scored."""
    from convlens.core.engine import MaskedForwardEngine
    from convlens.core.hooks import LayerCapture
    from convlens.core.maps import minmax_normalize, upsample

    with LayerCapture(model, ["bn2"]) as cap, torch.inference_mode():
        model(x[None])
        maps = cap.activations["bn2"][0].float()
    engine = MaskedForwardEngine(model, score="logit", batch_size=batch)
    chunks = (minmax_normalize(upsample(maps[i : i + batch], (224, 224)), eps=1e-8)[:, None]
              for i in range(0, maps.shape[0], batch))
    weights = torch.softmax(engine.run(x, chunks, target)[:, 0], dim=0)
    cam = torch.relu(torch.einsum("k,khw->hw", weights, maps))
    return upsample(cam[None], (224, 224))[0]  # as Score-CAM's combine_layer_maps


def scorecam_versus_pgc(model: torch.nn.Module, photos: dict[str, torch.Tensor], rounds: int) -> dict[str, Any]:
    """convlens's Score-CAM (default batch) and pytorch-grad-cam's ScoreCAM (its default batch, 16) on bn2,
    alternated photo by photo and round by round: times, maps against each other and against every-channel
    scoring."""
    from pytorch_grad_cam import ScoreCAM as PGCScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    out: dict[str, Any] = {"ours": [], "pgc": [], "rows": []}
    explainer = ScoreCAM(model, layers="bn2")
    for name, x in photos.items():
        with torch.inference_mode():
            target = int(model(x[None]).argmax())
        for _ in range(rounds):
            t0 = time.perf_counter()
            ours = explainer.explain(x, target)
            out["ours"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with PGCScoreCAM(model=model, target_layers=[model.bn2]) as cam:  # default batch size
                theirs = np.asarray(cam(input_tensor=x[None], targets=[ClassifierOutputTarget(target)])[0])
            out["pgc"].append(time.perf_counter() - t0)
        every = every_channel_scorecam(model, x, target, explainer.batch_size)
        out["rows"].append({
            "photo": name, "target": target, "zero": ours.extras["zero_masks"]["bn2"][0],
            "forwards": ours.forward_passes,
            "r_pgc": float(np.corrcoef(ours.normalized[0].numpy().ravel(), theirs.ravel())[0, 1]),
            "r_every": float(np.corrcoef(ours.maps[0].numpy().ravel(), every.numpy().ravel())[0, 1]),
            "max_diff": float((ours.maps[0] - every).abs().max()), "bitwise": bool(torch.equal(ours.maps[0], every)),
        })
    return out


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
    photos = {name: loaded.preprocessing(Image.fromarray(getattr(skimage.data, name)())) for name in PHOTOS}
    load_before = os.getloadavg()[0]
    cam = scorecam_versus_pgc(model, photos, rounds=1 if args.quick else 2)
    ours_s, theirs_s = sum(cam["ours"]), sum(cam["pgc"])

    rows = [
        ["model forward, best batch", f"{best_batch}", f"{model_rate:.1f} img/s", "", ""],
        ["engine on RISE masks", f"{n_masks} masks", f"{masked_rate:.1f} img/s",
         f"{masked_rate / model_rate:.2f}", ">= 0.87"],
        ["RISE explainer end to end", f"{n_masks} masks", f"{rise_rate:.1f} img/s",
         f"{rise_rate / model_rate:.2f}", ""],
        ["Score-CAM convlens (bn2, 1280 ch, batch 64)", f"{len(cam['ours'])} runs", f"{ours_s:.1f} s",
         f"**{ours_s / theirs_s:.2f}** x pgc", "<= 0.6"],
        ["Score-CAM pytorch-grad-cam 1.5.7 (batch 16, its default)", f"{len(cam['pgc'])} runs", f"{theirs_s:.1f} s",
         "1.00", ""],
    ]
    batch_rows = [[b, f"{v:.1f}"] for b, v in rates.items()]
    cam_rows = [[r["photo"], r["target"], f"{r['zero']} / 1280", r["forwards"], f"{r['r_every']:.6f}",
                 f"{r['max_diff']:.1e}" + (" (bitwise equal)" if r["bitwise"] else ""), f"{r['r_pgc']:.4f}"]
                for r in cam["rows"]]
    runs = ", ".join(f"{o:.1f} / {p:.1f}" for o, p in zip(cam["ours"], cam["pgc"], strict=True))
    body = "\n\n".join([
        "## Foundation: model, engine, Score-CAM (`benchmarks/bench_core.py`)",
        machine_line() + f" · EfficientNet-Lite0 (pretrained) · {'quick' if args.quick else 'full'} run · load "
        f"average {load_before:.1f} before the Score-CAM runs, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} cores",
        markdown_table(["what", "size", "measured", "ratio", "target"], rows),
        f"Score-CAM runs, alternated photo by photo (convlens / pytorch-grad-cam, seconds): {runs}.",
        "Score-CAM maps: all-zero masks (constant bn2 channels) are scored once; r and max |diff| against "
        "convlens's previous Score-CAM (every channel scored, computed here), and r against pytorch-grad-cam "
        "(which up-samples with align_corners=True):\n\n" + markdown_table(
            ["photo", "class", "zero masks", "forwards", "r vs every-channel", "max abs diff", "r vs pgc"], cam_rows),
        "Model throughput by batch size (img/s, channels-last):\n\n" + markdown_table(["batch", "img/s"], batch_rows),
    ])
    print(body)
    write_section("core", body)


if __name__ == "__main__":
    main()
