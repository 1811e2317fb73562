"""Speed that holds on a busy machine: every method and stage quiet and under load, on one and on the default threads.

Stages (EfficientNet-Lite0, pretrained, scikit-image's chelsea at 224 x 224; ``--quick``: 96 x 96 and
smaller sizes), each through its public entry point: Grad-CAM, Score-CAM, RISE, SISE (full and fast),
ADVISE (its KDE and AVX phases from the same runs), INV, ``convlens labels`` (``run_labels`` on a small
study export, all-MiniLM-L6-v2) and TCAV (``TCAVRunner`` on the synthetic benchmark's concepts).

Conditions: *quiet* (nothing started by the benchmark; the machine's load average is recorded) and
*busy* (one busy-loop process per core, started and stopped by the benchmark); torch on one thread, on the
default threads with the scoped limits of :mod:`convlens.core.threads` and with them switched off (the
behaviour before); OpenMP threads that sleep while they wait (``OMP_WAIT_POLICY=PASSIVE``, what ``import
convlens`` sets before torch loads) or spin (libgomp's default, what a process that imported torch first
gets). The three thread configurations alternate within every repetition of a stage (side by side under
the same load); each wait policy runs in its own worker process (the policy is fixed when torch loads).

Goals (issue 24), measured in the passive worker: the batched KDE >= 20x ``adaptivekde`` (looped per
channel) on a busy machine and >= 50x quiet (256 random channels, Z = 49); ADVISE <= 5x Grad-CAM's time;
fast SISE >= 5x faster than full SISE with an EBPG within 0.01 on the real photos
(``benchmarks/real_photos.json``; quiet, default threads, alternated object by object); no stage more
than 1.5x slower on the default threads than on one thread under the same load.

Usage: ``python benchmarks/bench_load.py [--quick] [--stages gradcam,advise] [--no-goals] [--no-write]``
(the full run took 20 minutes on 2 cores shared with other jobs, load average 2-4.5; ``--quick``
checks the whole path at 96 x 96 with small sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

POLICIES = {"passive": "PASSIVE", "spin": None}  # OMP_WAIT_POLICY of each worker (None: libgomp's default)
CONFIGS = ("1 thread", "default", "default, limits off")  # torch threads, scoped limits on / off
LOADS = ("quiet", "busy")


def load_average() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


@contextlib.contextmanager
def busy_cores(count: int | None = None) -> Iterator[int]:
    """One pure-Python busy loop per core (or ``count``) for the body; stopped and reaped on exit."""
    count = count or os.cpu_count() or 1
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(1.0)  # let the scheduler spread them
        yield count
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


# ------------------------------------------------------------------------------------------ worker: stages
@dataclass
class Stage:
    """A stage run as users run it; ``phases`` names timings of its result reported as rows of their own."""

    name: str
    run: Callable[[], Any]
    phases: tuple[str, ...] = ()
    repeats: int = 1
    times: dict[str, float] = field(default_factory=dict)  # "load|config|phase" -> best seconds

    def time(self, load_name: str, config: str, default_threads: int) -> None:
        import torch

        from convlens.core.threads import thread_limits_enabled

        torch.set_num_threads(1 if config == "1 thread" else default_threads)
        with thread_limits_enabled(config != "default, limits off"):
            start = time.perf_counter()
            result = self.run()
            seconds = time.perf_counter() - start
        timings = getattr(result, "timings", {}) or {}
        for phase, value in [("", seconds), *((p, timings.get(p, math.nan)) for p in self.phases)]:
            key = f"{load_name}|{config}|{phase}"
            self.times[key] = min(self.times.get(key, math.inf), value)


def method_stages(size: int, quick: bool) -> list[Stage]:
    import skimage.data
    import torch
    from PIL import Image

    from convlens.inv import INV
    from convlens.methods import create
    from convlens.methods.sise import SISEParams
    from convlens.models import load

    loaded = load("efficientnet_lite0")
    x = loaded.preprocessing(Image.fromarray(skimage.data.chelsea()))[None]
    if size != 224:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    rise_masks = 64 if quick else 500
    made = {
        "Grad-CAM": create("gradcam", loaded),
        "Score-CAM": create("scorecam", loaded),
        f"RISE ({rise_masks} masks)": create("rise", loaded, n_masks=rise_masks),
        "SISE": create("sise", loaded),
        f"fast SISE (fast_factor {SISEParams().fast_factor:g})": create("sise", loaded, fast=True),
        "ADVISE": create("advise", loaded),
    }
    stages = [Stage(name, (lambda e=explainer: e.explain(x)), ("kde", "avx") if name == "ADVISE" else ())
              for name, explainer in made.items()]
    inv = INV(loaded, num_layers=2 if quick else 9)
    stages.append(Stage(f"INV ({inv.config.num_layers} layers)", lambda: inv.explain(x)))
    return stages


PHRASES = {
    "tabby cat": ["striped fur", "the ears", "whiskers and nose", "green eyes", "fur", "a cat face", "stripes",
                  "pointy ears", "the eye", "soft fur on the cheek"],
    "espresso": ["a cup", "coffee foam", "the saucer", "brown liquid", "a spoon", "white cup", "crema", "the handle",
                 "coffee", "a round plate"],
}


def labels_stage(quick: bool) -> Stage:
    """``run_labels`` on a study export (the format of ``convlens study export``) of two classes' plays."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from convlens.labels.embedders import load_embedder
    from convlens.labels.pipeline import run_labels
    from labels_helpers import make_play, make_round, write_export

    rng = np.random.default_rng(0)
    rounds, plays = [], []
    for c, (name, phrases) in enumerate(PHRASES.items()):
        for i in range(3 if quick else 8):
            row = make_round(f"img{c}{i}", 1 + i % 3, i, name)
            rounds.append(row)
            plays += [make_play(f"p{c}{i}{j}", row, "win", 2, str(rng.choice(phrases))) for j in range(4)]
    export = write_export(Path(tempfile.mkdtemp(prefix="bench-load-")) / "export", rounds, plays,
                          {"study_id": "bench", "classes": list(PHRASES)})
    embedder = load_embedder("minilm")
    return Stage(f"labels ({len(plays)} plays)", lambda: run_labels(export, embedder=embedder))


def tcav_stage(quick: bool) -> Stage:
    """``TCAVRunner.run`` for one class of the synthetic benchmark: its object and distractor concepts."""
    from convlens.models.synthetic import SYNTHETIC_PREPROCESSING, load_synthetic_model
    from convlens.tcav.concept_sets import synthetic_class_inputs, synthetic_concepts
    from convlens.tcav.runner import TCAVRunner

    images, runs = (10, 3) if quick else (20, 10)
    concepts = synthetic_concepts(SYNTHETIC_PREPROCESSING, n_images=images, seed=0)
    inputs = synthetic_class_inputs(SYNTHETIC_PREPROCESSING, count=images, seed=0)
    model = load_synthetic_model("synthetic-vgg")

    def run() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few random runs in --quick
            runner = TCAVRunner(model.module, ["features.16"], model_name="synthetic-vgg", random_runs=runs)
            return runner.run({0: inputs[0]}, {0: concepts.for_class(0)}, concepts.random)

    return Stage(f"TCAV (1 class, 2 concepts, N = {runs})", run)


STAGE_KEYS = ("gradcam", "scorecam", "rise", "sise", "fastsise", "advise", "inv", "labels", "tcav")


def _key(name: str) -> str:
    return name.split(" (")[0].lower().replace("-", "").replace(" ", "")


def build_stages(size: int, quick: bool, only: set[str] | None) -> list[Stage]:
    import torch

    stages = method_stages(size, quick)
    stages += [builder(quick) for key, builder in (("labels", labels_stage), ("tcav", tcav_stage))
               if only is None or key in only]
    stages = [s for s in stages if only is None or _key(s.name) in only]
    torch.set_num_threads(1)
    for stage in stages:  # warm-up (imports, layer discovery), and how many repeats the stage affords
        stage.run()
        start = time.perf_counter()
        stage.run()
        stage.repeats = 3 if time.perf_counter() - start < 1.0 else 1
    return stages


def measure(stages: list[Stage], load_name: str, default_threads: int) -> None:
    """Each stage in turn; its thread configurations alternate within every repetition."""
    for stage in stages:
        for _ in range(stage.repeats):
            for config in CONFIGS:
                stage.time(load_name, config, default_threads)
        print(f"  {load_name:5} {stage.name}: " + ", ".join(
            f"{config} {stage.times[f'{load_name}|{config}|']:.3f} s" for config in CONFIGS), flush=True)


# ------------------------------------------------------------------------------------------- worker: goals
def kde_goal(channels: int, default_threads: int) -> list[list[object]]:
    """Our KDE (default threads, limits on / off) against ``adaptivekde`` looped per channel, quiet and busy."""
    import torch
    from adaptivekde import ssvkernel as reference

    from convlens.core.threads import thread_limits_enabled
    from convlens.numerics.kde import linspace_like_numpy, ssvkernel

    samples = torch.from_numpy(np.random.default_rng(0).normal(0.45, 0.2, (channels, 49)))
    tin = linspace_like_numpy(0.0, 1.0, 49)

    def ours(limits: bool) -> float:
        torch.set_num_threads(default_threads)
        best = math.inf
        with thread_limits_enabled(limits):
            for _ in range(3):
                start = time.perf_counter()
                ssvkernel(samples, tin, convention="adaptivekde")
                best = min(best, time.perf_counter() - start)
        return best

    def looped() -> float:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for row in samples.numpy():
                np.random.seed(0)
                reference(row, tin.numpy(), M=10, nbs=1, WinFunc="Gauss")
        return time.perf_counter() - start

    ssvkernel(samples[:8], tin)  # warm-up
    rows = []
    for load_name in LOADS:
        with busy_cores() if load_name == "busy" else contextlib.nullcontext():
            on, off = ours(True), ours(False)
            ref = looped()
            on, off = min(on, ours(True)), min(off, ours(False))  # best of the runs before and after
            rows.append([load_name, f"{ref:.2f}", f"{on:.3f}", f"**{ref / on:.0f}x**", f"{off:.3f}",
                         f"{ref / off:.1f}x", load_average()])
        print("  KDE goal", rows[-1], flush=True)
    return rows


def sise_goal(objects_limit: int | None, factors: list[float], default_threads: int) -> dict[str, Any]:
    """Full vs fast SISE on the real photos, alternated object by object (quiet, default threads)."""
    import torch

    from bench_localisation import METRICS, prepare
    from convlens.methods import create
    from convlens.models import load

    torch.set_num_threads(default_threads)
    loaded = load("efficientnet_lite0")
    objects = prepare(loaded)[:objects_limit]
    methods = {"full": create("sise", loaded)} | {
        f"fast, fast_factor {f:g}": create("sise", loaded, fast=True, fast_factor=f) for f in factors
    }
    for explainer in methods.values():
        explainer.explain(objects[0]["x"], objects[0]["target"])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    ebpg: dict[str, list[float]] = {name: [] for name in methods}
    forwards: dict[str, list[int]] = {name: [] for name in methods}
    for item in objects:
        for name, explainer in methods.items():
            start = time.perf_counter()
            explanation = explainer.explain(item["x"], item["target"])
            seconds[name].append(time.perf_counter() - start)
            ebpg[name].append(float(METRICS["EBPG"](explanation.maps[0], item["mask"])))
            forwards[name].append(explanation.forward_passes)
        print("  SISE goal", item["name"], {k: (round(v[-1], 2), round(ebpg[k][-1], 4)) for k, v in seconds.items()},
              flush=True)
    held_out = [i for i, item in enumerate(objects) if item["name"].split(":")[0] not in FULL_CROP_PHOTOS]
    rows = []
    for name in methods:
        cells = []
        for chosen in (range(len(objects)), held_out):
            speed_up = sum(seconds["full"][i] for i in chosen) / sum(seconds[name][i] for i in chosen)
            difference = np.mean([ebpg[name][i] - ebpg["full"][i] for i in chosen]) if chosen else math.nan
            cells += ["1 (itself)" if name == "full" else f"**{speed_up:.2f}x**",
                      "—" if name == "full" else f"{difference:+.4f}"]
        rows.append([name, f"{np.mean(forwards[name]):.0f}", f"{np.mean(seconds[name]):.2f}",
                     f"{np.mean(ebpg[name]):.4f}", *cells])
    return {"rows": rows, "objects": len(objects), "held_out": len(held_out), "load": load_average()}


FULL_CROP_PHOTOS = ("chelsea", "coffee")  # bench_sise's photos: boxes filling (most of) the crop


def worker(args: argparse.Namespace) -> None:
    """One wait policy (fixed by this process's environment): every stage quiet and busy, then the goals."""
    import torch

    default_threads = torch.get_num_threads()
    only = None if args.stages is None else {_key(s) for s in args.stages.split(",")}
    stages = build_stages(args.size or (96 if args.quick else 224), args.quick, only)
    loads = {"at the start": load_average()}
    for load_name in args.loads.split(","):
        with busy_cores() if load_name == "busy" else contextlib.nullcontext():
            measure(stages, load_name, default_threads)
            loads[f"after the {load_name} runs"] = load_average()
    out: dict[str, Any] = {"default_threads": default_threads, "loads": loads,
                           "stages": [{"name": s.name, "phases": s.phases, "times": s.times} for s in stages]}
    if args.goals:
        out["kde"] = {"channels": 32 if args.quick else 256}
        out["kde"]["rows"] = kde_goal(out["kde"]["channels"], default_threads)
        out["sise"] = sise_goal(2 if args.quick else None, [float(f) for f in args.sise_factors.split(",")],
                                default_threads)
    args.worker_out.write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------- parent: report
def run_worker(policy: str, args: argparse.Namespace, loads: str, goals: bool) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if POLICIES[policy] is not None:
        env["OMP_WAIT_POLICY"] = POLICIES[policy]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.json"
        command = [sys.executable, __file__, "--worker-out", str(out), "--sise-factors", args.sise_factors,
                   "--loads", loads]
        command += ["--quick"] * args.quick + ["--goals"] * goals
        command += [] if args.size is None else ["--size", str(args.size)]
        command += [] if args.stages is None else ["--stages", args.stages]
        print(f"worker: OMP_WAIT_POLICY={POLICIES[policy] or '(unset: spin)'}", flush=True)
        subprocess.run(command, env=env, check=True, cwd=Path(__file__).parent)
        return json.loads(out.read_text())


def stage_table(passive: dict[str, Any], spin: dict[str, Any]) -> str:
    threads = passive["default_threads"]
    headers = ["stage", "quiet: 1 thread s", f"quiet: {threads} threads s", "busy: 1 thread s",
               f"busy: {threads} threads s", f"busy: {threads} threads / 1 (goal <= 1.5)",
               "busy, limits off: / 1", f"spinning OpenMP, busy: {threads} threads / 1",
               f"before (spinning, no limits): busy {threads} threads s", "before: busy / 1 thread"]
    rows = []
    for mine, theirs in zip(passive["stages"], spin["stages"], strict=True):
        for phase in ("", *mine["phases"]):
            t = {(load, config): mine["times"].get(f"{load}|{config}|{phase}", math.nan)
                 for load in LOADS for config in CONFIGS}
            s = {(load, config): theirs["times"].get(f"{load}|{config}|{phase}", math.nan)
                 for load in LOADS for config in CONFIGS}
            ratio = t["busy", "default"] / t["busy", "1 thread"]
            rows.append([
                mine["name"] if not phase else f"{mine['name']}: {phase.upper()} phase",
                f"{t['quiet', '1 thread']:.3g}", f"{t['quiet', 'default']:.3g}",
                f"{t['busy', '1 thread']:.3g}", f"{t['busy', 'default']:.3g}",
                f"**{ratio:.2f}**" if ratio > 1.5 else f"{ratio:.2f}",
                f"{t['busy', 'default, limits off'] / t['busy', '1 thread']:.2f}",
                f"{s['busy', 'default'] / s['busy', '1 thread']:.2f}",
                f"{s['busy', 'default, limits off']:.3g}",
                f"{s['busy', 'default, limits off'] / s['busy', '1 thread']:.2f}",
            ])
    from _sections import markdown_table

    return markdown_table(headers, rows)


def advise_rows(result: dict[str, Any]) -> list[list[object]]:
    stages = {stage["name"]: stage["times"] for stage in result["stages"]}
    if "ADVISE" not in stages or "Grad-CAM" not in stages:
        return []
    rows = []
    for load in LOADS:
        for config in ("1 thread", "default"):
            advise, gradcam = stages["ADVISE"][f"{load}|{config}|"], stages["Grad-CAM"][f"{load}|{config}|"]
            rows.append([load, config, f"{advise:.3f}", f"{gradcam:.3f}", f"**{advise / gradcam:.1f}x**"])
    return rows


def report(args: argparse.Namespace, passive: dict[str, Any], spin: dict[str, Any]) -> str:
    from _sections import machine_line, markdown_table

    threads = passive["default_threads"]
    loads = "; ".join(f"{name} worker: " + ", ".join(f"{key} {value}" for key, value in r["loads"].items())
                      for name, r in (("passive", passive), ("spinning", spin)))
    parts = [
        "## Speed under load (`benchmarks/bench_load.py`)",
        machine_line() + f" · {'quick run (96 x 96, small sizes)' if args.quick else 'full run'} · default {threads} "
        f"torch threads on {os.cpu_count()} cores · load average (1/5/15 min): {loads}",
        "**Load condition.** *quiet*: nothing started by the benchmark (whatever else the machine runs: see "
        f"the load averages); *busy*: {os.cpu_count()} pure-Python busy-loop processes (one per core), started "
        "and stopped by the benchmark. *1 thread* / *N threads*: torch's intra-op threads, with the scoped limits "
        "of `convlens.core.threads` (small-operation sections on one thread); *limits off*: every operation on "
        "the N threads. Main columns: OpenMP threads sleep while they wait (`OMP_WAIT_POLICY=PASSIVE`, set by "
        "`import convlens` before torch loads); *spinning*: libgomp's default (a process that imported torch "
        "before convlens); *before* = spinning, no limits: what every stage did until now. Seconds are the best "
        "of the repetitions (3 for stages under 1 s, else 1), the thread configurations alternated within each.",
        stage_table(passive, spin),
    ]
    if advise_rows(passive):
        parts += ["### ADVISE vs Grad-CAM (the runs above, passive; goal: ADVISE <= 5x Grad-CAM)",
                  markdown_table(["load", "threads", "ADVISE s", "Grad-CAM s", "ADVISE / Grad-CAM"],
                                 advise_rows(passive))]
    if "kde" in passive:
        parts += [f"### KDE vs `adaptivekde` ({passive['kde']['channels']} random N(0.45, 0.2) channels, Z = 49, "
                  f"convention 'adaptivekde', {threads} threads; goal: >= 50x quiet, >= 20x busy)",
                  markdown_table(["load", "adaptivekde looped s", "ours s", "speed-up", "ours s, limits off",
                                  "speed-up, limits off", "load average after"], passive["kde"]["rows"]),
                  "`adaptivekde.ssvkernel(x, tin, M=10, nbs=1, WinFunc='Gauss')` channel by channel (single-threaded "
                  "numpy) against `convlens.numerics.kde.ssvkernel` on all channels at once, best of 3 runs before "
                  "and 3 after the reference, in the passive worker."]
    if "sise" in passive:
        held_out = passive["sise"]["held_out"]
        parts += [f"### Fast vs full SISE on the real photos ({passive['sise']['objects']} objects; quiet, "
                  f"{threads} threads, load average {passive['sise']['load']} after; goal: >= 5x faster, EBPG "
                  "within 0.01)",
                  markdown_table(["SISE", "forwards / image", "s / image", "EBPG (0-1)", "speed-up (total time)",
                                  "EBPG - full (mean per object)", f"other {held_out} objects: speed-up",
                                  "other objects: EBPG - full"], passive["sise"]["rows"]),
                  "Each object explained by every variant in turn (full first). The last two columns leave out "
                  f"{' and '.join(FULL_CROP_PHOTOS)} (the photos of `bench_sise.py`): their boxes fill (most of) "
                  "the crop, so every variant scores EBPG 1 on them."]
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="96 x 96 input, small sizes: checks the script runs")
    parser.add_argument("--size", type=int, default=None, help="input side of the method stages (224; quick: 96)")
    parser.add_argument("--stages", default=None, help=f"comma-separated stage keys of {', '.join(STAGE_KEYS)}")
    parser.add_argument("--no-goals", action="store_true", help="skip the KDE and SISE goal measurements")
    parser.add_argument("--sise-factors", default="4,6,8", help="fast_factor values of the SISE goal")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)  # internal: one wait policy's worker
    parser.add_argument("--goals", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loads", default="quiet,busy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out is not None:
        worker(args)
        return
    passive = run_worker("passive", args, "quiet,busy", goals=not args.no_goals)
    spin = run_worker("spin", args, "busy", goals=False)  # on one thread the policy changes nothing
    body = report(args, passive, spin)
    print(body)
    if not args.no_write and not args.quick:
        from _sections import write_section

        write_section("load", body)


if __name__ == "__main__":
    main()
