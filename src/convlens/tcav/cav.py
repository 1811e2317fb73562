"""Concept activation vectors (CAVs) on Captum's ``captum.concept`` pieces, with caches that cannot go stale.

A CAV (Kim et al., ICML 2018, Sec. 3.2) is the normal v_C^l of a linear classifier that separates the
layer-l activations f_l(x) of a concept's images from those of a random set. This module provides

* :class:`ActivationStore` — f_l(x) for every *distinct* image (by content hash) and layer, computed
  once with Captum's :class:`~captum.attr.LayerActivation` (all layers in one forward per batch), when
  the first CAV that needs it is trained, and reused by every other; in memory, or spilled to ``.npy``
  memory maps in a directory.
  Captum's own TCAV stores activations per concept (``AV.save``) and recomputes them for every concept
  that repeats an image; ``reuse=False`` reproduces the no-cache cost for the benchmark.
* :class:`MiniBatchSGDClassifier` — a :class:`captum.concept.Classifier` with the same model as
  Captum's ``DefaultClassifier`` (sklearn ``SGDClassifier(alpha=0.01)``, hinge loss, i.e. a linear
  SVM trained by SGD) but trained one mini-batch at a time with ``partial_fit``: memory is one batch of
  activations, not the whole concept set (captum#930). Batches are sized to a byte budget.
* :class:`CAVCache` — trains CAVs and stores them with Captum's :class:`~captum.concept.CAV`
  (``save``/``load``) under ``save_path/<model id>/<concept ids>-<layer>.pkl``, where the model id
  holds a hash of the model's weights and buffers and of the classifier settings, and the concept ids
  are derived from the hash of each concept's image data (:attr:`ConceptSet.captum_id`). A changed
  concept image, model weight, layer or classifier setting therefore gives a different file: a stale CAV
  can never be reused (captum#776, where CAVs are keyed by the user's concept ids only).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from captum.attr import LayerActivation
from captum.concept import CAV, Classifier, Concept
from sklearn.linear_model import SGDClassifier
from torch import nn
from torch.utils.data import DataLoader, Dataset

from convlens.core.hooks import eval_mode
from convlens.tcav.concept_sets import ConceptSet

__all__ = ["ActivationStore", "CAVCache", "MiniBatchSGDClassifier", "cav_direction", "model_digest"]

BATCH_BYTES = 64 * 2**20  # float64 bytes of one classifier mini-batch


def model_digest(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and values of every parameter and buffer of ``model``."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


class ActivationStore:
    """Flattened layer activations f_l(x), computed once per distinct image and layer.

    Args:
        model: the network (used in eval mode).
        layers: dotted module names (as in ``model.named_modules()``).
        batch_size: images per forward.
        directory: spill activations to ``.npy`` memory maps in a fresh sub-directory of it
            (memory-safe for large layers; removed by :meth:`close`); ``None`` keeps them in memory.
        reuse: ``False`` recomputes a concept's activations every time they are asked for (the cost
            without an activation cache; nothing is stored).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        batch_size: int = 64,
        directory: str | os.PathLike[str] | None = None,
        reuse: bool = True,
    ) -> None:
        modules = dict(model.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(f"layers not found in {type(model).__name__}: {missing}")
        self.model = model
        self.layers = list(layers)
        self.batch_size = batch_size
        self.directory = Path(directory) if directory is not None else None
        self._spill: Path | None = None
        self.reuse = reuse
        self.images_forwarded = 0
        self.seconds = 0.0  # time spent in forward passes
        self._layer_act = LayerActivation(model, [modules[name] for name in self.layers])
        self._row_of: dict[str, int] = {}
        self._chunks: dict[str, list[np.ndarray]] = {layer: [] for layer in self.layers}
        self._chunk_starts: list[int] = []

    def forward(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """Activations (N, F) float32 per layer for ``images``, in batches (no caching)."""
        began = time.perf_counter()
        device = next(self.model.parameters(), torch.empty(0)).device
        out: dict[str, list[np.ndarray]] = {layer: [] for layer in self.layers}
        with eval_mode(self.model), torch.no_grad():
            for start in range(0, images.shape[0], self.batch_size):
                batch = images[start : start + self.batch_size].to(device)
                acts = self._layer_act.attribute(batch)
                acts = acts if isinstance(acts, list) else [acts]
                for layer, act in zip(self.layers, acts, strict=True):
                    out[layer].append(act.reshape(act.shape[0], -1).float().cpu().numpy())
        self.images_forwarded += int(images.shape[0])
        self.seconds += time.perf_counter() - began
        return {layer: np.concatenate(parts) for layer, parts in out.items()}

    def add(self, concepts: Sequence[ConceptSet]) -> None:
        """Compute and keep the activations of every image of ``concepts`` not seen before."""
        if not self.reuse:
            return
        new: dict[str, torch.Tensor] = {}
        for concept in concepts:
            for digest, image in zip(concept.image_digests, concept.images, strict=True):
                if digest not in self._row_of and digest not in new:
                    new[digest] = image
        if not new:
            return
        acts = self.forward(torch.stack(list(new.values())))
        start = len(self._row_of)
        self._chunk_starts.append(start)
        for layer, values in acts.items():
            self._chunks[layer].append(self._keep(layer, len(self._chunk_starts) - 1, values))
        for offset, digest in enumerate(new):
            self._row_of[digest] = start + offset

    def _keep(self, layer: str, chunk: int, values: np.ndarray) -> np.ndarray:
        if self.directory is None:
            return values
        if self._spill is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._spill = Path(tempfile.mkdtemp(prefix="activations-", dir=self.directory))
        path = self._spill / f"{hashlib.sha256(layer.encode()).hexdigest()[:12]}-{chunk}.npy"
        np.save(path, values)
        return np.load(path, mmap_mode="r")

    def rows(self, concept: ConceptSet) -> np.ndarray:
        """Store rows of ``concept``'s images (after :meth:`add`)."""
        try:
            return np.array([self._row_of[d] for d in concept.image_digests], dtype=np.int64)
        except KeyError:
            raise KeyError(f"activations of concept {concept.name!r} were not computed: call add() first") from None

    def gather(self, layer: str, rows: np.ndarray) -> np.ndarray:
        """Activations of ``rows`` at ``layer`` as an (len(rows), F) float32 array."""
        starts = np.asarray(self._chunk_starts)
        chunk_ids = np.searchsorted(starts, rows, side="right") - 1
        out = None
        for chunk in np.unique(chunk_ids):
            where = np.nonzero(chunk_ids == chunk)[0]
            values = self._chunks[layer][chunk][rows[where] - starts[chunk]]
            if out is None:
                out = np.empty((len(rows), values.shape[1]), dtype=np.float32)
            out[where] = values
        return out if out is not None else np.empty((0, 0), dtype=np.float32)

    def close(self) -> None:
        """Drop the kept activations and delete their memory-map files."""
        self._row_of.clear()
        self._chunk_starts.clear()
        self._chunks = {layer: [] for layer in self.layers}
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None


class _Batches(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Item b is mini-batch b: (activations, labels), gathered from the store on demand."""

    def __init__(self, fetch: Any, rows: np.ndarray, labels: np.ndarray, batch_rows: int) -> None:
        self.fetch, self.rows, self.labels, self.batch_rows = fetch, rows, labels, batch_rows

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_rows)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = slice(b * self.batch_rows, (b + 1) * self.batch_rows)
        return torch.from_numpy(self.fetch(self.rows[part])), torch.from_numpy(self.labels[part])


class MiniBatchSGDClassifier(Classifier):
    """Linear SVM trained by SGD on mini-batches: Captum's default CAV model without its memory peak.

    The model is sklearn's ``SGDClassifier(alpha, loss="hinge", learning_rate="optimal")`` — what
    ``captum.concept.DefaultClassifier`` fits (alpha 0.01, tol 1e-3, at most 1000 epochs) — updated
    with ``partial_fit`` one mini-batch at a time, so one epoch is the same per-sample SGD sweep as
    ``fit`` while only one batch of activations is in memory. Stopping follows ``fit``: stop after
    ``n_iter_no_change`` epochs whose mean training hinge loss (measured on each batch before its
    update) does not improve on the best by ``tol``. ``shuffle`` shuffles the rows within each batch
    (the batches themselves come in the loader's order; :class:`CAVCache` shuffles the rows once).

    ``train_and_eval(train_loader, test_dataloader=None, classes=None)`` returns ``{"accs": held-out
    accuracy}`` (NaN without a test loader); ``weights()`` is (C, F), one row per class in
    ``classes()`` order, binary problems as ``[-w, w]`` like Captum's default.
    """

    def __init__(
        self,
        alpha: float = 0.01,
        max_epochs: int = 1000,
        tol: float = 1e-3,
        n_iter_no_change: int = 5,
        test_split_ratio: float = 0.33,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if alpha <= 0 or max_epochs < 1 or n_iter_no_change < 1 or not 0 <= test_split_ratio < 1:
            raise ValueError("need alpha > 0, max_epochs >= 1, n_iter_no_change >= 1, 0 <= test_split_ratio < 1")
        self.alpha, self.max_epochs, self.tol = alpha, max_epochs, tol
        self.n_iter_no_change, self.test_split_ratio, self.seed = n_iter_no_change, test_split_ratio, seed
        self.shuffle = shuffle
        self.lm: SGDClassifier | None = None
        self.epochs = 0

    @property
    def cache_key(self) -> str:
        """The settings that change a trained CAV (part of the CAV cache key)."""
        return (
            f"sgd-hinge-a{self.alpha:g}-e{self.max_epochs}-t{self.tol:g}-n{self.n_iter_no_change}"
            f"-split{self.test_split_ratio:g}-sh{int(self.shuffle)}-s{self.seed}"
        )

    def _epoch(self, loader: DataLoader, classes: np.ndarray) -> float:
        assert self.lm is not None
        total, count = 0.0, 0
        for x, y in loader:
            xs, ys = x.numpy().astype(np.float64, copy=False), y.numpy()
            signs = np.where(ys == classes[1], 1.0, -1.0)
            margin = xs @ self.lm.coef_[0] + self.lm.intercept_[0] if hasattr(self.lm, "coef_") else np.zeros(len(ys))
            total += float(np.maximum(0.0, 1.0 - signs * margin).sum())  # hinge loss before the update
            count += len(ys)
            self.lm.partial_fit(xs, ys, classes=classes)
        return total / max(count, 1)

    def _fit_in_batches(self, dataloader: DataLoader, labels: np.ndarray) -> None:
        best, stale = math.inf, 0
        for epoch in range(1, self.max_epochs + 1):
            self.epochs = epoch
            loss = self._epoch(dataloader, labels)
            stale = stale + 1 if loss > best - self.tol else 0
            best = min(best, loss)
            if stale >= self.n_iter_no_change:
                break

    def train_and_eval(
        self,
        dataloader: DataLoader,
        test_dataloader: DataLoader | None = None,
        classes: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if classes is None:  # one extra pass over the labels only
            classes = np.unique(np.concatenate([y.numpy() for _, y in dataloader])).tolist()
        labels = np.array(sorted(classes))
        if len(labels) != 2:
            raise ValueError(f"a CAV separates two sets (concept vs random); got {len(labels)} classes")
        self.lm = SGDClassifier(
            alpha=self.alpha, loss="hinge", learning_rate="optimal", shuffle=self.shuffle,
            random_state=np.random.RandomState(self.seed),  # a stream: each call shuffles differently
        )
        self._fit_in_batches(dataloader, labels)
        if test_dataloader is None:
            return {"accs": math.nan, "epochs": self.epochs}
        right = total = 0
        for x, y in test_dataloader:
            right += int((self.lm.predict(x.numpy().astype(np.float64)) == y.numpy()).sum())
            total += len(y)
        return {"accs": right / max(total, 1), "epochs": self.epochs}

    def weights(self) -> torch.Tensor:
        if self.lm is None:
            raise RuntimeError("train the classifier first (train_and_eval)")
        coef = torch.from_numpy(self.lm.coef_.astype(np.float32))
        return torch.stack([-coef[0], coef[0]]) if coef.shape[0] == 1 else coef

    def classes(self) -> list[int]:
        if self.lm is None:
            raise RuntimeError("train the classifier first (train_and_eval)")
        return [int(c) for c in self.lm.classes_]


def cav_direction(cav: CAV, concept_id: int) -> np.ndarray:
    """The CAV row of ``concept_id``: the direction pointing towards that concept's activations."""
    stats = cav.stats or {}
    classes = [int(c) for c in np.asarray(stats["classes"]).tolist()]
    weights = stats["weights"]
    weights = weights.detach().cpu().numpy() if isinstance(weights, torch.Tensor) else np.asarray(weights)
    return weights[classes.index(concept_id)].astype(np.float32)


class CAVCache:
    """Train CAVs on stored activations and keep them on disk under content-derived keys.

    Args:
        store: activations of every concept and random set (:class:`ActivationStore`).
        classifier: a :class:`captum.concept.Classifier`; default :class:`MiniBatchSGDClassifier`.
        model_name: readable part of the model id; the id is ``<name>-<weights hash>-<classifier hash>``
            (:func:`model_digest` of ``store.model``, the classifier's ``cache_key``), so the CAV directory
            changes with any weight or buffer of the model and with the classifier settings.
        save_path: root directory of the CAV files; ``None`` keeps CAVs in memory only.
        seed: seed of the train/held-out split.
    """

    def __init__(
        self,
        store: ActivationStore,
        classifier: Classifier | None = None,
        model_name: str = "model",
        save_path: str | os.PathLike[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.store = store
        self.classifier = classifier if classifier is not None else MiniBatchSGDClassifier(seed=seed)
        key = getattr(self.classifier, "cache_key", type(self.classifier).__qualname__)
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name) or "model"
        self.model_id = f"{name}-{model_digest(store.model)[:16]}-{hashlib.sha256(str(key).encode()).hexdigest()[:8]}"
        self.save_path = str(save_path) if save_path is not None else None
        self.seed = seed
        self.trained = 0
        self.loaded = 0
        self._memory: dict[tuple[str, str, str], CAV] = {}
        if self.save_path is not None:
            CAV.create_cav_dir_if_missing(self.save_path, self.model_id)

    def path(self, concept: ConceptSet, other: ConceptSet, layer: str) -> str:
        """Where the CAV of ``concept`` vs ``other`` at ``layer`` is stored (Captum's layout)."""
        return CAV.assemble_save_path(self.save_path or "", self.model_id, self._concepts(concept, other), layer)

    @staticmethod
    def _concepts(concept: ConceptSet, other: ConceptSet) -> list[Concept]:
        if concept.digest == other.digest:
            raise ValueError(f"concept {concept.name!r} and {other.name!r} hold the same images")
        return [Concept(concept.captum_id, concept.name, None), Concept(other.captum_id, other.name, None)]

    def direction(self, concept: ConceptSet, other: ConceptSet, layer: str) -> tuple[np.ndarray, float]:
        """v_C^l for ``concept`` against ``other`` at ``layer`` and its held-out accuracy.

        The two sets are put in digest order before training, so ``direction(b, a)`` is the other row
        (``-v``) of the same binary CAV as ``direction(a, b)``: random-vs-random pairs train once.
        """
        first, second = sorted((concept, other), key=lambda s: s.digest)  # one CAV serves both directions
        key = (first.digest, second.digest, layer)
        if key not in self._memory:
            self._memory[key] = self._load(first, second, layer) or self._train(first, second, layer)
        cav = self._memory[key]
        return cav_direction(cav, concept.captum_id), float((cav.stats or {}).get("accs", math.nan))

    def _load(self, concept: ConceptSet, other: ConceptSet, layer: str) -> CAV | None:
        if self.save_path is None or not os.path.exists(self.path(concept, other, layer)):
            return None
        with warnings.catch_warnings():  # Captum's loader names numpy.core for torch's safe globals
            warnings.filterwarnings("ignore", message="numpy.core is deprecated", category=DeprecationWarning)
            cav = CAV.load(self.save_path, self.model_id, self._concepts(concept, other), layer)
        self.loaded += cav is not None
        return cav

    def _train(self, concept: ConceptSet, other: ConceptSet, layer: str) -> CAV:
        concepts = self._concepts(concept, other)
        train, test = self._loaders(concept, other, layer)
        kwargs: dict[str, Any] = {}
        if isinstance(self.classifier, MiniBatchSGDClassifier):
            kwargs = {"test_dataloader": test, "classes": sorted(c.id for c in concepts)}
        stats = self.classifier.train_and_eval(train, **kwargs) or {}
        classes = [int(c) for c in np.asarray(self.classifier.classes()).tolist()]
        weights = self.classifier.weights().detach().float().cpu()
        stats = {**stats, "weights": weights, "classes": classes}
        cav = CAV(concepts, layer, stats, self.save_path or "", self.model_id)
        if self.save_path is not None:
            _atomic_save(cav)
        self.trained += 1
        return cav

    def _loaders(self, concept: ConceptSet, other: ConceptSet, layer: str) -> tuple[DataLoader, DataLoader | None]:
        """Mini-batch loaders over the two sets' rows: a stratified held-out split, rows shuffled once."""
        split = getattr(self.classifier, "test_split_ratio", 0.0)
        rng = np.random.default_rng([self.seed, concept.captum_id, other.captum_id])
        fetch, rows = self._source(concept, other, layer)
        train_parts, test_parts = [], []
        for label, part in ((concept.captum_id, rows[0]), (other.captum_id, rows[1])):
            part = rng.permutation(part)
            n_test = int(split * len(part))
            train_parts.append((part[n_test:], label))
            test_parts.append((part[:n_test], label))
        train_rows, train_labels = _stack(train_parts, rng)
        test_rows, test_labels = _stack(test_parts, rng)
        batch = max(1, min(256, BATCH_BYTES // (8 * max(1, fetch(train_rows[:1]).shape[1]))))
        train = DataLoader(_Batches(fetch, train_rows, train_labels, batch), batch_size=None)
        test = DataLoader(_Batches(fetch, test_rows, test_labels, batch), batch_size=None) if len(test_rows) else None
        return train, test

    def _source(self, concept: ConceptSet, other: ConceptSet, layer: str) -> tuple[Any, tuple[np.ndarray, np.ndarray]]:
        if self.store.reuse:  # lazily: a run whose CAVs are all cached forwards no image
            self.store.add([concept, other])
            return (lambda rows: self.store.gather(layer, rows)), (self.store.rows(concept), self.store.rows(other))
        values = self.store.forward(torch.cat([concept.images, other.images]))[layer]
        return (lambda rows: values[rows]), (np.arange(concept.size), concept.size + np.arange(other.size))


def _stack(parts: list[tuple[np.ndarray, int]], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    rows = np.concatenate([p for p, _ in parts]).astype(np.int64)
    labels = np.concatenate([np.full(len(p), label, dtype=np.int64) for p, label in parts])
    order = rng.permutation(len(rows))
    return rows[order], labels[order]


def _atomic_save(cav: CAV) -> None:
    """``CAV.save`` into a temporary directory, then an atomic rename: a killed run leaves no half-written
    CAV file that a later run would try to load."""
    final = CAV.assemble_save_path(cav.save_path, cav.model_id, cav.concepts, cav.layer)
    tmp_root = tempfile.mkdtemp(dir=cav.save_path, prefix=".tmp-")
    try:
        CAV.create_cav_dir_if_missing(tmp_root, cav.model_id)
        CAV(cav.concepts, cav.layer, cav.stats, tmp_root, cav.model_id).save()
        os.replace(CAV.assemble_save_path(tmp_root, cav.model_id, cav.concepts, cav.layer), final)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
