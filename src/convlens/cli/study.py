"""``convlens study create|serve|export|backup`` (and ``convlens serve``, the alias of ``study serve``).

Heavy imports (torch for reading INV runs, the web stack for serving) happen inside the commands; serving
and exporting never import torch. Bad input gives one message on stderr and exit code 2, and writes
nothing; Ctrl-C stops the server cleanly with exit code 130.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from convlens.cli.common import fail, split_list
from convlens.cli.crowd import recovery_command, simulate_command

__all__ = ["serve", "study_app"]

console = Console(stderr=True)
study_app = typer.Typer(help="Deep Reveal studies: create one from INV runs, serve it, export its data.",
                        no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _validation_message(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors())
    return str(exc).splitlines()[0]


@study_app.command("create")
def create(
    study_dir: Annotated[Path, typer.Argument(help="New folder for the study.", show_default=False)],
    runs: Annotated[list[Path], typer.Option("--from", help="INV run folder (`convlens explain --methods inv --out "
                                                          "DIR`); repeatable.", show_default=False)],
    classes: Annotated[Path | None, typer.Option(help="File with the study's classes, one per line "
                                                     "(default: the INV target classes).")] = None,
    gold: Annotated[int, typer.Option(help="Images with a gold (attention-check) round: known answer, 50-100 % "
                                           "revealed.")] = 0,
    gold_rate: Annotated[float, typer.Option(help="Share of each participant's quota played as gold rounds (at "
                                                  "least one when there are gold rounds), at random positions.")] = 0.1,
    layers: Annotated[str | None, typer.Option(help="Comma-separated layers to play (default: all).")] = None,
    title: Annotated[str, typer.Option(help="Title shown to players.")] = "Deep Reveal",
    study_version: Annotated[str, typer.Option(help="The team's study version (exported).")] = "1",
    consent: Annotated[Path | None, typer.Option(help="Consent text file (paragraphs split by blank lines).")] = None,
    consent_version: Annotated[str, typer.Option(help="Version of the consent text.")] = "1",
    plays_per_round: Annotated[int, typer.Option(help="Plays of each (non-gold) round by different players.")] = 3,
    quota: Annotated[int | None, typer.Option(help="Rounds each participant must finish for the completion code "
                                                   "(default: 20, or as many as a participant can play).")] = None,
    rounds_per_player: Annotated[int | None, typer.Option(help="Former name of --quota: an upper bound.",
                                                          hidden=True)] = None,
    lease_minutes: Annotated[float, typer.Option(help="Minutes without activity after which a running round is "
                                                      "abandoned and the participant's planned rounds are "
                                                      "released.")] = 20.0,
    languages: Annotated[str, typer.Option(help="Comma-separated BCP-47 tags offered for descriptions.")] = "en,it",
    completion_code: Annotated[str | None, typer.Option(help="Code shown after the quota (Prolific).")] = None,
    completion_url: Annotated[str | None, typer.Option(help="Redirect link after the quota (https://...).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of gold-round choice and assignment.")] = 0,
    one_round_per_image: Annotated[bool, typer.Option(
        "--one-round-per-image/--any-round-per-image",
        help="At most one round of each image per player (a finished round shows the answer and the full "
             "image, so later rounds of that image would be known answers).")] = True,
    skip_broken: Annotated[bool, typer.Option("--skip-broken", help="Leave out (and list) image folders whose INV "
                                                                    "result cannot be read.")] = False,
) -> None:
    """Turn INV runs into rounds (image x layer x cluster), render their six reveal images, fix the quota."""
    from pydantic import ValidationError

    from convlens.study.batch.create import CreateOptions, StudyCreationError, create_study, read_classes_file

    if not 0.0 < lease_minutes <= 7 * 24 * 60:
        fail(console, f"--lease-minutes {lease_minutes}: between 0 and 10080 (a week)")
    try:
        options = CreateOptions(
            title=title, study_version=study_version, consent_version=consent_version, gold=gold,
            gold_rate=gold_rate, classes=read_classes_file(classes) if classes else None,
            layers=split_list(layers), languages=split_list(languages) or [], plays_per_round=plays_per_round,
            quota=quota, rounds_per_player=rounds_per_player, lease_seconds=max(1, round(lease_minutes * 60)),
            completion_code=completion_code, completion_url=completion_url, seed=seed,
            one_round_per_image=one_round_per_image, skip_broken=skip_broken,
        )
        if consent is not None:
            options.consent_text = consent.read_text(encoding="utf-8").strip()
        summary = create_study(study_dir, runs, options)
    except ValidationError as exc:
        fail(console, _validation_message(exc))
    except (StudyCreationError, OSError, UnicodeDecodeError) as exc:
        fail(console, str(exc))
    for line in summary["broken"]:
        console.print(f"skipped: {line}", soft_wrap=True, markup=False)
    typer.echo(f"Study {summary['study_dir']}: {summary['rounds']} rounds + {summary['gold_rounds']} gold rounds "
               f"from {summary['images']} images; classes: {', '.join(summary['classes'])}")
    per = "one per image" if one_round_per_image else "one per round"
    typer.echo(f"Quota: each participant finishes {summary['quota']} rounds ({per}), {summary['gold_per_participant']}"
               f" of them gold, for the completion code; an idle round is abandoned after "
               f"{summary['lease_seconds'] / 60:g} minutes.")
    filled = summary["participants"] * (summary["quota"] - summary["gold_per_participant"])
    typer.echo(f"Capacity: {summary['participants']} participants ({summary['rounds']} rounds x "
               f"{summary['plays_per_round']} plays = {summary['slots']} plays; they fill {filled}).")
    if filled < summary["slots"]:
        typer.echo(f"Note: {summary['slots'] - filled} plays cannot be given to a full quota; a smaller --quota "
                   "spreads them better.")
    for note in summary.get("notes", []):
        typer.echo(f"Note: {note}")
    typer.echo(f"Admin token (also in {study_dir}/secrets.json): {summary['admin_token']}")
    typer.echo(f"Serve it with: convlens study serve {study_dir}")


@study_app.command("export")
def export(
    study_dir: Annotated[Path, typer.Argument(help="The study folder.", show_default=False)],
    format: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "csv",
    out: Annotated[Path | None, typer.Option(help="Output folder: new, empty, or an earlier export (replaced "
                                                  "whole; default: STUDY_DIR/exports/TIME-FORMAT).")] = None,
    db: Annotated[str | None, typer.Option(help="Database URL (default: the SQLite file in STUDY_DIR).")] = None,
    raw_csv: Annotated[bool, typer.Option("--raw-csv", help="Write participant text in CSV exactly, without the "
                                                            "spreadsheet-formula guard.")] = False,
) -> None:
    """Write study.json, the data dictionary and rounds/plays/events/participants, streaming, as one folder."""
    from sqlalchemy.exc import SQLAlchemyError

    from convlens.core.outputs import OutputFolderError
    from convlens.study.batch.export import default_export_folder, export_study_folder
    from convlens.study.game.opening import StudyDatabaseError

    target = out or default_export_folder(study_dir, format)
    try:
        files = export_study_folder(study_dir, target, format, db=db, raw_csv=raw_csv)
    except (OSError, ValueError, StudyDatabaseError, SQLAlchemyError, OutputFolderError) as exc:
        fail(console, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    typer.echo(f"Exported {len(files)} files to {target}")


@study_app.command("backup")
def backup(
    study_dir: Annotated[Path, typer.Argument(help="The study folder (SQLite database).", show_default=False)],
    out: Annotated[Path, typer.Option(help="The backup file to write (new).", show_default=False)],
) -> None:
    """Copy the study's SQLite database consistently while the server runs (SQLite's online backup); for
    PostgreSQL use pg_dump (README, deployment section)."""
    from convlens.study.store.backup import BackupError, backup_sqlite

    try:
        rows = backup_sqlite(study_dir, out)
    except BackupError as exc:
        fail(console, str(exc))
    typer.echo(f"Backed up {study_dir} to {out}: " + ", ".join(f"{n} {table}" for table, n in rows.items()))


study_app.command("simulate")(simulate_command)
study_app.command("recovery")(recovery_command)


@study_app.command("serve")
def serve(
    study_dir: Annotated[Path, typer.Argument(help="The study folder.", show_default=False)],
    db: Annotated[str | None, typer.Option(help="Database URL: sqlite:///PATH or postgresql+psycopg://USER@HOST/DB "
                                               "(default: STUDY_DIR/study.sqlite).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (behind a reverse proxy: 127.0.0.1).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port, 1-65535.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes (several: use PostgreSQL and a shared "
                                              "--rate-limit-storage).")] = 1,
    rate_limit_ip: Annotated[str | None, typer.Option(help="Limit per address, or per participant once registered, "
                                                          "e.g. '600/minute' (default: study.json).")] = None,
    rate_limit_participant: Annotated[str | None, typer.Option(help="Per-participant limit on game actions "
                                                                   "(default: study.json).")] = None,
    rate_limit_consent: Annotated[str | None, typer.Option(help="Per-address limit on the consent form "
                                                               "(default: study.json, 60/minute;1000/hour).")] = None,
    rate_limit_consent_session: Annotated[str | None, typer.Option(
        help="Per-browser-session limit on the consent form (default: study.json, 10/minute).")] = None,
    rate_limit_admin_login: Annotated[str | None, typer.Option(help="Per-address limit on the admin login "
                                                                   "(default: study.json, 10/minute).")] = None,
    rate_limit_storage: Annotated[str, typer.Option(help="Storage of the rate-limit counters: memory:// (per "
                                                         "worker) or shared, e.g. redis://HOST:6379.")] = "memory://",
    secure_cookies: Annotated[bool, typer.Option("--secure-cookies", help="Served over HTTPS (a TLS proxy): cookies "
                                                                          "only over HTTPS, and HSTS.")] = False,
    proxy_headers: Annotated[bool, typer.Option("--proxy-headers", help="Trust X-Forwarded-For/-Proto from "
                                                                       "--forwarded-allow-ips (the client "
                                                                       "address for rate limits, HTTPS).")] = False,
    forwarded_allow_ips: Annotated[str, typer.Option(help="Proxy addresses whose forwarded headers are trusted "
                                                          "(comma-separated).")] = "127.0.0.1",
    log_level: Annotated[str, typer.Option(help="critical, error, warning, info or debug.")] = "info",
) -> None:
    """Serve the Deep Reveal game of STUDY_DIR (migrates the database first; SIGTERM or Ctrl-C stop it cleanly).

    Exit codes: 2 for bad settings (a rate limit, the port, the host, the study), 130 after Ctrl-C."""
    from sqlalchemy.exc import SQLAlchemyError

    from convlens.study.game.opening import StudyDatabaseError
    from convlens.study.web.server import ServerSettings, run_server

    settings = ServerSettings(
        study_dir=str(study_dir), db=db, host=host, port=port, workers=workers, rate_limit_ip=rate_limit_ip,
        rate_limit_participant=rate_limit_participant, rate_limit_consent=rate_limit_consent,
        rate_limit_consent_session=rate_limit_consent_session, rate_limit_admin_login=rate_limit_admin_login,
        rate_limit_storage=rate_limit_storage, secure_cookies=secure_cookies, proxy_headers=proxy_headers,
        forwarded_allow_ips=forwarded_allow_ips, log_level=log_level)
    try:
        outcome = run_server(settings)
    except (OSError, ValueError, StudyDatabaseError, SQLAlchemyError) as exc:
        fail(console, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if outcome == "interrupted":
        raise typer.Exit(code=130)
