"""Every method on a CUDA device: the same maps as on the CPU (Pearson r; cuDNN may use TF32), nothing left on the
wrong device, reduced precision and memory-sized batches on a real GPU, pinned copies, an evaluation with
``device="cuda"``. Skipped (with a message) on a machine without CUDA; benchmarks/bench_gpu.py measures speed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def test_inv_runs_on_cuda(make_model: Callable[..., nn.Module]) -> None:
    from convlens.concepts.inv import INV

    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    explanation = INV(make_model().cuda(), layers="convs").explain(x.cuda())
    assert explanation.layers


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
        config = EvaluationConfig(model="synthetic-vgg", methods=["gradcam", "sise"], data="synthetic", limit=3,
                                  metrics=["ebpg", "drop"], out=tmp_path / device, device=device, n_samples=1)
        results[device] = {(s["method"], s["metric"]): s["mean"] for s in run_evaluation(config).summary}
    for key, value in results["cpu"].items():
        if key[1] != "seconds":
            assert results["cuda"][key] == pytest.approx(value, rel=0.02, abs=1e-3), key
