"""A resumable per-image results store: one JSON file per (method, image), written atomically.

Layout under the run directory::

    run.json                      ``"format": "convlens-evaluate-run"`` and the settings fingerprint (a
                                  resume with other settings is refused)
    records/<method>/<key>.json   one image's results for one method (all its targets)
    records/_bad/<key>.json       an image that could not be used, with the reason

Why so: a run killed at any moment leaves only complete records (temporary file, fsync, ``os.replace``), so
a rerun skips exactly the work they hold; keys ``<index>-<hash of id>`` are safe file names whatever the
image ids and keep the dataset's order; nothing convlens did not write is replaced or deleted
(:func:`check_run_folder`); and two runs into one folder take turns under its lock (:class:`ResultsStore`).
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
    "OUTPUT_FILES",
    "OUTPUT_FOLDERS",
    "RUN_FORMAT",
    "OutputFolderError",
    "ResultsStore",
    "SettingsMismatchError",
    "atomic_save_image",
    "check_run_folder",
    "record_key",
]

BAD = "_bad"
RUN_FILE = "run.json"
RUN_FORMAT = "convlens-evaluate-run"
# what an evaluation writes next to run.json and records/ (convlens.runners.evaluate_outputs)
OUTPUT_FILES = ("per_image.csv", "summary.csv", "summary.md", "summary.json", "bad_images.csv", "report.html")
OUTPUT_FOLDERS = ("samples", "report_files")
_LEGACY_SETTINGS = {"model", "methods", "metrics", "data"}  # run.json of convlens 0.1.0: the bare settings
# the names the run writes inside its folders (what --overwrite may remove)
_OWN_NAMES = {
    "records": re.compile(r"^\d{7}-[0-9a-f]{10}\.json$"),
    "samples": re.compile(r"^\d{7}-[0-9a-f]{10}(_t\d+|_mask\d+)?\.png$"),
    "report_files": re.compile(r"^(metrics|curves)\.png$"),
}
# what a killed run of earlier versions left: ``.<final name>.<8 random characters>.tmp``
_LEGACY_TMP = re.compile(r"^\.(?P<name>.+?)(\.[a-z0-9_]{8})?\.tmp$")


class SettingsMismatchError(ValueError):
    """The output folder holds a run made with different settings."""


class OutputFolderError(ValueError):
    """The output folder holds files convlens evaluate did not write (nothing was written)."""


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _read_run_file(path: Path) -> dict[str, Any] | None:
    """The settings in a run.json convlens wrote (this format, or 0.1.0's bare settings); else None."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("format") == RUN_FORMAT:
        return {k: v for k, v in data.items() if k not in ("format", "format_version")}
    return data if "format" not in data and set(data) >= _LEGACY_SETTINGS else None


def check_run_folder(root: Path, outputs: Iterable[str] = (*OUTPUT_FILES, *OUTPUT_FOLDERS)) -> dict[str, Any] | None:
    """The settings of the run in ``root`` (None: no run there yet). Raises :class:`OutputFolderError` when
    ``root`` is not a folder, its ``run.json`` is not convlens's, or it has none and holds any of the run's
    output names (``records`` or ``outputs``): those files are someone else's."""
    if _exists(root) and not root.is_dir():
        raise OutputFolderError(f"--out {root} is a file, not a folder: choose a folder for the results")
    if _exists(root / RUN_FILE):
        previous = _read_run_file(root / RUN_FILE)
        if previous is None:
            raise OutputFolderError(
                f"--out {root}: its {RUN_FILE} was not written by convlens evaluate; choose another folder"
            )
        return previous
    taken = [name for name in ("records", *outputs) if _exists(root / name)]
    if taken:
        raise OutputFolderError(
            f"--out {root}: {', '.join(taken)} there not written by convlens evaluate (no {RUN_FILE}); "
            "choose another folder"
        )
    return None


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


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class ResultsStore:
    """Per-image results of one evaluation run in ``root``.

    Args:
        root: the run directory (created if needed).
        settings: JSON-able description of everything that determines the results; stored on the first
            run, compared on every later one.
        overwrite: discard the records, sample overlays and report plots of a previous run with other
            settings instead of refusing.
        on_wait: called once when another run holds the folder and this one has to wait for it.
        outputs: the names the run writes next to ``run.json`` and ``records/``: in a folder without a
            convlens ``run.json``, any of them is someone else's file and the store refuses the folder.

    A store holds the run directory's lock (:class:`~convlens.core.files.OutputLock`) from opening to
    :meth:`close`: two runs into the same folder take turns (the second waits, then resumes from the first
    one's records), so neither can see or remove the other's half-written files. ``overwrite`` of a folder
    proven ours removes only files with the names the run writes; :meth:`remove_stale_temporaries` deletes
    only the temporary files a killed run left in the folders the store writes.
    """

    def __init__(
        self, root: str | os.PathLike[str], settings: dict[str, Any], overwrite: bool = False,
        on_wait: Callable[[], None] | None = None, outputs: Iterable[str] = (*OUTPUT_FILES, *OUTPUT_FOLDERS),
    ) -> None:
        self.root = Path(root)
        self.records_dir = self.root / "records"
        self.settings = settings
        self.outputs = tuple(outputs)
        self._lock: OutputLock | None = None
        check_run_folder(self.root, self.outputs)  # before anything is created
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = OutputLock(self.root, on_wait=on_wait).__enter__()
        try:
            self._check_settings(overwrite)
        except BaseException:
            self.close()
            raise

    def _check_settings(self, overwrite: bool) -> None:
        previous = check_run_folder(self.root, self.outputs)  # again, now that no other run can change it
        changed = sorted(  # a setting an earlier version did not record counts as None
            k for k in set(previous or {}) | set(self.settings)
            if _canonical(previous.get(k)) != _canonical(self.settings.get(k))
        ) if previous is not None else []
        if changed:
            if not overwrite:
                raise SettingsMismatchError(
                    f"{self.root} holds a run with different settings ({', '.join(changed)}): "
                    "use another --out folder, or --overwrite to discard it"
                )
            self._clear_outputs()
        marked = {"format": RUN_FORMAT, "format_version": 1} | self.settings
        atomic_write_text(self.root / RUN_FILE, json.dumps(marked, indent=2, sort_keys=True, default=str) + "\n")

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

    def _clear_outputs(self) -> None:
        """Remove the previous run's records, sample overlays and report plots (call only in a folder whose
        run.json is ours): files with the names the run writes, in its own folders; then their emptied
        sub-folders. Anything else stays."""
        for folder_name, own in _OWN_NAMES.items():
            folder = self.root / folder_name
            if folder.is_symlink() or not folder.is_dir():
                continue
            for sub in [folder, *(p for p in sorted(folder.iterdir()) if p.is_dir() and not p.is_symlink())]:
                for path in sorted(sub.iterdir()):
                    if own.match(path.name) and path.is_file() and not path.is_symlink():
                        path.unlink()
                if sub != folder and not any(sub.iterdir()):
                    sub.rmdir()

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
                if _OWN_NAMES["records"].match(path.name):  # a record's name: anything else is not ours
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
