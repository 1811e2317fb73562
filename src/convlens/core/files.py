"""Writing results safely: atomic files and folders, permissions that follow the umask, and clean-up
of what a killed run left behind — and never anything else.

Every temporary entry convlens creates is named ``.convlens-tmp-<32 hex digits>`` (a folder being
written; files end in ``.tmp``) or ``.convlens-old-<32 hex digits>`` (a folder of ours being replaced),
next to its final place: 128 random bits, so no name a user gives a file has that exact shape.
:func:`remove_stale_temporaries` deletes exactly those names (and nothing else) — call it only while
holding the output folder's lock (:class:`OutputLock`), so that no other run is still writing them.

Temporaries are created 0700 (folders) and 0600 (files); results here get the permissions of any folder or
file the user creates (``0777`` / ``0666`` minus the umask), so a shared output folder stays readable
as the user's own umask says.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "OutputLock",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_text",
    "is_temporary_name",
    "remove_stale_temporaries",
    "temporary_name",
]

TMP_PREFIX = ".convlens-tmp-"
OLD_PREFIX = ".convlens-old-"
_STALE = re.compile(r"^\.convlens-(tmp|old)-[0-9a-f]{32}(\.tmp)?$")


def temporary_name(kind: str = "tmp", suffix: str = "") -> str:
    """A fresh temporary's name: ``.convlens-<kind>-<32 random hex digits><suffix>`` (kind tmp or old)."""
    return f".convlens-{kind}-{secrets.token_hex(16)}{suffix}"


def is_temporary_name(name: str) -> bool:
    """True for exactly the names :func:`temporary_name` makes (what a killed run may have left)."""
    return _STALE.match(name) is not None


def _make_temporary(parent: Path, kind: str, directory: bool, suffix: str = "") -> Path:
    """Create a new temporary folder or empty file in ``parent`` (exclusively: never an existing entry)."""
    while True:
        path = parent / temporary_name(kind, suffix)
        try:
            if directory:
                path.mkdir()
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:  # pragma: no cover - 128 random bits
            continue
        return path


def current_umask() -> int:
    """The process umask (read from /proc where possible; else set and restored at once)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_like_new(path: Path, directory: bool) -> None:
    with contextlib.suppress(OSError):  # a file system without permissions (e.g. FAT) keeps its own
        os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temp file in the same folder, fsync, rename over ``path``."""
    path = Path(path)
    tmp = _make_temporary(path.parent, "tmp", directory=False, suffix=".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        _chmod_like_new(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, like :func:`atomic_write_text` (images, plots)."""
    path = Path(path)
    tmp = _make_temporary(path.parent, "tmp", directory=False, suffix=".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _chmod_like_new(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class atomic_directory:  # noqa: N801 - used like a function: ``with atomic_directory(path) as tmp``
    """Write a directory atomically: build it in a sibling temp dir, rename on success, delete on error.

    Args:
        path: the final folder.
        overwrite: replace an existing folder at ``path`` (else FileExistsError).
        replaceable: when given, an existing folder is replaced only if ``replaceable(path)`` is true
            (e.g. "convlens wrote it"); otherwise FileExistsError and nothing is touched.
    """

    def __init__(
        self, path: str | os.PathLike[str], overwrite: bool = True, replaceable: Callable[[Path], bool] | None = None
    ) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.replaceable = replaceable
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _make_temporary(self.path.parent, "tmp", directory=True)
        _chmod_like_new(self.tmp, directory=True)
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self._check_replaceable()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if not (self.path.exists() or self.path.is_symlink()):
            os.replace(self.tmp, self.path)
            return
        old = _make_temporary(self.path.parent, "old", directory=True)
        os.replace(self.path, old / "content")
        os.replace(self.tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)

    def _check_replaceable(self) -> None:
        if not (self.path.exists() or self.path.is_symlink()):
            return
        if self.path.is_symlink() or not self.path.is_dir():
            raise FileExistsError(f"{self.path} exists and is not a folder: not replaced")
        if not self.overwrite:
            raise FileExistsError(self.path)
        if self.replaceable is not None and not self.replaceable(self.path):
            raise FileExistsError(f"{self.path} exists and was not written by convlens: not replaced")


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[str]:
    """Delete the ``.convlens-tmp-*`` / ``.convlens-old-*`` entries directly in ``folder`` (left by a killed
    run) and return their names. Nothing else is touched. Hold the folder's :class:`OutputLock`."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        if not is_temporary_name(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


class OutputLock:
    """An exclusive advisory lock on an output folder (``<folder>/.convlens.lock``, ``flock``).

    Two runs into the same folder take turns: the second waits (``on_wait`` is called once when it has
    to) until the first has finished. The lock file exists only while a run holds it (the holder
    deletes it; a waiter that wakes up on a deleted file tries again). The operating system releases the
    lock when a process dies, so a killed run never leaves the folder locked (only the empty file, which
    the next run re-uses). Where ``fcntl`` does not exist (Windows) runs are not serialised (each image
    is still written atomically).
    """

    NAME = ".convlens.lock"

    def __init__(self, folder: str | os.PathLike[str], on_wait: Callable[[], None] | None = None) -> None:
        self.path = Path(folder) / self.NAME
        self.on_wait = on_wait
        self._handle: int | None = None

    def __enter__(self) -> OutputLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        waited = False
        while True:
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if self.on_wait is not None and not waited:
                        self.on_wait()
                    waited = True
                    fcntl.flock(handle, fcntl.LOCK_EX)
                if self._is_current(handle):
                    self._handle = handle
                    return self
            except BaseException:
                os.close(handle)
                raise
            os.close(handle)  # the holder deleted this file before we got it: lock the new one

    def _is_current(self, handle: int) -> bool:
        try:
            return os.fstat(handle).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # while still holding the lock: a waiter then retries on a fresh file
            os.close(self._handle)  # closing the descriptor releases the flock
            self._handle = None
