"""What every CLI command shares: the user-error type, the one-line error exit, ``KEY=VALUE`` parsing, old
option spellings kept as hidden aliases, and readable help (metavars such as ``PATH``, never Python types)."""

from __future__ import annotations

import ast
import typing
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperGroup

__all__ = ["CliError", "ReadableHelpGroup", "fail", "old_spelling", "parse_literal", "readable_metavars",
           "split_list"]

T = TypeVar("T")


class CliError(Exception):
    """A user error: printed as one line, non-zero exit, nothing written."""


def fail(console: Console, message: str, code: int = 2) -> NoReturn:
    """Print ``error: <message>`` on one line (never wrapped at the terminal width: users copy paths from it;
    verbatim: user text is never read as rich markup) and exit with ``code``."""
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=code)


def parse_literal(text: str) -> Any:
    """``"true"`` -> True, ``"none"`` -> None, Python literals (numbers, lists, strings) as such, else the text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        return text


def split_list(text: str | None) -> list[str] | None:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; None, ``""`` and only commas -> None (the option's default)."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    return items or None


def old_spelling(console: Console, option: str, value: T | None, old: str, old_value: T | None, default: T) -> T:
    """The value of ``option``, also accepted under its ``old`` spelling (a hidden option, so that scripts
    written for it keep working with identical results); both given with different values is an error."""
    if value is not None and old_value is not None and value != old_value:
        fail(console, f"{option} and its old spelling {old} disagree ({value!r} vs {old_value!r}): give one")
    if value is not None:
        return value
    return old_value if old_value is not None else default


class _ReadableArgument(TyperArgument):
    """An argument shown as ``NAME``, ``NAME...`` or ``[NAME]...`` in usage and help (click's style)."""

    def _readable_name(self) -> str:
        return f"{self.metavar}..." if self.nargs != 1 else str(self.metavar)

    def get_usage_pieces(self, ctx: click.Context) -> list[str]:
        name = self._readable_name()
        return [name if self.required else f"[{self.metavar}]{'...' if self.nargs != 1 else ''}"]

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        return None if record is None else (self._readable_name(), record[1])


def readable_metavars(command: click.Command) -> None:
    """Give every parameter of ``command`` and its sub-commands a readable metavar where none was set:
    options ``TEXT``, ``INTEGER``, ``FLOAT``, ``PATH`` or ``[a|b]``; arguments their name in capitals. (typer
    would print the Python annotation instead: ``<list[str]>``, ``{study_dir}``.)"""
    for param in command.params:
        if isinstance(param, click.Option) and (param.is_flag or param.count):
            continue
        if param.metavar is None:
            is_argument = isinstance(param, click.Argument) or getattr(param, "param_type_name", "") == "argument"
            param.metavar = (param.name or "value").upper() if is_argument else _type_metavar(param)
        if isinstance(param, TyperArgument) and not isinstance(param, _ReadableArgument):
            param.__class__ = _ReadableArgument  # same object, click-style display (adds no state)
    for sub_command in getattr(command, "commands", {}).values():
        readable_metavars(sub_command)


_TYPE_METAVARS = {str: "TEXT", int: "INTEGER", float: "FLOAT", bool: "BOOLEAN", Path: "PATH"}


def _type_metavar(param: click.Parameter) -> str:
    """``TEXT``, ``INTEGER``, ``FLOAT``, ``PATH`` or ``[a|b]`` for an option's value type (typer's own type
    descriptor when it has one, else click's type)."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None:
        if isinstance(param.type, click.Choice):
            return "[" + "|".join(str(choice) for choice in param.type.choices) + "]"
        return param.type.name.upper()
    if descriptor.choices is not None:
        return "[" + "|".join(str(getattr(choice, "value", choice)) for choice in descriptor.choices) + "]"
    if descriptor.is_path:
        return "PATH"
    annotation = descriptor.annotation
    if descriptor.is_list and typing.get_args(annotation):
        annotation = typing.get_args(annotation)[0]
    return _TYPE_METAVARS.get(annotation, getattr(annotation, "__name__", "VALUE").upper())


class ReadableHelpGroup(TyperGroup):
    """The root command group: built once every command exists, it makes every help text readable
    (:func:`readable_metavars`), whichever module registered the command."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        readable_metavars(self)
