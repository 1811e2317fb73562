"""Output folders written as a whole, and read back only when whole (``study export``, ``labels``,
``global``, ``tcav``).

The rule every such command keeps: it writes only into a folder it made or one that holds only its own
outputs, marked by its manifest (:func:`check_output_folder`); it builds the new folder aside and renames
it into place, so a killed run leaves the previous folder or nothing, never a mixture
(:class:`OutputFolder`); the manifest records every file's size and SHA-256, and readers check them
(:func:`verify_output_folder`), so a file cut short or swapped after writing is named, not read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convlens.core.files import OutputLock, atomic_directory, is_temporary_name

__all__ = ["FolderKind", "OutputFolder", "OutputFolderError", "check_output_folder", "file_digest",
           "verify_output_folder"]

_CHUNK = 1 << 20


class OutputFolderError(ValueError):
    """An output folder that cannot be written, or a folder read back that does not check out (the message
    names the folder or file and says why; nothing was written)."""


@dataclass(frozen=True, kw_only=True)
class FolderKind:
    """One command's output folder: its manifest (file name and ``format``) and the entries it may hold.

    ``names``: top-level files and folders the command writes (its manifest included); ``extra``: names
    other convlens commands may add to it (e.g. ``tcav.csv`` placed into a labels folder).
    """

    command: str
    manifest: str
    format: str
    names: frozenset[str]
    extra: frozenset[str] = field(default_factory=frozenset)

    def own(self, name: str) -> bool:
        return name in self.names or name in self.extra or name == OutputLock.NAME or is_temporary_name(name)


def _read_json(path: Path) -> Any:
    if path.is_symlink() or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _is_own_folder(path: Path, kind: FolderKind) -> bool:
    """Empty, or marked by this command's manifest and holding nothing else but its own names."""
    entries = [entry.name for entry in path.iterdir()]
    if not entries:
        return True
    manifest = _read_json(path / kind.manifest)
    if not isinstance(manifest, dict) or manifest.get("format") != kind.format:
        return False
    return all(kind.own(name) for name in entries)


def check_output_folder(path: str | os.PathLike[str], kind: FolderKind) -> None:
    """Before anything is written: ``path`` may become ``kind``'s output folder. Raises
    :class:`OutputFolderError` when it is a file, holds anything this command did not write, or cannot be
    written (one line naming the folder and, where there is one, the first foreign entry)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_dir():
            raise OutputFolderError(f"--out {path}: exists and is not a folder")
        try:
            entries = sorted(entry.name for entry in path.iterdir())
        except OSError as exc:
            raise OutputFolderError(f"--out {path}: cannot read this folder ({exc.strerror or exc})") from None
        manifest = _read_json(path / kind.manifest)
        ours = isinstance(manifest, dict) and manifest.get("format") == kind.format
        foreign = [name for name in entries if not (ours and kind.own(name))]
        if entries and foreign:
            raise OutputFolderError(
                f"--out {path}: holds {foreign[0]!r}, which {kind.command} did not write; choose a new or empty "
                "folder (convlens never replaces files it did not write)")
        if not os.access(path, os.W_OK | os.X_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            raise OutputFolderError(f"--out {path}: no permission to replace this folder")
        return
    parent = path.parent
    while not (parent.exists() or parent.is_symlink()) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputFolderError(f"--out {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputFolderError(f"--out {path}: no permission to create it in {parent}")


def file_digest(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file (read in chunks)."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": sha.hexdigest()}


class OutputFolder:
    """Build ``kind``'s output folder aside and rename it into place (``with OutputFolder(out, kind) as
    folder``: write into ``folder.path``, then :meth:`seal` the manifest). An error or a kill inside the
    block leaves the previous folder (or none) as it was; only an own folder is ever replaced."""

    def __init__(self, path: str | os.PathLike[str], kind: FolderKind) -> None:
        self.final = Path(path)
        self.kind = kind
        check_output_folder(self.final, kind)
        self._atomic = atomic_directory(self.final, replaceable=lambda p: _is_own_folder(p, kind))
        self.path = Path()
        self.sealed = False

    def __enter__(self) -> OutputFolder:
        self.path = self._atomic.__enter__()
        return self

    def seal(self, manifest: Mapping[str, Any], *, exclude: Iterable[str] = ()) -> dict[str, Any]:
        """Write the manifest with ``format`` and, under ``files``, the size and SHA-256 of every file in the
        folder (recursively; ``exclude`` lists relative paths left out, e.g. a cache) and return it."""
        skip = set(exclude)
        files = {}
        for file in sorted(p for p in self.path.rglob("*") if p.is_file()):
            relative = file.relative_to(self.path).as_posix()
            if relative != self.kind.manifest and not any(relative == s or relative.startswith(f"{s}/") for s in skip):
                files[relative] = file_digest(file)
        sealed = {**manifest, "format": self.kind.format, "files": files}
        (self.path / self.kind.manifest).write_text(json.dumps(sealed, indent=2, default=str), encoding="utf-8")
        self.sealed = True
        return sealed

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None and not self.sealed:
            exc_type = RuntimeError  # a folder without its manifest is never put in place
            self._atomic.__exit__(exc_type, None, None)
            raise RuntimeError(f"{self.final}: OutputFolder closed without seal(): nothing was written")
        try:
            self._atomic.__exit__(exc_type, exc, tb)
        except FileExistsError as error:
            raise OutputFolderError(f"--out {self.final}: {error}") from None


def verify_output_folder(path: str | os.PathLike[str], kind: FolderKind, *, what: str | None = None) -> dict[str, Any]:
    """The manifest of a folder ``kind`` wrote, after checking every file it lists: present, the same size
    and SHA-256. Raises :class:`OutputFolderError` naming the folder or the first file that does not check
    out (``what`` describes the folder in the message, e.g. "the output folder of `convlens labels`")."""
    path = Path(path)
    what = what or f"the output folder of `{kind.command}`"
    if not path.is_dir():
        raise OutputFolderError(f"{path}: no such folder (expected {what})")
    manifest = _read_json(path / kind.manifest)
    if not isinstance(manifest, dict) or manifest.get("format") != kind.format:
        raise OutputFolderError(f"{path / kind.manifest}: missing or not written by {kind.command} (expected {what})")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise OutputFolderError(f"{path / kind.manifest}: lists no files (written by an older convlens, or edited); "
                                f"rerun {kind.command}")
    for relative, expected in files.items():
        file = path / relative
        if not file.is_file():
            raise OutputFolderError(f"{file}: missing (listed in {kind.manifest}); rerun {kind.command}")
        if file_digest(file) != expected:
            raise OutputFolderError(f"{file}: does not match {kind.manifest} (cut short or changed after it was "
                                    f"written); rerun {kind.command}")
    return manifest
