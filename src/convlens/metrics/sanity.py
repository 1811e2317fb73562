"""Sanity checks: does the explanation depend on the model's parameters and on the explained class?

* :class:`ModelParameterRandomisation` — Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018,
  Sec. 3 (cascading randomisation from the logits down, and independent randomisation), comparing the
  explanation of the trained model with that of each randomised model by Spearman rank correlation of the
  absolute maps, Spearman of the signed maps, and SSIM.
* :class:`RandomLogit` — Sixt, Granz and Landgraf, "When Explanations Lie", ICML 2020: similarity between the
  explanation of the explained class and that of a random other class.

For both, a *faithful* method gives **low** similarity (direction LOWER). A method is passed as a factory
``make_explainer(model) -> Explainer`` so the same method (with the same knobs) is rebuilt on each
randomised copy; the trained model itself is never modified (randomisation happens on a deep copy).
``evaluate(context)`` takes the factory, model, image, class and original map from the context; the
MPRT similarities of one context share one randomisation run.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from convlens.core.hooks import eval_mode
from convlens.core.maps import minmax_normalize
from convlens.metrics.base import Direction, Metric, MetricCategory
from convlens.metrics.context import MetricContext, MetricValue

__all__ = [
    "SIMILARITIES",
    "ModelParameterRandomisation",
    "RandomLogit",
    "RandomisationResult",
    "map_similarity",
    "randomisable_layers",
    "spearman_similarity",
    "ssim_similarity",
]

ExplainerFactory = Callable[[nn.Module], Any]
SimilarityName = Literal["spearman_abs", "spearman", "ssim"]
SIMILARITIES: tuple[str, ...] = ("spearman_abs", "spearman", "ssim")


def spearman_similarity(a: np.ndarray, b: np.ndarray, absolute: bool) -> float:
    """Spearman rank correlation of two maps (flattened), of their absolute values when ``absolute``
    (``scipy.stats.spearmanr``; average ranks for ties). NaN when a map is constant (undefined)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if absolute:
        a, b = np.abs(a), np.abs(b)
    if np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b)[0])


def ssim_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004, ``skimage.metrics.structural_similarity``, 7 x 7 uniform window or the largest
    odd window that fits) between the two maps min-max normalised to [0, 1] (``data_range=1``), as
    Adebayo et al. compare normalised maps. Two constant maps are identical (1), one constant map is
    compared as all zeros."""
    from skimage.metrics import structural_similarity

    a_t = minmax_normalize(torch.as_tensor(np.asarray(a, dtype=np.float64))).numpy()
    b_t = minmax_normalize(torch.as_tensor(np.asarray(b, dtype=np.float64))).numpy()
    side = min(a_t.shape)
    win = min(7, side if side % 2 == 1 else side - 1)
    if win < 3:
        raise ValueError(f"maps of shape {a_t.shape} are too small for SSIM (need at least 3 x 3)")
    return float(structural_similarity(a_t, b_t, data_range=1.0, win_size=win))


def map_similarity(a: np.ndarray, b: np.ndarray, kind: SimilarityName) -> float:
    """One of :data:`SIMILARITIES` between two (H, W) maps."""
    if kind == "spearman_abs":
        return spearman_similarity(a, b, absolute=True)
    if kind == "spearman":
        return spearman_similarity(a, b, absolute=False)
    if kind == "ssim":
        return ssim_similarity(a, b)
    raise ValueError(f"unknown similarity {kind!r}; choose one of {SIMILARITIES}")


def randomisable_layers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the layers that own parameters and can be re-initialised (``reset_parameters``: conv,
    linear, normalisation), in the order the forward pass *uses* them (one dummy forward on ``x[:1]``);
    layers the forward does not call come last in definition order."""
    candidates = {
        name: m
        for name, m in model.named_modules()
        if name and hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False))
    }
    order: list[str] = []
    handles = []
    for name, module in candidates.items():
        handles.append(module.register_forward_hook(lambda _m, _i, _o, name=name: order.append(name)))
    try:
        with torch.inference_mode(), eval_mode(model):
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    called = list(dict.fromkeys(order))
    return called + [n for n in candidates if n not in called]


@dataclass
class RandomisationResult:
    """Similarities after each randomisation step: ``steps[k]`` names the layer(s) randomised at step k
    (cumulatively for the cascade); ``similarity[kind]`` is (n_steps, B)."""

    steps: list[str]
    similarity: dict[str, torch.Tensor] = field(default_factory=dict)
    order: str = "cascading"

    def aggregate(self, kind: str, how: Literal["mean", "last"] = "mean") -> torch.Tensor:
        """(B,) per-image summary: mean over the steps (NaN steps ignored) or the fully randomised model."""
        values = self.similarity[kind]
        if how == "last":
            return values[-1]
        return torch.nanmean(values, dim=0)


def _explain_maps(
    make_explainer: ExplainerFactory, model: nn.Module, x: torch.Tensor, class_ids: torch.Tensor
) -> np.ndarray:
    explanation = make_explainer(model).explain(x, class_ids)
    return explanation.maps.detach().double().cpu().numpy()


def _as_maps(maps: torch.Tensor | np.ndarray, x: torch.Tensor) -> np.ndarray:
    return torch.as_tensor(maps).detach().double().cpu().numpy().reshape(x.shape[0], *x.shape[-2:])


class ModelParameterRandomisation(Metric):
    r"""Model-parameter randomisation test (Adebayo et al., NeurIPS 2018, Sec. 3.1 / Fig. 2).

    Starting from the logits layer, layers are re-initialised one at a time, cumulatively
    (``order="cascading"``; ``"independent"`` re-initialises one layer of the trained model at a time), and
    after each step the explanation ``E_k`` of the same image and class is compared with the trained model's
    ``E_0``:

    .. math:: \rho_{abs}(k) = \mathrm{Spearman}(|E_0|, |E_k|),\quad \rho(k) = \mathrm{Spearman}(E_0, E_k),\quad
              \mathrm{SSIM}(\hat E_0, \hat E_k)

    (``Ê`` min-max normalised). A method that passes the test gives low similarity. The per-image score is
    the mean over the steps (Quantus's ``return_average_correlation``) or, with ``aggregate="last"``, the
    similarity to the fully randomised model.

    Layers are the modules owning parameters with ``reset_parameters`` (conv, linear, normalisation) in
    reverse forward order; ``layers`` gives an explicit list of module names (top first), each step
    re-initialising a whole named module. Before each re-initialisation the RNG is seeded with ``seed``
    (Quantus's convention: the same seed for every layer), inside ``torch.random.fork_rng`` so the caller's
    RNG is untouched.

    Args:
        similarity: which similarity ``__call__`` returns (all three are in :meth:`run`'s result).
        order: ``"cascading"`` or ``"independent"``.
        aggregate: ``"mean"`` over steps or ``"last"`` step.
        layers: explicit module names, top (logits) first; default: every randomisable layer.
        max_steps: stop after this many steps (the top layers), for large models.
        seed: re-initialisation seed.
    """

    name: ClassVar[str] = "mprt"
    direction: ClassVar[Direction] = Direction.LOWER
    category: ClassVar[MetricCategory] = MetricCategory.SANITY
    requires: ClassVar[frozenset[str]] = frozenset({"make_explainer"})

    def __init__(
        self,
        similarity: SimilarityName = "spearman_abs",
        order: Literal["cascading", "independent"] = "cascading",
        aggregate: Literal["mean", "last"] = "mean",
        layers: Sequence[str] | None = None,
        max_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; choose one of {SIMILARITIES}")
        if order not in ("cascading", "independent"):
            raise ValueError(f"order must be 'cascading' or 'independent', got {order!r}")
        if aggregate not in ("mean", "last"):
            raise ValueError(f"aggregate must be 'mean' or 'last', got {aggregate!r}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.similarity = similarity
        self.order = order
        self.aggregate = aggregate
        self.layers = list(layers) if layers is not None else None
        self.max_steps = max_steps
        self.seed = seed

    def steps_for(self, model: nn.Module, x: torch.Tensor) -> list[str]:
        """Module names in randomisation order (top first)."""
        if self.layers is not None:
            modules = dict(model.named_modules())
            missing = [n for n in self.layers if n not in modules]
            if missing:
                raise ValueError(f"layers not found in the model: {missing}")
            steps = list(self.layers)
        else:
            steps = randomisable_layers(model, x)[::-1]
        return steps[: self.max_steps] if self.max_steps else steps

    def _reinitialise(self, module: nn.Module) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            targets = [module] if hasattr(module, "reset_parameters") else []
            targets += [m for m in module.modules() if m is not module and hasattr(m, "reset_parameters")]
            if not targets:
                raise ValueError(f"module {type(module).__name__} has no parameters to re-initialise")
            for m in targets:
                m.reset_parameters()

    def run(
        self,
        make_explainer: ExplainerFactory,
        model: nn.Module,
        x: torch.Tensor,
        class_ids: torch.Tensor | Sequence[int],
        original_maps: torch.Tensor | np.ndarray | None = None,
    ) -> RandomisationResult:
        """All similarities after every step, for a batch ``x`` and its explained classes."""
        if x.ndim == 3:
            x = x[None]
        ids = torch.as_tensor(class_ids).long().reshape(-1)
        original = _explain_maps(make_explainer, model, x, ids) if original_maps is None else _as_maps(original_maps, x)
        steps = self.steps_for(model, x)
        shape = (len(steps), x.shape[0])
        values = {kind: torch.full(shape, float("nan"), dtype=torch.float64) for kind in SIMILARITIES}
        randomised = copy.deepcopy(model)
        for k, name in enumerate(steps):
            if self.order == "independent" and k > 0:
                randomised = copy.deepcopy(model)
            self._reinitialise(dict(randomised.named_modules())[name])
            maps = _explain_maps(make_explainer, randomised, x, ids)
            for b in range(x.shape[0]):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", category=RuntimeWarning)
                    for kind in SIMILARITIES:
                        values[kind][k, b] = map_similarity(original[b], maps[b], kind)  # type: ignore[arg-type]
        return RandomisationResult(steps=steps, similarity=values, order=self.order)

    def __call__(
        self,
        make_explainer: ExplainerFactory,
        model: nn.Module,
        x: torch.Tensor,
        class_ids: torch.Tensor | Sequence[int],
        original_maps: torch.Tensor | np.ndarray | None = None,
    ) -> torch.Tensor:
        result = self.run(make_explainer, model, x, class_ids, original_maps)
        return result.aggregate(self.similarity, self.aggregate)

    def evaluate(self, context: MetricContext) -> MetricValue:
        """One randomisation run per context and settings serves every similarity (``mprt_*``)."""
        key = ("randomisation", self.order, tuple(self.layers or ()), self.max_steps, self.seed)
        result = context.shared(key, lambda: self.run(
            context.need("make_explainer"), context.model, context.x, [context.target], context.saliency
        ))
        return MetricValue(float(result.aggregate(self.similarity, self.aggregate)[0]))


class RandomLogit(Metric):
    r"""Random-logit test (Sixt, Granz and Landgraf, "When Explanations Lie: Why Many Modified BP
    Attributions Fail", ICML 2020, Sec. 5; Quantus ``RandomLogit``).

    .. math:: \mathrm{RL} = \mathrm{sim}\big(E(x, c),\ E(x, c')\big),\qquad
              c' \sim \mathcal U(\{0..C-1\} \setminus \{c\})

    the similarity (SSIM of the min-max normalised maps by default, as Quantus; or Spearman) between the
    explanation of the explained class ``c`` and of a random other class ``c'`` drawn from
    ``numpy.random.default_rng(seed)``. Class-sensitive methods give low similarity (direction LOWER).
    Quantus computes SSIM on flattened 1-D maps; here the maps stay 2-D (the SSIM of images).
    """

    name: ClassVar[str] = "random_logit"
    direction: ClassVar[Direction] = Direction.LOWER
    category: ClassVar[MetricCategory] = MetricCategory.SANITY
    requires: ClassVar[frozenset[str]] = frozenset({"make_explainer"})

    def __init__(self, similarity: SimilarityName = "ssim", seed: int = 0) -> None:
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; choose one of {SIMILARITIES}")
        self.similarity = similarity
        self.seed = seed

    def random_classes(self, class_ids: torch.Tensor, n_classes: int) -> torch.Tensor:
        """One class ``!= class_ids[b]`` per image, uniform over the other ``n_classes - 1``."""
        if n_classes < 2:
            raise ValueError("the random-logit test needs a model with at least 2 classes")
        rng = np.random.default_rng(self.seed)
        draws = rng.integers(0, n_classes - 1, size=class_ids.numel())
        return torch.as_tensor(draws + (draws >= class_ids.cpu().numpy()), dtype=torch.long)

    def __call__(
        self,
        make_explainer: ExplainerFactory,
        model: nn.Module,
        x: torch.Tensor,
        class_ids: torch.Tensor | Sequence[int],
        original_maps: torch.Tensor | np.ndarray | None = None,
        n_classes: int | None = None,
    ) -> torch.Tensor:
        if x.ndim == 3:
            x = x[None]
        ids = torch.as_tensor(class_ids).long().reshape(-1)
        if n_classes is None:
            with torch.inference_mode(), eval_mode(model):
                n_classes = int(make_explainer(model).logits(x[:1]).shape[1])
        other = self.random_classes(ids, n_classes)
        original = _explain_maps(make_explainer, model, x, ids) if original_maps is None else _as_maps(original_maps, x)
        off = _explain_maps(make_explainer, model, x, other)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            scores = [map_similarity(original[b], off[b], self.similarity) for b in range(x.shape[0])]
        return torch.tensor(scores, dtype=torch.float64)

    def evaluate(self, context: MetricContext) -> MetricValue:
        factory = context.need("make_explainer")
        return MetricValue(float(self(factory, context.model, context.x, [context.target], context.saliency)[0]))
