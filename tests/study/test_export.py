"""Export: the contract's files and columns, every outcome, CSV = JSON Lines, streaming in chunks, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from convlens.study.batch.data_dictionary import TABLES
from convlens.study.batch.export import BATCH, export_study, format_rows
from study.conftest import CLASSES, ApiPlayer, make_app, true_class

TRICKY = 'edges, "quotes"\nand a second line; ümlaut'


def _scenario(app: Any) -> dict[str, Any]:
    """win (level 2, described in Italian), lose (level 0, not described), resign (level 1), abandoned."""
    alice, bob = ApiPlayer(app, nickname="alice"), ApiPlayer(app, query="?PROLIFIC_PID=pp1")
    win = alice.next()["play"]
    alice.act(win, "reveal", level=1)
    alice.act(win, "reveal", level=2)
    alice.act(win, "guess", class_name=true_class(app, win))
    alice.act(win, "describe", text=TRICKY, language="it")
    lose = alice.next()["play"]
    alice.act(lose, "guess", class_name=next(c for c in CLASSES if c != true_class(app, lose)))
    resign = bob.next()["play"]
    bob.act(resign, "reveal", level=1)
    bob.act(resign, "resign")
    abandoned = bob.next()["play"]
    bob.act(abandoned, "reveal", level=1)
    return {"win": win, "lose": lose, "resign": resign, "abandoned": abandoned}


def _read(out: Path, table: str, fmt: str) -> list[dict[str, Any]]:
    path = out / f"{table}.{fmt}"
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [c["name"] for c in TABLES[table]]
    return rows


def _as_csv(value: Any) -> str:
    return "" if value is None else ("true" if value is True else "false" if value is False else str(value))


def test_export_follows_the_contract(study_dir: Path, database: str, tmp_path: Path) -> None:
    app = make_app(study_dir, database)
    plays = _scenario(app)
    runtime, engine = app.state.runtime, app.state.engine
    export_study(engine, runtime.config, tmp_path / "csv", "csv")
    export_study(engine, runtime.config, tmp_path / "jsonl", "jsonl")
    meta = json.loads((tmp_path / "jsonl" / "study.json").read_text())
    assert meta["reveal_levels"] == {"0": 2.0, "1": 4.5, "2": 8.0, "3": 13.0, "4": 20.0, "5": 30.0}
    assert meta["classes"] == CLASSES and meta["study_version"] == "1" and "100 - 10*k" in meta["scoring_rule"]
    assert meta["data_dictionary_version"] == "1" and meta["inv_runs"][0]["format_version"] >= 1
    dictionary = json.loads((tmp_path / "csv" / "data_dictionary.json").read_text())
    assert dictionary["tables"] == TABLES and "## plays" in (tmp_path / "csv" / "data_dictionary.md").read_text()
    rows = {table: _read(tmp_path / "jsonl", table, "jsonl") for table in TABLES}
    for table in TABLES:  # CSV and JSON Lines carry the same values
        assert _read(tmp_path / "csv", table, "csv") == [{k: _as_csv(v) for k, v in r.items()} for r in rows[table]]
    by_id = {r["play_id"]: r for r in rows["plays"]}
    rounds = {r["round_id"]: r for r in rows["rounds"]}
    win, lose, resign, gone = (by_id[plays[k]] for k in ("win", "lose", "resign", "abandoned"))
    assert (win["outcome"], win["level"], win["correct"], win["score"], win["language"]) == ("win", 2, True, 80, "it")
    assert win["description"] == TRICKY and win["guessed_class"] == win["true_class"]
    assert (lose["outcome"], lose["level"], lose["correct"], lose["description"]) == ("lose", 0, False, None)
    assert (resign["outcome"], resign["level"], resign["guessed_class"], resign["correct"]) == ("resign", 1, None, None)
    assert (gone["outcome"], gone["level"], gone["ended_at"]) == ("abandoned", 1, None)
    for play in rows["plays"]:
        r = rounds[play["round_id"]]
        assert (play["cluster_id"], play["layer"], play["true_class"], play["gold"]) == (
            r["cluster_id"], r["layer"], r["true_class"], r["gold"])
        assert play["started_at"].endswith("Z")
    events = [e for e in rows["events"] if e["play_id"] == plays["win"]]
    assert [(e["type"], e["level"]) for e in events] == [("start", 0), ("reveal", 1), ("reveal", 2), ("guess", 2),
                                                         ("describe", 2)]
    assert [e["event_id"] for e in rows["events"]] == sorted(e["event_id"] for e in rows["events"])
    people = {p["nickname"]: p for p in rows["participants"]}
    assert (people["alice"]["plays"], people["alice"]["wins"]) == (2, 1)
    assert people[None]["prolific_pid"] == "pp1" and people[None]["plays"] == 1
    engine.dispose()


def test_rows_are_streamed_in_chunks() -> None:
    produced = []

    def rows() -> Any:
        for i in range(2 * BATCH + 5):
            produced.append(i)
            yield {"event_id": i, **{c["name"]: None for c in TABLES["events"][1:]}}

    chunks = format_rows(rows(), "events", "csv")
    first = next(chunks)
    assert len(produced) == BATCH and first.count("\n") == BATCH + 1  # header + one batch, nothing more read
    assert sum(chunk.count("\n") for chunk in chunks) == BATCH + 5
    with pytest.raises(ValueError, match="csv or jsonl"):
        next(format_rows(iter([]), "events", "xml"))


def test_cli_export(study_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from convlens.cli.main import app as cli

    app = make_app(study_dir)
    _scenario(app)
    app.state.engine.dispose()
    runner = CliRunner()
    result = runner.invoke(cli, ["study", "export", str(study_dir), "--format", "jsonl", "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == sorted(
        ["study.json", "data_dictionary.json", "data_dictionary.md", "rounds.jsonl", "plays.jsonl", "events.jsonl",
         "participants.jsonl"])
    bad = runner.invoke(cli, ["study", "export", str(study_dir), "--format", "xml"])
    assert bad.exit_code == 2 and "csv or jsonl" in bad.output
    missing = runner.invoke(cli, ["study", "export", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "study.json" in missing.output


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_label_pipeline_reads_the_export(study_dir: Path, tmp_path: Path, fmt: str) -> None:
    """The contract's consumer (convlens.labels.export) parses every row of both formats."""
    reader = pytest.importorskip("convlens.labels.export")
    app = make_app(study_dir)
    plays = _scenario(app)
    export_study(app.state.engine, app.state.runtime.config, tmp_path / fmt, fmt)
    app.state.engine.dispose()
    parsed = reader.read_export(tmp_path / fmt)
    assert parsed.invalid == [] and {p.play_id for p in parsed.plays} == set(plays.values())
    win = next(p for p in parsed.plays if p.play_id == plays["win"])
    assert (win.outcome, win.level, win.correct, win.description, win.language) == ("win", 2, True, TRICKY, "it")
    assert len(parsed.rounds) == len(app.state.runtime.rounds)
