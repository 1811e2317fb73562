"""`convlens evaluate` on the command line: a real process killed with SIGKILL resumes to the same tables,
the sise-voc2007 preset, and bad input (issue 10): exit code 2 with one clear line and nothing written,
temporary files of a killed run cleared by the next one (and nothing else), two runs into one folder at
once, and user text that looks like Rich markup."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from convlens.core.files import temporary_name
from convlens.runners.evaluate import EvaluationConfig, EvaluationError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _without_timings(out: Path) -> tuple[object, ...]:
    """The run's tables minus wall-clock timings (the only values that differ between identical runs)."""
    per_image = [{k: v for k, v in row.items() if k != "seconds"} for row in _csv(out / "per_image.csv")]
    summary = [row for row in _csv(out / "summary.csv") if row["metric"] != "seconds"]
    lines = (out / "summary.md").read_text().splitlines()
    table = [line.split(" | ") for line in lines if line.startswith("|")]
    column = next(i for i, cell in enumerate(table[0]) if cell.startswith("seconds"))
    markdown = [[cell for i, cell in enumerate(row) if i != column] for row in table]
    return per_image, summary, markdown


# ----------------------------------------------------------------------------------------------- CLI
def _cli() -> object:
    from convlens.cli.main import app

    return app


def test_cli_synthetic_run_and_kill_then_resume(tmp_path: Path) -> None:
    """A real `convlens evaluate` process is killed with SIGKILL mid-run; rerunning the same command skips
    the finished images and ends with the same tables as an uninterrupted run."""
    args = ["evaluate", "--data", "synthetic", "--model", "synthetic-vgg", "--methods", "gradcam,rise",
            "--metrics", "ebpg,drop", "--limit", "6", "--param", "rise.n_masks=500", "--no-progress",
            "--samples", "1"]
    clean = CliRunner().invoke(_cli(), [*args, "--out", str(tmp_path / "clean")])  # type: ignore[arg-type]
    assert clean.exit_code == 0, clean.output
    assert "ebpg" in clean.output and "gradcam" in clean.output
    out = tmp_path / "killed"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "convlens.cli.main", *args, "--out", str(out)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900  # a hang guard only: the loop ends when two records exist or the run ends
    records = out / "records/rise"
    while process.poll() is None and time.monotonic() < deadline and len(list(records.glob("*.json"))) < 2:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=300)
    assert process.returncode == -signal.SIGKILL, "the run ended before it was killed"
    finished = len(list((out / "records/rise").glob("*.json")))
    assert 2 <= finished < 6, "the run was not killed mid-way"
    resumed = CliRunner().invoke(_cli(), [*args, "--out", str(out)])  # type: ignore[arg-type]
    assert resumed.exit_code == 0, resumed.output
    assert _without_timings(out) == _without_timings(tmp_path / "clean")


def test_cli_preset_without_data_or_weights_says_what_is_missing(tmp_path: Path) -> None:
    out = tmp_path / "out"  # every run gets its own --out: a regression must not write into the repository

    def run(*args: str) -> object:
        return CliRunner().invoke(_cli(), ["evaluate", *args, "--out", str(out)])  # type: ignore[arg-type]

    result = run("--preset", "sise-voc2007")
    assert result.exit_code == 2 and "VOCtest_06-Nov-2007.tar" in result.output
    result = run("--preset", "sise-voc2007", "--data", str(tmp_path))
    assert result.exit_code == 2 and "--weights" in result.output
    weights = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1)}, weights)
    result = run("--preset", "sise-voc2007", "--data", str(tmp_path / "VOCdevkit"), "--model", "resnet18",
                 "--weights", str(weights))
    assert result.exit_code == 2 and "data not found" in result.output
    result = run("--preset", "sise-voc2007", "--data", str(tmp_path), "--model", "resnet18", "--weights", str(weights))
    assert result.exit_code == 2 and "VOCtest_06-Nov-2007.tar" in result.output
    result = run("--data", "synthetic", "--metrics", "ebpg", "--metric-param", "ebpg.step=3")
    assert result.exit_code == 2 and "ebpg accepts clip_negative" in result.output
    result = run()
    assert result.exit_code == 2 and "no data" in result.output
    assert not out.exists()  # errors write nothing


def test_cli_preset_resolves_the_papers_methods_and_sigmoid_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--preset sise-voc2007: SISE Table 1's methods and metrics, sigmoid scores for the metrics and for the
    sampling methods (multi-label VOC models), user parameters merged over the preset's."""
    import convlens.cli.evaluate as command

    captured: list[EvaluationConfig] = []

    def capture(config: EvaluationConfig, show_progress: bool = False) -> object:
        captured.append(config)
        raise EvaluationError("captured")

    monkeypatch.setattr(command, "run_evaluation", capture)
    weights = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1)}, weights)
    result = CliRunner().invoke(_cli(), [  # type: ignore[arg-type]
        "evaluate", "--preset", "sise-voc2007", "--data", str(tmp_path), "--model", "resnet18", "--weights",
        str(weights), "--param", "rise.n_masks=10", "--out", str(tmp_path / "out"),
    ])
    assert result.exit_code == 2 and "captured" in result.output
    config = captured[0]
    assert list(config.methods) == ["gradcam", "gradcampp", "rise", "scorecam", "sise"]
    assert list(config.metrics) == ["ebpg", "miou", "bbox", "drop", "increase"]
    assert config.metric_score == "sigmoid" and config.targets == "label" and config.data_format == "voc"
    assert config.method_params == {"rise": {"score": "sigmoid", "n_masks": 10}, "sise": {"score": "sigmoid"}}


def test_cli_sise_voc2007_preset_on_a_voc_fixture(tmp_path: Path) -> None:
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True)
    xml = ("<annotation><filename>{n}.jpg</filename><object><name>{c}</name><difficult>0</difficult><bndbox>"
           "<xmin>40</xmin><ymin>50</ymin><xmax>160</xmax><ymax>200</ymax></bndbox></object></annotation>")
    rng = np.random.default_rng(0)
    for n, c in (("000001", "dog"), ("000002", "cat")):
        Image.fromarray(rng.integers(0, 255, (240, 260, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{n}.jpg")
        (voc / "Annotations" / f"{n}.xml").write_text(xml.format(n=n, c=c))
    (voc / "ImageSets/Main/test.txt").write_text("000001\n000002\n")
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "voc_resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=20).state_dict(), weights)
    result = CliRunner().invoke(_cli(), [  # type: ignore[arg-type]
        "evaluate", "--preset", "sise-voc2007", "--data", str(tmp_path), "--model", "resnet18", "--weights",
        str(weights), "--methods", "gradcam", "--out", str(tmp_path / "out"), "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    rows = _csv(tmp_path / "out/per_image.csv")
    assert [r["target_name"] for r in rows] == ["dog", "cat"]  # each annotated class is explained
    settings = json.loads((tmp_path / "out/run.json").read_text())
    assert settings["metrics"] == ["ebpg", "miou", "bbox", "drop", "increase"]
    assert settings["metric_score"] == "sigmoid" and settings["data"]["type"] == "VOCDetection"
    assert all(r["ebpg"] != "" and r["drop"] != "" for r in rows)


# ----------------------------------------------------------------------------------------------- bad input (issue 10)
QUICK = ["--data", "synthetic", "--methods", "gradcam", "--metrics", "ebpg", "--limit", "1", "--no-progress"]


def _fails_cleanly(args: list[str], expected: str) -> None:
    result = CliRunner().invoke(_cli(), ["evaluate", *args])  # type: ignore[arg-type]
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output


def test_bad_numbers_devices_and_output_folders_exit_2_with_one_line_and_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _fails_cleanly([*QUICK, "--limit", "-2", "--out", str(out)], "--limit must be >= 1, got -2")
    _fails_cleanly([*QUICK, "--batch-size", "0", "--out", str(out)], "--batch-size must be >= 1")
    _fails_cleanly([*QUICK, "--device", "tpu", "--out", str(out)], "'tpu' is not a device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # whatever this machine has
    _fails_cleanly([*QUICK, "--device", "cuda", "--out", str(out)], "no CUDA device is available")
    assert not out.exists()
    existing = tmp_path / "results.txt"
    existing.write_text("mine")
    _fails_cleanly([*QUICK, "--out", str(existing)], "is a file, not a folder")
    _fails_cleanly([*QUICK, "--out", str(existing / "sub")], "is a file, not a folder")
    assert existing.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (a place even root cannot write)")
def test_unwritable_output_folder_exits_2(tmp_path: Path) -> None:
    _fails_cleanly([*QUICK, "--out", "/proc/convlens-no-such-place/out"], "cannot write there")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_folder_exits_2(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        _fails_cleanly([*QUICK, "--out", str(locked / "out")], "no permission to write")
    finally:
        locked.chmod(0o700)


def test_an_error_line_quotes_a_path_that_looks_like_rich_markup(tmp_path: Path) -> None:
    _fails_cleanly(["--data", "nosuch[/x]", "--out", str(tmp_path / "o1")], "data not found: nosuch[/x]")


def test_the_progress_bar_shows_image_ids_that_look_like_rich_markup(tmp_path: Path) -> None:
    """A run whose image ids contain `[/x]` finishes with its progress bar on (it died partway before)."""
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(data / "ok.png")
    (data / "list.csv").write_text("path,label\nok.png,0\ngone[/x].png,0\n")
    result = CliRunner().invoke(_cli(), [  # type: ignore[arg-type]
        "evaluate", "--data", str(data / "list.csv"), "--methods", "gradcam", "--metrics", "drop",
        "--target", "predicted", "--progress", "--out", str(tmp_path / "o2"),
    ])
    assert result.exit_code == 0, result.output
    assert [row["id"] for row in _csv(tmp_path / "o2/bad_images.csv")] == ["gone[/x].png"]
    assert (tmp_path / "o2/report.html").is_file()


def test_a_rerun_clears_the_temporary_files_of_a_killed_run_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["evaluate", *QUICK, "--out", str(out)]
    assert CliRunner().invoke(_cli(), args).exit_code == 0  # type: ignore[arg-type]
    records = out / "records" / "gradcam"
    stale = [  # what SIGKILL leaves behind mid-write (this version's names and the earlier `.json.*.tmp`)
        records / ".0000000-385dad7297.json.k2j3h4k5.tmp", records / temporary_name(suffix=".tmp"),
        out / ".per_image.csv.x9y8z7w6.tmp", out / ".report.html.tmp", out / temporary_name(suffix=".tmp"),
        out / "samples" / "gradcam" / temporary_name(suffix=".tmp"),
    ]
    kept = [  # the user's files, and names that are not the run's
        out / "notes.tmp", out / ".my-results.json.a1b2c3d4.tmp", out / "mine" / ".0000000-x.json.a1b2c3d4.tmp",
        records / "notes.txt", out / ".convlens-tmp-notes", records / ".convlens-tmp-a1b2c3d4.tmp",
    ]
    for path in [*stale, *kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
    result = CliRunner().invoke(_cli(), args)  # type: ignore[arg-type]
    assert result.exit_code == 0, result.output
    assert [p for p in stale if p.exists()] == []
    assert all(p.read_text() == "partial" for p in kept)


def test_two_identical_runs_into_one_folder_take_turns(tmp_path: Path, make_model: Callable[..., Any]) -> None:
    """Both finish with the same tables; the second waits for the first and then finds every image done,
    so no image is computed twice and neither run sees the other's half-written files."""
    import threading

    from convlens.data.synthetic import CLASS_NAMES
    from convlens.models.synthetic import SYNTHETIC_PREPROCESSING
    from convlens.models.zoo import wrap
    from convlens.runners.evaluate import run_evaluation

    computed: list[str] = []
    results: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        model = wrap(make_model(num_classes=4), SYNTHETIC_PREPROCESSING, CLASS_NAMES, name="tiny")
        config = EvaluationConfig(model="tiny", methods=["gradcam", "rise"], data="synthetic", limit=3,
                                  metrics=["ebpg", "insertion"], out=tmp_path / "out", n_samples=3,
                                  method_params={"rise": {"n_masks": 64}}, metric_params={"insertion": {"step": 512}})
        try:
            results.append(run_evaluation(config, model=model, progress=lambda done, n, i: computed.append(i)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=1800)  # a hang guard only
    assert not any(thread.is_alive() for thread in threads), "a run still waits after 30 min"
    assert errors == [] and len(results) == 2
    assert sorted(computed) == ["test-0-000000", "test-0-000001", "test-0-000002"]  # each image once
    assert len(_csv(tmp_path / "out/per_image.csv")) == 3 * 2
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.startswith(".convlens-tmp")]
