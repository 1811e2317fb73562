"""Provenance for manifests: which versions of which packages wrote a result."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["package_versions"]


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed version of each distribution in ``names`` (None when it is not installed), for manifests."""
    from importlib import metadata

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
