"""Targets: per-sample class ids, score kinds, output adapters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from convlens.core.targets import adapt_output, class_id_from_name, class_scores, resolve_targets

LOGITS = torch.tensor([[1.0, 3.0, 0.0], [2.0, -1.0, 0.5]])


def test_resolve_targets() -> None:
    assert resolve_targets(LOGITS).tolist() == [1, 0]
    assert resolve_targets(LOGITS, "auto").tolist() == [1, 0]
    assert resolve_targets(LOGITS, 2).tolist() == [2, 2]
    assert resolve_targets(LOGITS, [2, 1]).tolist() == [2, 1]
    assert resolve_targets(LOGITS, "Bee", ["ant", "bee", "cat"]).tolist() == [1, 1]
    with pytest.raises(ValueError, match="out of range"):
        resolve_targets(LOGITS, 3)
    with pytest.raises(ValueError, match="out of range"):
        resolve_targets(LOGITS, [0, -1])
    with pytest.raises(ValueError, match="2 images"):
        resolve_targets(LOGITS, [0, 1, 2])
    with pytest.raises(ValueError, match="did you mean 'bee'"):
        class_id_from_name("bea", ["ant", "bee", "cat"])


def test_class_scores_by_hand() -> None:
    ids = torch.tensor([1, 2])
    assert class_scores(LOGITS, ids, "logit").tolist() == [3.0, 0.5]
    e = torch.exp(LOGITS)
    expected_softmax = [float(e[0, 1] / e[0].sum()), float(e[1, 2] / e[1].sum())]
    torch.testing.assert_close(class_scores(LOGITS, ids, "softmax"), torch.tensor(expected_softmax))
    torch.testing.assert_close(class_scores(LOGITS, ids, "sigmoid"), 1 / (1 + torch.exp(-torch.tensor([3.0, 0.5]))))
    several = class_scores(LOGITS, torch.tensor([[0, 1], [2, 0]]), "logit")
    assert several.tolist() == [[1.0, 3.0], [0.5, 2.0]]
    with pytest.raises(ValueError, match="unknown score"):
        class_scores(LOGITS, ids, "prob")  # type: ignore[arg-type]


def test_output_adapters() -> None:
    assert adapt_output((LOGITS, "aux")) is LOGITS
    assert adapt_output({"logits": LOGITS, "x": 1}) is LOGITS
    assert adapt_output({"out": LOGITS}) is LOGITS
    assert adapt_output(SimpleNamespace(logits=LOGITS)) is LOGITS
    assert adapt_output({"a": 1, "b": LOGITS}, lambda o: o["b"]) is LOGITS
    with pytest.raises(TypeError, match="output_adapter"):
        adapt_output({"a": LOGITS, "b": LOGITS})
    with pytest.raises(ValueError, match="batch, classes"):
        adapt_output(torch.zeros(2, 3, 4))


@pytest.mark.parametrize(
    ("targets", "shown"),
    [(3.7, "3.7 (float)"), (True, "True (bool)"), ([1, 2.5], "2.5 (float) among them"), ([], "an empty sequence"),
     (torch.tensor([1.0, 0.0]), "torch.float32 tensor"), (torch.tensor([True, False]), "torch.bool tensor"),
     ({"a": 1}, "(dict)")],
)
def test_targets_of_the_wrong_type_say_what_is_accepted(targets: object, shown: str) -> None:
    with pytest.raises(TypeError, match=r"targets must be None or 'auto' .*one class id per image; got") as info:
        resolve_targets(LOGITS, targets)  # type: ignore[arg-type]
    assert shown in str(info.value)


def test_integer_targets_of_numpy_and_torch_types() -> None:
    import numpy as np

    assert resolve_targets(LOGITS, np.int64(2)).tolist() == [2, 2]
    assert resolve_targets(LOGITS, np.array([0, 2])).tolist() == [0, 2]
    assert resolve_targets(LOGITS, torch.tensor([2, 1])).tolist() == [2, 1]
    assert resolve_targets(LOGITS, (1, 0)).tolist() == [1, 0]
