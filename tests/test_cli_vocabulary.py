"""One vocabulary on the command line (issue 23): readable help for every command at any width, the old
spellings kept as hidden aliases with identical results, one default batch size, ``convlens methods`` and
``convlens.create`` agreeing on what INV is, and the explainers' shared base."""

from __future__ import annotations

import csv
import inspect
import json
import re
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

import convlens
from convlens.cli.main import app
from convlens.core.binding import BoundExplainer
from convlens.core.params import ParamError
from convlens.inv import INV, INVParams
from convlens.methods import Explainer, available_methods
from convlens.methods.gradcam import GradCAM
from convlens.methods.rise import RISEParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()


def _command_paths(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [path]
    for name, sub_command in getattr(command, "commands", {}).items():
        paths += _command_paths(sub_command, (*path, name))
    return paths


ROOT = typer.main.get_command(app)
COMMANDS = _command_paths(ROOT)
# what typer prints for an un-named parameter: its Python annotation (<list[str]>, <int>, <path>) or {name}
PYTHON_TYPES = re.compile(r"<(?:list\[\w+\]|str|int|float|bool|path|Path)(?:\.\.\.)?>|list\[|\{[a-z_]+\}")
READABLE = re.compile(r"^(?:[A-Z][A-Z0-9_]*(?:\.\.\.)?|\[[^\]]+\](?:\.\.\.)?|[A-Z.\[\]]+=[A-Z]+)$")


def test_the_tree_holds_every_command() -> None:
    names = {" ".join(path) for path in COMMANDS}
    assert {"explain", "evaluate", "labels", "global", "tcav", "serve", "study", "study create", "methods"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "convlens")
@pytest.mark.parametrize("columns", ["40", "200"])
def test_help_shows_readable_metavars(path: tuple[str, ...], columns: str) -> None:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": columns})
    assert result.exit_code == 0, result.output
    assert not PYTHON_TYPES.search(result.output), result.output
    usage = " ".join(result.output.split("\n\n")[0].split())
    assert usage.startswith("Usage: convlens") and "{" not in usage and "<" not in usage, usage


@pytest.mark.parametrize("path", [p for p in COMMANDS if p], ids=" ".join)
def test_every_parameter_has_a_readable_metavar(path: tuple[str, ...]) -> None:
    command: Any = ROOT
    for name in path:
        command = command.commands[name]
    with click.Context(command, info_name=path[-1]) as context:
        for param in command.params:
            record = param.get_help_record(context)
            if record is None or getattr(param, "is_flag", False):
                continue
            shown = record[0].split(" ")[-1] if param.param_type_name == "option" else record[0]
            assert READABLE.match(shown), f"{' '.join(path)} {param.name}: {record[0]!r}"


def test_old_spellings_are_hidden_from_help() -> None:
    explain_help = runner.invoke(app, ["explain", "--help"], env={"COLUMNS": "200"}).output
    evaluate_help = runner.invoke(app, ["evaluate", "--help"], env={"COLUMNS": "200"}).output
    global_help = runner.invoke(app, ["global", "--help"], env={"COLUMNS": "200"}).output
    assert "--methods TEXT" in explain_help and not re.search(r"--method\b(?!s)", explain_help)
    assert "[METHOD.]KEY=VALUE" in explain_help and "[METHOD.]KEY=VALUE" in evaluate_help
    assert "--target TEXT" in evaluate_help and "--targets" not in evaluate_help
    assert not re.search(r"--method\b(?!s)", evaluate_help)
    assert "--min-similarity" not in global_help


# ------------------------------------------------------------------------------------------- explain aliases
@pytest.fixture
def tiny_model(tiny_cnn: torch.nn.Module) -> Any:
    from convlens.models import register_model, wrap
    from convlens.models.preprocessing import Preprocessing
    from convlens.models.zoo import unregister_model

    register_model("tiny-vocabulary", lambda weights: wrap(tiny_cnn, Preprocessing(32, 32), list("abcde"),
                                                            "tiny-vocabulary"))
    yield "tiny-vocabulary"
    unregister_model("tiny-vocabulary")


def _explain(tmp_path: Path, name: str, model: str, *args: str) -> Path:
    image = tmp_path / "cat.png"
    if not image.exists():
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
    out = tmp_path / name
    result = runner.invoke(app, ["explain", str(image), "--model", model, "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return out / "cat"


def _without_timings(record: Any) -> Any:
    if isinstance(record, dict):
        return {k: _without_timings(v) for k, v in record.items() if k not in ("timings", "seconds")}
    if isinstance(record, list):
        return [_without_timings(v) for v in record]
    return record


def test_explain_old_spellings_give_identical_results(tmp_path: Path, tiny_model: str) -> None:
    new = _explain(tmp_path, "new", tiny_model, "--methods", "gradcam,rise", "--target", "predicted",
                   "--param", "n_masks=40")
    old = _explain(tmp_path, "old", tiny_model, "--method", "gradcam,rise", "--target", "auto",
                   "--param", "rise.n_masks=40")
    for method in ("gradcam", "rise"):
        assert (new / f"{method}.npy").read_bytes() == (old / f"{method}.npy").read_bytes()
    new_record, old_record = (json.loads((d / "result.json").read_text()) for d in (new, old))
    assert _without_timings(new_record) == _without_timings(old_record)
    rise = new_record["results"][1]["params"]
    assert rise["n_masks"] == 40 and rise["batch_size"] == 64


def test_explain_refuses_two_spellings_that_disagree(tmp_path: Path) -> None:
    result = runner.invoke(app, ["explain", str(tmp_path), "--methods", "gradcam", "--method", "rise",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --methods and its old spelling --method disagree ('gradcam' vs 'rise'): " \
                                    "give one"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ evaluate aliases
def _evaluate(out: Path, *args: str) -> list[dict[str, str]]:
    result = runner.invoke(app, ["evaluate", "--data", "synthetic", "--metrics", "ebpg,drop", "--limit", "2",
                                 "--no-progress", "--samples", "0", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    with (out / "per_image.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def test_evaluate_old_spellings_give_identical_tables(tmp_path: Path) -> None:
    new = _evaluate(tmp_path / "new", "--methods", "rise", "--target", "predicted", "--param", "n_masks=48")
    old = _evaluate(tmp_path / "old", "--method", "rise", "--targets", "predicted", "--param", "rise.n_masks=48")
    assert new == old and len(new) == 2 and all(row["ebpg"] and row["drop"] for row in new)  # 2 images
    settings = [json.loads((tmp_path / name / "run.json").read_text()) for name in ("new", "old")]
    assert settings[0] == settings[1]
    assert settings[0]["targets"] == "predicted" and settings[0]["method_params"] == {"rise": {"n_masks": 48}}
    assert settings[0]["batch_size"] == 64


def test_evaluate_refuses_two_spellings_that_disagree(tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--data", "synthetic", "--target", "label", "--targets", "predicted",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--target and its old spelling --targets disagree" in result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- global
def test_global_min_similarity_is_ignored_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The option never did anything: it is accepted (old scripts run), says so, and changes no argument."""
    import convlens.reports.global_report as global_report

    calls: list[tuple[Any, ...]] = []

    def build_global(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return type("Result", (), {"notes": [], "classes": ["a"]})()

    monkeypatch.setattr(global_report, "build_global", build_global)
    plain = runner.invoke(app, ["global", str(tmp_path), "--out", str(tmp_path / "g")])
    old = runner.invoke(app, ["global", str(tmp_path), "--out", str(tmp_path / "g"), "--min-similarity", "0.7"],
                        env={"COLUMNS": "40"})
    assert plain.exit_code == old.exit_code == 0, old.output
    assert calls[0] == calls[1]
    assert "warning: --min-similarity has no effect on `convlens global` and is ignored" in old.output
    assert "min-similarity" not in plain.output


# ------------------------------------------------------------------------------------- defaults, INV, base
def test_one_default_batch_size() -> None:
    from convlens.cli.evaluate import evaluate
    from convlens.cli.explain import explain
    from convlens.cli.main import demo
    from convlens.runners.evaluate import EvaluationConfig
    from convlens.runners.explain import ExplainConfig

    library = inspect.signature(Explainer.__init__).parameters["batch_size"].default
    commands = [inspect.signature(f).parameters["batch_size"].default for f in (explain, evaluate, demo)]
    configs = [ExplainConfig(inputs=[]).batch_size, EvaluationConfig("m", ["gradcam"], "synthetic", ["ebpg"],
                                                                      Path("o")).batch_size]
    assert commands == [*configs, library] == [64, 64, 64]


def test_methods_lists_inv_as_a_layer_explainer_and_create_names_its_constructor(tiny_cnn: torch.nn.Module) -> None:
    output = runner.invoke(app, ["methods"], env={"COLUMNS": "250"}).output
    saliency, layer = output.split("Layer explainers")
    assert "convlens.create(NAME, model)" in saliency and "convlens.INV(model)" in layer
    listed = [re.findall(r"^│ (\w+)", part, flags=re.M) for part in (saliency, layer)]
    assert listed == [available_methods(), ["inv"]]
    for name in listed[0]:
        assert isinstance(convlens.create(name, tiny_cnn), Explainer)
    with pytest.raises(ValueError, match=r"'inv' is a layer explainer, not a saliency method .*use convlens\.INV"):
        convlens.create("inv", tiny_cnn)
    assert isinstance(convlens.INV(tiny_cnn), BoundExplainer)


def test_inv_shares_the_explainers_base_without_being_a_saliency_method(tiny_cnn: torch.nn.Module) -> None:
    inv, gradcam = INV(tiny_cnn, seed=3), GradCAM(tiny_cnn)
    assert not isinstance(inv, Explainer) and isinstance(gradcam, BoundExplainer)
    for explainer in (inv, gradcam):
        assert explainer.model is tiny_cnn and explainer.device == torch.device("cpu")
        assert explainer.score == "logit" and explainer.output_adapter is None and explainer.class_names is None
    assert inv.config == INVParams(seed=3) and inv.layer_spec == "tail" and gradcam.layer_spec == "last"
    with pytest.raises(ParamError, match=r"^inv: give either params= or keyword parameters, not both$"):
        INV(tiny_cnn, params=INVParams(), seed=1)
    with pytest.raises(ParamError, match=r"^inv: params must be an INVParams, got RISEParams$"):
        INV(tiny_cnn, params=RISEParams())
    with pytest.raises(ParamError, match=r"^gradcam: params must be a GradCAMParams, got INVParams$"):
        GradCAM(tiny_cnn, params=INVParams())
    with pytest.raises(ParamError, match=r"^rise: give either params= or keyword parameters, not both$"):
        convlens.create("rise", tiny_cnn, params=RISEParams(), n_masks=3)
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        INV(object())
    # the two layer questions have two names: INV's conv layers for a shape, a method's hooked layers for a batch
    assert [layer.name for layer in inv.explained_layers((3, 32, 32))] == ["block1.2", "block2.2", "block3.1"]
    assert gradcam.layers_for(torch.zeros(1, 3, 32, 32)) == ["block3"]
    assert not hasattr(inv, "layers_for")
