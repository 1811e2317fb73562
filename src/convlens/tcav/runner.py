"""TCAV with real statistics, on Captum's ``captum.concept`` (Kim et al., ICML 2018).

For a class k, a concept C and a layer l, TCAV asks whether moving the layer-l activations of the
class's images towards the concept raises the class logit h_k:

    S_{C,k,l}(x) = grad h_{l,k}(f_l(x)) . v_C^l                    (Kim et al., Eq. 1)
    TCAV_{C,k,l} = |{x in X_k : S_{C,k,l}(x) > 0}| / |X_k|         (Eq. 2; Captum's ``sign_count``)

**Layer attribution.** The gradients grad h_{l,k}(f_l(x)) come from Captum's
``LayerGradientXActivation(multiply_by_inputs=False)`` — Captum TCAV's own default, which despite its
name returns the plain gradient of the target *logit* w.r.t. the layer output: exactly the directional
derivative of Eq. 1. Gradient x activation would weight each unit by its activation and test a
different quantity than the paper's.

:class:`TCAVRunner` runs, for every class, concept and layer, the concept against N random sets (the
TCAV score and the magnitude of every run), lets each random set play the concept against the others
(the random-vs-random null), and compares the concept's mean with the random sets' means by a two-sided
t-test, Holm-corrected over all tests of the class, with effect sizes (:mod:`convlens.tcav.stats`
says why this form of the paper's test and not the two-sample one, which is anti-conservative).

**Statistic.** The verdict uses the *magnitude*, the mean directional derivative along the unit CAV, by
default. The sign count saturates: when a class's gradients point one way, the TCAV score of a direction
is ~1 or ~0, the random sets' mean scores spread over [0, 1] like a uniform variable, and a concept
scoring 1.0 lies at most sqrt(3) null SDs from their mean — never significant after correction however
many runs. The magnitude has no ceiling. Both are computed and written; ``statistic="sign_count"`` makes
the paper's score decide.

Costs are shared: every distinct image is forwarded once for all layers, when the first CAV that needs
it is trained (:class:`~convlens.tcav.cav.ActivationStore`); each class's gradients are computed once
per layer and reused by every CAV; one CAV per random pair serves both directions and every concept of
that size and every class; and CAVs are cached on disk under keys that hash the concept images, the
model weights, the layer and the classifier settings (:class:`~convlens.tcav.cav.CAVCache`).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from captum.attr import LayerGradientXActivation
from captum.concept import Classifier
from torch import nn

from convlens.core.hooks import eval_mode
from convlens.core.layers import LayerSpec, resolve_layers
from convlens.tcav.cav import ActivationStore, CAVCache
from convlens.tcav.concept_sets import ConceptSet, RandomSets
from convlens.tcav.stats import NullComparison, compare_to_null, holm, pseudo_concept_means

__all__ = [
    "MIN_RANDOM_RUNS",
    "STATISTICS",
    "TCAVReport",
    "TCAVRunner",
    "TCAVTest",
    "layer_sensitivities",
    "tcav_magnitude",
    "tcav_score",
]

logger = logging.getLogger("convlens.tcav")

MIN_RANDOM_RUNS = 10  # below this a warning: the t-test has little power and the null is poorly sampled


def layer_sensitivities(
    model: nn.Module, inputs: torch.Tensor, layers: Sequence[str], target: int, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """grad h_{l,k}(f_l(x)) flattened to (N, F) per layer, for target class k (one pass per batch).

    Captum's ``LayerGradientXActivation(model, layers, multiply_by_inputs=False)``: the gradient of the
    target logit w.r.t. each layer's output, the directional derivative of Kim et al. Eq. 1.
    """
    modules = dict(model.named_modules())
    attribution = LayerGradientXActivation(model, [modules[name] for name in layers], multiply_by_inputs=False)
    device = next(model.parameters(), torch.empty(0)).device
    parts: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    with eval_mode(model):
        for start in range(0, inputs.shape[0], batch_size):
            batch = inputs[start : start + batch_size].to(device)
            grads = attribution.attribute(batch, target=target)
            grads = grads if isinstance(grads, list) else [grads]
            for name, grad in zip(layers, grads, strict=True):
                parts[name].append(grad.detach().reshape(grad.shape[0], -1).float().cpu().numpy())
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def tcav_score(sensitivities: np.ndarray, direction: np.ndarray) -> float:
    """Fraction of inputs whose directional derivative S = grad . v_C is > 0 (Kim et al. Eq. 2)."""
    return float(np.mean(sensitivities @ direction > 0.0))


def tcav_magnitude(sensitivities: np.ndarray, direction: np.ndarray) -> float:
    """Mean directional derivative along the unit CAV, (1/|X_k|) sum_x grad h_k(f_l(x)) . v_C / ||v_C||.

    Captum's ``magnitude`` is the same mean with the raw CAV, whose length depends on the classifier
    fit; the unit CAV makes runs comparable. Unlike the sign count it does not saturate at 0 or 1.
    """
    return float(np.mean(sensitivities @ direction) / np.linalg.norm(direction))


STATISTICS = ("magnitude", "sign_count")


@dataclass(frozen=True)
class TCAVTest:
    """One (class, concept, layer) test: per-run scores, the null, both comparisons and the verdict.

    ``scores`` / ``magnitudes``: TCAV sign counts and magnitudes of the concept against each random set;
    ``null_scores`` / ``null_magnitudes``: the random sets' own means as pseudo-concepts (the null);
    ``statistic`` names the comparison that decides the verdict, Holm-corrected in ``p_holm``.
    """

    class_id: int
    class_name: str
    concept: str
    layer: str
    n_concept_images: int
    n_inputs: int
    scores: tuple[float, ...]
    magnitudes: tuple[float, ...]
    null_scores: tuple[float, ...]
    null_magnitudes: tuple[float, ...]
    sign_count: NullComparison
    magnitude: NullComparison
    cav_accuracy: float  # mean held-out accuracy of the concept's CAVs
    statistic: str
    alpha: float
    p_holm: float = math.nan

    @property
    def comparison(self) -> NullComparison:
        return self.magnitude if self.statistic == "magnitude" else self.sign_count

    @property
    def tcav_mean(self) -> float:
        return self.sign_count.value

    @property
    def random_mean(self) -> float:
        return self.sign_count.null_mean

    @property
    def significant(self) -> bool:
        return bool(self.p_holm < self.alpha)

    @property
    def direction(self) -> str:
        """``"positive"``: moving towards the concept raises the class logit more than random directions."""
        return self.comparison.direction

    @property
    def verdict(self) -> str:
        return f"used ({'+' if self.direction == 'positive' else '-'})" if self.significant else "not significant"

    def row(self) -> dict[str, Any]:
        """Flat CSV row (per-run scores space-separated); ``class``, ``concept``, ``layer``, ``significant``,
        ``direction``, ``p_value``, ``effect_size`` are the columns ``convlens global`` reads."""
        s, m, c = self.sign_count, self.magnitude, self.comparison
        return {
            "class_id": self.class_id, "class": self.class_name, "concept": self.concept, "layer": self.layer,
            "n_concept_images": self.n_concept_images, "n_inputs": self.n_inputs, "n_random_runs": len(self.scores),
            "tcav_mean": s.value, "random_tcav_mean": s.null_mean, "random_tcav_std": s.null_std, "p_tcav": s.p,
            "magnitude_mean": m.value, "random_magnitude_mean": m.null_mean, "random_magnitude_std": m.null_std,
            "p_magnitude": m.p, "statistic": self.statistic, "t": c.t, "p": c.p, "p_holm": self.p_holm,
            "p_value": self.p_holm,  # the verdict's p (Holm-adjusted), under the name the global report reads
            "alpha": self.alpha, "mean_difference": c.mean_difference, "effect_size": c.effect_size,
            "significant": self.significant, "direction": self.direction, "verdict": self.verdict,
            "cav_accuracy": self.cav_accuracy,
            "scores": _join(self.scores), "magnitudes": _join(self.magnitudes),
            "random_scores": _join(self.null_scores), "random_magnitudes": _join(self.null_magnitudes),
        }


def _join(values: Sequence[float]) -> str:
    return " ".join(f"{v:.6g}" for v in values)


@dataclass
class TCAVReport:
    """All tests of one run, with what it cost."""

    model: str
    tests: list[TCAVTest]
    random_runs: int
    alpha: float
    statistic: str
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def find(self, class_id: int, concept: str, layer: str) -> TCAVTest:
        for test in self.tests:
            if (test.class_id, test.concept, test.layer) == (class_id, concept, layer):
                return test
        raise KeyError(f"no test for class {class_id}, concept {concept!r}, layer {layer!r}")

    def rows(self) -> list[dict[str, Any]]:
        return [{"model": self.model, **test.row()} for test in self.tests]

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write one row per test (atomically: a temporary file renamed into place)."""
        path = Path(path)
        rows = self.rows()
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["model"])
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        return path


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start


Plan = dict[int, list[tuple[ConceptSet, list[ConceptSet]]]]


class TCAVRunner:
    """TCAV tests of concepts for classes, with random runs, a random-vs-random null, t-test, Holm, effects.

    Args:
        model: the classifier (returns logits; used in eval mode).
        layers: module names (dotted, as in ``model.named_modules()``), ``"blocks"`` or ``"last"``;
            unknown names fail with the closest matches.
        model_name: name used in reports and in the CAV cache directory (with the weight hash).
        class_names: names for the report (default ``"class <k>"``).
        random_runs: N random sets per concept (>= 3; default 20; a warning below 10).
        alpha: family-wise significance level per class (Holm).
        statistic: the per-run score whose comparison decides the verdict: ``"magnitude"`` (default;
            mean directional derivative along the unit CAV) or ``"sign_count"`` (Kim et al.'s TCAV
            score). Both are computed and reported.
        classifier: a :class:`captum.concept.Classifier` for the CAVs (default
            :class:`~convlens.tcav.cav.MiniBatchSGDClassifier`).
        cache_dir: directory of the CAV cache (Captum's CAV files); ``None``: in memory only.
        activation_dir: spill activations to memory-mapped files there (large layers); ``None``: RAM.
        reuse_activations: ``False`` recomputes activations for every CAV (benchmark of the cache).
        batch_size: images per forward / backward.
        seed: seed of the CAV classifier and of its train/held-out split.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec,
        *,
        model_name: str = "model",
        class_names: Sequence[str] | None = None,
        random_runs: int = 20,
        alpha: float = 0.05,
        statistic: str = "magnitude",
        classifier: Classifier | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        activation_dir: str | os.PathLike[str] | None = None,
        reuse_activations: bool = True,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        if random_runs < 3:
            raise ValueError(f"random_runs must be >= 3 (the null needs N >= 3 random sets), got {random_runs}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
        if random_runs < MIN_RANDOM_RUNS:
            warnings.warn(
                f"TCAV with {random_runs} random runs (< {MIN_RANDOM_RUNS}): the t-test has {random_runs - 1} degrees "
                "of freedom and the null is poorly sampled; use 20 or more", UserWarning, stacklevel=2,
            )
        self.model, self.layer_spec, self.model_name = model, layers, model_name
        self.class_names = list(class_names) if class_names is not None else None
        self.random_runs, self.alpha, self.statistic = random_runs, alpha, statistic
        self.classifier, self.cache_dir, self.activation_dir = classifier, cache_dir, activation_dir
        self.reuse_activations, self.batch_size, self.seed = reuse_activations, batch_size, seed

    def _class_name(self, class_id: int) -> str:
        if self.class_names is not None and 0 <= class_id < len(self.class_names):
            return self.class_names[class_id]
        return f"class {class_id}"

    def run(
        self,
        class_inputs: Mapping[int, torch.Tensor],
        concepts: Mapping[int, Sequence[ConceptSet]],
        random_sets: RandomSets | Mapping[int, RandomSets],
    ) -> TCAVReport:
        """Test every concept of ``concepts[k]`` for class k on the images ``class_inputs[k]``.

        Random sets of each concept's size come from ``random_sets`` (one pool, or one per class): the first
        N distinct sets that differ from the concept (:meth:`RandomSets.runs`).
        """
        plan = self._plan(class_inputs, concepts, random_sets)
        first = next(entries[0][0] for entries in plan.values())  # _plan keeps non-empty classes only
        layers = resolve_layers(self.model, self.layer_spec, tuple(first.images.shape[1:]))
        timer = _Timer()
        store = ActivationStore(self.model, layers, self.batch_size, self.activation_dir, self.reuse_activations)
        try:
            with timer("model_hash"):
                cavs = CAVCache(store, self.classifier, self.model_name, self.cache_dir, self.seed)
            tests = [test for class_id, entries in plan.items()
                     for test in self._class_tests(class_id, entries, class_inputs[class_id], layers, cavs, timer)]
        finally:
            store.close()  # also on errors: spilled activation files are deleted
        timer.seconds["activations"] = store.seconds  # forwards happen lazily inside CAV training
        timer.seconds["cavs"] -= store.seconds
        counts = {"images_forwarded": store.images_forwarded, "cavs_trained": cavs.trained, "cavs_loaded": cavs.loaded}
        logger.info("TCAV %s: %d tests on layers %s; %s", self.model_name, len(tests), ", ".join(layers), counts)
        return TCAVReport(
            self.model_name, tests, self.random_runs, self.alpha, self.statistic, dict(timer.seconds), counts
        )

    def _class_tests(
        self,
        class_id: int,
        entries: list[tuple[ConceptSet, list[ConceptSet]]],
        inputs: torch.Tensor,
        layers: list[str],
        cavs: CAVCache,
        timer: _Timer,
    ) -> list[TCAVTest]:
        """Every (concept, layer) test of one class, Holm-corrected together."""
        with timer("gradients"):
            sens = layer_sensitivities(self.model, inputs, layers, class_id, self.batch_size)
        nulls: dict[tuple[str, tuple[str, ...]], tuple[np.ndarray, np.ndarray]] = {}
        class_tests = []
        for concept, randoms in entries:
            key = tuple(r.digest for r in randoms)  # concepts of one size share their random sets (and null)
            for layer in layers:
                if (layer, key) not in nulls:
                    nulls[layer, key] = self._null(sens[layer], randoms, layer, cavs, timer)
                class_tests.append(self._test(class_id, concept, randoms, layer, sens[layer], nulls[layer, key],
                                              cavs, timer))
        adjusted = holm([t.comparison.p for t in class_tests])
        return [replace(t, p_holm=float(p)) for t, p in zip(class_tests, adjusted, strict=True)]

    def _plan(
        self,
        class_inputs: Mapping[int, torch.Tensor],
        concepts: Mapping[int, Sequence[ConceptSet]],
        random_sets: RandomSets | Mapping[int, RandomSets],
    ) -> Plan:
        if not concepts or not any(concepts.values()):
            raise ValueError("no concept sets to test")
        plan: Plan = {}
        for class_id, sets in concepts.items():
            if not sets:
                continue  # a class without concepts has nothing to test (and no first concept to size layers by)
            if class_id not in class_inputs or class_inputs[class_id].shape[0] < 1:
                raise ValueError(f"no input images for class {class_id} ({self._class_name(class_id)})")
            names = [s.name for s in sets]
            if len(set(names)) != len(names):
                raise ValueError(f"class {class_id}: concept names must be unique, got {names}")
            pool = random_sets[class_id] if isinstance(random_sets, Mapping) else random_sets
            plan[class_id] = [(s, pool.runs(s.size, self.random_runs, exclude=(s.digest,))) for s in sets]
        return plan

    @staticmethod
    def _null(
        sens: np.ndarray, randoms: list[ConceptSet], layer: str, cavs: CAVCache, timer: _Timer
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pseudo-concept means T_{R_j} (sign count, magnitude): each random set against the others.

        One CAV per unordered pair: direction(R_j, R_i) is -direction(R_i, R_j), so the sign count of
        (j vs i) counts S < 0 of (i vs j) and the magnitude flips sign.
        """
        n = len(randoms)
        sign, magnitude = np.zeros((n, n)), np.zeros((n, n))
        for i in range(n):
            for j in range(i + 1, n):
                with timer("cavs"):
                    v, _ = cavs.direction(randoms[i], randoms[j], layer)
                with timer("scores"):
                    d = sens @ v
                    sign[i, j], sign[j, i] = float(np.mean(d > 0)), float(np.mean(d < 0))
                    magnitude[i, j] = float(np.mean(d) / np.linalg.norm(v))
                    magnitude[j, i] = -magnitude[i, j]
        return pseudo_concept_means(sign), pseudo_concept_means(magnitude)

    def _test(
        self,
        class_id: int,
        concept: ConceptSet,
        randoms: list[ConceptSet],
        layer: str,
        sens: np.ndarray,
        null: tuple[np.ndarray, np.ndarray],
        cavs: CAVCache,
        timer: _Timer,
    ) -> TCAVTest:
        with timer("cavs"):
            runs = [cavs.direction(concept, r, layer) for r in randoms]
        with timer("scores"):
            scores = tuple(tcav_score(sens, v) for v, _ in runs)
            magnitudes = tuple(tcav_magnitude(sens, v) for v, _ in runs)
            sign_test = compare_to_null(float(np.mean(scores)), null[0])
            magnitude_test = compare_to_null(float(np.mean(magnitudes)), null[1])
        accuracies = [a for _, a in runs if not math.isnan(a)]
        return TCAVTest(
            class_id=class_id, class_name=self._class_name(class_id), concept=concept.name, layer=layer,
            n_concept_images=concept.size, n_inputs=int(sens.shape[0]), scores=scores, magnitudes=magnitudes,
            null_scores=tuple(float(v) for v in null[0]), null_magnitudes=tuple(float(v) for v in null[1]),
            sign_count=sign_test, magnitude=magnitude_test,
            cav_accuracy=float(np.mean(accuracies)) if accuracies else math.nan,
            statistic=self.statistic, alpha=self.alpha,
        )

