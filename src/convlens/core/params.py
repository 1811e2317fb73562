"""Typed parameter objects: one frozen dataclass per method gives its knobs, defaults, ranges and docs.

A method declares ``Params``, a subclass of :class:`MethodParams` whose fields are made with
:func:`param`::

    @dataclass(frozen=True)
    class RISEParams(MethodParams):
        n_masks: int = param(4000, "number of random masks N", ge=1)
        p: float = param(0.5, "probability that a grid cell is kept", gt=0, lt=1)

From that one place come the range checks (at construction, with a message that names the range),
the parsing of command-line text (``"2.5"`` for an ``int`` is an error, not a truncation),
``as_dict()`` for the recorded parameters, and :meth:`MethodParams.describe` for docs and ``--help``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

__all__ = ["MethodParams", "ParamError", "ParamSpec", "param"]

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ParamError(ValueError):
    """A parameter value that is unknown, of the wrong type or out of range (the message says which)."""


@dataclass(frozen=True)
class ParamSpec:
    """What :meth:`MethodParams.describe` reports about one parameter."""

    name: str
    type: str
    default: Any
    doc: str
    range: str


def param(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A parameter field: default, one-line doc and optional bounds (``ge``/``gt`` lower, ``le``/``lt`` upper).

    Choices come from a ``Literal[...]`` annotation. A mutable default (list, dict) is not allowed: use
    a tuple.
    """
    if isinstance(default, list | dict | set):
        raise TypeError("parameter defaults must be immutable (use a tuple)")
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    return dataclasses.field(default=default, metadata={"doc": doc, "bounds": bounds})


def _range_text(bounds: Mapping[str, float | None]) -> str:
    ge, gt, le, lt = (bounds.get(k) for k in ("ge", "gt", "le", "lt"))
    if (ge is not None or gt is not None) and (le is not None or lt is not None):
        left = f"[{ge:g}" if ge is not None else f"({gt:g}"
        right = f"{le:g}]" if le is not None else f"{lt:g})"
        return f"{left}, {right}"
    for value, symbol in ((ge, ">="), (gt, ">"), (le, "<="), (lt, "<")):
        if value is not None:
            return f"{symbol} {value:g}"
    return ""


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"tuple[{', '.join(_type_name(a) for a in typing.get_args(hint))}]"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _convert(value: Any, hint: Any, name: str) -> Any:
    """``value`` as the annotated type, or ParamError. Strings are parsed (command-line values)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        is_none = value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))
        if is_none and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, name)
            except ParamError:
                continue
        raise ParamError(f"{name}: expected {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        text = value.strip() if isinstance(value, str) else value
        for choice in choices:
            if text == choice or (isinstance(choice, str) and isinstance(text, str) and text.lower() == choice):
                return choice
        raise ParamError(f"{name}: must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    if origin is tuple:
        return _convert_tuple(value, typing.get_args(hint), name)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ParamError(f"{name}: expected true or false, got {value!r}")
    if hint is int:
        return _convert_int(value, name)
    if hint is float:
        return _convert_float(value, name)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ParamError(f"{name}: expected text, got {value!r}")
    raise TypeError(f"{name}: unsupported parameter type {hint!r}")


def _convert_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ParamError(f"{name}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ParamError(f"{name}: expected an integer, got {value!r}")


def _convert_float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ParamError(f"{name}: expected a number, got {value!r}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ParamError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ParamError(f"{name}: expected a finite number, got {value!r}")
    return number


def _convert_tuple(value: Any, args: tuple[Any, ...], name: str) -> tuple[Any, ...]:
    if isinstance(value, str):
        parts: list[Any] = [p for p in value.strip().strip("()[]").split(",") if p.strip()]
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        raise ParamError(f"{name}: expected {len(args)} comma-separated values, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(p, args[0], name) for p in parts)
    if len(parts) != len(args):
        raise ParamError(f"{name}: expected {len(args)} comma-separated values, got {value!r}")
    return tuple(_convert(p, a, name) for p, a in zip(parts, args, strict=True))


def _check_bounds(value: Any, bounds: Mapping[str, float | None], name: str) -> None:
    numbers = value if isinstance(value, tuple) else (value,)
    for number in numbers:
        if not isinstance(number, int | float) or isinstance(number, bool):
            continue
        ge, gt, le, lt = (bounds.get(k) for k in ("ge", "gt", "le", "lt"))
        ok = (
            (ge is None or number >= ge) and (gt is None or number > gt)
            and (le is None or number <= le) and (lt is None or number < lt)
        )
        if not ok:
            raise ParamError(f"{name}: must be {_range_text(bounds)}, got {value!r}")


@dataclass(frozen=True)
class MethodParams:
    """Base of every method's parameter object (a frozen dataclass of :func:`param` fields).

    Construction converts and checks every field (``MyParams(n=2.0)`` gives ``n == 2``; ``n=2.5``,
    ``n="abc"`` or an out-of-range value raise :class:`ParamError` naming the field and its range).
    Subclasses may add cross-field checks in ``check()``.
    """

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            label = f"{self.method}.{field.name}" if self.method else field.name
            value = _convert(getattr(self, field.name), hints[field.name], label)
            _check_bounds(value, field.metadata.get("bounds", {}), label)
            object.__setattr__(self, field.name, value)
        self.check()

    def check(self) -> None:
        """Cross-field checks (override; raise :class:`ParamError`)."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        """Parameters from a mapping of names to values or command-line text; unknown names are an error."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            known = ", ".join(cls.names()) or "none"
            owner = cls.method or cls.__name__
            raise ParamError(f"{owner} has no parameter {', '.join(map(repr, unknown))}; parameters: {known}")
        return cls(**values)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Field values (tuples as lists: JSON-ready)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def describe(cls) -> list[ParamSpec]:
        """Name, type, default, doc and range of every parameter (docs, ``convlens methods --params``)."""
        hints = typing.get_type_hints(cls)
        return [
            ParamSpec(f.name, _type_name(hints[f.name]), f.default, f.metadata.get("doc", ""),
                      _range_text(f.metadata.get("bounds", {})))
            for f in dataclasses.fields(cls)
        ]
