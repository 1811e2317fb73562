"""``convlens labels`` and ``convlens global``: from players' words to concept labels and global explanations.

``convlens labels STUDY_DIR_OR_EXPORT --out DIR`` reads a study export folder (``convlens study export``)
or a STUDY_DIR (exported first, into a temporary folder, with the study package) and writes the labels
folder (:mod:`convlens.labels.files`). ``convlens global LABELS_DIR --out DIR`` writes the
trends, plots and pages (:mod:`convlens.reports.global_report`). Bad input gives one line and exit 2.
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from convlens.cli.common import fail

__all__ = ["global_command", "labels_command", "load_translator"]

console = Console(stderr=True)


def load_translator(spec: str) -> Any:
    """``"package.module:name"`` -> the translator (``name`` called without arguments if it is callable
    and has no ``translate`` method); it must have ``name`` and ``translate(texts, source, context)``."""
    from convlens.labels.text import Translator

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--translator {spec!r}: expected MODULE:NAME")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--translator {spec!r}: {exc}") from exc
    try:
        translator = found() if callable(found) and not hasattr(found, "translate") else found
    except TypeError as exc:
        raise ValueError(f"--translator {spec!r} has no name and translate(texts, source, context): {exc}") from exc
    if not isinstance(translator, Translator):
        raise ValueError(f"--translator {spec!r} has no name and translate(texts, source, context)")
    return translator


def _aliases(items: list[str] | None) -> dict[str, list[str]]:
    aliases: dict[str, list[str]] = {}
    for item in items or []:
        name, sep, alias = item.partition("=")
        if not sep or not name.strip() or not alias.strip():
            raise ValueError(f"--class-alias {item!r}: expected CLASS=ALIAS")
        aliases.setdefault(name.strip(), []).append(alias.strip())
    return aliases


def _export_study(study_dir: Path, db: str | None, workdir: Path) -> Path:
    """Export a STUDY_DIR with the study package into ``workdir`` (CSV)."""
    from sqlalchemy.exc import SQLAlchemyError

    from convlens.study.batch.export import export_study
    from convlens.study.game.opening import StudyDatabaseError, open_runtime

    try:
        runtime, engine = open_runtime(study_dir, db, migrate=False)
        try:
            export_study(engine, runtime.config, workdir / "export", "csv")
        finally:
            engine.dispose()
    except (FileNotFoundError, StudyDatabaseError, SQLAlchemyError) as exc:
        raise ValueError(f"{study_dir}: cannot export the study ({str(exc).splitlines()[0]})") from exc
    return workdir / "export"


def _summary(result: Any, out: Path) -> None:
    counts = result.status_counts()
    typer.echo(f"{len(result.audit)} plays: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for reason, n in sorted(result.reason_counts().items()):
        typer.echo(f"  excluded, {reason}: {n}")
    for reason, n in sorted(result.unused_counts().items()):
        typer.echo(f"  counted, description not used ({reason}): {n}")
    rules = result.text_rules()
    merged, names = rules["spelling"]["merged"], rules["spelling"]["misspelt_class_names"]
    typer.echo(f"  spelling: {len(merged)} words merged into their frequent form, {len(names)} misspelt class "
               "names removed (labels.json text_rules)")
    if result.gold is not None:
        typer.echo(f"  gold filter: {result.gold.note}")
    for name, labelling in result.labellings.items():
        labels = sorted({c.label for c in labelling.clusters if c.label})
        typer.echo(f"  {name}: {sum(labelling.counts)} descriptions, {labelling.k} text clusters "
                   f"-> {', '.join(labels)}")
    typer.echo(f"embedder {result.embedder['name']}; wrote {out} (audit.csv has every play and its reason)")


def labels_command(
    source: Annotated[Path, typer.Argument(help="A study export folder or a STUDY_DIR.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("out/labels"),
    embedder: Annotated[str, typer.Option(help="auto | all-mpnet-base-v2 | all-MiniLM-L6-v2 | model folder.")] = "auto",
    translator: Annotated[str | None, typer.Option(help="MODULE:NAME of a translator (off by default).")] = None,
    max_chars: Annotated[int, typer.Option(help="Longer descriptions are excluded (with a reason).")] = 1000,
    wrong_rule: Annotated[str, typer.Option(
        help="authors (÷4 if no right guess gave the label) | per_play.")] = "authors",
    class_alias: Annotated[list[str] | None, typer.Option(
        help="CLASS=ALIAS, also removed from texts (repeatable).")] = None,
    max_text_clusters: Annotated[int, typer.Option(
        help="Largest number of text clusters per class tried by the silhouette search.")] = 40,
    spelling_similarity: Annotated[float, typer.Option(
        help="OSA similarity from which an unknown word is merged into a more frequent one (1 = off).")] = 0.75,
    min_gold_accuracy: Annotated[float | None, typer.Option(
        help="Drop the plays of participants whose gold accuracy (participants table: gold_correct / gold_plays) "
             "is below this share, e.g. 0.5 (off by default).")] = None,
    min_gold_plays: Annotated[int, typer.Option(
        help="Participants with fewer gold plays are kept by the gold filter (too little to judge).")] = 1,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the agreement intervals.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    db: Annotated[str | None, typer.Option(help="Database URL of a STUDY_DIR (default: its SQLite file).")] = None,
    raw_csv: Annotated[bool, typer.Option(
        "--raw-csv", help="Write participants' text into the CSVs exactly as typed (by default a cell starting "
                          "with = + - @ ' a tab or a carriage return gets a leading ' so that a spreadsheet shows "
                          "it as text; convlens's readers restore it).")] = False,
) -> None:
    """Concept labels from a Deep Reveal study: text clusters, label scores, merged clusters, agreement, audit."""
    from convlens.core.outputs import check_output_folder
    from convlens.labels.embedders import load_embedder
    from convlens.labels.export import is_export
    from convlens.labels.files import LABELS_FOLDER, write_labels
    from convlens.labels.pipeline import LabelSettings, run_labels

    try:
        settings = LabelSettings(max_chars=max_chars, wrong_rule=wrong_rule, class_aliases=_aliases(class_alias),
                                 n_bootstrap=bootstrap, seed=seed, max_text_clusters=max_text_clusters,
                                 spelling_similarity=spelling_similarity, min_gold_accuracy=min_gold_accuracy,
                                 min_gold_plays=min_gold_plays)
        plugin = load_translator(translator) if translator else None
        if not source.exists():
            raise ValueError(f"{source}: no such file or folder")
        check_output_folder(out, LABELS_FOLDER)  # before the work: a user's folder is refused at once
        with tempfile.TemporaryDirectory(prefix="convlens-labels-") as workdir:
            folder, base = source, None
            if not is_export(source):
                if not (source / "study.json").is_file():
                    raise ValueError(f"{source}: neither a study export (plays.csv|jsonl) nor a study folder")
                folder, base = _export_study(source, db, Path(workdir)), source
            result = run_labels(folder, None, load_embedder(embedder), plugin, settings, inv_base=base)
        write_labels(result, out, raw_csv=raw_csv)
    except (ValueError, OSError) as exc:
        fail(console, str(exc))
    _summary(result, out)


def global_command(
    labels_dir: Annotated[Path, typer.Argument(help="Output folder of `convlens labels`.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("out/global"),
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples over images for the slope intervals.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    tcav: Annotated[Path | None, typer.Option(
        help="TCAV results CSV (default: LABELS_DIR/tcav.csv if present).")] = None,
    inv_root: Annotated[Path | None, typer.Option(help="Folder holding the INV runs, if they moved.")] = None,
    raw_csv: Annotated[bool, typer.Option(
        "--raw-csv", help="Write labels and class names into the CSVs exactly (see `convlens labels --raw-csv`).")
    ] = False,
    min_similarity: Annotated[float | None, typer.Option(
        hidden=True, help="Deprecated, no effect: labels are final once `convlens labels` wrote them.")] = None,
) -> None:
    """Global explanations: per class, concepts that grow or fade with depth, plots and labelled maps."""
    from convlens.reports.global_report import build_global

    if min_similarity is not None:  # accepted so that old scripts run; it never changed anything here
        console.print("warning: --min-similarity has no effect on `convlens global` and is ignored: labels are "
                      "final once `convlens labels` wrote them", soft_wrap=True, markup=False)

    if bootstrap < 1:
        fail(console, f"--bootstrap must be >= 1, got {bootstrap}")
    try:
        result = build_global(labels_dir, out, bootstrap, seed, tcav, inv_root, raw_csv=raw_csv)
    except (ValueError, OSError) as exc:
        fail(console, str(exc))
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"{len(result.classes)} classes; open {out / 'index.html'}")
