"""Property-based: hostile file names and folder layouts never cost a user a file, never crash the CLI.

Hypothesis builds a folder of images (good, corrupt, or text with an image suffix) under hostile names
(rich markup, dots, spaces, quotes, unicode, the names of the run's own files) in hostile sub-folders,
optionally with the user's own files already in ``--out``, and runs ``convlens explain`` on it with a
tiny registered model. Properties: the exit code is 0, 1 or 2 and never a traceback; every path that
existed before is unchanged afterwards; every new path is one of the run's own files inside ``--out``;
no temporary is left; with exit 0 or 1 every visible image was explained or listed as skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
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
from convlens.models import LoadedModel, register_model
from convlens.models.images import IMAGE_SUFFIXES
from convlens.models.preprocessing import Preprocessing
from convlens.models.zoo import unregister_model

runner = CliRunner()
TINY = "tiny-hostile"


def _tiny(weights: object = None) -> LoadedModel:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(4, 2)).eval()
    return LoadedModel(TINY, module, Preprocessing(size=8, resize=8), ["a", "[b]"], False, "test")


@pytest.fixture(autouse=True, scope="module")
def _registered():
    register_model(TINY, _tiny)
    yield
    unregister_model(TINY)


HOSTILE = [*"ab.-_ []\\:*?\"<>|%#&;'`$(){}!~=,", "ü", "漢", "\u202e", "[/", "[bold]", "[/x]"]
SPECIAL = ["..", "...", ".", "results.json", "index.html", "INDEX.HTML", ".hidden", "-rf", "image", "a", "a.b.c"]
stems = st.one_of(st.sampled_from(SPECIAL), st.lists(st.sampled_from(HOSTILE), min_size=1, max_size=8).map("".join))
suffixes = st.sampled_from([".png", ".jpg", ".PNG", ".jpeg", ".txt", ""])
folders = st.lists(st.sampled_from(["sub", "[x]", "a b", ".hidden", "...", "out", "漢", "image"]), max_size=2)
files = st.lists(st.tuples(folders, stems, suffixes, st.sampled_from(["good", "good", "broken", "text"])),
                 min_size=1, max_size=5)
user_files = st.lists(st.sampled_from(["stem-folder", "hidden", "notes", "foreign-index"]), max_size=2, unique=True)


def _write(path: Path, kind: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "good":
        pixels = (np.random.default_rng(seed).random((10, 12, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, format="PNG")
    elif kind == "broken":
        path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    else:
        path.write_text("not an image")


def _snapshot(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
    }


def _build(root: Path, layout: list, extra: list[str], out: Path) -> dict[Path, str]:
    placed: dict[Path, str] = {}
    for seed, (parts, stem, suffix, kind) in enumerate(layout):
        name = stem + suffix
        if name in (".", "..") or not name:
            continue
        path = root.joinpath("in", *parts, name)
        if any(p in placed for p in path.parents) or path.exists():
            continue
        _write(path, kind, seed)
        placed[path] = kind
    out.mkdir(parents=True, exist_ok=True)
    if "stem-folder" in extra and placed:
        folder = out / next(iter(placed)).stem.lstrip(".")
        if folder != out and not folder.exists():
            folder.mkdir()
            (folder / "notes.txt").write_text("mine")
    if "hidden" in extra and not (out / ".mine.abcd1234").exists():
        (out / ".mine.abcd1234").write_text("mine")
    if "notes" in extra and not (out / "notes.txt").exists():
        (out / "notes.txt").write_text("mine")
    if "foreign-index" in extra and not (out / "index.html").exists():
        (out / "index.html").write_text("<h1>my page</h1>")
    return placed


def _visible_images(placed: dict[Path, str], root: Path, out: Path) -> dict[str, str]:
    visible = {}
    for path, kind in placed.items():
        parts = path.relative_to(root / "in").parts
        inside_out = out in path.parents
        if not inside_out and not any(p.startswith(".") for p in parts) and path.suffix.lower() in IMAGE_SUFFIXES:
            visible[str(path.resolve())] = kind
    return visible


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=files, extra=user_files, out_inside=st.booleans(), explicit=st.booleans())
def test_hostile_names_and_layouts(layout: list, extra: list[str], out_inside: bool, explicit: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = root / "in" / "out" if out_inside else root / "result"
        placed = _build(root, layout, extra, out)
        before = _snapshot(root)
        inputs = [str(p) for p in placed] if explicit and placed else [str(root / "in")]
        result = runner.invoke(app, ["explain", *inputs, "--model", TINY, "--out", str(out)])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.output
        assert result.exit_code in (0, 1, 2), result.output
        after = _snapshot(root)
        assert {k: after.get(k) for k in before} == before, "a file that existed before changed or vanished"
        new = set(after) - set(before)
        if result.exit_code == 2:
            assert not new, result.output
            return
        prefix = out.relative_to(root).as_posix() + "/"
        summary = json.loads((out / "results.json").read_text())
        own = {f"{prefix}index.html", f"{prefix}results.json"}
        assert all(k in own or any(k == prefix + d or k.startswith(prefix + d + "/") for d in summary["images"])
                   for k in new), sorted(new)
        assert not [p for p in os.listdir(out) if p.startswith(".convlens")]
        explained = {json.loads((out / d / "result.json").read_text())["source"] for d in summary["images"]}
        skipped = {str(Path(s["path"]).resolve()) for s in summary["skipped"]}
        if not explicit:
            visible = _visible_images(placed, root, out)
            assert explained | skipped == set(visible), result.output
            assert explained == {p for p, kind in visible.items() if kind == "good"}
        assert result.exit_code == (0 if not skipped else 1)
