"""TCAV with real statistics, on Captum's ``captum.concept`` (Kim et al., ICML 2018).

For a class k, a concept C and a layer l, TCAV asks whether moving the layer-l activations of the
class's images towards the concept raises the class logit h_k:

    S_{C,k,l}(x) = grad h_{l,k}(f_l(x)) . v_C^l                    (Kim et al., Eq. 1)
    TCAV_{C,k,l} = |{x in X_k : S_{C,k,l}(x) > 0}| / |X_k|         (Eq. 2; Captum's ``sign_count``)

The gradients come from Captum's ``LayerGradientXActivation(multiply_by_inputs=False)``, Captum TCAV's
default: the plain gradient of the logit w.r.t. the layer output, exactly Eq. 1's directional derivative.
:class:`TCAVRunner` runs each concept against N random sets, lets each random set play the concept against
the others (the random-vs-random null) and compares the means by a two-sided t-test, Holm-corrected over
the class's tests (:mod:`convlens.tcav.stats` says why this form of the paper's test). The verdict uses the
*magnitude* (mean directional derivative along the unit CAV) by default: the sign count saturates at 0 and
1, where a concept can never lie more than sqrt(3) null SDs from the random sets. Verdicts: ``used (+)`` /
``used (-)``, ``no evidence at this power`` (not "not used"), ``cannot test`` (a null without spread).

Costs are shared: every distinct image is forwarded once for all layers; each class's gradients are
computed once and projected on all its CAVs in one product; every CAV of a layer is asked for at once, so
the missing ones train in one batched solve per size (:mod:`convlens.tcav.solver`); one CAV per random pair
serves both directions, every concept of that size and every class; and CAVs are cached on disk under keys
that hash the concept images, the weights, the layer and the classifier (:class:`~convlens.tcav.cav.CAVCache`).
"""

from __future__ import annotations

import contextlib
import csv
import io
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
from convlens.tcav.solver import LinearSVM
from convlens.tcav.stats import STATISTICS, NullComparison, compare_to_null, holm, pseudo_concept_means

__all__ = [
    "MIN_RANDOM_RUNS",
    "STATISTICS",
    "TCAVReport",
    "TCAVRunner",
    "TCAVTest",
    "detectable_effect",
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


NO_EVIDENCE = "no evidence at this power"
PROJECTION_BYTES = 256 * 2**20  # CAVs (float32) held at once while projecting the class's gradients on them


@dataclass(frozen=True)
class TCAVTest:
    """One (class, concept, layer) test: per-run scores, the null, both comparisons and the verdict.

    ``scores`` / ``magnitudes``: TCAV sign counts and magnitudes of the concept against each random set;
    ``null_scores`` / ``null_magnitudes``: the random sets' own means as pseudo-concepts (the null);
    ``statistic`` names the comparison that decides the verdict, Holm-corrected in ``p_holm``;
    ``cav_accuracies``: held-out (cross-validated) accuracy of each of the concept's CAVs; ``layer_role``:
    ``"last"`` for the model's last block (where the synthetic check knows the answer), ``"earlier"``
    otherwise; ``detectable_effect``: the |effect size| that is called used whatever the other tests of
    the class (the Bonferroni bound of Holm's first step).
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
    cav_accuracies: tuple[float, ...]
    statistic: str
    alpha: float
    layer_role: str = "earlier"
    p_holm: float = math.nan
    detectable_effect: float = math.nan

    @property
    def comparison(self) -> NullComparison:
        return self.magnitude if self.statistic == "magnitude" else self.sign_count

    @property
    def tcav_mean(self) -> float:
        """Kim et al.'s TCAV score (sign count), mean over the runs; tested only with ``statistic="sign_count"``."""
        return self.sign_count.value

    @property
    def random_mean(self) -> float:
        return self.sign_count.null_mean

    @property
    def cav_accuracy(self) -> float:
        """Mean held-out accuracy of the concept's CAVs."""
        finite = [a for a in self.cav_accuracies if not math.isnan(a)]
        return float(np.mean(finite)) if finite else math.nan

    @property
    def chance_accuracy(self) -> float:
        """The held-out accuracy a CAV reaches by guessing, at most, 19 times in 20: the 95th percentile of
        Binomial(n, 1/2) / n over its n = concept + random images (one-sided binomial bound)."""
        from scipy import stats

        n = 2 * self.n_concept_images
        return float(stats.binom.ppf(0.95, n, 0.5) / n)

    @property
    def cav_at_chance(self) -> bool:
        """The concept's CAVs tell its images from random images no better than guessing (mean held-out
        accuracy within the binomial bound): the layer does not separate the concept, its CAVs are
        arbitrary directions, and the test has no power here ("no evidence" says nothing about use, and a
        "used" verdict is as likely a false alarm as for a random set)."""
        return bool(self.cav_accuracy <= self.chance_accuracy)

    @property
    def untestable(self) -> str | None:
        """Why the test cannot be made (NaN in the statistic or its null, a null without spread), else None."""
        null = self.null_magnitudes if self.statistic == "magnitude" else self.null_scores
        if not np.isfinite([self.comparison.value, *null]).all():
            return "NaN in the statistic or its null (gradients not finite, or a CAV of length 0)"
        if self.comparison.null_std == 0:
            return f"the null is constant (every random set scores {self.comparison.null_mean:.6g}): no spread to " \
                   "judge by"
        return None

    @property
    def significant(self) -> bool:
        return self.untestable is None and bool(self.p_holm < self.alpha)

    @property
    def direction(self) -> str:
        """``"positive"``: moving towards the concept raises the class logit more than random directions."""
        return self.comparison.direction

    @property
    def verdict(self) -> str:
        """``used (+)`` / ``used (-)`` (significant after Holm), ``no evidence at this power`` (not "not
        used": the test may miss a real effect smaller than ``detectable_effect``), or ``cannot test: why``."""
        reason = self.untestable
        if reason is not None:
            return f"cannot test: {reason}"
        if self.significant:
            return f"used ({'+' if self.direction == 'positive' else '-'})"
        return NO_EVIDENCE

    def row(self) -> dict[str, Any]:
        """Flat CSV row (per-run values space-separated); ``class``, ``concept``, ``layer``, ``significant``
        (empty when the test cannot be made), ``direction``, ``p_value``, ``effect_size``, ``verdict`` are
        the columns ``convlens global`` reads. The tested statistic's columns come first; the other
        statistic's are named by it (``sign_count_*``, ``magnitude_*``)."""
        s, m, c = self.sign_count, self.magnitude, self.comparison
        return {
            "class_id": self.class_id, "class": self.class_name, "concept": self.concept, "layer": self.layer,
            "layer_role": self.layer_role, "n_concept_images": self.n_concept_images, "n_inputs": self.n_inputs,
            "n_random_runs": len(self.scores), "statistic": self.statistic, "verdict": self.verdict,
            "significant": "" if self.untestable else self.significant, "direction": self.direction,
            "p_value": self.p_holm,  # the verdict's p (Holm-adjusted), under the name the global report reads
            "effect_size": c.effect_size, "detectable_effect_size": self.detectable_effect,
            "mean_difference": c.mean_difference, "t": c.t, "p": c.p, "p_holm": self.p_holm, "alpha": self.alpha,
            "cav_accuracy": self.cav_accuracy, "chance_accuracy": self.chance_accuracy,
            "cav_at_chance": self.cav_at_chance,
            "magnitude_mean": m.value, "random_magnitude_mean": m.null_mean, "random_magnitude_std": m.null_std,
            "p_magnitude": m.p, "sign_count_mean": s.value, "random_sign_count_mean": s.null_mean,
            "random_sign_count_std": s.null_std, "p_sign_count": s.p,
            "magnitudes": _join(self.magnitudes), "random_magnitudes": _join(self.null_magnitudes),
            "sign_counts": _join(self.scores), "random_sign_counts": _join(self.null_scores),
            "cav_accuracies": _join(self.cav_accuracies),
        }


def _join(values: Sequence[float]) -> str:
    return " ".join(f"{v:.6g}" for v in values)


def detectable_effect(alpha: float, tests: int, runs: int) -> float:
    """|z| = |T_C - mean T_R| / SD T_R that is significant at ``alpha / tests`` (Holm's first step, so
    whatever the other tests) in the Crawford-Howell test with ``runs`` null values:
    t_{1 - alpha / (2 tests), runs - 1} * sqrt(1 + 1 / runs)."""
    from scipy import stats

    return float(stats.t.ppf(1 - alpha / (2 * tests), runs - 1) * math.sqrt(1 + 1 / runs))


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
        from convlens.core.files import atomic_write_text

        rows = self.rows()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["model"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buffer.getvalue())
        return Path(path)


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


@dataclass(frozen=True)
class _Projections:
    """Every CAV of a (class, layer): S = grad . v per input (N, K), |v| (K,), held-out accuracies (K,)."""

    values: np.ndarray
    norms: np.ndarray
    accuracies: np.ndarray

    def columns(self, start: int, stop: int) -> _Projections:
        return _Projections(self.values[:, start:stop], self.norms[start:stop], self.accuracies[start:stop])

    def sign_counts(self) -> np.ndarray:
        return (self.values > 0).mean(0)

    def magnitudes(self) -> np.ndarray:
        return self.values.mean(0, dtype=np.float64) / self.norms


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
            the mean directional derivative of the class logit along the unit CAV over the class's
            images) or ``"sign_count"`` (Kim et al.'s TCAV score: the share of those images whose logit
            rises along the CAV). Both are computed and reported.
        classifier: the CAV trainer (default :class:`~convlens.tcav.solver.LinearSVM`, batched and
            deterministic; or a :class:`captum.concept.Classifier`, one CAV at a time).
        cache_dir: directory of the CAV cache (Captum's CAV files); ``None``: in memory only.
        activation_dir: spill activations to memory-mapped files there (large layers); ``None``: RAM.
        reuse_activations: ``False`` recomputes activations for every solve (benchmark of the cache).
        batch_size: images per forward / backward.
        seed: seed of a Captum classifier's training and split (the default trainer needs none).
        device: where the CAVs are solved (default: the model's device).
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
        classifier: Classifier | LinearSVM | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        activation_dir: str | os.PathLike[str] | None = None,
        reuse_activations: bool = True,
        batch_size: int = 64,
        seed: int = 0,
        device: str | torch.device | None = None,
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
        self.device = device

    def _class_name(self, class_id: int) -> str:
        if self.class_names is not None and 0 <= class_id < len(self.class_names):
            return self.class_names[class_id]
        return f"class {class_id}"

    def run(
        self,
        class_inputs: Mapping[int, torch.Tensor],
        concepts: Mapping[int, Sequence[ConceptSet]],
        random_sets: RandomSets | Mapping[int, RandomSets | Mapping[str, RandomSets]],
    ) -> TCAVReport:
        """Test every concept of ``concepts[k]`` for class k on the images ``class_inputs[k]``.

        Random sets of each concept's size come from ``random_sets`` (one pool, one per class, or per class
        one per concept name): the first N distinct sets that differ from the concept
        (:meth:`RandomSets.runs`). Concepts drawing the same random sets share their null.
        """
        plan = self._plan(class_inputs, concepts, random_sets)
        first = next(entries[0][0] for entries in plan.values())  # _plan keeps non-empty classes only
        shape = tuple(first.images.shape[1:])
        layers = resolve_layers(self.model, self.layer_spec, shape)
        roles = {layer: "last" if layer in resolve_layers(self.model, "last", shape) else "earlier" for layer in layers}
        timer = _Timer()
        store = ActivationStore(self.model, layers, self.batch_size, self.activation_dir, self.reuse_activations)
        cavs: CAVCache | None = None
        try:
            with timer("model_hash"):
                cavs = CAVCache(store, self.classifier, self.model_name, self.cache_dir, self.seed, self.device,
                                background_writes=True)
            with timer("cavs"):
                self._train_ahead(plan, list(roles), cavs)
            tests = [test for class_id, entries in plan.items()
                     for test in self._class_tests(class_id, entries, class_inputs[class_id], roles, cavs, timer)]
            with timer("cavs"):
                cavs.close()  # the CAV files still being written
        finally:
            if cavs is not None:
                with contextlib.suppress(OSError):
                    cavs.close()
            store.close()  # also on errors: spilled activation files are deleted
        timer.seconds["activations"] = store.seconds  # forwards happen lazily inside CAV training
        timer.seconds["cavs"] -= store.seconds
        counts = {"images_forwarded": store.images_forwarded, "cavs_trained": cavs.trained, "cavs_loaded": cavs.loaded,
                  "cavs_recomputed": cavs.recomputed, "cav_solves": cavs.solves}
        logger.info("TCAV %s: %d tests on layers %s; %s", self.model_name, len(tests), ", ".join(layers), counts)
        return TCAVReport(
            self.model_name, tests, self.random_runs, self.alpha, self.statistic, dict(timer.seconds), counts
        )

    def _train_ahead(self, plan: Plan, layers: list[str], cavs: CAVCache) -> None:
        """Per layer, every class's CAVs in one solve per size (few large batches instead of one per class),
        kept in memory for the class-by-class scoring; skipped when they would not all fit in it."""
        widths = _layer_widths(self.model, layers, tuple(next(iter(plan.values()))[0][0].images.shape[1:]))
        for layer in layers:
            nulls = {tuple(r.digest for r in randoms): randoms for entries in plan.values() for _, randoms in entries}
            null_pairs = [(randoms[i], randoms[j]) for randoms in nulls.values()
                          for i in range(len(randoms)) for j in range(i + 1, len(randoms))]
            runs = [(concept, r) for entries in plan.values() for concept, randoms in entries for r in randoms]
            if 4 * widths[layer] * (len(null_pairs) + len(runs)) > cavs.memory_bytes // 2:
                continue
            cavs.directions(null_pairs, layer, accuracy=False)
            cavs.directions(runs, layer)

    def _class_tests(
        self,
        class_id: int,
        entries: list[tuple[ConceptSet, list[ConceptSet]]],
        inputs: torch.Tensor,
        roles: dict[str, str],
        cavs: CAVCache,
        timer: _Timer,
    ) -> list[TCAVTest]:
        """Every (concept, layer) test of one class, Holm-corrected together (untestable ones left out).

        Per layer, every CAV the class needs — each random-set group's random pairs (the null) and every
        concept against its random sets — is asked for at once, so the missing ones train in one solve.
        """
        with timer("gradients"):
            sens = layer_sensitivities(self.model, inputs, list(roles), class_id, self.batch_size)
        groups = {tuple(r.digest for r in randoms): randoms for _, randoms in entries}  # shared by equal sizes
        found: dict[tuple[str, str], TCAVTest] = {}
        for layer, role in roles.items():
            pairs = [(randoms[i], randoms[j]) for randoms in groups.values()
                     for i in range(len(randoms)) for j in range(i + 1, len(randoms))]
            null_projections = self._project(sens[layer], pairs, layer, cavs, timer, accuracy=False)
            runs = self._project(sens[layer], [(c, r) for c, randoms in entries for r in randoms], layer, cavs, timer)
            with timer("scores"):
                nulls, start = {}, 0
                for key, randoms in groups.items():
                    count = len(randoms) * (len(randoms) - 1) // 2
                    nulls[key] = _null(null_projections.columns(start, start + count), len(randoms))
                    start += count
                start = 0
                for concept, randoms in entries:
                    null = nulls[tuple(r.digest for r in randoms)]
                    found[concept.name, layer] = self._test(class_id, concept, layer, role,
                                                            runs.columns(start, start + len(randoms)), null)
                    start += len(randoms)
        tests = [found[concept.name, layer] for concept, _ in entries for layer in roles]
        testable = [i for i, t in enumerate(tests) if t.untestable is None]
        adjusted = dict(zip(testable, holm([tests[i].comparison.p for i in testable]), strict=True))
        bound = detectable_effect(self.alpha, max(1, len(testable)), self.random_runs)
        return [replace(t, p_holm=float(adjusted.get(i, math.nan)), detectable_effect=bound)
                for i, t in enumerate(tests)]

    @staticmethod
    def _project(
        sens: np.ndarray, pairs: list[tuple[ConceptSet, ConceptSet]], layer: str, cavs: CAVCache, timer: _Timer,
        accuracy: bool = True,
    ) -> _Projections:
        """The class's gradients on every pair's CAV, the CAVs asked for in chunks of at most PROJECTION_BYTES."""
        chunk = max(1, PROJECTION_BYTES // (4 * max(1, sens.shape[1])))
        values, norms, accuracies = [], [], []
        for start in range(0, len(pairs), chunk):
            with timer("cavs"):
                directions, found = cavs.directions(pairs[start : start + chunk], layer, accuracy=accuracy)
            with timer("scores"):  # torch: its thread setting holds (numpy's BLAS would start threads of its own)
                vectors = torch.from_numpy(directions)
                values.append((torch.from_numpy(sens) @ vectors.T).numpy())
                norms.append(torch.linalg.vector_norm(vectors.double(), dim=1).numpy())
                accuracies.append(found)
        return _Projections(np.concatenate(values, 1), np.concatenate(norms), np.concatenate(accuracies))

    def _plan(
        self,
        class_inputs: Mapping[int, torch.Tensor],
        concepts: Mapping[int, Sequence[ConceptSet]],
        random_sets: RandomSets | Mapping[int, RandomSets | Mapping[str, RandomSets]],
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
            pools = pool if isinstance(pool, Mapping) else dict.fromkeys(names, pool)
            missing = [name for name in names if name not in pools]
            if missing:
                raise ValueError(f"class {class_id}: no random pool for concepts {missing}")
            plan[class_id] = [(s, pools[s.name].runs(s.size, self.random_runs, exclude=(s.digest,))) for s in sets]
        return plan

    def _test(
        self, class_id: int, concept: ConceptSet, layer: str, role: str, runs: _Projections, null: _Null
    ) -> TCAVTest:
        scores = tuple(float(v) for v in runs.sign_counts())
        magnitudes = tuple(float(v) for v in runs.magnitudes())
        return TCAVTest(
            class_id=class_id, class_name=self._class_name(class_id), concept=concept.name, layer=layer,
            n_concept_images=concept.size, n_inputs=int(runs.values.shape[0]), scores=scores, magnitudes=magnitudes,
            null_scores=tuple(float(v) for v in null.sign_counts),
            null_magnitudes=tuple(float(v) for v in null.magnitudes),
            sign_count=compare_to_null(float(np.mean(scores)), null.sign_counts),
            magnitude=compare_to_null(float(np.mean(magnitudes)), null.magnitudes),
            cav_accuracies=tuple(float(a) for a in runs.accuracies), statistic=self.statistic, alpha=self.alpha,
            layer_role=role,
        )


def _layer_widths(model: nn.Module, layers: Sequence[str], shape: tuple[int, ...]) -> dict[str, int]:
    """Flattened output size of each layer, from one forward of a zero image."""
    modules = dict(model.named_modules())
    widths: dict[str, int] = {}
    hooks = [modules[name].register_forward_hook(
        lambda _module, _inputs, output, name=name: widths.__setitem__(name, int(output[0].numel())))
        for name in layers]
    device = next(model.parameters(), torch.empty(0)).device
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, *shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return widths


@dataclass(frozen=True)
class _Null:
    """Pseudo-concept means T_{R_j}: sign counts and magnitudes."""

    sign_counts: np.ndarray
    magnitudes: np.ndarray


def _null(pairs: _Projections, n: int) -> _Null:
    """Each random set against the others, from one CAV per unordered pair (i < j, row-major order):
    direction(R_j, R_i) is -direction(R_i, R_j), so the sign count of (j vs i) counts S < 0 of (i vs j)
    and the magnitude flips sign."""
    i, j = np.triu_indices(n, 1)
    sign, magnitude = np.zeros((n, n)), np.zeros((n, n))
    sign[i, j], sign[j, i] = pairs.sign_counts(), (pairs.values < 0).mean(0)
    magnitude[i, j] = pairs.magnitudes()
    magnitude[j, i] = -magnitude[i, j]
    return _Null(pseudo_concept_means(sign), pseudo_concept_means(magnitude))
