"""HTML reports (Jinja2, autoescaped: every user-provided string is escaped)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from convlens.core.files import atomic_write_text

__all__ = ["render_explain_report", "template_environment"]


def template_environment() -> Environment:
    return Environment(loader=PackageLoader("convlens.reports", "templates"), autoescape=select_autoescape(["html"]))


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_explain_report(path: Path, context: dict[str, Any]) -> None:
    """Write the ``convlens explain`` index page (atomically: temp file, then rename)."""
    for image in context.get("images", []):
        for result in image.get("results", []):
            extras = result.get("extras") or {}
            result["extras_table"] = [(k, _short(v)) for k, v in extras.items()]
    html = template_environment().get_template("explain.html").render(**context)
    atomic_write_text(path, html)
