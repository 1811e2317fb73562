"""Lazy package exports: a package's public names are imported from their modules on first use.

``import convlens.study`` must not load torch, and ``import convlens`` should stay cheap; so each package
lists ``name -> module`` and gets its module ``__getattr__`` and ``__dir__`` (PEP 562) from
:func:`lazy_exports`. A name, once looked up, is stored in the package, so later look-ups are plain.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` (its ``__name__``) exporting ``exports`` (name -> module)."""

    def module_getattr(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def module_dir() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return module_getattr, module_dir
