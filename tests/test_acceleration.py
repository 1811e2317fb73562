"""The GPU path's parts that run on a CPU: bf16 autocast really runs the masked forwards in bf16 and keeps the
maps (Pearson r against fp32), the ambient batch size reaches the masked forwards and is restored, the memory
arithmetic of ``batch_size="auto"``, opt-in compilation (a real ``torch.compile`` with the eager backend: same
scores), channels-last conversion restored exactly, pinned copies only towards CUDA. What needs a GPU is in
test_cuda.py (skipped here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import convlens.methods.base as base
from convlens.core import acceleration
from convlens.core.acceleration import (
    Acceleration,
    accelerated,
    batch_from_memory,
    compiled,
    engine_precision,
    memory_batch_size,
    to_device,
)
from convlens.core.engine import MaskedForwardEngine, channels_last_model
from convlens.methods.registry import create

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def _conv_dtypes(model: nn.Module) -> tuple[list[torch.dtype], Any]:
    seen: list[torch.dtype] = []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return seen, conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))


def test_bf16_autocast_runs_the_masked_forwards_in_bf16_and_keeps_the_scores(make_model: Callable[..., nn.Module]
                                                                             ) -> None:
    model = make_model()
    x = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
    masks = torch.rand(24, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    seen, hook = _conv_dtypes(model)
    fp32 = MaskedForwardEngine(model, batch_size=8).run(x, masks, [1, 3])
    assert set(seen) == {torch.float32}
    seen.clear()
    with accelerated(precision="bf16"):
        bf16 = MaskedForwardEngine(model, batch_size=8).run(x, masks, [1, 3])
    explicit = MaskedForwardEngine(model, batch_size=8, precision="bf16").run(x, masks, [1, 3])
    hook.remove()
    assert set(seen) == {torch.bfloat16}  # every masked forward's convolutions ran in bf16
    assert bf16.dtype == torch.float32 and torch.equal(bf16, explicit)
    assert not torch.equal(bf16, fp32)  # reduced precision did something ...
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=2e-3)  # ... within bf16's 8-bit mantissa


@pytest.mark.parametrize(("method", "knobs"), [
    ("rise", {"n_masks": 400}), ("scorecam", {}), ("sise", {}), ("sise", {"fusion": "code"}), ("adasise", {}),
])
def test_bf16_maps_agree_with_fp32(make_model: Callable[..., nn.Module], method: str, knobs: dict[str, Any]) -> None:
    """Map agreement of bf16 autocast vs fp32 on the tiny CNN (the GPU benchmark's goal: r >= 0.99)."""
    model = make_model(seed=2)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    explainer = create(method, model, batch_size=32, **knobs)
    fp32 = explainer.explain(x)
    with accelerated(precision="bf16"):
        bf16 = explainer.explain(x)
    assert bf16.params["precision"] == "bf16" and "precision" not in fp32.params
    for a, b in zip(fp32.maps, bf16.maps, strict=True):
        assert pearson(a, b) >= 0.99


def test_engine_precision_choice() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert engine_precision(None, False, cpu) == "fp32"
    assert engine_precision(None, True, cuda) == "fp16"  # the engine's former autocast flag
    assert engine_precision(None, True, cpu) == "fp32"
    with accelerated(precision="bf16"):
        assert engine_precision(None, False, cpu) == "bf16"
        assert engine_precision("fp32", False, cpu) == "fp32"  # an engine's own setting wins
    with pytest.raises(ValueError, match="precision must be one of"):
        engine_precision("fp8", False, cpu)
    for bad in ({"precision": "int8"}, {"batch_size": 0}, {"batch_size": True}, {"memory_fraction": 1.5},
                {"max_batch_size": 0}):
        with pytest.raises(ValueError):
            Acceleration(**bad)  # type: ignore[arg-type]


def test_ambient_batch_size_reaches_the_masked_forwards_and_is_restored(make_model: Callable[..., nn.Module]) -> None:
    model = make_model()
    x = torch.randn(1, 3, 32, 32)
    batches: list[int] = []
    hook = model.register_forward_hook(lambda _m, inputs, _o: batches.append(inputs[0].shape[0]))
    rise = create("rise", model, batch_size=10, n_masks=40)
    with accelerated(batch_size=16):
        explanation = rise.explain(x)
    hook.remove()
    assert batches[1:] == [16, 16, 8]  # after the plain forward of the image: 40 masks in chunks of 16
    assert explanation.params["batch_size"] == 16 and rise.batch_size == 10


def test_auto_batch_size_is_sized_for_masked_forward_methods_only(make_model: Callable[..., nn.Module],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``"auto"`` asks :func:`memory_batch_size` (here standing in for a GPU's answer, 7) for methods whose
    batches are inference-only; IG's batches carry a backward pass and keep their size. On a CPU the real
    function answers None: every method keeps its own batch size."""
    model = make_model()
    x = torch.randn(1, 3, 32, 32)
    assert memory_batch_size(model, x[0]) is None
    with accelerated(batch_size="auto"):
        assert create("rise", model, batch_size=10, n_masks=20).explain(x).params["batch_size"] == 10
    monkeypatch.setattr(base, "memory_batch_size", lambda *args: 7)
    with accelerated(batch_size="auto"):
        assert create("rise", model, batch_size=10, n_masks=20).explain(x).params["batch_size"] == 7
        assert create("ig", model, batch_size=10, steps=4).explain(x).params["batch_size"] == 10


def test_batch_from_memory_arithmetic() -> None:
    gib = 2**30
    assert batch_from_memory(10 * gib, 40 * 2**20, 0.7, 1024) == 179  # floor(0.7 * 10 GiB / 40 MiB) = 179.2
    assert batch_from_memory(100 * gib, 2**20, 0.7, 1024) == 1024  # capped
    assert batch_from_memory(2**20, 40 * 2**20, 0.7, 1024) == 1  # never below one
    assert batch_from_memory(gib, 0, 0.7, 256) == 256


def test_compiled_forwards_give_the_same_scores(make_model: Callable[..., nn.Module]) -> None:
    """A real ``torch.compile`` (dynamo with the eager backend: same kernels) used by the engine: equal scores,
    compiled once per model and mode."""
    model = make_model()
    x = torch.randn(3, 32, 32)
    masks = torch.rand(12, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    plain = MaskedForwardEngine(model, batch_size=8).run(x, masks, [0, 2])
    fast = compiled(model, True, backend="eager")
    assert compiled(model, True, backend="eager") is fast
    model.__dict__[acceleration._COMPILED_ATTRIBUTE]["True:inductor"] = fast  # what compile=True resolves to
    with_compile = MaskedForwardEngine(model, batch_size=8, compile=True).run(x, masks, [0, 2])
    with accelerated(compile=True):
        ambient = MaskedForwardEngine(model, batch_size=8).run(x, masks, [0, 2])
    torch.testing.assert_close(with_compile, plain, rtol=0, atol=1e-6)
    assert torch.equal(with_compile, ambient)


def test_a_dropped_model_and_its_compiled_forward_are_collected(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled module refers to its model (as ``torch.compile``'s OptimizedModule does): the cache must not
    keep either alive once the caller drops the model; a copy or pickle of the model carries no compiled form."""
    import copy
    import gc
    import pickle
    import weakref

    class StandIn(nn.Module):  # what torch.compile returns: a module wrapping (and referring to) the model
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

    calls: list[nn.Module] = []

    def fake_compile(model: nn.Module, **options: Any) -> nn.Module:
        calls.append(model)
        return StandIn(model)

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = nn.Sequential(nn.Linear(2, 2))
    first = compiled(model, True)
    assert compiled(model, True) is first and len(calls) == 1  # once per model and mode
    assert set(model.state_dict()) == {"0.weight", "0.bias"}  # the cache is no sub-module
    assert not pickle.loads(pickle.dumps(model)).__dict__.get(acceleration._COMPILED_ATTRIBUTE)
    assert not copy.deepcopy(model).__dict__.get(acceleration._COMPILED_ATTRIBUTE)
    model_ref, compiled_ref = weakref.ref(model), weakref.ref(first)
    calls.clear()
    del model, first
    gc.collect()
    assert model_ref() is None and compiled_ref() is None


def test_channels_last_restores_every_parameter_exactly() -> None:
    """A depthwise (C, 1, k, k) weight is "contiguous" in both layouts: the strides must come back as they were
    (else later convolutions pick other kernels and differ in the last bit)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    strides = [p.stride() for p in model.parameters()]
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    with channels_last_model(model):
        assert model[1].weight.stride() != strides[2]  # converted inside
    assert [p.stride() for p in model.parameters()] == strides
    assert torch.equal(model(x), before)
    MaskedForwardEngine(model, batch_size=4).run(x[0], torch.rand(6, 1, 16, 16), [1])
    assert [p.stride() for p in model.parameters()] == strides


def test_to_device_on_cpu_is_a_plain_copy() -> None:
    x = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    y = to_device(x, torch.device("cpu"), torch.float32)
    assert y.dtype == torch.float32 and torch.equal(y, x.float()) and not y.is_pinned()


def test_bench_gpu_runs_end_to_end_in_quick_mode(tmp_path: Path) -> None:
    """benchmarks/bench_gpu.py, the script prepared for a GPU machine, on this CPU with tiny settings: every
    (method, precision) measured with its map agreement, a report made from the JSON, and a CPU run is never
    written into BENCHMARKS.md."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"
    out = tmp_path / "gpu.json"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), "--quick", "--models", "efficientnet_lite0", "--json", str(out),
                    "--no-write"], check=True, timeout=900, env=env, capture_output=True)
    data = json.loads(out.read_text())
    (entry,) = data["models"]
    runs = {(run["method"], run["precision"]): run for run in entry["runs"]}
    assert set(runs) == {(m, p) for m in ("sise", "rise") for p in ("fp32", "bf16")}
    assert runs[("rise", "fp32")]["masked_forwards"] == [16]  # the quick settings' 16 masks
    for (_, precision), run in runs.items():
        assert all(s > 0 for s in run["seconds"]) and run["batch_size"] == 8
        assert all(0.9 <= r <= 1.0 + 1e-9 for r in run["pearson_vs_fp32"])
        if precision == "fp32":
            assert run["pearson_vs_fp32"] == [pytest.approx(1.0)]
    refused = subprocess.run([sys.executable, str(script), "--report", str(out)], timeout=900, env=env,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "not written" in refused.stderr
    assert "### efficientnet_lite0" in refused.stdout and "| sise | bf16 |" in refused.stdout
