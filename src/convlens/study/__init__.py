"""Deep Reveal as a study server: INV cluster maps shown to people, their guesses and words recorded.

Rooms: ``store`` (the study's files, database and backups), ``game`` (the rules, quota plans, assignment,
queries, opening a study), ``web`` (the FastAPI server) and ``batch`` (``create`` a study from INV runs,
``export`` it). Workflow: ``convlens study create`` -> ``convlens study serve`` -> ``convlens study export``
(from Python: :func:`create_study`, :func:`run_server` with :class:`ServerSettings`,
:func:`export_study_folder`). Nothing here imports torch except study creation, which reads INV runs. The
simulated crowd is :mod:`convlens.crowd`.
"""

from __future__ import annotations

from convlens.core.lazy import lazy_exports

_EXPORTS = {
    "CreateOptions": "convlens.study.batch.create",
    "ServerSettings": "convlens.study.web.server",
    "backup_sqlite": "convlens.study.store.backup",
    "create_app": "convlens.study.web.app",
    "create_study": "convlens.study.batch.create",
    "export_study": "convlens.study.batch.export",
    "export_study_folder": "convlens.study.batch.export",
    "run_server": "convlens.study.web.server",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
