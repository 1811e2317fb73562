"""The batched adaptive KDE against the `adaptivekde` package and a literal port of ADVISEkernel.m."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from adaptivekde import ssvkernel as adaptivekde_ssvkernel
from adaptivekde.ssvkernel import CostFunction, fftkernel, fftkernelWin, ilogexp, logexp
from scipy.signal import find_peaks

from convlens.methods.kde import count_peaks, linspace_like_numpy, ssvkernel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_adaptivekde(x: np.ndarray, tin: np.ndarray) -> np.ndarray | None:
    """First output of ``adaptivekde.ssvkernel(x, tin, M=10, nbs=1, WinFunc='Gauss')``; None when it raises."""
    np.random.seed(0)  # only its bootstrap (nbs=1) draws random numbers; the first output is deterministic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return adaptivekde_ssvkernel(x, tin, M=10, nbs=1, WinFunc="Gauss")[0]
        except (IndexError, ValueError):
            return None


def reference_matlab(x: np.ndarray, tin: np.ndarray, M: int = 10, costs: list[float] | None = None
                     ) -> np.ndarray | None:
    """Literal, slow re-computation of ADVISEkernel.m (MATLAB) with adaptivekde's helper functions.

    Differences to adaptivekde's top level, line by line from the MATLAB source: T = range of tin;
    dt_samp from the in-range samples (empty -> t = tin, no error); ``histc(x_ab, t - dt/2)`` with L
    edges (values above the last edge are dropped, an exact hit on it counts); 29 evaluations (k = 1..29);
    N = 0 gives NaN (returned as None here). ``costs`` collects every evaluated cost in order.
    """
    record = costs.append if costs is not None else (lambda _value: None)
    T = tin.max() - tin.min()
    x_ab = x[(x >= tin.min()) & (x <= tin.max())]
    gaps = np.sort(np.diff(np.sort(x_ab)))
    gaps = gaps[gaps != 0]
    if gaps.size and gaps[0] > np.min(np.diff(tin)):
        t = np.linspace(tin.min(), tin.max(), int(min(np.ceil(T / gaps[0]), 1e3)))
    else:
        t = tin
    if t.size < 2:
        return None
    dt = np.min(np.diff(t))
    edges = t - dt / 2
    counts = np.zeros(t.size)
    for value in x_ab:
        k = np.searchsorted(edges, value, side="right") - 1
        if 0 <= k < t.size - 1 or (k == t.size - 1 and value == edges[-1]):
            counts[k] += 1
    y_hist = counts / dt
    L = y_hist.size
    N = np.sum(y_hist * dt)
    if N == 0:
        return None
    W = logexp(np.linspace(ilogexp(np.array([5 * dt])), ilogexp(np.array([T])), M).ravel())
    c = np.zeros((M, L))
    for j in range(M):
        yh = fftkernel(y_hist, W[j] / dt)
        c[j] = yh**2 - 2 * yh * y_hist + 2 / (2 * np.pi) ** 0.5 / W[j] * y_hist
    optws = np.zeros((M, L))
    for i in range(M):
        C_local = np.array([fftkernelWin(c[j], W[i] / dt, "Gauss") for j in range(M)])
        optws[i] = W[np.argmin(C_local, axis=0)]
    a, b, tol, phi = 1e-12, 1.0, 1e-5, (5**0.5 + 1) / 2
    c1 = (phi - 1) * a + (2 - phi) * b
    c2 = (2 - phi) * a + (phi - 1) * b
    f1 = CostFunction(y_hist, N, t, dt, optws, W, "Gauss", c1)[0]
    f2 = CostFunction(y_hist, N, t, dt, optws, W, "Gauss", c2)[0]
    record(f1)
    record(f2)
    k = 1
    while abs(b - a) > tol * (abs(c1) + abs(c2)) and k < 30:
        if f1 < f2:
            b, c2 = c2, c1
            c1 = (phi - 1) * a + (2 - phi) * b
            f2 = f1
            f1, yv, _ = CostFunction(y_hist, N, t, dt, optws, W, "Gauss", c1)
            record(f1)
        else:
            a, c1 = c1, c2
            c2 = (2 - phi) * a + (phi - 1) * b
            f1 = f2
            f2, yv, _ = CostFunction(y_hist, N, t, dt, optws, W, "Gauss", c2)
            record(f2)
        yopt = yv / np.sum(yv * dt)
        k += 1
    return np.interp(tin, t, yopt)


def adaptivekde_costs(x: np.ndarray, tin: np.ndarray) -> list[float]:
    """Every cost adaptivekde's golden-section search evaluates, in order."""
    module = sys.modules["adaptivekde.ssvkernel"]
    original = module.CostFunction
    costs: list[float] = []

    def recording(*args: object) -> tuple:
        out = original(*args)
        costs.append(out[0])
        return out

    module.CostFunction = recording
    try:
        reference_adaptivekde(x, tin)
    finally:
        module.CostFunction = original
    return costs


def golden_section_tie(costs: list[float], rel: float = 1e-9) -> bool:
    """Whether the golden-section search compared two costs equal up to rounding (a flat stretch of C(g)):
    there the branch ``f1 < f2`` is decided by floating-point noise, which no re-implementation shares."""
    f1, f2 = costs[0], costs[1]
    for new in costs[2:]:
        if abs(f1 - f2) <= rel * max(abs(f1), abs(f2)):
            return True
        f1, f2 = (new, f1) if f1 < f2 else (f2, new)
    return False


def sample_rows(seed: int, n_per_kind: int, size: int) -> np.ndarray:
    """Activation-like rows: in-range Gaussians, post-ReLU, scaled uniforms (partly out of [0, 1]),
    bimodal mixtures, ties, and coarse rows with few distinct values (internal grid coarser than tin)."""
    rng = np.random.default_rng(seed)
    kinds = [
        rng.normal(0.45, 0.2, (n_per_kind, size)),
        np.maximum(rng.normal(0.0, 0.8, (n_per_kind, size)), 0.0),
        rng.uniform(0, 1, (n_per_kind, size)) * rng.uniform(0.3, 3.0, (n_per_kind, 1)),
        np.where(rng.random((n_per_kind, size)) < 0.5, rng.normal(0.25, 0.05, (n_per_kind, size)),
                 rng.normal(0.75, 0.05, (n_per_kind, size))),
        np.round(rng.uniform(0, 1, (n_per_kind, size)) * 12) / 12 + rng.uniform(0, 0.01, (n_per_kind, 1)),
        rng.choice(np.linspace(0.1, 0.9, 5), (n_per_kind, size)) * rng.uniform(0.9, 1.1, (n_per_kind, 1)),
    ]
    return np.concatenate(kinds)


def compare(ours: torch.Tensor, valid: torch.Tensor, references: list[np.ndarray | None]
            ) -> tuple[float, float, list[int]]:
    """(fraction of rows with r >= 0.999, fraction with equal peak counts, rows failing either).
    Failures (no density) must coincide exactly."""
    good_r, equal, mismatches = 0, 0, []
    peaks_ours = count_peaks(ours).tolist()
    for i, ref in enumerate(references):
        ref_ok = ref is not None and bool(np.all(np.isfinite(ref)))
        assert bool(valid[i]) == ref_ok, f"row {i}: ours valid={bool(valid[i])}, reference fitted={ref_ok}"
        ref_peaks = len(find_peaks(ref)[0]) if ref_ok else 0
        same_peaks = peaks_ours[i] == ref_peaks
        close = not ref_ok or np.corrcoef(ref, ours[i].numpy())[0, 1] >= 0.999
        equal += int(same_peaks)
        good_r += int(close)
        if not (same_peaks and close):
            mismatches.append(i)
    return good_r / len(references), equal / len(references), mismatches


def test_matches_adaptivekde_on_random_rows() -> None:
    x = sample_rows(seed=0, n_per_kind=7, size=49)
    tin = np.linspace(0, 1, 49)
    result = ssvkernel(torch.from_numpy(x), torch.from_numpy(tin), convention="adaptivekde")
    references = [reference_adaptivekde(row, tin) for row in x]
    close, agreement, mismatches = compare(result.density, result.valid, references)
    assert close == 1.0 and agreement == 1.0, mismatches
    assert (result.grid_points[result.valid] < 49).any(), "the coarse-grid branch was not exercised"


def test_matlab_convention_matches_literal_port() -> None:
    x = sample_rows(seed=1, n_per_kind=6, size=64)
    tin = np.linspace(0, 1, 64)
    result = ssvkernel(torch.from_numpy(x), torch.from_numpy(tin))
    references = [reference_matlab(row, tin) for row in x]
    close, agreement, mismatches = compare(result.density, result.valid, references)
    assert close == 1.0 and agreement == 1.0, mismatches


def test_conventions_differ_where_documented() -> None:
    """MATLAB's histc drops samples in (1 - dt/2, 1]; numpy.histogram keeps them in the last bin."""
    tin = np.linspace(0, 1, 21)  # dt = 0.05, last edge 0.975
    rng = np.random.default_rng(3)
    row = np.concatenate([rng.uniform(0.3, 0.6, 15), [0.99, 0.995, 0.985, 1.0, 0.98, -0.5]])
    x = torch.from_numpy(row[None])
    matlab = ssvkernel(x, torch.from_numpy(tin), convention="matlab")
    port = ssvkernel(x, torch.from_numpy(tin), convention="adaptivekde")
    # the matlab estimate has (almost) no mass near 1, the port's has a bump there
    assert float(matlab.density[0, -1]) < 0.5 * float(port.density[0, -1])
    np.testing.assert_allclose(matlab.density[0].numpy(), reference_matlab(row, tin), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(port.density[0].numpy(), reference_adaptivekde(row, tin), rtol=1e-8, atol=1e-10)


def test_gaussian_mixture_has_two_peaks() -> None:
    rng = np.random.default_rng(7)
    size = 196
    mixture = np.where(
        rng.random((4, size)) < 0.5, rng.normal(0.25, 0.05, (4, size)), rng.normal(0.72, 0.06, (4, size))
    )
    for convention in ("matlab", "adaptivekde"):
        result = ssvkernel(torch.from_numpy(mixture), convention=convention)
        assert result.valid.all()
        assert count_peaks(result.density).tolist() == [2, 2, 2, 2]
        modes = [torch.from_numpy(find_peaks(d.numpy())[0]) / (size - 1) for d in result.density]
        for found in modes:
            assert abs(float(found[0]) - 0.25) < 0.06 and abs(float(found[1]) - 0.72) < 0.06


def test_densities_integrate_to_one_on_the_grid() -> None:
    x = torch.from_numpy(sample_rows(seed=2, n_per_kind=5, size=49))
    result = ssvkernel(x)
    dt = 1 / 48
    on_tin = result.valid & (result.grid_points == 49)
    assert on_tin.sum() > 10
    torch.testing.assert_close(result.density[on_tin].sum(1) * dt, torch.ones(int(on_tin.sum()), dtype=torch.float64))
    # rows estimated on a coarser internal grid t (L points, sum(yopt) dt_t = 1) are linearly interpolated
    # onto tin: the interpolant integrates to 1 - (y_0 + y_L) dt_t / 2 (trapezoid vs rectangle rule)
    coarse = torch.nonzero(result.valid & (result.grid_points < 49)).flatten()
    assert coarse.numel() > 0
    for i in coarse.tolist():
        y = result.density[i].numpy()
        dt_t = 1 / (int(result.grid_points[i]) - 1)
        expected = 1 - (y[0] + y[-1]) * dt_t / 2
        assert abs(np.trapezoid(y, dx=dt) - expected) < 0.05
    assert (result.density[result.valid] >= 0).all()


def test_failures_give_no_density() -> None:
    tin = np.linspace(0, 1, 16)
    rows = np.stack([
        np.linspace(1.5, 3.0, 16),  # nothing in range
        np.full(16, 0.4),  # one distinct value, in range
        np.concatenate([[0.4], np.linspace(2, 3, 15)]),  # one distinct in-range value among others
        np.linspace(0.1, 0.9, 16),  # fine
    ])
    x = torch.from_numpy(rows)
    matlab = ssvkernel(x, torch.from_numpy(tin))
    # ADVISEkernel.m: no in-range value -> N = 0 -> NaN density; a single distinct value -> one bump
    assert matlab.valid.tolist() == [False, True, True, True]
    assert torch.isnan(matlab.density[0]).all()
    assert count_peaks(matlab.density).tolist()[:3] == [0, 1, 1]
    np.testing.assert_allclose(matlab.density[1].numpy(), reference_matlab(rows[1], tin), rtol=1e-8)
    assert reference_matlab(rows[0], tin) is None
    # the spec's reading (< 2 distinct in-range values fail) as an explicit option
    strict = ssvkernel(x, torch.from_numpy(tin), min_distinct=2)
    assert strict.valid.tolist() == [False, False, False, True]
    # adaptivekde raises for a constant vector and returns NaN for an empty in-range set: failures here
    port = ssvkernel(x, torch.from_numpy(tin), convention="adaptivekde")
    fitted = [(ref := reference_adaptivekde(r, tin)) is not None and bool(np.isfinite(ref).all()) for r in rows]
    assert port.valid.tolist() == fitted
    assert port.valid.tolist() == [False, False, True, True]


def test_count_peaks_equals_scipy_find_peaks() -> None:
    rng = np.random.default_rng(11)
    rows = []
    for length in range(1, 13):
        for _ in range(60):
            row = rng.integers(0, 4, length).astype(float)  # many plateaus
            if rng.random() < 0.2:
                row[rng.integers(0, length)] = np.nan
            rows.append(row)
    for row in rows:
        assert int(count_peaks(torch.from_numpy(row))) == len(find_peaks(row)[0]), row
    batch = torch.from_numpy(rng.normal(size=(50, 30)))
    assert count_peaks(batch).tolist() == [len(find_peaks(r)[0]) for r in batch.numpy()]


def test_chunking_and_row_order_do_not_change_results() -> None:
    x = torch.from_numpy(sample_rows(seed=4, n_per_kind=3, size=36))
    full = ssvkernel(x)
    chunked = ssvkernel(x, max_chunk_elements=1)
    torch.testing.assert_close(full.density, chunked.density, equal_nan=True)
    permutation = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    shuffled = ssvkernel(x[permutation])
    torch.testing.assert_close(shuffled.density, full.density[permutation], equal_nan=True)


def test_linspace_like_numpy_is_bitwise_numpy() -> None:
    for num in (2, 7, 49, 196, 1000):
        assert torch.equal(linspace_like_numpy(0.0, 1.0, num), torch.from_numpy(np.linspace(0, 1, num)))


def test_bad_input_raises() -> None:
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        ssvkernel(np.zeros((2, 4)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        ssvkernel(torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        ssvkernel(torch.tensor([[0.1, float("nan"), 0.3]]))
    with pytest.raises(ValueError, match="increasing"):
        ssvkernel(torch.rand(2, 5), grid=torch.tensor([0.0, 0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match="convention"):
        ssvkernel(torch.rand(2, 5), convention="R")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    x = torch.from_numpy(sample_rows(seed=5, n_per_kind=10, size=49))
    cpu = ssvkernel(x)
    gpu = ssvkernel(x.cuda())
    torch.testing.assert_close(gpu.density.cpu(), cpu.density, equal_nan=True, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_real_activations_match_adaptivekde() -> None:
    """EfficientNet-Lite0's last layer (bn2, 1280 x 7 x 7, ReLU6) on chelsea: 128 evenly spaced channels."""
    from PIL import Image
    from skimage import data

    from convlens.core.hooks import LayerCapture
    from convlens.models import load

    loaded = load("efficientnet_lite0")
    x = loaded.preprocessing(Image.fromarray(data.chelsea()))[None]
    with LayerCapture(loaded.module, ["bn2"]) as capture, torch.inference_mode():
        loaded.module(x)
        activations = capture.activations["bn2"][0]
    rows = activations.flatten(1)[:: activations.shape[0] // 128].double()
    tin = np.linspace(0, 1, rows.shape[1])
    for convention in ("adaptivekde", "matlab"):
        subset = rows if convention == "adaptivekde" else rows[::2]
        result = ssvkernel(subset, torch.from_numpy(tin), convention=convention)
        traces: list[list[float]] = [[] for _ in range(subset.shape[0])]
        if convention == "adaptivekde":
            references = [reference_adaptivekde(r, tin) for r in subset.numpy()]
        else:
            references = [
                reference_matlab(r, tin, costs=trace) for r, trace in zip(subset.numpy(), traces, strict=True)
            ]
        close, agreement, mismatches = compare(result.density, result.valid, references)
        assert close >= 0.99 and agreement >= 0.99, (convention, mismatches)
        # every difference comes from a tie in the reference's golden-section comparisons
        for i in mismatches:
            costs = adaptivekde_costs(subset[i].numpy(), tin) if convention == "adaptivekde" else traces[i]
            assert golden_section_tie(costs), (convention, i)
        assert result.valid.sum() > subset.shape[0] // 4
