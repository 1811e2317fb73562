"""What every CLI command shares: the user-error type and the parsing of ``KEY=VALUE`` values."""

from __future__ import annotations

import ast
from typing import Any

__all__ = ["CliError", "parse_literal"]


class CliError(Exception):
    """A user error: printed as one line, non-zero exit, nothing written."""


def parse_literal(text: str) -> Any:
    """``"true"`` -> True, ``"none"`` -> None, Python literals (numbers, lists, strings) as such, else the text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
