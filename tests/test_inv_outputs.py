"""INV's outputs: saved files and their round trip, the layer-by-layer page, INV in the explain pipeline,
and the real pretrained model end to end."""

from __future__ import annotations

import html.parser
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from convlens.inv import INV, load_inv_explanation
from convlens.inv.manifest import image_digest
from convlens.inv.report import render_inv_page

TINY_LAYERS = ["block1.2", "block2.2", "block3.1"]  # post-ReLU outputs of TinyCNN's three convs


class _LinkParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.headings: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        self._in_h2 = self._in_h2 or tag == "h2"

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.headings.append(data)


def test_save_load_roundtrip_and_page(tmp_path: Path, tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    names = ["<script>alert(1)</script>", "b", "c", "d", "e"]
    x = tiny_images[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        explanation = INV(tiny_cnn, class_names=names).explain(x, target=0)
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    manifest_path = explanation.save(tmp_path / "inv", image=image)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["image_sha256"] == image_digest(x) and manifest["image_id"] == image_digest(x)[:16]
    loaded = load_inv_explanation(tmp_path / "inv")
    assert loaded.target == 0 and loaded.target_name == names[0]
    for a, b in zip(explanation.layers, loaded.layers, strict=True):
        np.testing.assert_array_equal(a.weights, b.weights)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert [c.id for c in a.clusters] == [c.id for c in b.clusters]
        for ca, cb in zip(a.clusters, b.clusters, strict=True):
            np.testing.assert_array_equal(ca.feature_map, cb.feature_map)
            np.testing.assert_array_equal(ca.input_map, cb.input_map)
            assert (ca.channels, ca.weight) == (cb.channels, cb.weight)
    ids = [c["id"] for layer in manifest["layers"] for c in layer["clusters"]]
    assert len(set(ids)) == len(ids) and all(i.startswith(manifest["image_id"] + ":") for i in ids)
    assert loaded.cluster(ids[0]).id == ids[0]

    page = render_inv_page(tmp_path / "inv")
    text = page.read_text()
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    parser = _LinkParser()
    parser.feed(text)
    assert parser.images and all((tmp_path / "inv" / src).is_file() for src in parser.images)
    headings = " ".join(parser.headings)
    positions = [headings.index(name) for name in TINY_LAYERS]
    assert positions == sorted(positions)  # layers low -> high
    for layer in manifest["layers"]:  # every kept cluster shows its weight, heaviest first
        shown = [text.index(f"w = {c['weight']:.2f} %") for c in layer["clusters"]]
        assert shown == sorted(shown)
    with pytest.raises(FileNotFoundError):
        load_inv_explanation(tmp_path)


def test_runner_inv_params_and_image_record(tmp_path: Path, tiny_cnn: nn.Module) -> None:
    """INV in the explain pipeline: --param items checked by INVParams, one image explained into a folder."""
    from PIL import Image

    from convlens.models import wrap
    from convlens.models.preprocessing import Preprocessing
    from convlens.runners.explain_image import ImageSettings, explain_image
    from convlens.runners.explain_methods import build_explainers, parse_method_params

    per_method = parse_method_params(["inv.seed=3", "gradcam.score=softmax", "embedding=pca"], ["gradcam", "inv"])
    assert per_method == {"gradcam": {"score": "softmax"}, "inv": {"seed": 3, "embedding": "pca"}}
    with pytest.raises(ValueError, match="no selected method accepts 'nope'"):
        parse_method_params(["inv.nope=1"], ["inv"])
    with pytest.raises(ValueError, match=r"inv.perplexity: must be > 0"):
        parse_method_params(["inv.perplexity=0"], ["inv"])

    loaded = wrap(tiny_cnn, Preprocessing(size=32, resize=32), class_names=list("abcde"), name="tiny")
    with pytest.raises(ValueError, match=r"inv: .*embedding"):
        build_explainers(loaded, ["inv"], {"inv": {"embedding": "umap"}}, None, 8)
    explainers = build_explainers(loaded, ["inv"], {"inv": {"embedding": "pca"}}, "block2.2,block3.1", 8)
    path = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(1).random((40, 48, 3)) * 255).astype(np.uint8)).save(path)
    folder = tmp_path / "out"
    folder.mkdir()
    record = explain_image(path, loaded, explainers, ImageSettings(None, "h"), folder)
    inv_record = record["results"][0]
    assert (folder / inv_record["page"]).is_file() and (folder / inv_record["files"]["overlay"]).is_file()
    assert all((folder / block["file"]).is_file() for block in inv_record["block_images"])
    manifest = json.loads((folder / "inv" / "inv.json").read_text())
    assert manifest["image_sha256"] == image_digest(path)  # ids start with the image FILE's hash
    assert [layer["name"] for layer in manifest["layers"]] == ["block2.2", "block3.1"]
    assert manifest["layer_choice"]["rule"] == "explicit"


@pytest.mark.slow
def test_efficientnet_lite0_chelsea_end_to_end(tmp_path: Path) -> None:
    """Real model: the cat is predicted, the last two layers' clusters are valid, weights cross-checked."""
    import skimage.data
    from PIL import Image
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

    from convlens.models import load

    loaded = load("efficientnet_lite0")
    image = Image.fromarray(skimage.data.chelsea())
    x = loaded.preprocessing(image)[None]
    inv = INV(loaded, num_layers=2, weighting="gradcam")
    explanation = inv.explain(x)
    assert "cat" in (explanation.target_name or "")
    assert [layer.name for layer in explanation.layers] == ["blocks.6.0.bn3", "bn2"]
    model = loaded.module
    grabber = ActivationsAndGradients(model, [model.get_submodule("bn2")], None)
    output = grabber(x)
    model.zero_grad()
    output[0, explanation.target].backward()
    grad = grabber.gradients[0].numpy().copy()
    grabber.release()
    np.testing.assert_allclose(explanation.layer("bn2").alpha, grad[0].mean(axis=(1, 2)), rtol=1e-3, atol=1e-7)
    for layer in explanation.layers:
        assert 3 <= layer.n_clusters <= 8 and layer.clusters
        assert abs(layer.weights.sum() - 100) < 1e-6
    explanation.save(tmp_path / "inv", image=loaded.preprocessing.display(image))
    page = render_inv_page(tmp_path / "inv", class_names=loaded.class_names).read_text()
    assert explanation.target_name in page and page.count('class="id"') >= len(explanation.clusters)


@pytest.mark.slow
def test_explain_command_with_inv_links_the_layer_page(tmp_path: Path) -> None:
    """``convlens explain IMAGE --method gradcam,inv --layers bn2``: both results, INV page linked."""
    import skimage.data
    from PIL import Image

    from convlens.runners.explain import ExplainConfig, run_explain

    image = tmp_path / "cat.png"
    Image.fromarray(skimage.data.chelsea()).save(image)
    config = ExplainConfig(
        inputs=[str(image)], methods=["gradcam", "inv"], layers="bn2", out=tmp_path / "out",
        params=["inv.embedding=pca"],
    )
    assert run_explain(config).exit_code == 0
    record = json.loads((tmp_path / "out" / "cat" / "result.json").read_text())
    methods = [r["method"] for r in record["results"]]
    assert methods == ["gradcam", "inv"]
    inv_record = record["results"][1]
    page = tmp_path / "out" / "cat" / inv_record["page"]
    assert page.is_file() and "bn2" in page.read_text()
    index = (tmp_path / "out" / "index.html").read_text()
    assert f'href="cat/{inv_record["page"]}"' in index
    manifest = json.loads((tmp_path / "out" / "cat" / "inv" / "inv.json").read_text())
    assert manifest["image_sha256"] == image_digest(image) and manifest["params"]["embedding"] == "pca"
