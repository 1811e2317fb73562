"""One rule for every command that writes a folder (issue 20), as a property: whatever a user keeps in the
folder given as ``--out`` (or in the folder around it) — random names, hidden names, names of the command's
own outputs, names shaped like convlens's temporaries — the command either refuses with exit code 2 and one
line, writing nothing, or succeeds; and nothing outside its own new files changes: every file and folder
that was there is still there, byte for byte, and nothing new appears outside ``--out``.

The table ``COMMANDS`` has one entry per command, each with tiny synthetic inputs (a 3-layer CNN, one image,
a six-play study export, its labels folder) so that an example takes well under a second. Covered:
``explain``, ``evaluate``, ``labels``, ``global``. ``study export`` and ``tcav`` join the table as one
entry each (their output folders follow the same rule through :mod:`convlens.core.outputs`).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from convlens.cli.main import app
from convlens.core.files import OutputLock, is_temporary_name
from convlens.labels.files import GLOBAL_FOLDER, LABELS_FOLDER
from convlens.models import LoadedModel, register_model
from convlens.models.preprocessing import Preprocessing
from convlens.models.zoo import unregister_model
from convlens.runners.store import OUTPUT_FILES, OUTPUT_FOLDERS
from labels_helpers import TINY_TABLE, ToyEmbedder, tiny_export

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = "tiny-output-rule"
runner = CliRunner()


def _tiny_model(weights: str | None = None) -> LoadedModel:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                           nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    return LoadedModel(TINY, module, Preprocessing(size=16, resize=16), ["a", "b", "c"], False, "test")


@dataclass(frozen=True)
class Inputs:
    """What the commands read, made once, outside every folder a user's files are put in."""

    image: Path
    export: Path
    labels: Path


@dataclass(frozen=True)
class Command:
    """One command of the rule: its arguments for an output folder, and the names of its own outputs (the
    names a user's files are most likely to collide with)."""

    name: str
    arguments: Callable[[Inputs, Path], list[str]]
    outputs: tuple[str, ...]
    whole_folder: bool  # writes its folder as a whole (OutputFolder): any user entry in --out is refused
    max_examples: int


COMMANDS = [
    Command("explain", lambda i, out: ["explain", str(i.image), "--model", TINY, "--method", "gradcam",
                                       "--out", str(out)],
            ("results.json", "index.html", "img", "img-2", "IMG"), False, 15),
    Command("evaluate", lambda i, out: ["evaluate", "--data", "synthetic", "--methods", "gradcam", "--metrics",
                                        "ebpg", "--limit", "1", "--no-progress", "--samples", "0", "--out", str(out)],
            (*OUTPUT_FILES, *OUTPUT_FOLDERS, "records", "run.json"), False, 12),
    Command("labels", lambda i, out: ["labels", str(i.export), "--out", str(out), "--bootstrap", "10"],
            tuple(sorted(LABELS_FOLDER.names | LABELS_FOLDER.extra)), True, 25),
    Command("global", lambda i, out: ["global", str(i.labels), "--out", str(out), "--bootstrap", "10"],
            (*sorted(GLOBAL_FOLDER.names), "tench", "Tench"), True, 20),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inputs]:
    import convlens.labels.embedders as embedders

    register_model(TINY, _tiny_model)
    original = embedders.load_embedder
    embedders.load_embedder = lambda *_args, **_kw: ToyEmbedder(TINY_TABLE)  # no sentence model is loaded
    root = tmp_path_factory.mktemp("inputs")
    pixels = (np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / "img.png")
    export = tiny_export(root / "export")
    result = runner.invoke(app, ["labels", str(export), "--out", str(root / "labels"), "--bootstrap", "10"])
    assert result.exit_code == 0, result.output
    yield Inputs(root / "img.png", export, root / "labels")
    embedders.load_embedder = original
    unregister_model(TINY)


# ------------------------------------------------------------------------------------------- the strategies
LOOKALIKES = [".convlens-tmp-notes", ".convlens-tmp-" + "a" * 31, ".convlens-tmp-" + "A" * 32,
              ".convlens-old-" + "f" * 33, ".convlens-tmp-" + "0" * 32 + ".bak", ".convlens-notes", ".hidden",
              "notes.txt", "Notes.TXT", "out", "sub", " spaced name ", "漢字", "-dash", "=formula"]
random_names = st.text(alphabet=st.sampled_from("abcXYZ019._- é"), min_size=1, max_size=10)


def _allowed(name: str) -> bool:
    # A name shaped exactly like convlens's temporaries (.convlens-tmp-<32 hex>) is convlens's by design, and
    # .convlens.lock is the lock's own name: no user's file is expected to have either.
    return name not in (".", "..") and not is_temporary_name(name) and name != OutputLock.NAME


def user_entries(command: Command) -> st.SearchStrategy[list[tuple[str, str, bytes, str | None]]]:
    names = st.one_of(st.sampled_from([*command.outputs, *LOOKALIKES]), random_names).filter(_allowed)
    entry = st.tuples(names, st.sampled_from(["file", "dir", "dir-with-file"]), st.binary(max_size=16),
                      st.one_of(st.none(), st.sampled_from([*command.outputs, "mine.txt", ".x"])))
    return st.lists(entry, min_size=0, max_size=5, unique_by=lambda e: e[0].lower())


def _make(root: Path, entries: list[tuple[str, str, bytes, str | None]]) -> None:
    for name, kind, content, inner in entries:
        path = root / name
        if kind == "file":
            path.write_bytes(content)
            continue
        path.mkdir()
        if kind == "dir-with-file":
            (path / (inner or "mine.txt")).write_bytes(content)


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------------------------------- the property
def check_the_rule(command: Command, inputs: Inputs, entries: list, place: str) -> None:
    root = Path(tempfile.mkdtemp(prefix="rule-"))
    try:
        folder = root / "user"
        folder.mkdir()
        _make(folder, entries)
        dirs = [name for name, kind, _, _ in entries if kind != "file"]
        out = {"the folder": folder, "a new folder in it": folder / "results-new",
               "a folder of the user's in it": folder / dirs[0] if dirs else folder / "results-new"}[place]
        before = _snapshot(root)
        result = runner.invoke(app, command.arguments(inputs, out))
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        after = _snapshot(root)
        assert result.exit_code in (0, 2), result.output
        if result.exit_code == 2:
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), result.output
            assert after == before, "a refused run wrote or removed something"
            return
        changed = {k: (v, after.get(k)) for k, v in before.items() if after.get(k) != v}
        assert changed == {}, f"{command.name} changed or removed the user's {sorted(changed)}"
        prefix = out.relative_to(root).as_posix()
        outside = [k for k in after if k not in before and k != prefix and not k.startswith(prefix + "/")]
        assert outside == [], f"{command.name} wrote outside --out: {outside}"
        if command.whole_folder:
            assert not (out.is_dir() and before.get(prefix) == "dir" and any(
                k.startswith(prefix + "/") for k in before)), "wrote into a folder that held the user's files"
        assert not [k for k in after if Path(k).name.startswith(".convlens-tmp-") and k not in before]
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.name for c in COMMANDS])
def test_nothing_but_the_commands_own_files_changes(command: Command, inputs: Inputs) -> None:
    @settings(max_examples=command.max_examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(entries=user_entries(command),
           place=st.sampled_from(["the folder", "a new folder in it", "a folder of the user's in it"]))
    def example(entries: list, place: str) -> None:
        check_the_rule(command, inputs, entries, place)

    example()
