"""``convlens study simulate`` and ``convlens study recovery``: a simulated crowd plays a study over HTTP, and
the labels found are checked against what it was given (:mod:`convlens.crowd.play`,
:mod:`convlens.crowd.recovery`). Bad input gives one line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from convlens.cli.common import fail

__all__ = ["recovery_command", "simulate_command"]

console = Console(stderr=True)


def simulate_command(
    study_dir: Annotated[Path, typer.Argument(help="The study folder (`convlens study create`).", show_default=False)],
    participants: Annotated[int | None, typer.Option(help="Simulated participants (each plays until the server "
                                                          "says done); default: as many as it takes for every "
                                                          "round to get its plays per round.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the plan and of every player's choices.")] = 0,
    url: Annotated[str | None, typer.Option(help="Play a running server (e.g. http://127.0.0.1:8000, rate limits "
                                                 "high enough: --rate-limit-ip, --rate-limit-participant and "
                                                 "--rate-limit-consent); default: start one for the run.")] = None,
    db: Annotated[str | None, typer.Option(help="Database URL of the server (started here or at --url; default: "
                                                "the SQLite file in STUDY_DIR); read to know each play's "
                                                "round.")] = None,
    concurrent: Annotated[int, typer.Option(help="Participants in the game at the same time.")] = 4,
    budget: Annotated[int | None, typer.Option(help="Stop once this many plays started.")] = None,
    concepts_per_class: Annotated[int, typer.Option(help="Planted concepts per class.")] = 3,
    trend_strength: Annotated[float, typer.Option(help="Tilt of the rising/falling concepts over depth "
                                                       "(0..1).")] = 0.8,
    trends: Annotated[bool, typer.Option("--trends/--no-trends", help="Plant a rising and a falling concept "
                                                                      "per class.")] = True,
    out: Annotated[Path | None, typer.Option(help="Folder for crowd_plan.json and crowd_run.json (default: "
                                                  "STUDY_DIR/simulation).")] = None,
) -> None:
    """Play STUDY_DIR with a seeded simulated crowd through the real web API; write the planted truth."""
    from convlens.crowd.play import SimulationError, run_crowd, served, url_clients
    from convlens.crowd.players import CrowdModel, plan_crowd
    from convlens.study.store.config import load_rounds, load_study

    if (participants is not None and participants < 1) or concurrent < 1 or (budget is not None and budget < 1):
        fail(console, "--participants, --concurrent and --budget must be >= 1")
    if not 0 <= trend_strength <= 1:
        fail(console, f"--trend-strength must be in 0..1, got {trend_strength}")
    target = out or study_dir / "simulation"
    try:
        config = load_study(study_dir)
        model = CrowdModel(concepts_per_class=concepts_per_class, trends=trends, trend_strength=trend_strength)
        plan = plan_crowd(load_rounds(study_dir), config.classes, model, seed)
        plan.study_id = config.study_id
        target.mkdir(parents=True, exist_ok=True)
        (target / "crowd_plan.json").write_text(json.dumps(plan.to_json(), indent=2))
        import asyncio

        if url is not None:
            run = asyncio.run(run_crowd(url_clients(url), study_dir, plan, participants, concurrent, budget, db))
        else:
            with served(study_dir, db, log=target / "server.log") as base:
                run = asyncio.run(run_crowd(url_clients(base), study_dir, plan, participants, concurrent, budget, db))
    except (FileNotFoundError, ValueError, OSError, SimulationError) as exc:
        fail(console, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    (target / "crowd_run.json").write_text(json.dumps(run.to_json(), indent=2))
    summary = run.summary()
    typer.echo(f"{summary['participants']} participants, {summary['plays']} plays ({summary['outcomes']}), "
               f"{summary['described']} descriptions, {summary['requests']} requests in {summary['seconds']} s")
    if summary["shared_images"]:
        typer.echo(f"{summary['shared_images']} plays showed a level-0 picture that another round shares (players "
                   "cannot tell those rounds apart; the simulator knows each play's round from the database)")
    typer.echo(f"Planted truth: {target / 'crowd_plan.json'}; next: convlens study export {study_dir} --out EXPORT")


def recovery_command(
    plan_file: Annotated[Path, typer.Argument(help="crowd_plan.json of `convlens study simulate`.",
                                              show_default=False)],
    labels_dir: Annotated[Path, typer.Argument(help="Output folder of `convlens labels`.", show_default=False)],
    global_dir: Annotated[Path | None, typer.Option("--global", help="Output folder of `convlens global` "
                                                                    "(checks the planted trends).")] = None,
) -> None:
    """How many clusters got their planted concept as best label; whether planted trends have the right slope."""
    from convlens.crowd.players import CrowdPlan
    from convlens.crowd.recovery import recovery, trend_signs

    try:
        plan = CrowdPlan.from_json(json.loads(plan_file.read_text()))
        found = recovery(labels_dir, plan)
        signs = trend_signs(global_dir, plan) if global_dir is not None else []
    except ValueError as exc:  # a labels or global folder that does not check out, a plan of another study
        fail(console, str(exc))
    except (OSError, KeyError, TypeError) as exc:
        fail(console, f"{type(exc).__name__}: {exc}")
    typer.echo(f"planted concept is the best label of {found.recovered} of {len(found.clusters)} clusters "
               f"({found.share:.0%})")
    for sign in signs:
        verdict = "right sign" if sign.right_sign else "WRONG sign" if sign.label else "no label"
        typer.echo(f"  {sign.class_name}: {sign.concept} planted {sign.planted}, label {sign.label}, slope "
                   f"{sign.slope:.3g} [{sign.ci_low:.3g}, {sign.ci_high:.3g}]: {verdict}")
