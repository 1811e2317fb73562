"""A resumable per-image results store: one JSON file per (method, image), written atomically.

Layout under the run directory::

    run.json                      settings fingerprint (a resume with other settings is refused)
    records/<method>/<key>.json   one image's results for one method (all its targets)
    records/_bad/<key>.json       an image that could not be used, with the reason

Each record is written to a temporary file in the same folder, flushed and fsync'ed, then renamed over
its final name (``os.replace``, atomic on POSIX and Windows): a run killed at any moment leaves only
complete records, and a rerun skips exactly the work they hold. Keys are ``<index>-<hash of id>`` so file
names are safe whatever the image ids contain, and the order of the dataset is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["BAD", "ResultsStore", "SettingsMismatchError", "atomic_write_text", "record_key"]

BAD = "_bad"


class SettingsMismatchError(ValueError):
    """The output folder holds a run made with different settings."""


def record_key(index: int, sample_id: str) -> str:
    """File-name-safe, order-preserving key of a sample."""
    digest = hashlib.sha1(sample_id.encode("utf-8")).hexdigest()[:10]
    return f"{index:07d}-{digest}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _canonical(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


class ResultsStore:
    """Per-image results of one evaluation run in ``root``.

    Args:
        root: the run directory (created if needed).
        settings: JSON-able description of everything that determines the results; stored on the first
            run, compared on every later one.
        overwrite: discard the records of a previous run with other settings instead of refusing.
    """

    def __init__(self, root: str | os.PathLike[str], settings: dict[str, Any], overwrite: bool = False) -> None:
        self.root = Path(root)
        self.records_dir = self.root / "records"
        settings_path = self.root / "run.json"
        if settings_path.is_file():
            previous = json.loads(settings_path.read_text())
            if _canonical(previous) != _canonical(settings):
                if not overwrite:
                    changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
                    raise SettingsMismatchError(
                        f"{self.root} holds a run with different settings ({', '.join(changed)}): "
                        "use another --out folder, or --overwrite to discard it"
                    )
                self._clear_records()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(settings_path, json.dumps(settings, indent=2, sort_keys=True, default=str) + "\n")
        self.settings = settings

    def _clear_records(self) -> None:
        if self.records_dir.is_dir():
            for path in sorted(self.records_dir.rglob("*.json"), reverse=True):
                path.unlink()

    def path(self, method: str, key: str) -> Path:
        return self.records_dir / method / f"{key}.json"

    def has(self, method: str, key: str) -> bool:
        return self.path(method, key).is_file()

    def is_bad(self, key: str) -> bool:
        return self.has(BAD, key)

    def put(self, method: str, key: str, record: dict[str, Any]) -> None:
        """Store one record atomically (replacing any previous one)."""
        atomic_write_text(self.path(method, key), json.dumps(record, allow_nan=True) + "\n")

    def mark_bad(self, key: str, sample_id: str, reason: str) -> None:
        self.put(BAD, key, {"key": key, "id": sample_id, "reason": reason})

    def records(self, method: str) -> Iterator[dict[str, Any]]:
        """All records of ``method`` in dataset order."""
        folder = self.records_dir / method
        if folder.is_dir():
            for path in sorted(folder.glob("*.json")):
                yield json.loads(path.read_text())

    def bad(self) -> list[dict[str, Any]]:
        return list(self.records(BAD))
