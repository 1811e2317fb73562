"""Scoped thread limits (convlens.core.threads): they lower and restore torch's and BLAS's thread counts, nest,
compose with a Ray worker's --threads-per-worker (small-operation sections on one thread, the batched
forwards on the worker's), and change no map: every method's maps with the limits are those without them,
bit for bit or within float rounding, on 4 threads and on 1."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

import convlens.numerics.avx as avx_module
import convlens.numerics.kde as kde_module
from convlens.core.threads import limit_threads, thread_limits_enabled, thread_limits_on
from convlens.methods import create
from convlens.models.preprocessing import Preprocessing
from convlens.numerics.kde import linspace_like_numpy, ssvkernel
from convlens.runners.ray_workers import _set_threads

PREP = Preprocessing(size=32, resize=32)


@pytest.fixture
def threads() -> Iterator[Callable[[int], None]]:
    """Set torch's thread count for the test; the count before is restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def blas_threads() -> list[int]:
    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]


def test_lowers_restores_and_nests(threads: Callable[[int], None]) -> None:
    threads(3)
    with limit_threads():
        assert torch.get_num_threads() == 1
        with limit_threads(2):  # never raises an outer limit
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 3
    with limit_threads(2):
        assert torch.get_num_threads() == 2
        with limit_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 3
    threads(1)
    with limit_threads(2):  # the caller's lower count wins
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 1


def test_restores_after_an_error_and_as_a_decorator(threads: Callable[[int], None]) -> None:
    threads(3)
    with pytest.raises(RuntimeError, match="inside"), limit_threads():
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 3

    @limit_threads(2)
    def seen() -> int:
        return torch.get_num_threads()

    assert seen() == 2 and seen() == 2  # a fresh limit per call
    assert torch.get_num_threads() == 3


def test_switch_off_and_required_limits(threads: Callable[[int], None]) -> None:
    threads(3)
    assert thread_limits_on()
    with thread_limits_enabled(False):
        assert not thread_limits_on()
        with limit_threads():
            assert torch.get_num_threads() == 3  # a speed limit: off
        with limit_threads(1, required=True):
            assert torch.get_num_threads() == 1  # a limit a result depends on (INV) always holds
        with thread_limits_enabled(True), limit_threads():
            assert torch.get_num_threads() == 1
    assert thread_limits_on() and torch.get_num_threads() == 3


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1"])
def test_rejects_bad_counts(bad: Any) -> None:
    with pytest.raises(ValueError, match="integer >= 1"), limit_threads(bad):
        pass


def test_blas_limit_lowers_and_restores_numpy_and_scipy_blas() -> None:
    import scipy.linalg  # noqa: F401  (its own OpenBLAS, loaded after the limit's first scan)

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        assert before and all(n == 2 for n in before)
        with limit_threads(1, blas=True):
            assert all(n == 1 for n in blas_threads())
            with limit_threads(2, blas=True):  # never raises
                assert all(n == 1 for n in blas_threads())
            assert all(n == 1 for n in blas_threads())
        assert blas_threads() == before
        with limit_threads(1):  # without blas=True only torch is limited
            assert blas_threads() == before


def tiny_input(seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (1, 32, 32, 3)).astype(np.float32)
    images[:, 6:20, 10:26] = rng.integers(150, 256, (1, 1, 1, 3))  # a bright patch
    return PREP.normalize(torch.from_numpy(images / 255.0).permute(0, 3, 1, 2))


def test_small_sections_run_on_one_thread_and_forwards_on_the_workers(
    make_model: Callable[..., torch.nn.Module], threads: Callable[[int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ray worker with --threads-per-worker 3: ADVISE's KDE and AVX similarity see one thread, every model
    forward (the gradients' and the masked images') sees the worker's three, and three are left afterwards."""
    model = make_model(seed=3, num_classes=10)
    seen: dict[str, list[int]] = {"kde": [], "similarity": [], "forward": []}

    def recording(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen[name].append(torch.get_num_threads())
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(kde_module, "_fit_rows", recording("kde", kde_module._fit_rows))
    monkeypatch.setattr(avx_module, "fsim_reference_terms", recording("similarity", avx_module.fsim_reference_terms))
    model.register_forward_pre_hook(lambda *_: seen["forward"].append(torch.get_num_threads()))
    _set_threads(3)  # what the worker of convlens.runners.ray_workers does first
    create("advise", model, preprocessing=PREP).explain(tiny_input())
    assert seen["kde"] == [1] and seen["similarity"] and set(seen["similarity"]) == {1}
    assert len(seen["forward"]) >= 3 and set(seen["forward"]) == {3}  # (layer search,) logits, gradients, AVX
    assert torch.get_num_threads() == 3


METHODS: dict[str, dict[str, Any]] = {
    "gradcam": {},
    "gradcampp": {},
    "layercam": {"layers": ["block2", "block3"]},
    "scorecam": {"layers": "block2"},
    "rise": {"n_masks": 40, "batch_size": 16},
    "sise": {},
    "sise-fast": {"fast": True, "fast_factor": 2.0},
    "adasise": {"fusion": "code"},
    "advise": {"preprocessing": PREP},
}


def _explain(model: torch.nn.Module, name: str, x: torch.Tensor, limits: bool) -> Any:
    with thread_limits_enabled(limits):
        return create(name.removesuffix("-fast"), model, **METHODS[name]).explain(x)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("count", [4, 1])
def test_maps_do_not_depend_on_the_limits(
    name: str, count: int, make_model: Callable[..., torch.nn.Module], threads: Callable[[int], None]
) -> None:
    """Each method with the scoped limits and without them, on ``count`` threads: the same maps (bit for bit
    where nothing rounds differently, else within float32 rounding), the same ADVISE groups and selection."""
    model = make_model(seed=3, num_classes=10)
    x = tiny_input(seed=1)
    threads(count)
    limited, unlimited = _explain(model, name, x, True), _explain(model, name, x, False)
    torch.testing.assert_close(limited.maps, unlimited.maps, rtol=1e-5, atol=1e-6)
    for key, layer_map in unlimited.layer_maps.items():
        torch.testing.assert_close(limited.layer_maps[key], layer_map, rtol=1e-5, atol=1e-6)
    if name == "advise":
        assert limited.extras["images"][0]["peak_histogram"] == unlimited.extras["images"][0]["peak_histogram"]
        assert limited.extras["selected"] == unlimited.extras["selected"]
    if count == 1:  # nothing to limit: the very same computation
        assert torch.equal(limited.maps, unlimited.maps)


def test_kde_does_not_depend_on_the_thread_count(threads: Callable[[int], None]) -> None:
    """The KDE on 4 threads without its limit and on one: the same densities to rounding, the same search."""
    samples = torch.from_numpy(np.random.default_rng(0).normal(0.45, 0.2, (64, 49)))
    tin = linspace_like_numpy(0.0, 1.0, 49)
    one = ssvkernel(samples, tin, convention="adaptivekde")
    threads(4)
    with thread_limits_enabled(False):
        four = ssvkernel(samples, tin, convention="adaptivekde")
    assert torch.equal(one.valid, four.valid) and torch.equal(one.evaluations, four.evaluations)
    torch.testing.assert_close(one.density, four.density, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(one.stiffness, four.stiffness, rtol=1e-10, atol=0.0)


def _policy(code: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_import_convlens_makes_openmp_threads_sleep_while_they_wait() -> None:
    """``import convlens`` before torch sets OMP_WAIT_POLICY=PASSIVE (read by libgomp when torch loads); a
    value the user set is kept; after torch it changes nothing (too late for this process)."""
    show = "import os; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert _policy(f"import convlens, torch; {show}") == "PASSIVE"
    assert _policy(f"import convlens; {show}", OMP_WAIT_POLICY="active") == "active"
    assert _policy(f"import torch, convlens; {show}") == "None"


def test_the_load_benchmark_starts_and_stops_its_busy_loops() -> None:
    """benchmarks/bench_load.py's busy condition: one spinning process per requested core while the body runs,
    none left afterwards (also when the body fails)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_load.py"
    spec = importlib.util.spec_from_file_location("convlens_bench_load", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def recording_popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        process = real_popen(*args, **kwargs)
        started.append(process)
        return process

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up
        spec.loader.exec_module(bench)
        patch.setattr(bench.subprocess, "Popen", recording_popen)
        patch.setattr(bench.time, "sleep", lambda _: None)
        with pytest.raises(RuntimeError, match="body"), bench.busy_cores(2) as count:
            assert count == 2 and len(started) == 2 and all(p.poll() is None for p in started)
            raise RuntimeError("body")
    assert all(p.poll() is not None for p in started)
