"""The masked-forward engine equals a brute-force loop, chunked any way, and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convlens.core.engine import MaskedForwardEngine, report_progress


def _brute_force(model: nn.Module, x: torch.Tensor, masks: torch.Tensor, ids: list[int], baseline: torch.Tensor | float,
                 kind: str) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for m in masks:
            logits = model((baseline + (x - baseline) * m)[None])[0]
            values = {"logit": logits, "softmax": logits.softmax(0), "sigmoid": logits.sigmoid()}[kind]
            rows.append(values[ids])
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["logit", "softmax", "sigmoid"])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_engine_matches_brute_force(tiny_cnn: nn.Module, kind: str, batch_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, 32, generator=g)
    masks = torch.rand(10, 1, 32, 32, generator=g)
    engine = MaskedForwardEngine(tiny_cnn, score=kind, batch_size=batch_size)  # type: ignore[arg-type]
    scores = engine.run(x, masks, [0, 4])
    torch.testing.assert_close(scores, _brute_force(tiny_cnn, x, masks, [0, 4], 0.0, kind), rtol=1e-4, atol=1e-5)
    assert engine.forward_passes == 10


def test_engine_sources_baseline_and_callbacks(tiny_cnn: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 32, 32, generator=g)
    masks = torch.rand(7, 32, 32, generator=g)  # (N, H, W) accepted
    baseline = torch.randn(3, 1, 1, generator=g)
    expected = _brute_force(tiny_cnn, x[0], masks[:, None], [2], baseline, "softmax")
    engine = MaskedForwardEngine(tiny_cnn, score="softmax", batch_size=4)
    seen: list[int] = []
    progress: list[int] = []
    with report_progress(progress.append):
        from_tensor = engine.run(x, masks, 2, baseline=baseline, on_chunk=lambda m, s: seen.append(m.shape[0]))
    from_iterable = engine.run(x, [masks[:2], masks[2:]], 2, baseline=baseline)
    chunks = [masks[:5], masks[5:]]
    from_callable = engine.run(x, lambda i: chunks[i] if i < len(chunks) else None, 2, baseline=baseline)
    for scores in (from_tensor, from_iterable, from_callable):
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
    assert seen == [4, 3] and progress == [4, 3]


def test_engine_restores_model_state(tiny_cnn: nn.Module) -> None:
    tiny_cnn.train()
    engine = MaskedForwardEngine(tiny_cnn, batch_size=4, channels_last=True)
    engine.run(torch.randn(3, 32, 32), torch.rand(5, 1, 32, 32), 0)
    assert tiny_cnn.training
    assert all(p.is_contiguous() for p in tiny_cnn.parameters())
    assert not any(p.is_inference() for p in tiny_cnn.parameters())
    # the model still trains afterwards (parameters are normal autograd leaves)
    loss = tiny_cnn(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    assert tiny_cnn.fc.weight.grad is not None


def test_engine_rejects_batches(tiny_cnn: nn.Module) -> None:
    engine = MaskedForwardEngine(tiny_cnn)
    with pytest.raises(ValueError, match="one image"):
        engine.run(torch.randn(2, 3, 32, 32), torch.rand(2, 1, 32, 32), 0)
