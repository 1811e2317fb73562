"""Output folders written as a whole, and read back only when whole (``study export``, ``labels``,
``global``, ``tcav``).

The rule every such command keeps: it writes only into a folder it made or one that holds only its own
outputs, marked by its manifest (:func:`check_output_folder`); it builds the new folder aside and renames
it into place, so a killed run leaves the previous folder or nothing, never a mixture
(:class:`OutputFolder`); the manifest records every file's size and SHA-256, and readers check them
(:func:`verify_output_folder`), so a file cut short or swapped after writing is named, not read.

"Its own outputs" are the manifest's fixed names (:class:`FolderKind`) and, in a sealed folder, every file the
manifest lists (e.g. per-class folders); a user's file added anywhere inside makes the folder foreign. The folder
being built is locked (``flock``) while its run lives, so what a killed run left beside ``--out`` is removed by
the next one (:func:`remove_dead_asides`), never a live run's folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convlens.core.files import OutputLock, _chmod_like_new, is_temporary_name, temporary_name

__all__ = ["FolderKind", "OutputFolder", "OutputFolderError", "check_output_folder", "file_digest",
           "remove_dead_asides", "verify_output_folder"]

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


def read_json_or_none(path: Path) -> Any:
    """The JSON in the regular file ``path``; None for a link, a missing file or one that does not parse."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _foreign_entries(path: Path, kind: FolderKind) -> list[str]:
    """What in the existing folder ``path`` its command did not write: every entry, unless the folder holds
    ``kind``'s manifest; then the top-level names that ``kind`` does not own and its manifest does not list
    (a command with per-class folders lists their files under ``files``) and, in a sealed folder, any file
    below them that the manifest neither lists nor marks ``unsealed`` (a user's note in a class folder)."""
    entries = sorted(entry.name for entry in path.iterdir())
    manifest = read_json_or_none(path / kind.manifest)
    if not isinstance(manifest, dict) or manifest.get("format") != kind.format:
        return entries
    listed = manifest.get("files")
    if not isinstance(listed, dict):  # written before manifests were sealed: its fixed names only
        return [name for name in entries if not kind.own(name)]
    unsealed = [str(s) for s in manifest.get("unsealed") or []]
    tops = {str(name).split("/")[0] for name in listed}
    foreign = [name for name in entries if not (kind.own(name) or name in tops)]
    for name in entries:
        folder = path / name
        if name in foreign or is_temporary_name(name) or folder.is_symlink() or not folder.is_dir():
            continue
        for inner in sorted(folder.rglob("*")):
            relative = inner.relative_to(path).as_posix()
            if (inner.is_symlink() or not inner.is_dir()) and relative not in listed and not any(
                    relative == s or relative.startswith(f"{s}/") for s in unsealed):
                foreign.append(relative)
    return foreign


def _is_own_folder(path: Path, kind: FolderKind) -> bool:
    """Empty, or marked by this command's manifest and holding nothing else but its own outputs."""
    return not _foreign_entries(path, kind)


def check_output_folder(path: str | os.PathLike[str], kind: FolderKind) -> None:
    """Before anything is written: ``path`` may become ``kind``'s output folder. Raises
    :class:`OutputFolderError` when it is a file, holds anything this command did not write, or cannot be
    written (one line naming the folder and, where there is one, the first foreign entry)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_dir():
            raise OutputFolderError(f"--out {path}: exists and is not a folder")
        try:
            foreign = _foreign_entries(path, kind)
        except OSError as exc:
            raise OutputFolderError(f"--out {path}: cannot read this folder ({exc.strerror or exc})") from None
        if foreign:
            raise OutputFolderError(
                f"--out {path}: holds {foreign[0]!r}, which {kind.command} did not write; choose a new or empty "
                "folder (convlens never replaces files it did not write)")
        if not os.access(path, os.W_OK | os.X_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            raise OutputFolderError(f"--out {path}: no permission to replace this folder")
        return
    check_creatable(path)


def check_creatable(path: Path) -> None:
    """Raise :class:`OutputFolderError` unless the folder ``path`` (not there yet) can be created: its first
    existing ancestor must be a folder this process may write into."""
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
        self._lock: _AsideLock | None = None
        self.path = Path()
        self.sealed = False

    def __enter__(self) -> OutputFolder:
        parent = self.final.parent
        parent.mkdir(parents=True, exist_ok=True)
        remove_dead_asides(parent)
        self._lock = _AsideLock(parent)
        try:
            self._lock.folder.mkdir()
            _chmod_like_new(self._lock.folder, directory=True)
        except BaseException:
            self._lock.release()
            raise
        self.path = self._lock.folder
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
        if skip:
            sealed["unsealed"] = sorted(skip)
        (self.path / self.kind.manifest).write_text(json.dumps(sealed, indent=2, default=str), encoding="utf-8")
        self.sealed = True
        return sealed

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is not None or not self.sealed:
                shutil.rmtree(self.path, ignore_errors=True)
                if exc_type is None:  # a folder without its manifest is never put in place
                    raise RuntimeError(f"{self.final}: OutputFolder closed without seal(): nothing was written")
                return
            try:
                self._put_in_place()
            except BaseException:
                shutil.rmtree(self.path, ignore_errors=True)
                raise
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _put_in_place(self) -> None:
        """Rename the built folder to its final name. A previous folder (checked again: still the command's
        own) first goes aside under a lock of its own, so that a kill between the two renames leaves it for
        the next run to remove (:func:`remove_dead_asides`); an error puts it back."""
        final = self.final
        if not (final.exists() or final.is_symlink()):
            os.replace(self.path, final)
            return
        if final.is_symlink() or not final.is_dir():
            raise OutputFolderError(f"--out {final}: exists and is not a folder: not replaced")
        if not _is_own_folder(final, self.kind):
            raise OutputFolderError(f"--out {final}: now holds files {self.kind.command} did not write: not replaced")
        previous = _AsideLock(final.parent)
        try:
            os.replace(final, previous.folder)
            try:
                os.replace(self.path, final)
            except BaseException:
                os.replace(previous.folder, final)
                raise
            shutil.rmtree(previous.folder, ignore_errors=True)
        finally:
            previous.release()


class _AsideLock:
    """The lock of a folder being built aside: the file ``.convlens-tmp-<H>.tmp``, locked (``flock``) for as
    long as the run builds the folder ``.convlens-tmp-<H>`` beside it. A killed run's lock is released by
    the operating system, so :func:`remove_dead_asides` can tell its leftovers from a live run's folder.
    The folder is created only once the lock is held; where ``fcntl`` does not exist (Windows) nothing is
    locked and no leftover is ever removed."""

    def __init__(self, parent: Path) -> None:
        while True:
            name = temporary_name(suffix=".tmp")
            try:
                self.handle: int | None = os.open(parent / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # pragma: no cover - 128 random bits
                continue
            break
        self.file = parent / name
        self.folder = parent / name.removesuffix(".tmp")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def release(self) -> None:
        """Remove the lock file (the folder has been renamed into place or removed), then unlock it."""
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.file.unlink()
            os.close(self.handle)
            self.handle = None


def remove_dead_asides(parent: str | os.PathLike[str]) -> list[str]:
    """Remove the folders that killed :class:`OutputFolder` runs were building in ``parent`` (a folder
    ``.convlens-tmp-<H>`` beside a lock file ``.convlens-tmp-<H>.tmp`` that no live run holds) and their lock
    files; return the folders' names. Nothing else is touched: no other entry has both names."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return []
    parent = Path(parent)
    removed = []
    for lock in sorted(parent.glob(".convlens-tmp-*.tmp")):
        folder = lock.with_name(lock.name.removesuffix(".tmp"))
        if not (is_temporary_name(lock.name) and folder.is_dir() and not folder.is_symlink() and lock.is_file()):
            continue
        try:
            handle = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(handle)  # a live run's folder
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed.append(folder.name)
        finally:
            os.close(handle)
    return removed


def verify_output_folder(path: str | os.PathLike[str], kind: FolderKind, *, what: str | None = None) -> dict[str, Any]:
    """The manifest of a folder ``kind`` wrote, after checking every file it lists: present, the same size
    and SHA-256. Raises :class:`OutputFolderError` naming the folder or the first file that does not check
    out (``what`` describes the folder in the message, e.g. "the output folder of `convlens labels`")."""
    path = Path(path)
    what = what or f"the output folder of `{kind.command}`"
    if not path.is_dir():
        raise OutputFolderError(f"{path}: no such folder (expected {what})")
    manifest = read_json_or_none(path / kind.manifest)
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
