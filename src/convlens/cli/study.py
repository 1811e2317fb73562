"""``convlens study create|export`` and ``convlens serve``: the Deep Reveal study workflow.

Heavy imports (torch for reading INV runs, the web stack for serving) happen inside the commands.
Bad input gives one message on stderr and exit code 2, and writes nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from convlens.cli.common import fail
from convlens.cli.crowd import recovery_command, simulate_command

__all__ = ["serve", "study_app"]

console = Console(stderr=True)
study_app = typer.Typer(help="Deep Reveal studies: create one from INV runs, export its data.",
                        no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@study_app.command("create")
def create(
    study_dir: Annotated[Path, typer.Argument(help="New folder for the study.", show_default=False)],
    runs: Annotated[list[Path], typer.Option("--from", help="INV run folder (`convlens explain --methods inv --out "
                                                          "DIR`); repeatable.", show_default=False)],
    classes: Annotated[Path | None, typer.Option(help="File with the study's classes, one per line "
                                                     "(default: the INV target classes).")] = None,
    gold: Annotated[int, typer.Option(help="Gold (attention-check) rounds: known answer, 50-100 % revealed.")] = 0,
    layers: Annotated[str | None, typer.Option(help="Comma-separated layers to play (default: all).")] = None,
    title: Annotated[str, typer.Option(help="Title shown to players.")] = "Deep Reveal",
    study_version: Annotated[str, typer.Option(help="The team's study version (exported).")] = "1",
    consent: Annotated[Path | None, typer.Option(help="Consent text file (paragraphs split by blank lines).")] = None,
    consent_version: Annotated[str, typer.Option(help="Version of the consent text.")] = "1",
    plays_per_round: Annotated[int, typer.Option(help="Plays of each (non-gold) round by different players.")] = 3,
    rounds_per_player: Annotated[int, typer.Option(help="Rounds per participant before the end screen.")] = 20,
    languages: Annotated[str, typer.Option(help="Comma-separated BCP-47 tags offered for descriptions.")] = "en,it",
    completion_code: Annotated[str | None, typer.Option(help="Completion code shown at the end (Prolific).")] = None,
    completion_url: Annotated[str | None, typer.Option(help="Redirect link at the end (https://...).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of gold-round choice and assignment.")] = 0,
    one_round_per_image: Annotated[bool, typer.Option(
        "--one-round-per-image/--any-round-per-image",
        help="At most one round of each image per player (a finished round shows the answer and the full "
             "image, so later rounds of that image would be known answers).")] = True,
) -> None:
    """Turn INV runs into rounds (image x layer x cluster) and render their six reveal images."""
    from pydantic import ValidationError

    from convlens.study.batch.create import CreateOptions, StudyCreationError, create_study, read_classes_file

    try:
        options = CreateOptions(
            title=title, study_version=study_version, consent_version=consent_version, gold=gold,
            classes=read_classes_file(classes) if classes else None,
            layers=[x.strip() for x in layers.split(",") if x.strip()] if layers else None,
            languages=[x.strip() for x in languages.split(",") if x.strip()], plays_per_round=plays_per_round,
            rounds_per_player=rounds_per_player, completion_code=completion_code, completion_url=completion_url,
            seed=seed, one_round_per_image=one_round_per_image,
        )
        if consent is not None:
            options.consent_text = consent.read_text(encoding="utf-8").strip()
        summary = create_study(study_dir, runs, options)
    except ValidationError as exc:
        fail(console, "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()))
    except (StudyCreationError, OSError, UnicodeDecodeError) as exc:
        fail(console, str(exc))
    typer.echo(f"Study {summary['study_dir']}: {summary['rounds']} rounds + {summary['gold_rounds']} gold rounds "
               f"from {summary['images']} images; classes: {', '.join(summary['classes'])}")
    if one_round_per_image:
        needed = -(-summary["rounds"] * plays_per_round // summary["images"])
        typer.echo(f"Each participant plays at most {summary['images']} rounds (one per image): {summary['rounds']} "
                   f"rounds x {plays_per_round} plays need at least {needed} participants.")
    for note in summary.get("notes", []):
        typer.echo(f"Note: {note}")
    typer.echo(f"Admin token (also in {study_dir}/secrets.json): {summary['admin_token']}")
    typer.echo(f"Serve it with: convlens serve {study_dir}")


@study_app.command("export")
def export(
    study_dir: Annotated[Path, typer.Argument(help="The study folder.", show_default=False)],
    format: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "csv",
    out: Annotated[Path | None, typer.Option(help="Output folder (default: STUDY_DIR/exports/TIME-FORMAT).")] = None,
    db: Annotated[str | None, typer.Option(help="Database URL (default: the SQLite file in STUDY_DIR).")] = None,
) -> None:
    """Write study.json, the data dictionary and rounds/plays/events/participants, streaming."""
    from sqlalchemy.exc import SQLAlchemyError

    from convlens.study.batch.export import FORMATS, export_study
    from convlens.study.game.opening import StudyDatabaseError, open_runtime

    if format not in FORMATS:
        fail(console, f"--format {format!r}: use csv or jsonl")
    try:
        runtime, engine = open_runtime(study_dir, db, migrate=False)
        target = out or study_dir / "exports" / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{format}"
        files = export_study(engine, runtime.config, target, format)
        engine.dispose()
    except (FileNotFoundError, ValueError, StudyDatabaseError, SQLAlchemyError) as exc:
        fail(console, str(exc).splitlines()[0])
    typer.echo(f"Exported {len(files)} files to {target}")


study_app.command("simulate")(simulate_command)
study_app.command("recovery")(recovery_command)


def serve(
    study_dir: Annotated[Path, typer.Argument(help="The study folder.", show_default=False)],
    db: Annotated[str | None, typer.Option(help="Database URL: sqlite:///PATH or postgresql+psycopg://USER@HOST/DB "
                                               "(default: STUDY_DIR/study.sqlite).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
    rate_limit_ip: Annotated[str | None, typer.Option(help="Per-IP limit, e.g. '600/minute' "
                                                          "(default: study.json).")] = None,
    rate_limit_participant: Annotated[str | None, typer.Option(help="Per-participant limit on actions.")] = None,
    rate_limit_consent: Annotated[str | None, typer.Option(help="Per-IP limit on the consent form "
                                                               "(default: study.json, 30/minute).")] = None,
    rate_limit_admin_login: Annotated[str | None, typer.Option(help="Per-IP limit on the admin login "
                                                                   "(default: study.json, 10/minute).")] = None,
    rate_limit_storage: Annotated[str, typer.Option(help="limits storage URI shared by workers "
                                                         "(e.g. redis://...).")] = "memory://",
    secure_cookies: Annotated[bool, typer.Option("--secure-cookies", help="Cookies only over HTTPS.")] = False,
    proxy_headers: Annotated[bool, typer.Option("--proxy-headers", help="Trust X-Forwarded-For from the "
                                                                       "proxy (client IPs for rate limits).")] = False,
) -> None:
    """Serve the Deep Reveal game of STUDY_DIR (migrates the database first; stops cleanly on SIGTERM)."""
    from sqlalchemy.exc import SQLAlchemyError

    from convlens.study.game.opening import StudyDatabaseError
    from convlens.study.web.server import serve as run_server

    try:
        run_server(study_dir, db, host, port, workers, rate_limit_ip, rate_limit_participant, rate_limit_storage,
                   secure_cookies, proxy_headers, rate_limit_consent=rate_limit_consent,
                   rate_limit_admin_login=rate_limit_admin_login)
    except (FileNotFoundError, ValueError, StudyDatabaseError, SQLAlchemyError) as exc:
        fail(console, str(exc).splitlines()[0])
