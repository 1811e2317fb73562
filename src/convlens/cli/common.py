"""What every CLI command shares: the user-error type, the one-line error exit and ``KEY=VALUE`` parsing."""

from __future__ import annotations

import ast
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["CliError", "fail", "parse_literal", "split_list"]


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
