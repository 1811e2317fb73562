"""Which explainers a ``convlens explain`` run uses, and their checked parameters.

Saliency methods come from :mod:`convlens.methods` (the registry), INV from :mod:`convlens.inv`;
both kinds declare a typed ``Params`` class (:class:`~convlens.core.params.MethodParams`) that checks
types and ranges and parses command-line text, so ``--param rise.n_masks=2.5`` or ``sise.mu=2`` are
refused before anything runs, with the range in the message.

Besides its ``Params``, every explainer takes three *common* settings: ``score`` (logit / softmax /
sigmoid), ``batch_size`` (sampling methods) and ``layers`` (a layer spec; INV also knows ``tail``,
``depth`` and ``convs``), settable per method with ``--param METHOD.KEY=VALUE``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from convlens.core.layers import resolve_layers
from convlens.core.params import MethodParams, ParamError, ParamSpec, param
from convlens.inv.explainer import INV
from convlens.methods.registry import METHODS, get_method

__all__ = ["ExplainerSpec", "build_explainers", "explainer_names", "get_explainer_spec", "parse_method_params"]

CONCEPT_METHODS: dict[str, type[INV]] = {"inv": INV}


@dataclass(frozen=True)
class CommonSettings(MethodParams):
    """Settings every explainer takes besides its own parameters."""

    score: Literal["logit", "softmax", "sigmoid"] | None = param(None, "differentiated score (default: the paper's)")
    batch_size: int | None = param(None, "masked inputs per forward pass (default: --batch-size)", ge=1)
    layers: str | None = param(None, "layer spec: blocks | last | names (INV also: tail | depth | convs)")


@dataclass(frozen=True)
class ExplainerSpec:
    """A method name resolved: its class, kind and parameter class."""

    name: str
    cls: type
    kind: Literal["saliency", "concept"]
    params: type[MethodParams]

    @property
    def knobs(self) -> list[str]:
        common = ["score", "layers"] if self.kind == "concept" else ["score", "batch_size", "layers"]
        return [*self.params.names(), *common]

    def describe(self) -> list[ParamSpec]:
        return self.params.describe()


def explainer_names() -> list[str]:
    """Every name ``--methods`` accepts: the registered saliency methods, then the concept explainers."""
    return [*METHODS, *CONCEPT_METHODS]


def get_explainer_spec(name: str) -> ExplainerSpec:
    """The explainer called ``name`` (aliases as in the methods registry); ValueError if unknown."""
    key = name.strip().lower()
    if key in CONCEPT_METHODS:
        cls = CONCEPT_METHODS[key]
        return ExplainerSpec(key, cls, "concept", cls.Params)
    try:
        cls = get_method(name)
    except ValueError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(explainer_names())}") from None
    return ExplainerSpec(cls.name, cls, "saliency", cls.Params)


def parse_method_params(
    items: Sequence[str], methods: Sequence[str], overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """``["rise.n_masks=1000", "score=softmax"]`` -> per method ``{name: value}``, every value converted and
    checked by the method's ``Params`` (or :class:`CommonSettings`). An unscoped ``KEY=VALUE`` goes to every
    selected method that has ``KEY``. ``overrides`` (``{method: {name: value}}``) are applied first."""
    specs = {m: get_explainer_spec(m) for m in methods}
    raw: dict[str, dict[str, Any]] = {m: dict((overrides or {}).get(m, {})) for m in methods}
    for item in items:
        key, sep, value = item.partition("=")
        scope, _, name = key.strip().rpartition(".")
        if not sep or not name:
            raise ParamError(f"--param {item!r}: expected KEY=VALUE or METHOD.KEY=VALUE")
        if scope and scope.strip().lower() not in {m.lower() for m in methods}:
            raise ParamError(f"--param {item!r}: method {scope!r} is not among --methods {','.join(methods)}")
        targets = [m for m in methods if not scope or m.lower() == scope.strip().lower()]
        accepted_by = [m for m in targets if name in specs[m].knobs]
        if not accepted_by:
            known = "; ".join(f"{m}: {', '.join(specs[m].knobs)}" for m in targets)
            raise ParamError(f"--param {item!r}: no selected method accepts {name!r} ({known})")
        for m in accepted_by:
            raw[m][name] = value
    return {m: _checked(specs[m], values) for m, values in raw.items()}


def _checked(spec: ExplainerSpec, values: Mapping[str, Any]) -> dict[str, Any]:
    own = {k: v for k, v in values.items() if k in spec.params.names()}
    common = {k: v for k, v in values.items() if k not in own}
    parsed_own = spec.params.from_mapping(own)
    try:
        parsed_common = CommonSettings.from_mapping(common)
    except ParamError as exc:
        raise ParamError(f"{spec.name}.{exc}") from None
    return {k: getattr(parsed_own, k) for k in own} | {k: getattr(parsed_common, k) for k in common}


def build_explainers(
    loaded: Any, methods: Sequence[str], per_method: Mapping[str, Mapping[str, Any]], layers: str | None,
    batch_size: int,
) -> dict[str, Any]:
    """One explainer per method on ``loaded`` (a LoadedModel), layers resolved once to catch bad specs early.

    Raises ValueError naming the method (bad parameter combination, unknown layer)."""
    size = loaded.preprocessing.size
    explainers: dict[str, Any] = {}
    for name in methods:
        spec = get_explainer_spec(name)
        kwargs = dict(per_method.get(name, {}))
        layer_text = kwargs.pop("layers", None) or layers
        layer_spec = _layer_spec(layer_text) if spec.cls.uses_layers else None
        if spec.kind == "saliency":
            kwargs["batch_size"] = kwargs.get("batch_size") or batch_size
        try:
            explainer = spec.cls(loaded, layers=layer_spec, **kwargs) if layer_spec is not None \
                else spec.cls(loaded, **kwargs)
            if spec.kind == "concept":
                explainer.explained_layers((3, size, size))
            elif layer_spec is not None:
                resolve_layers(loaded.module, layer_spec, (3, size, size))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: {exc}") from exc
        explainers[spec.name] = explainer
    return explainers


def _layer_spec(text: str | None) -> str | list[str] | None:
    if not text:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else parts

