"""Typed parameter objects (convlens.core.params) and the model binding shared by explainers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from convlens.core.binding import ModelBinding
from convlens.core.params import MethodParams, ParamError, param


@dataclass(frozen=True)
class ToyParams(MethodParams):
    method = "toy"
    n: int = param(10, "a count", ge=1)
    p: float = param(0.5, "a probability", gt=0, le=1)
    mode: Literal["a", "b"] = param("a", "a choice")
    fast: bool = param(False, "a switch")
    k_range: tuple[int, int] = param((3, 8), "a range", ge=2)
    sigma: float | None = param(None, "optional", gt=0)


def test_defaults_and_conversion_from_text() -> None:
    params = ToyParams.from_mapping({"n": "12", "p": "0.25", "mode": "B", "fast": "yes", "k_range": "2,5"})
    assert (params.n, params.p, params.mode, params.fast, params.k_range) == (12, 0.25, "b", True, (2, 5))
    assert ToyParams().as_dict() == {"n": 10, "p": 0.5, "mode": "a", "fast": False, "k_range": [3, 8], "sigma": None}
    assert ToyParams(n=4.0).n == 4 and isinstance(ToyParams(n=4.0).n, int)
    assert ToyParams.from_mapping({"sigma": "none"}).sigma is None
    assert ToyParams.from_mapping({"sigma": "1.5"}).sigma == 1.5


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"n": "2.5"}, "toy.n: expected an integer, got '2.5'"),
        ({"n": "abc"}, "toy.n: expected an integer, got 'abc'"),
        ({"n": 0}, "toy.n: must be >= 1, got 0"),
        ({"p": 2}, "toy.p: must be (0, 1], got 2.0"),
        ({"p": "nan"}, "toy.p: expected a finite number, got 'nan'"),
        ({"mode": "c"}, "toy.mode: must be one of 'a', 'b', got 'c'"),
        ({"fast": "maybe"}, "toy.fast: expected true or false, got 'maybe'"),
        ({"k_range": "1,5"}, "toy.k_range: must be >= 2, got (1, 5)"),
        ({"k_range": "3"}, "toy.k_range: expected 2 comma-separated values, got '3'"),
        ({"sigma": -1}, "toy.sigma: must be > 0, got -1.0"),
        ({"nope": 1}, "toy has no parameter 'nope'; parameters: n, p, mode, fast, k_range, sigma"),
    ],
)
def test_bad_values_name_the_field_and_range(values: dict, message: str) -> None:
    with pytest.raises(ParamError) as info:
        ToyParams.from_mapping(values)
    assert str(info.value) == message


def test_describe_lists_type_default_range_and_doc() -> None:
    rows = {spec.name: spec for spec in ToyParams.describe()}
    p = rows["p"]
    assert (p.type, p.default, p.range, p.doc) == ("float", 0.5, "(0, 1]", "a probability")
    assert rows["mode"].type == "'a' | 'b'"
    assert rows["sigma"].type == "float | None"


def test_binding_unwraps_and_scores() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3, 4))
        model[1].bias.zero_()
    binding = ModelBinding(model, score="softmax", class_names=["a", "b", "c"])
    x = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]]])
    logits = binding.logits(x)
    assert torch.equal(logits, torch.tensor([[1.0, 2.0, 0.0]]))
    ids = binding.targets(logits, "a")
    expected = torch.exp(torch.tensor(1.0)) / torch.exp(torch.tensor([1.0, 2.0, 0.0])).sum()
    assert torch.allclose(binding.scores(logits, ids), expected[None])
    assert binding.class_name(1) == "b" and binding.class_name(7) is None
    calls = []
    assert binding.cached_layers((1,), lambda: calls.append(1) or ["x"]) == ["x"]
    assert binding.cached_layers((1,), lambda: calls.append(1) or ["y"]) == ["x"] and calls == [1]
    with pytest.raises(ValueError, match="unknown score"):
        ModelBinding(model, score="probit")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        ModelBinding(object())
