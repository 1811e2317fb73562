"""The public surface: what ``import convlens`` offers, lazily, and the ``__all__`` of the packages a user
imports from in the README (pinned here so that a helper does not slip into them unnoticed)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import convlens

SURFACES = {
    "convlens.models": {
        "IMAGENET_PREPROCESSING", "ImageLoadError", "LoadedModel", "Preprocessing", "available_models",
        "imagenet_class_names", "load", "load_image", "load_state_dict", "register_model", "wrap",
    },
    "convlens.runners": {
        "EvaluationConfig", "EvaluationResult", "ExplainConfig", "ExplainError", "ExplainResult", "ResultsStore",
        "run_evaluation", "run_explain",
    },
}
INV_SURFACE = {
    "FORMAT_VERSION", "INV", "INVParams", "InvCluster", "InvExplanation", "InvLayer", "ManifestError",
    "load_inv_explanation",
}


def test_import_convlens_is_cheap_and_exports_resolve_lazily() -> None:
    code = "import convlens, sys; print(sorted(m for m in ('torch', 'numpy', 'timm') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    for name in convlens.__all__:
        value = getattr(convlens, name)
        if name != "__version__":
            module = importlib.import_module(convlens._EXPORTS[name])
            assert value is getattr(module, name) and name in module.__all__
    assert set(dir(convlens)) >= set(convlens.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        convlens.nope  # noqa: B018


@pytest.mark.parametrize("package", sorted(SURFACES))
def test_package_surfaces(package: str) -> None:
    module = importlib.import_module(package)
    assert set(module.__all__) == SURFACES[package]
    assert all(hasattr(module, name) for name in module.__all__)


def test_inv_surface_the_study_server_reads() -> None:
    concepts = importlib.import_module("convlens.inv")
    assert set(concepts.__all__) >= INV_SURFACE  # other concept tools (TCAV, labels) add their own names
    assert not [name for name in concepts.__all__ if name.startswith("_")]
    for building_block in ("cluster_feature_maps", "channel_weights", "find_conv_layers", "minmax_rows"):
        assert building_block not in concepts.__all__
