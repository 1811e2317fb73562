"""``convlens explain`` end to end: outputs, bad input handling, resume, escaping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import skimage.data
import torch
from PIL import Image
from typer.testing import CliRunner

from convlens.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage.data.chelsea()).save(folder / "chelsea.png")
    Image.fromarray(skimage.data.coffee()).save(folder / "<script>coffee.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return folder


def _run(*args: str, columns: int | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": str(columns)} if columns else None)
    return result.exit_code, result.output


@pytest.mark.slow
def test_explain_folder_skips_bad_files_and_resumes(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = _run("explain", str(photos), "--methods", "gradcam,layercam", "--out", str(out), "--per-block",
                        "--layers", "blocks", columns=40)  # a 40-column terminal: paths are never wrapped
    assert code == 1, output  # exit 1: an image was skipped (listed)
    assert f"{photos / 'broken.jpg'}: " in output and f"{out / 'index.html'} " in output
    results = json.loads((out / "results.json").read_text())
    assert [s["path"].endswith("broken.jpg") for s in results["skipped"]] == [True]
    chelsea = json.loads((out / "chelsea" / "result.json").read_text())
    assert 281 <= chelsea["top5"][0]["id"] <= 285
    assert [r["method"] for r in chelsea["results"]] == ["gradcam", "layercam"]
    saved = torch.from_numpy(__import__("numpy").load(out / "chelsea" / "gradcam.npy"))
    assert saved.shape == (224, 224) and saved.max() > 0
    assert (out / "chelsea" / "gradcam_block4.png").is_file()
    html = (out / "index.html").read_text()
    assert "&lt;script&gt;coffee.jpg" in html and "<script>coffee" not in html  # user text escaped
    assert "broken.jpg" in html
    before = (out / "chelsea" / "result.json").stat().st_mtime_ns
    code, output = _run("explain", str(photos), "--methods", "gradcam,layercam", "--out", str(out),
                        "--layers", "blocks")
    assert code == 1 and (out / "chelsea" / "result.json").stat().st_mtime_ns == before  # resumed, not recomputed
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "nosuch"], "unknown method"),
        (["--model", "resnet5O"], "did you mean resnet50"),
        (["--target", "1000"], "out of range"),
        (["--target", "not a class"], "unknown class name"),
        (["--param", "gradcam.bogus=1"], "no selected method accepts"),
        (["--layers", "nolayer"], "not found"),
        (["--device", "cuda"], "no CUDA device") if not torch.cuda.is_available()
        else (["--device", "cuda:99"], "CUDA device(s)"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    ],
)
def test_bad_arguments_exit_nonzero_and_write_nothing(photos: Path, tmp_path: Path, args: list[str],
                                                      message: str) -> None:
    out = tmp_path / "out"
    code, output = _run("explain", str(photos / "chelsea.png"), "--out", str(out), *args)
    assert code == 2, output
    assert "error:" in output and message in output
    assert not out.exists()


def test_unreadable_explicit_file_writes_nothing(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = _run("explain", str(photos / "chelsea.png"), str(photos / "broken.jpg"), "--out", str(out))
    assert code == 2 and "broken.jpg" in output and not out.exists()
    code, output = _run("explain", str(photos / "missing.png"), "--out", str(out))
    assert code == 2 and "no such file" in output and not out.exists()


def test_listing_commands() -> None:
    wide = {"COLUMNS": "220"}
    result = runner.invoke(app, ["methods"], env=wide)
    assert result.exit_code == 0 and all(m in result.output for m in ("gradcam", "scorecam", "rise", "ig", "inv"))
    for name, checks in {"inv": {"perplexity": "> 0", "cluster_range": "(3, 8)", "layers": "'tail'"},
                         "rise": {"n_masks": ">= 1", "p": "(0, 1]"}}.items():
        result = runner.invoke(app, ["methods", name], env=wide)
        rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 4}
        assert result.exit_code == 0 and all(text in rows[row] for row, text in checks.items()), result.output
    code, output = _run("methods", "nosuch")
    assert code == 2 and "unknown method 'nosuch'" in output
    code, output = _run("models", columns=40)  # names are never cut, whatever the width
    assert code == 0 and "efficientnet_lite0" in output and "resnet50" in output
    code, output = _run("methods", columns=40)
    assert code == 0 and all(m in output for m in ("gradcampp", "scorecam", "adasise", "inv"))


def test_inv_over_depth_from_the_command_line(tmp_path: Path, tiny_cnn) -> None:
    from convlens.models import register_model, wrap
    from convlens.models.preprocessing import Preprocessing
    from convlens.models.zoo import unregister_model

    register_model("tiny-cli", lambda weights: wrap(tiny_cnn, Preprocessing(32, 32), list("abcde"), "tiny-cli"))
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "cat.png")
    try:
        code, output = _run("explain", str(tmp_path / "cat.png"), "--model", "tiny-cli", "--methods", "inv",
                            "--layers", "depth", "--param", "num_layers=2", "--param", "embedding=pca",
                            "--out", str(tmp_path / "out"))
        mixed, mixed_output = _run("explain", str(tmp_path / "cat.png"), "--model", "tiny-cli", "--methods",
                                   "gradcam,inv", "--param", "inv.layers=depth", "--param", "inv.num_layers=2",
                                   "--param", "inv.embedding=pca", "--out", str(tmp_path / "mixed"))
    finally:
        unregister_model("tiny-cli")
    assert code == 0, output
    manifest = json.loads((tmp_path / "out" / "cat" / "inv" / "inv.json").read_text())
    assert manifest["layer_choice"] == {"rule": "depth", "num_layers": 2, "conv_layers": 3}
    assert [layer["name"] for layer in manifest["layers"]] == ["block2.2", "block3.1"]  # positions 1 and 2 of 3
    assert mixed == 0, mixed_output
    record = json.loads((tmp_path / "mixed" / "cat" / "result.json").read_text())
    assert [r["method"] for r in record["results"]] == ["gradcam", "inv"]
    assert record["results"][1]["layer_choice"]["rule"] == "depth" and record["results"][0]["layers"] == ["block3"]
