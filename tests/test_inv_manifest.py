"""INV's file contract (``inv.json``, format version 2) and its layer choice over depth.

The Deep Reveal study server reads INV runs through ``load_inv_explanation`` and the public fields of
``InvExplanation`` / ``InvLayer`` / ``InvCluster``; these tests pin that contract: the schema fields,
reading version 1 files, refusing later versions, and never replacing a folder INV did not write.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from convlens.inv import (
    FORMAT_VERSION,
    INV,
    InvCluster,
    InvExplanation,
    InvLayer,
    ManifestError,
    load_inv_explanation,
)
from convlens.inv.layers import choose_conv_layers, find_conv_layers


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[InvExplanation, Path]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    ).eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        explanation = INV(model, layers="depth", num_layers=2, class_names=["a", "b", "c"]).explain(x)
    folder = tmp_path_factory.mktemp("inv") / "run"
    explanation.save(folder, image=np.zeros((16, 16, 3), dtype=np.uint8))
    return explanation, folder


def test_manifest_fields_of_version_2(saved: tuple[InvExplanation, Path]) -> None:
    _, folder = saved
    manifest = json.loads((folder / "inv.json").read_text())
    assert manifest["format"] == "convlens-inv" and manifest["format_version"] == FORMAT_VERSION == 2
    # 3 conv layers, depth rule with 2 layers: runs of lengths 1.5 -> positions ceil(1.5) - 1 = 1 and 2
    assert manifest["layer_choice"] == {"rule": "depth", "num_layers": 2, "conv_layers": 3}
    assert [layer["conv_position"] for layer in manifest["layers"]] == [1, 2]
    assert [layer["name"] for layer in manifest["layers"]] == ["3", "5"]
    assert manifest["params"]["layers"] == "depth" and "n_jobs" not in manifest["params"]
    for layer in manifest["layers"]:
        assert set(layer) >= {"index", "name", "conv", "dir", "channels", "feature_size", "clusters", "files"}
        for cluster in layer["clusters"]:
            assert cluster["id"] == f"{manifest['image_id']}:{layer['name']}:{cluster['index']}"
            assert all((folder / path).is_file() for path in cluster["files"].values())


def test_public_fields_the_study_server_reads(saved: tuple[InvExplanation, Path]) -> None:
    explanation, folder = saved
    loaded = load_inv_explanation(folder)
    assert loaded.layer_choice == explanation.layer_choice and loaded.image_id == explanation.image_id
    for a, b in zip(explanation.layers, loaded.layers, strict=True):
        assert isinstance(b, InvLayer) and (b.name, b.index, b.feature_size) == (a.name, a.index, a.feature_size)
        assert b.conv_position == a.conv_position
        for ca, cb in zip(a.clusters, b.clusters, strict=True):
            assert isinstance(cb, InvCluster)
            assert (cb.id, cb.index, cb.channels, cb.weight) == (ca.id, ca.index, ca.channels, ca.weight)
            np.testing.assert_array_equal(cb.feature_map, ca.feature_map)
            np.testing.assert_array_equal(cb.input_map, ca.input_map)


def _copy_with(folder: Path, target: Path, change) -> Path:
    import shutil

    shutil.copytree(folder, target)
    manifest = json.loads((target / "inv.json").read_text())
    change(manifest)
    (target / "inv.json").write_text(json.dumps(manifest))
    return target


def test_version_1_is_read_and_later_versions_are_refused(saved: tuple[InvExplanation, Path], tmp_path: Path) -> None:
    _, folder = saved

    def as_version_1(manifest: dict) -> None:
        manifest["format_version"] = 1
        del manifest["layer_choice"]
        for layer in manifest["layers"]:
            del layer["conv_position"]

    old = load_inv_explanation(_copy_with(folder, tmp_path / "v1", as_version_1))
    assert old.layer_choice is None and [layer.conv_position for layer in old.layers] == [None, None]
    future = _copy_with(folder, tmp_path / "v3", lambda m: m.update(format_version=3))
    with pytest.raises(ManifestError, match=r"format version 3, written by a newer convlens.*upgrade convlens"):
        load_inv_explanation(future)
    other = _copy_with(folder, tmp_path / "other", lambda m: m.update(format="something-else"))
    with pytest.raises(ManifestError, match="not a convlens INV manifest"):
        load_inv_explanation(other)
    escaping = _copy_with(folder, tmp_path / "escape",
                          lambda m: m["layers"][0]["files"].update(weights="../../etc/passwd"))
    with pytest.raises(ManifestError, match="outside the folder"):
        load_inv_explanation(escaping)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "inv.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_inv_explanation(tmp_path / "broken")


def test_save_replaces_only_an_inv_folder(saved: tuple[InvExplanation, Path], tmp_path: Path) -> None:
    explanation, _ = saved
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not written by convlens"):
        explanation.save(mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"] and (mine / "thesis.tex").is_file()
    target = tmp_path / "inv"
    explanation.save(target)
    explanation.save(target)  # an INV folder is replaced
    assert load_inv_explanation(target).image_id == explanation.image_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inv", "mine"]


# ------------------------------------------------------------------------------------- layer choice
def test_depth_rule_by_hand() -> None:
    from convlens.inv.layers import ConvLayer

    convs = [ConvLayer(f"c{i}", f"c{i}", 1, (1, 1), i) for i in range(13)]
    # 13 conv layers cut into 9 runs: the last of run i is ceil(13 (i + 1) / 9) - 1
    assert [c.position for c in choose_conv_layers(convs, "depth", 9)] == [1, 2, 4, 5, 7, 8, 10, 11, 12]
    assert [c.position for c in choose_conv_layers(convs, "tail", 9)] == list(range(4, 13))
    assert choose_conv_layers(convs, "depth", 13) == convs == choose_conv_layers(convs, "depth", 20)
    assert [c.position for c in choose_conv_layers(convs, "depth", 1)] == [12]
    with pytest.raises(ValueError, match="unknown layer rule"):
        choose_conv_layers(convs, "middle", 3)


def test_depth_on_vgg16_spans_all_five_blocks() -> None:
    import torchvision

    with torch.device("meta"):
        vgg = torchvision.models.vgg16(weights=None)
    vgg = vgg.to_empty(device="cpu").eval()
    layers, choice = INV(vgg, layers="depth").layer_choice((3, 224, 224))
    assert [layer.name for layer in layers] == [f"features.{i}" for i in (3, 6, 11, 13, 18, 20, 25, 27, 29)]
    assert [layer.spatial[0] for layer in layers] == [224, 112, 56, 56, 28, 28, 14, 14, 14]
    assert choice == {"rule": "depth", "num_layers": 9, "conv_layers": 13}
    tail, tail_choice = INV(vgg).layer_choice((3, 224, 224))  # default: the paper's last nine
    assert [layer.spatial[0] for layer in tail] == [56] * 3 + [28] * 3 + [14] * 3 and tail_choice["rule"] == "tail"


def test_depth_on_efficientnet_lite0_leaves_the_last_stage() -> None:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    convs = find_conv_layers(model, (3, 224, 224))
    assert len(convs) == 49
    tail = INV(model).explained_layers((3, 224, 224))
    depth = INV(model, layers="depth").explained_layers((3, 224, 224))
    assert {layer.spatial for layer in tail} == {(7, 7)}
    assert [layer.position for layer in depth] == [5, 10, 16, 21, 27, 32, 38, 43, 48]
    assert [layer.spatial[0] for layer in depth] == [56, 28, 14, 14, 14, 14, 7, 7, 7]


def test_load_inv_with_input_reads_the_model_view_or_names_what_is_missing(
    saved: tuple[InvExplanation, Path], tmp_path: Path
) -> None:
    import shutil

    from convlens.inv.reader import load_inv_with_input

    explanation, folder = saved
    loaded, pixels = load_inv_with_input(folder)
    assert loaded.image_sha256 == explanation.image_sha256 and [la.name for la in loaded.layers] == [
        la.name for la in explanation.layers]
    assert pixels.dtype == np.uint8 and pixels.shape == (16, 16, 3) and not pixels.any()  # the zeros saved
    no_input = tmp_path / "no-input"
    shutil.copytree(folder, no_input)
    (no_input / "input.png").unlink()
    with pytest.raises(ManifestError, match=r"no-input: no input.png"):
        load_inv_with_input(no_input)
    broken = _copy_with(folder, tmp_path / "broken", lambda m: m.update(format_version=99))
    with pytest.raises(ManifestError, match=r"broken: unreadable INV result"):
        load_inv_with_input(broken)
