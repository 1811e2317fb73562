"""Spreadsheet-safe CSV cells for text that participants wrote (OWASP "CSV injection").

A spreadsheet runs a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return as a
formula (``=HYPERLINK(...)``, ``+cmd|...``). :func:`neutralise` prefixes such a cell with a single quote,
which spreadsheets show as text; it also prefixes a cell that already starts with a quote, so that
:func:`restore` (drop one leading quote) gives back the exact text for every input. Writers record in their
manifest that a CSV's text columns are neutralised; convlens's readers restore them.
"""

from __future__ import annotations

__all__ = ["FORMULA_STARTS", "neutralise", "restore"]

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"


def neutralise(text: str) -> str:
    """``text`` as a cell a spreadsheet shows as text (see the module docstring); :func:`restore` inverts it."""
    return QUOTE + text if text.startswith((*FORMULA_STARTS, QUOTE)) else text


def restore(cell: str) -> str:
    """The exact text of a cell written by :func:`neutralise`."""
    return cell[1:] if cell.startswith(QUOTE) else cell
