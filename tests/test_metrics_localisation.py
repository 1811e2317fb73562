"""Ground-truth metrics: hand-computed 4x4 cases and agreement with Quantus on random maps."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from convlens.metrics.base import Direction, MetricAccumulator, MetricCategory, bootstrap_ci, top_fraction_mask
from convlens.metrics.localisation import BoundingBoxAccuracy, EnergyPointingGame, PointingGame, TopFractionIoU

# distinct values 1..16: no ties anywhere
S = torch.tensor(
    [
        [16.0, 15.0, 2.0, 1.0],
        [14.0, 13.0, 3.0, 4.0],
        [5.0, 6.0, 12.0, 7.0],
        [8.0, 9.0, 10.0, 11.0],
    ]
)
# ground truth: the pixels holding 16, 15, 14 and 12
G = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)


def test_ebpg_toy() -> None:
    # sum(S) = 136; sum over G = 16 + 15 + 14 + 12 = 57
    assert EnergyPointingGame()(S, G).item() == pytest.approx(57 / 136, abs=1e-12)
    # scale invariance
    assert EnergyPointingGame()(3.5 * S, G).item() == pytest.approx(57 / 136, abs=1e-12)


def test_ebpg_negative_values() -> None:
    s = torch.tensor([[-1.0, 2.0], [3.0, 4.0]])
    g = torch.tensor([[True, True], [False, False]])
    assert EnergyPointingGame()(s, g).item() == pytest.approx(2 / 9)  # negatives clipped to 0
    assert EnergyPointingGame(clip_negative=False)(s, g).item() == pytest.approx(1 / 8)
    assert math.isnan(EnergyPointingGame()(torch.zeros(2, 2), g).item())  # no energy at all


def test_miou_toy() -> None:
    # top 20 % of 16 pixels: k = floor(3.2 + 0.5) = 3 -> values 16, 15, 14, all in G: IoU = 3 / (3 + 4 - 3)
    assert TopFractionIoU()(S, G).item() == pytest.approx(0.75)
    # top 50 %: values 16..9 (8 pixels), 4 of them in G: IoU = 4 / (8 + 4 - 4)
    assert TopFractionIoU(fraction=0.5)(S, G).item() == pytest.approx(0.5)


def test_bbox_toy() -> None:
    # |G| = 4: top-4 values 16, 15, 14, 13; 13 is outside G -> 3 / 4
    assert BoundingBoxAccuracy()(S, G).item() == pytest.approx(0.75)
    g = torch.zeros(4, 4, dtype=torch.bool)
    g[2, 2] = g[3, 3] = True  # values 12 and 11; top-2 are 16 and 15 -> 0
    assert BoundingBoxAccuracy()(S, g).item() == 0.0


def test_pointing_game_toy_and_tolerance() -> None:
    assert PointingGame()(S, G).item() == 1.0  # max (16) at (0, 0), inside G
    g = torch.zeros(4, 4, dtype=torch.bool)
    g[3, 3] = True  # distance from (0, 0) = sqrt(18) = 4.243
    assert PointingGame()(S, g).item() == 0.0
    assert PointingGame(tolerance=4)(S, g).item() == 0.0
    assert PointingGame(tolerance=5)(S, g).item() == 1.0
    g = torch.zeros(4, 4, dtype=torch.bool)
    g[0, 3] = True  # distance exactly 3: the acceptance disc is open (TorchRay's d^2 < t^2)
    assert PointingGame(tolerance=3)(S, g).item() == 0.0
    assert PointingGame(tolerance=3.01)(S, g).item() == 1.0


def test_pointing_game_ties() -> None:
    s = torch.zeros(4, 4)
    s[0, 3] = s[3, 0] = 1.0
    g = torch.zeros(4, 4, dtype=torch.bool)
    g[3, 0] = True
    assert PointingGame(ties="first")(s, g).item() == 0.0  # first maximum in row-major order is (0, 3)
    assert PointingGame(ties="any")(s, g).item() == 1.0


def test_batch_equals_single_and_empty_mask_is_nan() -> None:
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 8, 8, generator=gen)
    masks = torch.rand(5, 8, 8, generator=gen) > 0.7
    masks[2] = False
    for metric in (EnergyPointingGame(), TopFractionIoU(), BoundingBoxAccuracy(), PointingGame(tolerance=2)):
        batch = metric(maps, masks)
        assert math.isnan(batch[2].item())
        for i in (0, 1, 3, 4):
            assert batch[i].item() == pytest.approx(metric(maps[i], masks[i]).item(), abs=0)


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="does not match"):
        EnergyPointingGame()(torch.rand(4, 4), torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        EnergyPointingGame()(torch.full((4, 4), float("nan")), G)
    with pytest.raises(ValueError, match="fraction"):
        TopFractionIoU(fraction=0)
    with pytest.raises(ValueError, match="tolerance"):
        PointingGame(tolerance=-1)


def test_metadata() -> None:
    for cls in (EnergyPointingGame, TopFractionIoU, BoundingBoxAccuracy, PointingGame):
        assert cls.category is MetricCategory.GROUND_TRUTH
        assert cls.direction is Direction.HIGHER
        assert cls.name and cls.__doc__ and "\\" in cls.__doc__  # a formula is in the docstring


def test_top_fraction_mask_breaks_ties_by_position() -> None:
    kept = top_fraction_mask(torch.zeros(1, 4, 4), 0.2)  # k = 3 of equal values: the first three
    assert kept.flatten().tolist() == [True] * 3 + [False] * 13


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible() -> None:
    values = np.random.default_rng(0).normal(1.0, 1.0, 200)
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high
    assert (low, high) == bootstrap_ci(values)
    # the normal-theory interval for n=200 is mean +- 1.96 * sd / sqrt(n); the bootstrap is close to it
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert high - low == pytest.approx(2 * half, rel=0.15)
    acc = MetricAccumulator("x")
    for v in [1.0, float("nan"), 3.0]:
        acc.update(v)
    summary = acc.summary()
    assert summary["mean"] == 2.0 and summary["nan_count"] == 1 and summary["n"] == 2


# ----------------------------------------------------------------------------- peer: Quantus
@pytest.fixture(scope="module")
def quantus() -> object:
    """Quantus; only the peer comparisons skip when it is missing."""
    return pytest.importorskip("quantus")


def _quantus_inputs(batch: int = 6, size: int = 12, seed: int = 3) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    a = rng.random((batch, 1, size, size))  # continuous values: no ties
    s = (rng.random((batch, 1, size, size)) > 0.75).astype(np.float64)
    x = rng.random((batch, 3, size, size))
    y = np.zeros(batch, dtype=int)
    return x, y, a, s


def _run_quantus(metric: object, x: np.ndarray, y: np.ndarray, a: np.ndarray, s: np.ndarray) -> np.ndarray:
    return np.asarray(metric(model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s, channel_first=True), dtype=float)


@pytest.mark.filterwarnings("ignore")
def test_ebpg_matches_quantus_relevance_mass_accuracy(quantus: Any) -> None:
    x, y, a, s = _quantus_inputs()
    peer = _run_quantus(quantus.RelevanceMassAccuracy(disable_warnings=True, normalise=False, abs=False), x, y, a, s)
    ours = EnergyPointingGame()(a[:, 0], s[:, 0]).numpy()
    np.testing.assert_allclose(ours, peer, atol=1e-6)


@pytest.mark.filterwarnings("ignore")
def test_bbox_matches_quantus_relevance_rank_accuracy(quantus: Any) -> None:
    x, y, a, s = _quantus_inputs()
    peer = _run_quantus(quantus.RelevanceRankAccuracy(disable_warnings=True, normalise=False, abs=False), x, y, a, s)
    ours = BoundingBoxAccuracy()(a[:, 0], s[:, 0]).numpy()
    np.testing.assert_allclose(ours, peer, atol=1e-6)


@pytest.mark.filterwarnings("ignore")
def test_pointing_game_matches_quantus(quantus: Any) -> None:
    x, y, a, s = _quantus_inputs(batch=10, seed=7)
    # make some hits certain and some ties: Quantus counts a hit when any maximal pixel is inside
    a[0, 0, 2, 2] = 5.0
    s[0, 0, 2, 2] = 1.0
    a[1, 0, 0, 0] = a[1, 0, 5, 5] = 5.0
    s[1, 0, 0, 0], s[1, 0, 5, 5] = 0.0, 1.0
    peer = _run_quantus(quantus.PointingGame(disable_warnings=True, normalise=False, abs=False), x, y, a, s)
    ours = PointingGame(ties="any")(a[:, 0], s[:, 0]).numpy()
    np.testing.assert_allclose(ours, peer, atol=1e-6)
    assert ours[0] == 1.0 and ours[1] == 1.0
