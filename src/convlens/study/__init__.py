"""Deep Reveal as a study server: INV cluster maps shown to people, their guesses and words recorded.

Workflow: ``convlens study create STUDY_DIR --from INV_RUN...`` (:mod:`~convlens.study.creation`: rounds =
image x layer x cluster, six reveal images each, rendered once with :mod:`~convlens.study.reveal`),
``convlens serve STUDY_DIR [--db URL]`` (:mod:`~convlens.study.server`, :mod:`~convlens.study.app`),
``convlens study export STUDY_DIR --format csv|jsonl`` (:mod:`~convlens.study.export`, columns in
:mod:`~convlens.study.data_dictionary`).

Modules: ``config`` (study.json / rounds.json / secrets.json), ``db`` (SQLAlchemy models, durable engines,
Alembic upgrade; migrations in ``migrations/``), ``game`` (the rules, one transaction per action,
scoring), ``assignment`` (pluggable policy, uniform by default), ``queries`` (leaderboard, stats, admin
progress), ``schemas`` (pydantic request models), ``security`` (CSRF, admin token, headers, body limit),
``api`` / ``pages`` (routes), ``runtime`` (opening a study on a database), ``settle`` (how settled a round's
label is: the ``least-settled`` policy's measure). A simulated crowd (``crowd``: planted concepts, players'
behaviour and words; ``simulate``: its participants play the server over HTTP; ``crowd_eval``: planted
concepts and trends vs the labels found) tests and measures the whole loop: ``convlens study simulate``.
Nothing here imports torch except study creation (which reads INV runs through
:func:`convlens.concepts.load_inv_explanation`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CreateOptions", "create_app", "create_study", "export_study"]

_LAZY = {
    "CreateOptions": "convlens.study.creation",
    "create_study": "convlens.study.creation",
    "create_app": "convlens.study.app",
    "export_study": "convlens.study.export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'convlens.study' has no attribute {name!r}")
