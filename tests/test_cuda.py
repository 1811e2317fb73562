"""Every method on a CUDA device: the same maps as on the CPU (Pearson r; cuDNN may use TF32), nothing left on the
wrong device, reduced precision and memory-sized batches on a real GPU, pinned copies, an evaluation with
``device="cuda"``. Skipped (with a message) on a machine without CUDA; benchmarks/bench_gpu.py measures speed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from convlens.core.acceleration import accelerated, memory_batch_size, to_device
from convlens.methods.registry import METHODS, create

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (none here): run on a GPU machine, see bench_gpu.py"
)

CASES: list[tuple[str, dict[str, Any]]] = [(name, {}) for name in METHODS] + [
    ("rise", {"n_masks": 300}), ("sise", {"fusion": "code"}), ("sise", {"fast": True, "fusion": "code"}),
    ("sise", {"baseline": "blur"}), ("adasise", {"fusion": "simple"}),
]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double().cpu(), b.flatten().double().cpu()
    a, b = a - a.mean(), b - b.mean()
    denominator = a.norm() * b.norm()
    return 1.0 if float(denominator) == 0 and torch.equal(a, b) else float(a @ b / denominator)


def _knobs(name: str, knobs: dict[str, Any]) -> dict[str, Any]:
    small = {"rise": {"n_masks": 200}, "ig": {"steps": 8}}.get(name, {})
    return small | knobs


@pytest.mark.parametrize(("name", "knobs"), CASES, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in CASES])
def test_every_method_runs_on_cuda_with_the_cpu_maps(make_model: Callable[..., nn.Module], name: str,
                                                     knobs: dict[str, Any]) -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cpu_model = make_model(seed=1)
    gpu_model = make_model(seed=1).cuda()
    expected = create(name, cpu_model, batch_size=32, **_knobs(name, knobs)).explain(x, targets=[1, 2])
    explanation = create(name, gpu_model, batch_size=32, **_knobs(name, knobs)).explain(x, targets=[1, 2])
    assert explanation.maps.shape == expected.maps.shape
    for a, b in zip(expected.maps, explanation.maps, strict=True):
        assert pearson(a, b) >= 0.99
    assert torch.equal(explanation.targets.cpu(), expected.targets.cpu())


def _exact_cuda_math() -> Any:
    """No TF32 in cuDNN convolutions and matmuls for the body (CUDA then agrees with the CPU to ~1e-6)."""
    import contextlib

    @contextlib.contextmanager
    def scope() -> Any:
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

    return scope()


def test_inv_runs_on_cuda_with_the_cpu_clusters(make_model: Callable[..., nn.Module]) -> None:
    from convlens.inv.explainer import INV

    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = INV(make_model(), layers="convs", embedding="pca").explain(x)
    with _exact_cuda_math():
        explanation = INV(make_model().cuda(), layers="convs", embedding="pca").explain(x.cuda())
    assert [layer.name for layer in explanation.layers] == [layer.name for layer in expected.layers]
    for got, want in zip(explanation.layers, expected.layers, strict=True):
        np.testing.assert_allclose(got.weights, want.weights, rtol=1e-3, atol=1e-4)
        assert list(got.kept_channels) == list(want.kept_channels)
        assert [c.channels for c in got.clusters] == [c.channels for c in want.clusters], got.name
        for a, b in zip(got.clusters, want.clusters, strict=True):
            assert pearson(torch.from_numpy(a.input_map), torch.from_numpy(b.input_map)) >= 0.99
        assert pearson(torch.from_numpy(got.layer_map), torch.from_numpy(want.layer_map)) >= 0.99


def test_scorecam_and_rise_on_cuda_share_the_forwards_of_copies_and_score_dead_channels(
    make_model: Callable[..., nn.Module],
) -> None:
    """Score-CAM's mask stream on CUDA (its channel bookkeeping indexes on the masks' device), with dead channels
    (the zero image) and one image explained for three classes (shared masked forwards), against the CPU."""
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)).expand(3, -1, -1, -1)
    models = {"cpu": make_model(seed=2), "cuda": make_model(seed=2).cuda()}
    for model in models.values():
        with torch.no_grad():
            model.block3[0].weight[:12] = 0
            model.block3[0].bias[:12] = -1
    for name, knobs in (("scorecam", {"layers": "block3"}), ("rise", {"n_masks": 200})):
        with _exact_cuda_math():
            got = create(name, models["cuda"], batch_size=16, **knobs).explain(x.cuda(), targets=[0, 2, 4])
        want = create(name, models["cpu"], batch_size=16, **knobs).explain(x, targets=[0, 2, 4])
        assert got.forward_passes == want.forward_passes
        for a, b in zip(got.maps, want.maps, strict=True):
            assert pearson(a, b) >= 0.99
        if name == "scorecam":
            zero = want.extras["zero_masks"]["block3"]
            assert got.extras["zero_masks"]["block3"] == zero and zero[0] >= 12


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_cuda_keeps_the_maps(make_model: Callable[..., nn.Module], precision: str) -> None:
    model = make_model(seed=3).cuda()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)).cuda()
    seen: list[torch.dtype] = []
    hook = model.block2[0].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    rise = create("rise", model, n_masks=500, batch_size=64)
    fp32 = rise.explain(x).maps
    seen.clear()
    with accelerated(precision=precision):
        reduced = rise.explain(x)
    hook.remove()
    assert {torch.bfloat16 if precision == "bf16" else torch.float16} <= set(seen)
    assert reduced.params["precision"] == precision
    assert pearson(fp32, reduced.maps) >= 0.99


def test_auto_batch_size_fills_free_memory_within_the_cap(make_model: Callable[..., nn.Module]) -> None:
    model = make_model().cuda()
    sample = torch.randn(3, 32, 32, device="cuda")
    size = memory_batch_size(model, sample, "bf16", 0.5, 4096)
    assert size is not None and 1 <= size <= 4096
    assert memory_batch_size(model, sample, "bf16", 0.5, 4096) == size  # cached
    with accelerated(batch_size="auto", max_batch_size=96):
        explanation = create("rise", model, n_masks=200, batch_size=8).explain(sample[None])
    assert explanation.params["batch_size"] == memory_batch_size(model, sample, "fp32", 0.7, 96)


def test_pinned_copy_to_cuda() -> None:
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = to_device(x, torch.device("cuda"), torch.float32)
    torch.cuda.synchronize()
    assert y.is_cuda and y.dtype == torch.float32 and torch.equal(y.cpu(), x.float())


def test_evaluation_on_cuda_matches_the_cpu(tmp_path: Path) -> None:
    from convlens.runners.evaluate import EvaluationConfig, run_evaluation

    results = {}
    for device in ("cpu", "cuda"):
        config = EvaluationConfig(model="synthetic-vgg", methods=["gradcam", "sise", "scorecam"], data="synthetic",
                                  limit=3, metrics=["ebpg", "drop"], out=tmp_path / device, device=device, n_samples=1)
        results[device] = {(s["method"], s["metric"]): s["mean"] for s in run_evaluation(config).summary}
    for key, value in results["cpu"].items():
        if key[1] != "seconds":
            assert results["cuda"][key] == pytest.approx(value, rel=0.02, abs=1e-3), key
