"""``convlens evaluate``'s output folder: files it did not write are never replaced or deleted (a folder
without a convlens ``run.json`` that holds any of the run's names, a ``run.json`` that is not convlens's or not
JSON: exit 2, one line, nothing written); ``--overwrite`` removes the previous run's records, overlays and plots
and only those; new weights at the same path are new settings."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from convlens.data.synthetic import CLASS_NAMES
from convlens.models.synthetic import SYNTHETIC_PREPROCESSING, WEIGHTS_DIR
from convlens.models.zoo import LoadedModel, wrap
from convlens.runners.evaluate import EvaluationConfig, EvaluationResult, run_evaluation
from convlens.runners.store import SettingsMismatchError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = ["--data", "synthetic", "--methods", "gradcam", "--metrics", "ebpg", "--limit", "1", "--no-progress"]


def _evaluate(*args: str) -> tuple[int, str]:
    from convlens.cli.main import app

    result = CliRunner().invoke(app, ["evaluate", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a failure
    return result.exit_code, result.output


def _refused(out: Path, *extra: str) -> None:
    before = _snapshot(out)
    code, output = _evaluate(*QUICK, "--out", str(out), *extra)
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "not written by convlens evaluate" in lines[0], output
    assert _snapshot(out) == before  # nothing written, replaced or deleted


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else b"<dir>" for p in root.rglob("*")}


def test_a_folder_with_the_users_own_outputs_is_refused_untouched(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "report.html").write_text("<p>my report</p>")
    (project / "summary.md").write_text("# my notes")
    _refused(project)
    _refused(project, "--overwrite")
    records = tmp_path / "records-only"
    (records / "records" / "mine").mkdir(parents=True)
    (records / "records" / "mine" / "0000000-0123456789.json").write_text("{}")
    _refused(records, "--overwrite")


@pytest.mark.parametrize("run_json", ["not json {", '{"name": "my project"}', "[1, 2]", '{"format": "other"}'])
def test_a_run_json_that_is_not_ours_is_refused_untouched(tmp_path: Path, run_json: str) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text(run_json)
    (out / "records").mkdir()
    (out / "records" / "0000000-0123456789.json").write_text("{}")
    _refused(out)
    _refused(out, "--overwrite")


def test_our_folder_is_resumed_and_overwritten_but_the_users_files_in_it_stay(tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert _evaluate(*QUICK, "--out", str(out))[0] == 0
    assert json.loads((out / "run.json").read_text())["format"] == "convlens-evaluate-run"
    mine = [out / "records" / "gradcam" / "notes.json", out / "samples" / "my-figure.png", out / "notes.txt"]
    for path in mine:
        path.write_text("mine")
    assert _evaluate(*QUICK, "--out", str(out))[0] == 0  # same settings: resumed
    code, output = _evaluate(*QUICK[:-3], "--limit", "2", "--no-progress", "--out", str(out))
    assert code == 2 and "different settings" in output and "limit" in output
    assert _evaluate(*QUICK[:-3], "--limit", "2", "--no-progress", "--out", str(out), "--overwrite")[0] == 0
    assert all(path.read_text() == "mine" for path in mine)


def _tiny(make_model: Callable[..., torch.nn.Module]) -> LoadedModel:
    return wrap(make_model(num_classes=4), SYNTHETIC_PREPROCESSING, CLASS_NAMES, name="tiny")


def _overlays_in_report(out: Path) -> set[str]:
    return set(re.findall(r'src="(samples/gradcam/[^"]+)"', (out / "report.html").read_text()))


def test_overwrite_removes_the_previous_runs_overlays_and_plots(tmp_path: Path,
                                                                make_model: Callable[..., torch.nn.Module]) -> None:
    """Other targets with --overwrite: the report shows only the new run's overlays, and a plot the new run does
    not draw (insertion curves) is gone."""
    out = tmp_path / "o"
    common = {"model": "tiny", "methods": ["gradcam"], "data": "synthetic", "limit": 4, "out": out,
              "n_samples": 4, "metric_params": {"insertion": {"step": 512}}}
    run_evaluation(EvaluationConfig(**common, metrics=["ebpg", "insertion"], targets="label"),  # type: ignore[arg-type]
                   model=_tiny(make_model))
    old = _overlays_in_report(out)
    assert (out / "report_files" / "curves.png").is_file()
    result = run_evaluation(EvaluationConfig(**common, metrics=["ebpg"], targets="predicted",  # type: ignore[arg-type]
                                             overwrite=True), model=_tiny(make_model))
    rows = [json.loads(p.read_text()) for p in sorted((out / "records" / "gradcam").glob("*.json"))]
    expected = {f"samples/gradcam/{r['key']}_t{t['target']}.png" for r in rows for t in r["targets"]}
    assert result.n_images == 4 and expected != old  # the test needs targets that changed
    assert _overlays_in_report(out) == expected
    assert {f"samples/gradcam/{p.name}" for p in (out / "samples" / "gradcam").iterdir()} == expected
    assert not (out / "report_files" / "curves.png").exists() and (out / "report_files" / "metrics.png").is_file()


def test_new_weights_at_the_same_path_are_new_settings(tmp_path: Path) -> None:
    weights, out = tmp_path / "vgg.pt", tmp_path / "o"
    shutil.copy(WEIGHTS_DIR / "synthetic_vgg.pt", weights)
    config = {"model": "synthetic-vgg", "weights": str(weights), "methods": ["gradcam"], "data": "synthetic",
              "limit": 1, "metrics": ["drop"], "out": out, "n_samples": 0}
    first = _drop(run_evaluation(EvaluationConfig(**config)))  # type: ignore[arg-type]
    assert _drop(run_evaluation(EvaluationConfig(**config))) == first  # type: ignore[arg-type]
    state = torch.load(weights, weights_only=True)
    torch.save({k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()}, weights)  # retrained
    with pytest.raises(SettingsMismatchError, match="weights_sha256"):
        run_evaluation(EvaluationConfig(**config))  # type: ignore[arg-type]
    again = _drop(run_evaluation(EvaluationConfig(**config, overwrite=True)))  # type: ignore[arg-type]
    assert again == _drop(run_evaluation(EvaluationConfig(**config | {"out": tmp_path / "fresh"})))  # type: ignore[arg-type]
    assert again != first


def _drop(result: EvaluationResult) -> list[tuple[str, float]]:
    return [(s["method"], s["mean"]) for s in result.summary if s["metric"] == "drop"]
