"""The output folder of ``convlens explain``: where each image's results go, resume, and the run's files.

Rules (nothing convlens did not write is ever deleted, replaced or read as input):

* Per image one folder, named after the image's stem reduced to ``[A-Za-z0-9_.-]`` (no leading dot,
  at most 60 characters; ``image`` if nothing is left). If that name is taken — by anything convlens
  did not write, by another image's results, by a name of the run's own files (``index.html``,
  ``results.json``) or by an earlier image of the same run — the folder is ``<stem>-<8 hex>``, the hex
  digits from the SHA-256 of the image's absolute path (then 16, then 64 digits). So ``a/x.png`` and
  ``b/x.png`` get ``x`` and ``x-1a2b3c4d``; ``..png`` gets ``image``; names never escape ``--out``.
* A folder counts as convlens's when its ``result.json`` says ``"format": "convlens-explain-image"`` and it
  holds nothing but the files listed there as written. Only such a folder, of the same image, is ever
  replaced (new settings, ``--no-resume``); one with any other file in it is left alone.
* ``index.html`` and ``results.json`` are replaced only if convlens wrote them; otherwise the run stops
  before it starts (exit 2).
* Every folder and file is written under a temporary name and renamed into place
  (:mod:`convlens.core.files`); temporaries a killed run left are removed by the next run, and only
  those. Runs into the same folder take turns (:class:`~convlens.core.files.OutputLock`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from convlens.core.files import OutputLock, atomic_directory, atomic_write_text, remove_stale_temporaries
from convlens.core.outputs import OutputFolderError, check_creatable, read_json_or_none
from convlens.runners.explain_image import IMAGE_FORMAT, IMAGE_RECORD

__all__ = ["PAGE", "SUMMARY", "ExplainStore", "OutputFolderError", "check_output_folder", "is_explain_output"]

PAGE = "index.html"
SUMMARY = "results.json"
RUN_FORMAT = "convlens-explain-run"
PAGE_MARKER = '<meta name="generator" content="convlens explain">'
_RESERVED = {PAGE, SUMMARY, OutputLock.NAME}
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def stem_of(path: Path) -> str:
    """The image's file stem as a safe folder name (see the module docstring)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem).lstrip(".")[:60].rstrip(".") or "image"


def _candidate_names(path: Path, source: str) -> list[str]:
    stem = stem_of(path)
    digest = hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()
    first = [] if stem.lower() in _RESERVED or stem.split(".")[0].upper() in _WINDOWS_DEVICES else [stem]
    return [*first, f"{stem}-{digest[:8]}", f"{stem}-{digest[:16]}", f"{stem}-{digest}"]


def _entries(folder: Path) -> set[str]:
    """Relative paths of everything inside ``folder`` (symbolic links listed, not followed)."""
    found = set()
    for root, dirs, files in os.walk(folder, followlinks=False):
        base = Path(root).relative_to(folder)
        found.update((base / name).as_posix() for name in [*dirs, *files])
    return found


def owned_image_record(folder: Path) -> dict[str, Any] | None:
    """The record of a per-image folder convlens wrote and nobody added to since; else None."""
    if folder.is_symlink() or not folder.is_dir():
        return None
    record = read_json_or_none(folder / IMAGE_RECORD)
    if not isinstance(record, dict) or record.get("format") != IMAGE_FORMAT:
        return None
    written = record.get("written")
    if not isinstance(written, list) or not _entries(folder) <= set(written):
        return None
    return record


def _is_our_summary(path: Path) -> bool:
    data = read_json_or_none(path)
    legacy = isinstance(data, dict) and {"images", "skipped", "config_hash"} <= set(data)  # convlens 0.1.0
    return isinstance(data, dict) and (data.get("format") == RUN_FORMAT or legacy)


def _is_our_page(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return PAGE_MARKER in head or "<title>convlens — " in head  # the second: pages of convlens 0.1.0


def is_explain_output(folder: Path) -> bool:
    """True for a folder that a ``convlens explain`` run wrote (a run folder or a per-image folder):
    folder scans never read images from it."""
    record = read_json_or_none(folder / IMAGE_RECORD)
    return _is_our_summary(folder / SUMMARY) or (isinstance(record, dict) and record.get("format") == IMAGE_FORMAT)


def check_output_folder(out: Path) -> None:
    """Before anything is written: ``out`` is a folder (or can be made one) that may be written, and its
    ``index.html`` / ``results.json``, if any, are convlens's. Raises :class:`OutputFolderError`."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputFolderError(f"--out {out}: exists and is not a folder")
        for name, ours in ((PAGE, _is_our_page), (SUMMARY, _is_our_summary)):
            path = out / name
            if (path.exists() or path.is_symlink()) and not ours(path):
                raise OutputFolderError(
                    f"--out {out}: {name} there was not written by convlens explain; choose another folder"
                )
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutputFolderError(f"--out {out}: no permission to write into this folder")
        return
    check_creatable(out)


class ExplainStore:
    """The output folder of one run: placement and resume of images, atomic writes, the run's own files.

    Args:
        out: the output folder.
        config_hash: fingerprint of every setting that determines the results.
        resume: reuse an image's results when its file and the settings are unchanged.
    """

    def __init__(self, out: Path, config_hash: str, resume: bool = True) -> None:
        self.out = out
        self.config_hash = config_hash
        self.resume = resume
        self._claimed: set[str] = set()

    @contextlib.contextmanager
    def open(self, on_wait: Callable[[], None] | None = None) -> Iterator[list[str]]:
        """Create the folder, take its lock, remove what killed runs left; yields the removed names."""
        created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            lock = OutputLock(self.out, on_wait)
            lock.__enter__()
        except OSError as exc:
            if created:
                with contextlib.suppress(OSError):
                    self.out.rmdir()
            raise OutputFolderError(f"--out {self.out}: cannot write there ({exc.strerror or exc})") from exc
        try:
            check_output_folder(self.out)  # again, now that no other run can change it
            yield remove_stale_temporaries(self.out)
        finally:
            lock.__exit__(None, None, None)

    def locate(self, path: Path, digest: str) -> tuple[str | None, dict[str, Any] | None]:
        """The folder name for the image at ``path`` (file hash ``digest``) and, when its finished results
        can be reused, their record. ``(None, None)``: every candidate name is taken by something else."""
        source = str(path.resolve())
        for name in _candidate_names(path, source):
            if name.lower() in self._claimed:
                continue
            folder = self.out / name
            if not (folder.exists() or folder.is_symlink()):
                self._claimed.add(name.lower())
                return name, None
            record = owned_image_record(folder)
            if record is None or record.get("source") != source:
                continue
            self._claimed.add(name.lower())
            reusable = self.resume and record.get("config_hash") == self.config_hash and record.get("sha256") == digest
            return name, record if reusable else None
        return None, None

    def write(self, name: str, work: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Run ``work(folder)`` on a fresh temporary folder and move it to ``out/name`` (replacing only a
        folder of ours); returns what ``work`` returned."""
        with atomic_directory(self.out / name, replaceable=lambda p: owned_image_record(p) is not None) as tmp:
            return work(tmp)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.out / SUMMARY, json.dumps({"format": RUN_FORMAT, "format_version": 1} | summary,
                                                         indent=2, default=str))
