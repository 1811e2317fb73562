"""``convlens labels`` and ``convlens global`` killed with SIGKILL (issue 20): at every point of writing their
folder — tables written but not sealed, sealed but not in place, between moving the previous folder aside and
renaming the new one in — the folder is either the previous one, whole, or absent; no reader takes a half
folder for a valid one; and the next run succeeds and removes what the killed one left.

The kill comes from inside a real ``convlens`` process (a driver script wraps the step it dies at), so the point
is exact and the test does not depend on timing."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convlens.cli.main import app
from convlens.core.outputs import OutputFolderError
from convlens.labels.files import read_labels
from labels_helpers import TINY_TABLE, ToyEmbedder, tiny_export

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
runner = CliRunner()

KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import convlens.labels.embedders as embedders
    from labels_helpers import TINY_TABLE, ToyEmbedder
    embedders.load_embedder = lambda *args, **kw: ToyEmbedder(TINY_TABLE)
    from convlens.core import outputs

    point, out, argv = sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    seal = outputs.OutputFolder.seal
    def sealing(self, manifest, **kw):
        if point == "tables written, not sealed":
            die()
        sealed = seal(self, manifest, **kw)
        if point == "sealed, not in place":
            die()
        return sealed
    outputs.OutputFolder.seal = sealing
    rename = os.replace
    def renaming(source, target, *args, **kw):
        rename(source, target, *args, **kw)
        if point == "previous folder aside, new one not in place" and Path(source) == out:
            die()
    outputs.os.replace = renaming
    from convlens.cli.main import app
    app(argv)
""")
POINTS = ["tables written, not sealed", "sealed, not in place", "previous folder aside, new one not in place"]


@pytest.fixture(autouse=True)
def _toy_embedder(monkeypatch: pytest.MonkeyPatch) -> None:
    import convlens.labels.embedders as embedders

    monkeypatch.setattr(embedders, "load_embedder", lambda *_args, **_kw: ToyEmbedder(TINY_TABLE))


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _cli(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _killed(tmp_path: Path, point: str, out: Path, *argv: str | Path) -> None:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    killed = subprocess.run([sys.executable, str(script), str(Path(__file__).parent), point, str(out),
                             *map(str, argv)], capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".convlens"))


def _check_after_the_kill(parent: Path, out: Path, point: str, previous: dict[str, str], command: str) -> None:
    """The previous folder, whole, or none at all; what the killed run built aside is never read as valid."""
    leftovers = _leftovers(parent)
    assert leftovers, "the kill should have left the folder it was building"
    if point == "previous folder aside, new one not in place":
        assert not out.exists()
    else:
        assert _snapshot(out) == previous  # untouched
    for name in leftovers:
        if (parent / name).is_dir() and command == "labels" and point == "tables written, not sealed":
            with pytest.raises(OutputFolderError, match=r"labels\.json: missing"):
                read_labels(parent / name)  # the half-built folder: never taken for a labels folder


@pytest.mark.parametrize("point", POINTS)
def test_a_killed_labels_run_leaves_the_previous_folder_or_none_and_the_next_run_cleans_up(tmp_path: Path,
                                                                                            point: str) -> None:
    export, parent = tiny_export(tmp_path / "export"), tmp_path / "results"
    out = parent / "labels"
    assert _cli("labels", export, "--out", out, "--bootstrap", "10")[0] == 0
    previous = _snapshot(out)
    _killed(tmp_path, point, out, "labels", export, "--out", out, "--bootstrap", "10", "--raw-csv")
    _check_after_the_kill(parent, out, point, previous, "labels")
    if out.exists():
        assert read_labels(out).manifest["csv_cells"] == "neutralised"  # the previous run's folder, whole
    else:
        code, output = _cli("global", out, "--out", tmp_path / "global")
        assert code == 2 and "no such folder" in output and not (tmp_path / "global").exists()
    code, output = _cli("labels", export, "--out", out, "--bootstrap", "10", "--raw-csv")
    assert code == 0, output
    assert read_labels(out).manifest["csv_cells"] == "raw" and _leftovers(parent) == []


@pytest.mark.parametrize("point", [POINTS[0], POINTS[2]])
def test_a_killed_global_run_leaves_the_previous_folder_or_none_and_the_next_run_cleans_up(tmp_path: Path,
                                                                                            point: str) -> None:
    labels, parent = tmp_path / "labels", tmp_path / "results"
    assert _cli("labels", tiny_export(tmp_path / "export"), "--out", labels, "--bootstrap", "10")[0] == 0
    out = parent / "global"
    assert _cli("global", labels, "--out", out, "--bootstrap", "10")[0] == 0
    previous = _snapshot(out)
    _killed(tmp_path, point, out, "global", labels, "--out", out, "--bootstrap", "10", "--raw-csv")
    _check_after_the_kill(parent, out, point, previous, "global")
    code, output = _cli("global", labels, "--out", out, "--bootstrap", "10", "--raw-csv")
    assert code == 0, output
    assert '"csv_cells": "raw"' in (out / "global.json").read_text() and _leftovers(parent) == []
    assert (out / "tench" / "index.html").is_file()
