"""The shared output-folder rule (convlens.core.outputs) and spreadsheet-safe cells (convlens.core.csv_cells)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convlens.core.csv_cells import neutralise, restore
from convlens.core.files import is_temporary_name, remove_stale_temporaries, temporary_name
from convlens.core.outputs import (
    FolderKind,
    OutputFolder,
    OutputFolderError,
    check_output_folder,
    verify_output_folder,
)

KIND = FolderKind(command="convlens demo-out", manifest="demo.json", format="convlens-demo",
                  names=frozenset({"demo.json", "a.csv", "b.csv", "sub"}), extra=frozenset({"placed.csv"}))


def _write(out: Path, rows: int = 3) -> dict:
    with OutputFolder(out, KIND) as folder:
        (folder.path / "a.csv").write_text("x\n" + "1\n" * rows)
        (folder.path / "sub").mkdir()
        (folder.path / "sub" / "b.bin").write_bytes(b"\0" * 10)
        return folder.seal({"rows": rows})


def test_a_new_folder_is_built_aside_and_sealed(tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    manifest = _write(out)
    assert sorted(p.name for p in out.iterdir()) == ["a.csv", "demo.json", "sub"]
    assert manifest["files"]["a.csv"]["bytes"] == len("x\n1\n1\n1\n")
    assert set(manifest["files"]) == {"a.csv", "sub/b.bin"}
    assert verify_output_folder(out, KIND)["rows"] == 3
    assert not [p for p in tmp_path.rglob(".convlens-*")]


def test_an_own_folder_is_replaced_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write(out, rows=3)
    (out / "placed.csv").write_text("from another command")
    _write(out, rows=5)
    assert (out / "a.csv").read_text().count("1") == 5
    assert not (out / "placed.csv").exists()  # a stale addition goes with the folder it belonged to


@pytest.mark.parametrize("user_file", ["notes.txt", "a.csv.bak", ".convlens-tmp-notes", "sub2"])
def test_a_folder_with_a_user_file_is_refused_and_untouched(tmp_path: Path, user_file: str) -> None:
    out = tmp_path / "out"
    _write(out)
    (out / user_file).write_text("mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputFolderError, match=f"holds '{user_file}'"):
        _write(out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_folder_of_another_command_or_without_manifest_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.csv").write_text("user's own a.csv")
    with pytest.raises(OutputFolderError, match=r"'a\.csv', which convlens demo-out did not write"):
        check_output_folder(out, KIND)
    (out / "demo.json").write_text(json.dumps({"format": "convlens-other"}))
    with pytest.raises(OutputFolderError):
        check_output_folder(out, KIND)
    assert (out / "a.csv").read_text() == "user's own a.csv"


def test_a_file_as_out_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputFolderError, match="exists and is not a folder"):
        check_output_folder(tmp_path / "f", KIND)
    with pytest.raises(OutputFolderError, match="is not a folder"):
        check_output_folder(tmp_path / "f" / "out", KIND)


def test_an_error_inside_leaves_the_previous_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write(out, rows=2)
    with pytest.raises(ZeroDivisionError), OutputFolder(out, KIND) as folder:
        (folder.path / "a.csv").write_text("half")
        1 / 0  # noqa: B018
    assert (out / "a.csv").read_text() == "x\n1\n1\n"
    verify_output_folder(out, KIND)
    with pytest.raises(RuntimeError, match="without seal"), OutputFolder(out, KIND) as folder:
        (folder.path / "a.csv").write_text("unsealed")
    assert (out / "a.csv").read_text() == "x\n1\n1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_readers_name_a_cut_or_changed_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write(out, rows=10)
    text = (out / "a.csv").read_text()
    (out / "a.csv").write_text(text[: len(text) * 6 // 10])  # 40 % of the rows gone
    with pytest.raises(OutputFolderError, match=r"a\.csv: does not match demo\.json"):
        verify_output_folder(out, KIND)
    (out / "a.csv").write_text(text)
    verify_output_folder(out, KIND)
    (out / "sub" / "b.bin").unlink()
    with pytest.raises(OutputFolderError, match=r"b\.bin: missing"):
        verify_output_folder(out, KIND)
    with pytest.raises(OutputFolderError, match="no such folder"):
        verify_output_folder(tmp_path / "nothing", KIND)


def test_temporary_names_never_match_a_users_name(tmp_path: Path) -> None:
    name = temporary_name()
    assert is_temporary_name(name) and is_temporary_name(temporary_name("old")) and is_temporary_name(name + ".tmp")
    users = (".convlens-tmp-notes", ".convlens-tmp-abc12345", ".convlens-old-k2j4h5g6", ".convlens-tmp-" + "g" * 32)
    for user in users:
        assert not is_temporary_name(user)
        (tmp_path / user).write_text("mine")
    (tmp_path / name).mkdir()
    assert remove_stale_temporaries(tmp_path) == [name]
    assert len(list(tmp_path.iterdir())) == 4


@pytest.mark.parametrize(("text", "cell"), [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"), ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
    ("-2+3", "'-2+3"), ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"), ("'quoted", "''quoted"),
    ("a green eye", "a green eye"), ("", ""), ("x=1", "x=1"),
])
def test_cells_are_neutralised_the_owasp_way(text: str, cell: str) -> None:
    assert neutralise(text) == cell
    assert restore(cell) == text


@given(st.text())
def test_restore_inverts_neutralise(text: str) -> None:
    cell = neutralise(text)
    assert restore(cell) == text
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))


# ------------------------------------------------------------------ what a killed build leaves, and user files deep
def test_a_killed_builds_leftovers_are_removed_by_the_next_run_and_nothing_else(tmp_path: Path) -> None:
    from convlens.core.outputs import _AsideLock, remove_dead_asides

    dead = tmp_path / temporary_name()  # a build killed mid-way: its folder and its (unlocked) lock file
    (dead / "sub").mkdir(parents=True)
    (dead / "a.csv").write_text("half")
    Path(f"{dead}.tmp").write_text("")
    users = [tmp_path / temporary_name(), tmp_path / (temporary_name() + ".tmp"), tmp_path / ".convlens-tmp-notes"]
    users[0].mkdir()  # a temporary folder of another kind of run (no lock file beside it): not ours to judge
    users[1].write_text("an atomic write in progress")
    users[2].write_text("mine")
    live = _AsideLock(tmp_path)  # a build in progress in another run
    live.folder.mkdir()
    try:
        assert remove_dead_asides(tmp_path) == [dead.name]
        assert not dead.exists() and not Path(f"{dead}.tmp").exists()
        assert all(p.exists() for p in users) and live.folder.is_dir() and live.file.is_file()
        _write(tmp_path / "out")  # every OutputFolder clears its parent's dead builds first (none left now)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".convlens-tmp-")) == sorted(
            [users[0].name, users[1].name, users[2].name, live.folder.name, live.file.name])
    finally:
        live.release()
    assert not live.file.exists()


def test_a_file_a_user_added_inside_an_own_folder_is_foreign(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write(out)
    (out / "sub" / "my-notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match=r"holds 'sub/my-notes\.txt'"):
        _write(out)
    assert (out / "sub" / "my-notes.txt").read_text() == "mine"
    (out / "sub" / "my-notes.txt").unlink()
    with OutputFolder(out, KIND) as folder:  # an unsealed cache inside is the command's own
        (folder.path / "sub").mkdir()
        (folder.path / "sub" / "cache").mkdir()
        (folder.path / "sub" / "cache" / "x.bin").write_bytes(b"1")
        (folder.path / "sub" / "b.bin").write_bytes(b"2")
        manifest = folder.seal({}, exclude=["sub/cache"])
    assert set(manifest["files"]) == {"sub/b.bin"} and manifest["unsealed"] == ["sub/cache"]
    (out / "sub" / "cache" / "y.bin").write_bytes(b"3")  # the cache grew: still the command's
    check_output_folder(out, KIND)
    _write(out)
