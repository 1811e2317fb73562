"""Concept activation vectors (CAVs) on Captum's ``captum.concept`` pieces, with caches that cannot go stale.

A CAV (Kim et al., ICML 2018, Sec. 3.2) is the normal v_C^l of a linear classifier that separates the
layer-l activations f_l(x) of a concept's images from those of a random set. This module provides

* :class:`ActivationStore` — f_l(x) for every *distinct* image (by content hash) and layer, computed
  once with Captum's :class:`~captum.attr.LayerActivation` (all layers in one forward per batch), when
  the first CAV that needs it is trained, and reused by every other; in memory, or spilled to ``.npy``
  memory maps in a directory. ``reuse=False`` forwards the images of every solve again (the cost
  without an activation cache, for the benchmark).
* :class:`CAVCache` — trains CAVs with :class:`~convlens.tcav.solver.LinearSVM` (every missing pair of
  a layer and pair of sizes in one batched, deterministic solve) or with any
  :class:`captum.concept.Classifier`, and stores them as Captum's CAV files (``CAV.load`` reads them)
  under ``save_path/<model id>/<concept ids>-<layer>.pkl``, where the model id holds a hash of the
  model's weights and buffers and of the classifier settings, and the concept ids are derived from the
  hash of each concept's image data (:attr:`ConceptSet.captum_id`). A changed concept image, model
  weight, layer or classifier setting therefore gives a different file: a stale CAV can never be reused
  (captum#776, where CAVs are keyed by the user's concept ids only).
* :class:`MiniBatchSGDClassifier` — Captum's ``DefaultClassifier`` model (sklearn ``SGDClassifier``,
  hinge loss, alpha 0.01) trained one mini-batch at a time with ``partial_fit`` (captum#930): the
  solver convlens used before the batched one, kept for comparison (``classifier=``).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import tempfile
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from captum.attr import LayerActivation
from captum.concept import CAV, Classifier, Concept
from sklearn.linear_model import SGDClassifier
from torch import nn
from torch.utils.data import DataLoader, Dataset

from convlens.core.files import temporary_name
from convlens.core.hooks import eval_mode
from convlens.tcav.concept_sets import ConceptSet
from convlens.tcav.solver import LinearSVM

__all__ = ["ActivationStore", "CAVCache", "MiniBatchSGDClassifier", "cav_direction", "model_digest"]

BATCH_BYTES = 64 * 2**20  # float64 bytes of one classifier mini-batch
GRAM_CHUNK = 2**23  # float64 values of activations converted at a time (64 MiB)
MEMORY_BYTES = 256 * 2**20  # CAVs kept in memory
GRAM_BYTES = 512 * 2**20  # Gram matrices kept, all layers together


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
    """Train CAVs on stored activations, in batches, and keep them on disk under content-derived keys.

    Args:
        store: activations of every concept and random set (:class:`ActivationStore`).
        classifier: the CAV trainer: :class:`~convlens.tcav.solver.LinearSVM` (default; every missing CAV
            of a layer and pair of sizes in one batched, deterministic solve) or any
            :class:`captum.concept.Classifier` (one CAV at a time, e.g. :class:`MiniBatchSGDClassifier`).
        model_name: readable part of the model id; the id is ``<name>-<weights hash>-<classifier hash>``
            (:func:`model_digest` of ``store.model``, the classifier's ``cache_key``), so the CAV directory
            changes with any weight or buffer of the model and with the classifier settings.
        save_path: root directory of the CAV files; ``None`` keeps CAVs in memory only.
        seed: seed of the train/held-out split of a Captum classifier (the default trainer uses none).
        device: where the batched solve runs (default: the model's device).
        memory_bytes: CAVs kept in memory (least recently used dropped first).
        background_writes: write the CAV files on a background thread (call :meth:`close` at the end);
            ``False``: each file is written before :meth:`directions` returns.

    A file that cannot be read back (cut short, corrupted, another layout) is recomputed with a warning.
    """

    def __init__(
        self,
        store: ActivationStore,
        classifier: Classifier | LinearSVM | None = None,
        model_name: str = "model",
        save_path: str | os.PathLike[str] | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        memory_bytes: int = MEMORY_BYTES,
        background_writes: bool = False,
    ) -> None:
        self.store = store
        self.classifier = classifier if classifier is not None else LinearSVM()
        key = getattr(self.classifier, "cache_key", type(self.classifier).__qualname__)
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name) or "model"
        self.model_id = f"{name}-{model_digest(store.model)[:16]}-{hashlib.sha256(str(key).encode()).hexdigest()[:8]}"
        self.save_path = str(save_path) if save_path is not None else None
        self.seed = seed
        self.device = torch.device(device) if device is not None else _model_device(store.model)
        self.memory_bytes = memory_bytes
        self.trained = 0
        self.loaded = 0
        self.recomputed = 0  # unreadable cache files trained again
        self.solves = 0  # batched solves (or single Captum fits)
        self._memory: OrderedDict[tuple[str, str, str], tuple[np.ndarray, float]] = OrderedDict()
        self._held = 0
        self._grams = _Grams(self.device, GRAM_BYTES)
        self._writer = _Writer(limit=512 if background_writes else 0)
        if self.save_path is not None:
            CAV.create_cav_dir_if_missing(self.save_path, self.model_id)

    def close(self) -> None:
        """Wait until every CAV file is written (they are written in the background); raises a write error."""
        self._writer.close()

    def path(self, concept: ConceptSet, other: ConceptSet, layer: str) -> str:
        """Where the CAV of ``concept`` vs ``other`` at ``layer`` is stored (Captum's layout)."""
        first, second = _ordered(concept, other)
        return CAV.assemble_save_path(self.save_path or "", self.model_id, _concepts(first, second), layer)

    def direction(self, concept: ConceptSet, other: ConceptSet, layer: str) -> tuple[np.ndarray, float]:
        """v_C^l for ``concept`` against ``other`` at ``layer`` and its held-out accuracy.

        ``direction(b, a)`` is ``-v`` of the same binary CAV as ``direction(a, b)``: a pair trains once.
        """
        directions, accuracies = self.directions([(concept, other)], layer)
        return directions[0], float(accuracies[0])

    def directions(
        self, pairs: Sequence[tuple[ConceptSet, ConceptSet]], layer: str, *, accuracy: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """CAVs of every (concept, other) pair at ``layer`` as a (K, F) float32 array, each row pointing
        towards its pair's first set, and their held-out accuracies (K,): from memory, from the disk
        cache, or trained (all missing pairs of equal sizes in one solve). ``accuracy=False``: the
        accuracies may be NaN (the random-vs-random CAVs of the null need none; k fewer fits each)."""
        ordered = [_ordered(concept, other) for concept, other in pairs]
        found: dict[tuple[str, str], tuple[np.ndarray, float]] = {}
        missing: dict[tuple[str, str], tuple[ConceptSet, ConceptSet]] = {}
        for first, second in ordered:
            key = (first.digest, second.digest)
            if key in found or key in missing:
                continue
            entry = self._recall((*key, layer)) or self._load(first, second, layer)
            if entry is not None and accuracy and math.isnan(entry[1]):
                entry = None  # trained for a null without its held-out accuracy: trained again with it
            if entry is None:
                missing[key] = (first, second)
            else:
                found[key] = entry
        if missing:
            found.update(self._train(list(missing.values()), layer, accuracy))
        if not pairs:
            return np.empty((0, 0), dtype=np.float32), np.empty(0)
        rows, accuracies = [], []
        for (concept, _), (first, second) in zip(pairs, ordered, strict=True):
            vector, held_out = found[(first.digest, second.digest)]
            rows.append(vector if concept is first else -vector)
            accuracies.append(held_out)
        return np.stack(rows), np.asarray(accuracies, dtype=float)

    def _recall(self, key: tuple[str, str, str]) -> tuple[np.ndarray, float] | None:
        entry = self._memory.get(key)
        if entry is not None:
            self._memory.move_to_end(key)
        return entry

    def _remember(self, key: tuple[str, str, str], entry: tuple[np.ndarray, float]) -> None:
        if entry[0].nbytes > self.memory_bytes:
            return
        if key in self._memory:
            self._held -= self._memory.pop(key)[0].nbytes
        self._memory[key] = entry
        self._held += entry[0].nbytes
        while self._held > self.memory_bytes:
            _, (vector, _) = self._memory.popitem(last=False)
            self._held -= vector.nbytes

    def _load(self, first: ConceptSet, second: ConceptSet, layer: str) -> tuple[np.ndarray, float] | None:
        if self.save_path is None:
            return None
        path = self.path(first, second, layer)
        pending = self._writer.pending.get(path)  # trained in this run, its file not written yet
        if pending is not None:
            self.loaded += 1
            return _read_entry(pending, first, second, layer)
        if not os.path.exists(path):
            return None
        try:
            entry = _read_entry(torch.load(path, map_location="cpu", weights_only=True), first, second, layer)
        except Exception as exc:  # whatever a damaged cache file raises, the CAV is trained again
            shown = Path(path).relative_to(Path(self.save_path).parent)  # cavs/<model id>/<file>: where it was
            warnings.warn(f"CAV cache file {shown} cannot be read ({type(exc).__name__}: {exc}); trained again",
                          UserWarning, stacklevel=3)
            self.recomputed += 1
            return None
        self.loaded += 1
        self._remember((first.digest, second.digest, layer), entry)
        return entry

    def _train(
        self, pairs: list[tuple[ConceptSet, ConceptSet]], layer: str, accuracy: bool
    ) -> dict[tuple[str, str], tuple[np.ndarray, float]]:
        if not isinstance(self.classifier, LinearSVM):
            return {(a.digest, b.digest): self._train_one(a, b, layer) for a, b in pairs}
        by_sizes: dict[tuple[int, int], list[tuple[ConceptSet, ConceptSet]]] = {}
        for first, second in pairs:
            by_sizes.setdefault((first.size, second.size), []).append((first, second))
        trained: dict[tuple[str, str], tuple[np.ndarray, float]] = {}
        for group in by_sizes.values():
            trained.update(self._train_batch(group, layer, accuracy))
        return trained

    def _train_batch(
        self, pairs: list[tuple[ConceptSet, ConceptSet]], layer: str, accuracy: bool
    ) -> dict[tuple[str, str], tuple[np.ndarray, float]]:
        """One solve for pairs of equal sizes: Gram matrix of their rows, batched Newton, directions."""
        assert isinstance(self.classifier, LinearSVM)
        fetch, first_rows, second_rows = self._rows(pairs, layer)
        rows = np.concatenate([first_rows, second_rows], 1)
        if self.store.reuse:  # store rows: inner products computed once per layer and run
            gram, position = self._grams.over(layer, rows, fetch)
            local = torch.from_numpy(position[rows]).to(self.device)
        else:
            used, inverse = np.unique(rows, return_inverse=True)
            gram, local = _gram(fetch(used), self.device), torch.from_numpy(inverse.reshape(rows.shape)).to(self.device)
        split = first_rows.shape[1]
        fit = self.classifier.fit(gram, local[:, :split], local[:, split:], cross_validate=accuracy)
        used, inverse = np.unique(rows, return_inverse=True)
        coef = torch.zeros(len(pairs), len(used), dtype=torch.float64, device=self.device)
        coef.scatter_add_(1, torch.from_numpy(inverse.reshape(rows.shape)).to(self.device), fit.coef)  # w = sum c_i x_i
        vectors = _times_rows(coef, fetch(used), self.device)
        accuracies = fit.accuracy.cpu().numpy()
        self.solves += 1
        trained = {}
        for k, (first, second) in enumerate(pairs):
            entry = (vectors[k], float(accuracies[k]))
            extra = {"iterations": fit.iterations, "intercept": float(fit.intercept[k])}
            self._store(first, second, layer, entry, extra)
            trained[(first.digest, second.digest)] = entry
        return trained

    def _rows(
        self, pairs: list[tuple[ConceptSet, ConceptSet]], layer: str
    ) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray, np.ndarray]:
        """Activations source and (K, s), (K, t) rows of the pairs' sets in it."""
        sets = list({s.digest: s for pair in pairs for s in pair}.values())
        if self.store.reuse:  # lazily: a run whose CAVs are all cached forwards no image
            self.store.add(sets)
            return (lambda rows: self.store.gather(layer, rows),
                    np.stack([self.store.rows(a) for a, _ in pairs]), np.stack([self.store.rows(b) for _, b in pairs]))
        starts = np.cumsum([0] + [s.size for s in sets])
        where = {s.digest: np.arange(starts[i], starts[i + 1]) for i, s in enumerate(sets)}
        values = self.store.forward(torch.cat([s.images for s in sets]))[layer]
        return (lambda rows: values[rows]), np.stack([where[a.digest] for a, _ in pairs]), \
            np.stack([where[b.digest] for _, b in pairs])

    def _store(self, first: ConceptSet, second: ConceptSet, layer: str, entry: tuple[np.ndarray, float],
               extra: dict[str, Any]) -> None:
        self.trained += 1
        self._remember((first.digest, second.digest, layer), entry)
        if self.save_path is not None:
            self._writer.submit(self.path(first, second, layer), _entry_file(first, second, layer, entry, extra))

    def _train_one(self, first: ConceptSet, second: ConceptSet, layer: str) -> tuple[np.ndarray, float]:
        """A Captum classifier's CAV (one pair, its own train/held-out split)."""
        train, test = self._loaders(first, second, layer)
        kwargs: dict[str, Any] = {}
        if isinstance(self.classifier, MiniBatchSGDClassifier):
            kwargs = {"test_dataloader": test, "classes": sorted((first.captum_id, second.captum_id))}
        stats = self.classifier.train_and_eval(train, **kwargs) or {}
        classes = [int(c) for c in np.asarray(self.classifier.classes()).tolist()]
        weights = self.classifier.weights().detach().float().cpu().numpy()
        vector = weights[classes.index(first.captum_id)].astype(np.float32)
        accuracy = stats.get("accs", math.nan)
        entry = (vector, float(accuracy.item() if isinstance(accuracy, torch.Tensor) else accuracy))
        self.solves += 1
        self._store(first, second, layer, entry, {})
        return entry

    def _loaders(self, concept: ConceptSet, other: ConceptSet, layer: str) -> tuple[DataLoader, DataLoader | None]:
        """Mini-batch loaders over the two sets' rows: a stratified held-out split, rows shuffled once."""
        split = getattr(self.classifier, "test_split_ratio", 0.0)
        rng = np.random.default_rng([self.seed, concept.captum_id, other.captum_id])
        fetch, first_rows, second_rows = self._rows([(concept, other)], layer)
        train_parts, test_parts = [], []
        for label, part in ((concept.captum_id, first_rows[0]), (other.captum_id, second_rows[0])):
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


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _ordered(concept: ConceptSet, other: ConceptSet) -> tuple[ConceptSet, ConceptSet]:
    """The two sets in digest order: one CAV serves both directions of a pair."""
    if concept.digest == other.digest:
        raise ValueError(f"concept {concept.name!r} and {other.name!r} hold the same images")
    return (concept, other) if concept.digest < other.digest else (other, concept)


def _concepts(first: ConceptSet, second: ConceptSet) -> list[Concept]:
    return [Concept(first.captum_id, first.name, None), Concept(second.captum_id, second.name, None)]


def _gram(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """X X^T in float64, accumulated over column chunks (memory: one chunk in float64)."""
    rows, columns = values.shape
    gram = torch.zeros(rows, rows, dtype=torch.float64, device=device)
    step = max(1, GRAM_CHUNK // max(1, rows))
    for start in range(0, columns, step):
        part = torch.from_numpy(np.ascontiguousarray(values[:, start : start + step])).to(device, torch.float64)
        gram += part @ part.T
    return gram


def _times_rows(coef: torch.Tensor, values: np.ndarray, device: torch.device) -> np.ndarray:
    """``coef @ X`` in float64, stored as float32 (K, F) (the CAV file's precision), over column chunks: a CAV
    trained alone or in a batch rounds to the same float32 values."""
    out = np.empty((coef.shape[0], values.shape[1]), dtype=np.float32)
    step = max(1, GRAM_CHUNK // max(1, values.shape[0]))
    for start in range(0, values.shape[1], step):
        part = torch.from_numpy(np.ascontiguousarray(values[:, start : start + step])).to(device, torch.float64)
        out[:, start : start + step] = (coef @ part).float().cpu().numpy()
    return out


class _Grams:
    """X X^T (float64) over the activation-store rows seen so far, per layer, grown block by block: the
    solves of a class (its null, then its concepts) and of the classes sharing a random pool compute each
    inner product once. Past ``max_bytes`` in all, the least recently used layers' matrices are dropped (and
    a layer that alone would exceed it starts afresh with the rows asked for)."""

    def __init__(self, device: torch.device, max_bytes: int) -> None:
        self.device, self.max_bytes = device, max_bytes
        self._rows: dict[str, np.ndarray] = {}
        self._matrix: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._position: dict[str, np.ndarray] = {}

    def over(self, layer: str, rows: np.ndarray, fetch: Callable[[np.ndarray], np.ndarray]) -> tuple[
        torch.Tensor, np.ndarray
    ]:
        """The layer's Gram matrix and, indexed by store row, each row's position in it (-1: not in it)."""
        known = self._rows.get(layer, np.empty(0, dtype=np.int64)) if layer in self._matrix else np.empty(0, np.int64)
        new = np.setdiff1d(np.unique(rows), known)
        if 8 * (len(known) + len(new)) ** 2 > self.max_bytes:
            known, new = np.empty(0, dtype=np.int64), np.unique(rows)
        if len(new) or layer not in self._matrix:
            previous = self._matrix.pop(layer, None)
            matrix = _grown(previous if len(known) else None, fetch(known), fetch(new), self.device)
            while self._matrix and 8 * (sum(m.shape[0] ** 2 for m in self._matrix.values()) + matrix.shape[0] ** 2) \
                    > self.max_bytes:
                self._matrix.popitem(last=False)
            self._matrix[layer] = matrix
            known = np.concatenate([known, new])
            position = np.full(int(known.max()) + 1, -1, dtype=np.int64)
            position[known] = np.arange(len(known))
            self._rows[layer], self._position[layer] = known, position
        self._matrix.move_to_end(layer)
        return self._matrix[layer], self._position[layer]


def _grown(matrix: torch.Tensor | None, old: np.ndarray, new: np.ndarray, device: torch.device) -> torch.Tensor:
    """[[old old^T, old new^T], [new old^T, new new^T]] from the first block (``matrix``) and the rows."""
    if matrix is None:
        return _gram(new, device)
    cross = torch.zeros(len(new), len(old), dtype=torch.float64, device=device)
    step = max(1, GRAM_CHUNK // max(1, len(old) + len(new)))
    for start in range(0, new.shape[1], step):
        part_new = torch.from_numpy(np.ascontiguousarray(new[:, start : start + step])).to(device, torch.float64)
        part_old = torch.from_numpy(np.ascontiguousarray(old[:, start : start + step])).to(device, torch.float64)
        cross += part_new @ part_old.T
    return torch.cat([torch.cat([matrix, cross.T], 1), torch.cat([cross, _gram(new, device)], 1)], 0)


def _entry_file(first: ConceptSet, second: ConceptSet, layer: str, entry: tuple[np.ndarray, float],
                extra: dict[str, Any]) -> dict[str, Any]:
    """Captum's CAV file content (``CAV.save``): weights one row per class id, in ``classes`` order."""
    vector, accuracy = entry
    classes = sorted((first.captum_id, second.captum_id))
    rows = [vector if c == first.captum_id else -vector for c in classes]
    return {
        "concept_ids": [first.captum_id, second.captum_id], "concept_names": [first.name, second.name],
        "layer": layer,
        "stats": {"weights": torch.from_numpy(np.stack(rows)), "classes": classes, "accs": accuracy, **extra},
    }


def _read_entry(data: Any, first: ConceptSet, second: ConceptSet, layer: str) -> tuple[np.ndarray, float]:
    """The direction towards ``first`` and the accuracy from a CAV file's content; ValueError if it is not one."""
    if not isinstance(data, dict) or data.get("layer") != layer or not isinstance(data.get("stats"), dict):
        raise ValueError("not a CAV file of this layer")
    stats = data["stats"]
    classes = [int(c) for c in stats.get("classes", [])]
    weights = stats.get("weights")
    if sorted(classes) != sorted((first.captum_id, second.captum_id)) or not isinstance(weights, torch.Tensor):
        raise ValueError("the file holds another pair of concepts")
    weights = weights.detach().float().numpy()
    if weights.shape[0] != 2 or weights.ndim != 2 or not np.isfinite(weights).all():
        raise ValueError(f"weights of shape {tuple(weights.shape)} or not finite")
    accuracy = stats.get("accs", math.nan)
    return weights[classes.index(first.captum_id)].copy(), float(accuracy)


def _serialised(content: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


def _write(path: str, content: dict[str, Any]) -> None:
    """Write a CAV file: a temporary file renamed into place, so a killed run never leaves a half-written
    file under a CAV's name. No fsync: a cache file lost to a crash is trained again."""
    final = Path(path)
    tmp = final.with_name(temporary_name(suffix=".tmp"))
    try:
        tmp.write_bytes(_serialised(content))
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _Writer:
    """Writes CAV files on one background thread while the solves go on (file creation is slow on a busy
    disk; a thread waiting on it holds no core), at most ``limit`` files pending (0: written at once).
    :meth:`close` waits for them and raises the first error."""

    def __init__(self, limit: int = 512) -> None:
        self.limit = limit
        self.pending: dict[str, dict[str, Any]] = {}  # path -> content, until its file is written
        self._pool: ThreadPoolExecutor | None = None
        self._futures: deque[Future[None]] = deque()

    def submit(self, path: str, content: dict[str, Any]) -> None:
        if self.limit == 0:
            _write(path, content)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convlens-cav-writer")
        while len(self._futures) >= self.limit:
            self._futures.popleft().result()
        self.pending[path] = content
        self._futures.append(self._pool.submit(self._write, path, content))

    def _write(self, path: str, content: dict[str, Any]) -> None:
        try:
            _write(path, content)
        finally:
            if self.pending.get(path) is content:
                del self.pending[path]

    def close(self) -> None:
        try:
            while self._futures:
                self._futures.popleft().result()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None


def _stack(parts: list[tuple[np.ndarray, int]], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    rows = np.concatenate([p for p, _ in parts]).astype(np.int64)
    labels = np.concatenate([np.full(len(p), label, dtype=np.int64) for p, label in parts])
    order = rng.permutation(len(rows))
    return rows[order], labels[order]
