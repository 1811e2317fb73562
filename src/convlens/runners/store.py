"""A resumable per-image results store: one JSON file per (method, image), written atomically.

Layout under the run directory::

    run.json                      settings fingerprint (a resume with other settings is refused)
    records/<method>/<key>.json   one image's results for one method (all its targets)
    records/_bad/<key>.json       an image that could not be used, with the reason

Each record is written to a temporary file in the same folder, flushed and fsync'ed, then renamed over
its final name (``os.replace``, atomic on POSIX and Windows): a run killed at any moment leaves only
complete records, and a rerun skips exactly the work they hold. Keys are ``<index>-<hash of id>`` so file
names are safe whatever the image ids contain, and the order of the dataset is kept.

A store holds the run directory's lock (:class:`~convlens.core.files.OutputLock`) from opening to
:meth:`ResultsStore.close`: two runs into the same folder take turns (the second waits, then resumes
from the first one's records), so neither can see or remove the other's half-written files. Once it
holds the lock, :meth:`ResultsStore.remove_stale_temporaries` deletes the temporary files a killed run
left in the folders the store writes — those names only, nothing else.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from convlens.core.files import OutputLock, atomic_write_bytes, atomic_write_text, remove_stale_temporaries

__all__ = [
    "BAD",
    "ResultsStore",
    "SettingsMismatchError",
    "atomic_save_image",
    "record_key",
]

BAD = "_bad"
# what a killed run of earlier versions left: ``.<final name>.<8 random characters>.tmp``
_LEGACY_TMP = re.compile(r"^\.(?P<name>.+?)(\.[a-z0-9_]{8})?\.tmp$")


class SettingsMismatchError(ValueError):
    """The output folder holds a run made with different settings."""


def record_key(index: int, sample_id: str) -> str:
    """File-name-safe, order-preserving key of a sample."""
    digest = hashlib.sha1(sample_id.encode("utf-8")).hexdigest()[:10]
    return f"{index:07d}-{digest}"


def atomic_save_image(path: Path, image: Any) -> None:
    """Save a PIL image as PNG atomically (its folder is created if needed)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def _canonical(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


class ResultsStore:
    """Per-image results of one evaluation run in ``root``.

    Args:
        root: the run directory (created if needed).
        settings: JSON-able description of everything that determines the results; stored on the first
            run, compared on every later one.
        overwrite: discard the records of a previous run with other settings instead of refusing.
        on_wait: called once when another run holds the folder and this one has to wait for it.
    """

    def __init__(
        self, root: str | os.PathLike[str], settings: dict[str, Any], overwrite: bool = False,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.records_dir = self.root / "records"
        self.settings = settings
        self._lock: OutputLock | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = OutputLock(self.root, on_wait=on_wait).__enter__()
        try:
            self._check_settings(overwrite)
        except BaseException:
            self.close()
            raise

    def _check_settings(self, overwrite: bool) -> None:
        settings_path = self.root / "run.json"
        if settings_path.is_file():
            previous = json.loads(settings_path.read_text())
            if _canonical(previous) != _canonical(self.settings):
                if not overwrite:
                    changed = sorted(
                        k for k in set(previous) | set(self.settings) if previous.get(k) != self.settings.get(k)
                    )
                    raise SettingsMismatchError(
                        f"{self.root} holds a run with different settings ({', '.join(changed)}): "
                        "use another --out folder, or --overwrite to discard it"
                    )
                self._clear_records()
        atomic_write_text(settings_path, json.dumps(self.settings, indent=2, sort_keys=True, default=str) + "\n")

    def close(self) -> None:
        """Release the folder's lock (also released by the operating system when the process ends)."""
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self.close()

    def _clear_records(self) -> None:
        if self.records_dir.is_dir():
            for path in sorted(self.records_dir.rglob("*.json"), reverse=True):
                path.unlink()

    def remove_stale_temporaries(self, own_files: Iterable[str] = (), own_folders: Iterable[str] = ()) -> list[Path]:
        """Delete what a killed run left half-written: temporary files in ``records/`` and in the run's own
        sub-folders ``own_folders`` (recursively), and temporaries of the run's own files ``own_files`` (and
        ``run.json``) in the run directory. Nothing else is touched; call it while holding the lock (an open
        store does)."""
        removed: list[Path] = []
        own = {"run.json", *own_files}
        for folder in [self.records_dir, *(self.root / name for name in own_folders)]:
            if folder.is_dir() and not folder.is_symlink():
                for sub in [folder, *(p for p in sorted(folder.rglob("*")) if p.is_dir() and not p.is_symlink())]:
                    removed += [sub / name for name in remove_stale_temporaries(sub)]
                    removed += _remove_legacy(sub, lambda name: name.endswith(".json"))
        removed += [self.root / name for name in remove_stale_temporaries(self.root)]
        removed += _remove_legacy(self.root, lambda name: name in own)
        return removed

    def path(self, method: str, key: str) -> Path:
        return self.records_dir / method / f"{key}.json"

    def has(self, method: str, key: str) -> bool:
        return self.path(method, key).is_file()

    def is_bad(self, key: str) -> bool:
        return self.has(BAD, key)

    def put(self, method: str, key: str, record: dict[str, Any]) -> None:
        """Store one record atomically (replacing any previous one)."""
        path = self.path(method, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, allow_nan=True) + "\n")

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


def _remove_legacy(folder: Path, owned: Callable[[str], bool]) -> list[Path]:
    """Temporary files ``.<name>.<random>.tmp`` of earlier versions whose ``<name>`` is ``owned``."""
    removed = []
    for path in sorted(folder.glob(".*.tmp")):
        match = _LEGACY_TMP.match(path.name)
        if match and owned(match["name"]) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
