"""RISE: brute-force expectation with fixed masks, the mask generator re-derived literally, batches, Params."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from convlens.core.engine import MaskedForwardEngine
from convlens.core.params import ParamError
from convlens.methods import create
from convlens.methods.rise import RISE, RISEParams, rise_masks


def test_rise_with_fixed_masks_is_the_monte_carlo_expectation(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(3)
    masks = (torch.rand(20, 1, 32, 32, generator=g) > 0.5).float()
    p = 0.5
    result = RISE(tiny_cnn, masks=masks, p=p, batch_size=6).explain(tiny_images[:2], [2, 0])
    for i, c in enumerate([2, 0]):
        expected = torch.zeros(32, 32)
        with torch.no_grad():
            for m in masks:
                prob = torch.softmax(tiny_cnn((tiny_images[i] * m)[None]), dim=1)[0, c]
                expected += prob * m[0]
        expected /= len(masks) * p
        torch.testing.assert_close(result.maps[i], expected, rtol=1e-4, atol=1e-6)
    assert result.forward_passes == 2 + 2 * 20  # logits of both images, their masks
    assert result.params["n_masks"] == 20  # the fixed set's size


def bilinear_by_hand(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear up-sampling written out: output pixel i samples the input at (i + 0.5) * in / out - 0.5
    (pixel centres), clamped to the input, weights from the fractional part."""

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = np.floor(src).astype(int)
        return low, np.minimum(low + 1, n_in - 1), src - low

    y0, y1, fy = axis(grid.shape[0], out_h)
    x0, x1, fx = axis(grid.shape[1], out_w)
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
    bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


@pytest.mark.parametrize(("size", "grid_size", "p"), [((32, 40), 4, 0.3), ((30, 30), 7, 0.7), ((16, 12), 5, 1.0)])
def test_rise_masks_are_the_papers_procedure(size: tuple[int, int], grid_size: int, p: float) -> None:
    """Petsiuk et al. Sec. 3.2, step by step with the same random numbers: N binary s x s grids with
    P(cell = 1) = p; each bilinearly up-sampled to (s + 1) C_H x (s + 1) C_W, C = ceil(H / s); cropped H x W
    at an offset drawn uniformly from [0, C_H) x [0, C_W)."""
    n = 40
    masks = rise_masks(n, size, grid_size=grid_size, p=p, generator=torch.Generator().manual_seed(5))
    assert masks.shape == (n, 1, *size)
    g = torch.Generator().manual_seed(5)
    cells = (torch.rand(n, 1, grid_size, grid_size, generator=g) < p).double().numpy()
    cell_h, cell_w = math.ceil(size[0] / grid_size), math.ceil(size[1] / grid_size)
    dy = torch.randint(0, cell_h, (n,), generator=g).tolist()
    dx = torch.randint(0, cell_w, (n,), generator=g).tolist()
    for i in range(n):
        up = bilinear_by_hand(cells[i, 0], (grid_size + 1) * cell_h, (grid_size + 1) * cell_w)
        expected = np.clip(up[dy[i] : dy[i] + size[0], dx[i] : dx[i] + size[1]], 0, 1)
        np.testing.assert_allclose(masks[i, 0].numpy(), expected, atol=1e-6)


def test_rise_masks_statistics() -> None:
    """Properties any correct generator has, whatever its random numbers: E[m] = p, smooth values in
    [0, 1], and values that are 0 or 1 exactly on the cells' plateaus."""
    for p in (0.2, 0.5, 0.8):
        masks = rise_masks(600, (28, 28), grid_size=7, p=p, generator=torch.Generator().manual_seed(1))
        assert masks.min() >= 0 and masks.max() <= 1
        assert abs(float(masks.mean()) - p) < 0.02  # 600 x 64 Bernoulli cells: std ~0.002
        assert ((masks > 0.05) & (masks < 0.95)).float().mean() > 0.2  # bilinear transitions between cells
    seeded = rise_masks(10, (28, 28), generator=torch.Generator().manual_seed(0))
    assert torch.equal(seeded, rise_masks(10, (28, 28), generator=torch.Generator().manual_seed(0)))


def test_seeded_and_batched(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    explainer = RISE(tiny_cnn, n_masks=64, grid_size=4, batch_size=16, seed=7)
    batch = explainer.explain(tiny_images)
    for i in range(3):
        torch.testing.assert_close(batch.maps[i], explainer.explain(tiny_images[i]).maps[0], rtol=1e-4, atol=1e-6)
    other_seed = RISE(tiny_cnn, n_masks=64, grid_size=4, batch_size=16, seed=8).explain(tiny_images[:1])
    assert not torch.allclose(other_seed.maps[0], batch.maps[0])


def test_copies_of_one_image_share_the_masked_forwards_and_equal_single_calls(
    tiny_cnn: nn.Module, tiny_images: torch.Tensor
) -> None:
    """One image explained for 3 classes as 3 ``expand``-ed copies (what the evaluation passes): one stream of
    masked forwards scores every class; each map is bitwise the single call's."""
    explainer = RISE(tiny_cnn, n_masks=40, grid_size=4, batch_size=16, seed=5)
    image, classes = tiny_images[2], [4, 1, 3]
    batch = explainer.explain(image[None].expand(3, -1, -1, -1), classes)
    singles = [explainer.explain(image[None], [c]) for c in classes]
    for i, single in enumerate(singles):
        assert torch.equal(batch.maps[i], single.maps[0])
    assert singles[0].forward_passes == 1 + 40
    assert batch.forward_passes == 3 + 40  # three logits rows, the masks once
    mixed = torch.stack([image, tiny_images[0], image.clone()])
    together = explainer.explain(mixed, [4, 0, 3])
    assert torch.equal(together.maps[0], singles[0].maps[0]) and torch.equal(together.maps[2], singles[2].maps[0])
    assert torch.equal(together.maps[1], explainer.explain(tiny_images[0][None], [0]).maps[0])
    assert together.forward_passes == 3 + 2 * 40


@pytest.mark.parametrize("batch_size", [4, 64, 100, 200])
def test_streamed_masks_are_the_seeded_generator_in_blocks_of_64(
    tiny_cnn: nn.Module, tiny_images: torch.Tensor, batch_size: int
) -> None:
    """n_masks masks drawn from one generator seeded with ``seed`` in blocks of 64 (the last one shorter),
    whatever the batch size, then Eq. 6; forwards are cut to ``batch_size``."""
    explainer = RISE(tiny_cnn, n_masks=150, grid_size=3, p=0.4, seed=2, batch_size=batch_size)
    explanation = explainer.explain(tiny_images[0], 1)
    generator = torch.Generator().manual_seed(2)
    masks = torch.cat([rise_masks(k, (32, 32), 3, 0.4, generator) for k in (64, 64, 22)])
    with torch.no_grad():
        scores = torch.softmax(tiny_cnn(tiny_images[0] * masks), dim=1)[:, 1]
    expected = (scores[:, None, None] * masks[:, 0]).sum(0) / (150 * 0.4)
    torch.testing.assert_close(explanation.maps[0], expected, rtol=1e-4, atol=1e-6)
    assert explanation.forward_passes == 1 + 150
    sizes: list[int] = []
    engine_run = MaskedForwardEngine.run

    def spy(self: MaskedForwardEngine, x: torch.Tensor, masks: object, *args: object, **kwargs: object) -> torch.Tensor:
        on_chunk = kwargs.pop("on_chunk")
        return engine_run(self, x, masks, *args, on_chunk=lambda m, s: (sizes.append(len(m)), on_chunk(m, s)),
                          **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MaskedForwardEngine, "run", spy)
        explainer.explain(tiny_images[0], 1)
    assert sizes == [min(batch_size, 150 - start) for start in range(0, 150, batch_size)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_masks": 0}, "rise.n_masks: must be >= 1, got 0"),
        ({"n_masks": "2.5"}, "rise.n_masks: expected an integer, got '2.5'"),
        ({"p": 0}, "rise.p: must be (0, 1], got 0.0"),
        ({"p": 1.5}, "rise.p: must be (0, 1], got 1.5"),
        ({"grid_size": 0}, "rise.grid_size: must be >= 1, got 0"),
        ({"masks_per_pixel": 3}, "rise has no parameter 'masks_per_pixel'; parameters: n_masks, grid_size, p, seed"),
    ],
)
def test_params_check_their_ranges(tiny_cnn: nn.Module, kwargs: dict, message: str) -> None:
    with pytest.raises(ParamError) as info:
        RISE(tiny_cnn, **kwargs)
    assert str(info.value) == message


def test_keyword_api_and_recorded_params(tiny_cnn: nn.Module) -> None:
    explainer = create("rise", tiny_cnn, n_masks=1000, layers="last")  # layers: accepted and ignored
    assert explainer.params() == {"score": "softmax", "batch_size": 64, "n_masks": 1000, "grid_size": 7, "p": 0.5,
                                  "seed": 0}
    assert RISE(tiny_cnn, params=RISEParams(n_masks=1000)).params() == explainer.params()
    assert {spec.name: spec.range for spec in RISEParams.describe()} == {
        "n_masks": ">= 1", "grid_size": ">= 1", "p": "(0, 1]", "seed": ""}
