"""Backups of a study's SQLite database while the server runs (``convlens study backup``).

SQLite's online backup API copies the database page by page inside read transactions, so the copy is one
consistent state even while the server commits (WAL mode); copying the file with ``cp`` is not (the WAL
holds committed transactions not yet in the main file). The copy is written beside its target under a
temporary name and renamed into place when complete and checked (``PRAGMA integrity_check``). PostgreSQL
studies are backed up with ``pg_dump`` (README, deployment section).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from convlens.core.files import temporary_name
from convlens.study.store.config import StudyFiles

__all__ = ["BackupError", "backup_sqlite"]

TABLES = ("participants", "plays", "events")


class BackupError(ValueError):
    """A backup that cannot be made (one clear line; nothing written)."""


def backup_sqlite(study_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, int]:
    """Copy STUDY_DIR/study.sqlite to the new file ``out``; returns the row counts of the copy's main tables."""
    source = StudyFiles(study_dir).sqlite
    out = Path(out)
    if not source.is_file():
        raise BackupError(f"{source}: no database (the study was never served, or it uses PostgreSQL: pg_dump)")
    if out.exists() or out.is_symlink():
        raise BackupError(f"--out {out}: exists; give a new file name (a backup never replaces a file)")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise BackupError(f"--out {out}: cannot write in {out.parent}")
    tmp = out.parent / temporary_name("tmp", ".tmp")
    try:
        reader, copy = sqlite3.connect(f"file:{source}?mode=ro", uri=True), sqlite3.connect(tmp)
        try:
            reader.backup(copy)
            if copy.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                raise BackupError(f"{source}: the copy failed SQLite's integrity check")
            counts = {table: copy.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in TABLES}
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            reader.close()
            copy.close()
        os.link(tmp, out)  # never over a file that appeared meanwhile
    except sqlite3.Error as exc:
        raise BackupError(f"{source}: cannot back up ({exc})") from None
    except FileExistsError:
        raise BackupError(f"--out {out}: exists; give a new file name (a backup never replaces a file)") from None
    finally:
        tmp.unlink(missing_ok=True)
    return counts
