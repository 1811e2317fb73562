"""The folders of ``convlens labels`` and ``convlens global`` (issue 20): written as a whole and read only
when whole, never over a user's files, spreadsheet-safe text cells that every convlens reader restores, and
one line with exit code 2 (naming the file) for an export or a labels folder that does not check out."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convlens.cli.main import app
from convlens.core.outputs import OutputFolderError
from convlens.labels.export import ExportError, read_export
from convlens.labels.files import read_labels
from convlens.labels.pipeline import LabelSettings, run_labels
from labels_helpers import FORMULA, TINY_TABLE, ToyEmbedder, make_play, make_round, tiny_export, write_export

runner = CliRunner()


@pytest.fixture(autouse=True)
def _toy_embedder(monkeypatch: pytest.MonkeyPatch) -> None:
    """`convlens labels` with the toy embedder whatever --embedder says (no model is loaded)."""
    import convlens.labels.embedders as embedders

    monkeypatch.setattr(embedders, "load_embedder", lambda *_args, **_kw: ToyEmbedder(TINY_TABLE))


def _cli(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback fails every test here
    return result.exit_code, result.output


def _one_error_line(code: int, output: str, *expected: str) -> str:
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), output
    for text in expected:
        assert text in lines[0], output
    return lines[0]


def _labels(tmp_path: Path, name: str = "labels", *extra: str, study_id: str = "tiny") -> Path:
    export = tiny_export(tmp_path / f"export-{study_id}", study_id)
    code, output = _cli("labels", export, "--out", tmp_path / name, "--bootstrap", "10", *extra)
    assert code == 0, output
    return tmp_path / name


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------- spreadsheet safety
def test_participant_text_is_neutralised_in_the_csvs_and_restored_by_every_reader(tmp_path: Path) -> None:
    labels = _labels(tmp_path)
    raw = _labels(tmp_path, "raw", "--raw-csv")
    assert json.loads((labels / "labels.json").read_text())["csv_cells"] == "neutralised"
    assert json.loads((raw / "labels.json").read_text())["csv_cells"] == "raw"
    # in the file: a leading quote, so a spreadsheet shows the text; --raw-csv: exactly as typed
    cells = {row["play_id"]: row["description"] for row in _rows(labels / "audit.csv")}
    assert cells["p02"] == "'" + FORMULA and cells["p12"] == "'-scales" and cells["p00"] == "fins"
    assert {row["play_id"]: row["description"] for row in _rows(raw / "audit.csv")}["p02"] == FORMULA
    assert not any(c.startswith(("=", "+", "-", "@", "\t", "\r")) for path in labels.glob("*.csv")
                   for row in _rows(path) for c in row.values() if not _number(c))
    # read back: the exact text, and the same labels, scores and tables as the raw folder's
    folder, exact = read_labels(labels), read_labels(raw)
    assert {r["play_id"]: r["description"] for r in folder.audit}["p02"] == FORMULA
    for name in ("audit", "text_clusters", "clusters", "label_scores", "groups", "group_labels", "agreement"):
        assert folder.table(name) == exact.table(name), name
    expected = run_labels(tiny_export(tmp_path / "again"), embedder=ToyEmbedder(TINY_TABLE),
                          settings=LabelSettings(n_bootstrap=10))
    assert [r.description for r in expected.audit] == [r["description"] for r in folder.audit]
    assert {c.cluster_id: "; ".join(c.best_labels) for c in expected.clusters} == {
        r["cluster_id"]: r["best_labels"] for r in folder.clusters}
    # ... and `global` gives the same trends from both
    assert _cli("global", labels, "--out", tmp_path / "g1", "--bootstrap", "10")[0] == 0
    assert _cli("global", raw, "--out", tmp_path / "g2", "--bootstrap", "10", "--raw-csv")[0] == 0
    for table in ("trends.csv", "slopes.csv"):
        assert (tmp_path / "g1" / table).read_bytes() == (tmp_path / "g2" / table).read_bytes()
    assert json.loads((tmp_path / "g1" / "global.json").read_text())["csv_cells"] == "neutralised"


def _number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def test_the_export_reader_restores_neutralised_cells_when_study_json_says_so(tmp_path: Path) -> None:
    r = make_round("A", 0, 0, "tench", n_layers=1)
    plays = [make_play("p1", r, "win", 1, "'" + FORMULA), make_play("p2", r, "win", 2, "''quoted"),
             make_play("p3", r, "win", 3, "'-2+3"), make_play("p4", r, "win", 4, "plain")]
    texts = ["'" + FORMULA, "''quoted", "'-2+3", "plain"]
    for cells, expected in (("neutralised", [FORMULA, "'quoted", "-2+3", "plain"]), ("raw", texts), (None, texts)):
        study = {"study_id": "s", "classes": ["tench"]} | ({"csv_cells": cells} if cells else {})
        export = read_export(write_export(tmp_path / str(cells), [r], plays, study))
        assert [p.description for p in export.plays] == expected, cells
    with pytest.raises(ExportError, match=r"study\.json: csv_cells 'maybe' is not one of neutralised, raw"):
        read_export(write_export(tmp_path / "bad", [r], plays, {"study_id": "s", "csv_cells": "maybe"}))


# ---------------------------------------------------------------------------------------- broken inputs
@pytest.mark.parametrize(("target", "data"), [
    ("plays.csv", "play_id,description\np1,caf\xe9\n".encode("latin-1")),
    ("rounds.csv", b"round_id,\xff\xfe\n"),
    ("study.json", b'{"study_id": "\xff"}'),
])
def test_an_export_that_is_not_utf8_is_named(tmp_path: Path, target: str, data: bytes) -> None:
    export = tiny_export(tmp_path / "export")
    (export / target).write_bytes(data)
    code, output = _cli("labels", export, "--out", tmp_path / "out")
    _one_error_line(code, output, f"{export / target}: not UTF-8 text")
    assert not (tmp_path / "out").exists()


def _cut_rows(path: Path, share: float) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[: max(1, round(len(lines) * (1 - share)))]), encoding="utf-8")


def _half_rewritten(tmp_path: Path) -> Path:
    """The new CSVs of a rerun (--raw-csv) under the old labels.json: what a killed replace used to leave."""
    old, new = _labels(tmp_path, "old"), _labels(tmp_path, "new", "--raw-csv")
    mixed = tmp_path / "mixed"
    shutil.copytree(old, mixed)
    for table in new.glob("*.csv"):
        shutil.copyfile(table, mixed / table.name)
    return mixed


def _cut(tmp_path: Path, table: str, share: float = 0.4) -> Path:
    folder = _labels(tmp_path, f"cut-{table}")
    _cut_rows(folder / table, share)
    return folder


@pytest.mark.parametrize(("make", "named"), [
    (_half_rewritten, "audit.csv: does not match labels.json"),
    (lambda tmp: _cut(tmp, "clusters.csv"), "clusters.csv: does not match labels.json"),
    (lambda tmp: _cut(tmp, "label_scores.csv", 0.3), "label_scores.csv: does not match labels.json"),
])
def test_a_labels_folder_that_does_not_check_out_is_named_by_every_reader(tmp_path: Path, make, named: str) -> None:
    folder = make(tmp_path)
    with pytest.raises(OutputFolderError, match=named.replace(".", r"\.")):
        read_labels(folder)
    before = _snapshot(folder)
    _one_error_line(*_cli("global", folder, "--out", tmp_path / "global"), named, "rerun convlens labels")
    _one_error_line(*_cli("tcav", folder, "--out", tmp_path / "tcav"), named)
    assert not (tmp_path / "global").exists() and not (tmp_path / "tcav").exists()
    assert _snapshot(folder) == before


def test_a_labels_folder_of_the_previous_convlens_says_rerun(tmp_path: Path) -> None:
    folder = _labels(tmp_path)
    manifest = json.loads((folder / "labels.json").read_text())
    old = {k: v for k, v in manifest.items() if k not in ("files", "csv_cells")} | {
        "format_version": 1, "files": sorted(p.name for p in folder.iterdir())}  # what the previous version wrote
    (folder / "labels.json").write_text(json.dumps(old))
    line = _one_error_line(*_cli("global", folder, "--out", tmp_path / "g"), "labels.json", "rerun convlens labels")
    assert "older convlens" in line
    _one_error_line(*_cli("tcav", folder, "--out", tmp_path / "t"), "rerun convlens labels")
    # and `convlens labels` may replace that folder: it is its own
    code, output = _cli("labels", tiny_export(tmp_path / "e2"), "--out", folder, "--bootstrap", "10")
    assert code == 0, output
    read_labels(folder)


# ----------------------------------------------------------------------------------- the user's own files
@pytest.mark.parametrize("command", ["labels", "global"])
@pytest.mark.parametrize("user_file", ["audit.csv", "clusters.csv", "labels.json", "index.html", "trends.csv",
                                       "global.json", "notes.txt", ".convlens-tmp-notes", "tench"])
def test_a_folder_holding_a_users_file_is_refused_and_untouched(tmp_path: Path, command: str,
                                                                user_file: str) -> None:
    labels = _labels(tmp_path)
    source = tiny_export(tmp_path / "e2") if command == "labels" else labels
    out = tmp_path / "mine"
    out.mkdir()
    (out / user_file).write_text("the user's own")
    before = _snapshot(tmp_path)
    _one_error_line(*_cli(command, source, "--out", out, "--bootstrap", "10"), f"holds '{user_file}'",
                    f"convlens {command} did not write")
    assert _snapshot(tmp_path) == before


def test_a_users_file_inside_a_global_class_folder_is_never_replaced(tmp_path: Path) -> None:
    labels = _labels(tmp_path)
    out = tmp_path / "global"
    assert _cli("global", labels, "--out", out, "--bootstrap", "10")[0] == 0
    assert _cli("global", labels, "--out", out, "--bootstrap", "10")[0] == 0  # its own folder: replaced
    (out / "tench" / "my-notes.txt").write_text("mine")
    _one_error_line(*_cli("global", labels, "--out", out, "--bootstrap", "10"), "holds 'tench/my-notes.txt'")
    assert (out / "tench" / "my-notes.txt").read_text() == "mine"


def test_classes_whose_folder_names_collide_get_their_own_pages(tmp_path: Path) -> None:
    rounds = [make_round(image, depth, 0, name, n_layers=2) for image, name in (("A", "golf ball"), ("B", "golf_ball"),
                                                                               ("C", "index.html"))
              for depth in range(2)]
    plays = [make_play(f"p{i}{k}", r, "win", k, text) for i, r in enumerate(rounds)
             for k, text in enumerate(["fins", "scales"])]
    export = write_export(tmp_path / "e", rounds, plays, {"study_id": "c", "classes": ["golf ball", "golf_ball"]})
    assert _cli("labels", export, "--out", tmp_path / "labels", "--bootstrap", "10")[0] == 0
    code, output = _cli("global", tmp_path / "labels", "--out", tmp_path / "g", "--bootstrap", "10")
    assert code == 0, output
    pages = {p.parent.name: p.read_text() for p in (tmp_path / "g").glob("*/index.html")}
    titles = {folder: page.split("<h1>Global explanation — ")[1].split("</h1>")[0] for folder, page in pages.items()}
    assert titles == {"golf_ball": "golf ball", "golf_ball-2": "golf_ball", "index.html-2": "index.html"}
    index = (tmp_path / "g" / "index.html").read_text()
    assert all(f'href="{folder}/index.html"' in index for folder in titles)
