"""Processes a run starts never outlive it, even when it is killed (SIGKILL, a crash, the OOM killer).

A run that starts helper processes — the study server of ``convlens study simulate``, the daemons of a
local Ray (raylet, GCS, dashboard and runtime-env agents, workers) — stops them when it ends. A killed run
cannot, and some of them then live on: Ray's agents poll for the raylet's death for about a minute, a
server started with ``subprocess`` runs until someone kills it. :class:`ProcessWatchdog` closes that gap: a
small watchdog process (``python -m convlens.core.processes``) follows the run; it notes the run's
descendants (every ``interval`` seconds, and at once for a process handed to :meth:`ProcessWatchdog.adopt`)
and, when the run dies without closing it, terminates them (SIGTERM, SIGKILL after ``grace`` seconds).

The watchdog learns of the death from its standard input, a pipe only the run holds (EOF), and, should a
forked child still hold the pipe, from the run's process id disappearing. It ignores SIGINT and SIGHUP and
runs in its own session, so a Ctrl-C or a closed terminal that kills the run leaves it to clean up. It
never outlives the run: it exits once the run's processes are gone. Descendants are read from ``/proc``
(Linux) or with psutil where it is installed; elsewhere only adopted processes are followed. A process id is
compared with its start time before it is signalled, so a reused id is never killed.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

__all__ = ["ProcessWatchdog", "descendants", "start_time"]

Identity = tuple[int, float]  # (pid, start time): a process, not just a reusable number


_PROC = Path("/proc/self/stat").exists()


def start_time(pid: int) -> float | None:
    """When ``pid`` started (clock ticks since boot on Linux, seconds with psutil), or None if it is gone
    (a zombie counts as gone)."""
    if _PROC:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return None if fields[0] in ("Z", "X") else float(fields[19])
    try:
        import psutil
    except ImportError:  # pragma: no cover - neither /proc nor psutil
        return None
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.Error:
        return None


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (``/proc``, else psutil, else nothing)."""
    if _PROC:
        found = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    text = Path(entry.path, "stat").read_text()
                    found[int(entry.name)] = int(text.rsplit(")", 1)[1].split()[1])
        return found
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return {}
    return {p.info["pid"]: p.info["ppid"] for p in psutil.process_iter(["pid", "ppid"])}


def descendants(pid: int) -> list[int]:
    """The process ids of ``pid``'s children, their children, and so on."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, stack = [], list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, []))
    return found


class ProcessWatchdog:
    """While open (``with ProcessWatchdog() as watchdog``), the processes this one starts are terminated if
    it dies before closing the watchdog (see the module docstring). :meth:`adopt` a process the moment it is
    started (nothing is missed between two looks), :meth:`scan` after starting several at once (a local Ray).

    ``interval``: seconds between two looks at the descendants; ``grace``: seconds between SIGTERM and SIGKILL.
    """

    def __init__(self, *, interval: float = 0.5, grace: float = 5.0) -> None:
        self.interval = interval
        self.grace = grace
        self._process: subprocess.Popen[bytes] | None = None
        self._pipe: IO[bytes] | None = None

    def __enter__(self) -> ProcessWatchdog:
        command = [sys.executable, "-m", "convlens.core.processes", str(os.getpid()), str(self.interval),
                   str(self.grace)]
        env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        self._pipe = self._process.stdin
        return self

    @property
    def pid(self) -> int | None:
        """The watchdog's own process id (while open)."""
        return self._process.pid if self._process is not None else None

    def _send(self, line: str) -> None:
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                self._pipe.write(line.encode() + b"\n")
                self._pipe.flush()

    def adopt(self, pid: int) -> None:
        """Follow ``pid`` (and, from the next look on, its descendants) from now on."""
        self._send(f"adopt {pid}")

    def remove_after(self, folder: str | os.PathLike[str]) -> None:
        """If the run dies, also remove ``folder`` (e.g. a local Ray's temporary folder), once its processes
        are stopped; a run that closes the watchdog removes its own folders."""
        self._send(f"remove {os.fspath(folder)}")

    def scan(self) -> None:
        """Look at this process's descendants now (e.g. right after starting a local Ray)."""
        self._send("scan")

    def __exit__(self, *exc: object) -> None:
        """Close: the run ended normally and stops its own processes; the watchdog exits without a signal."""
        self._send("stop")
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                self._pipe.close()
            self._pipe = None
        if self._process is not None:
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - the watchdog never blocks on "stop"
                self._process.kill()
                self._process.wait()
            self._process = None


# --------------------------------------------------------------------------------------- the watchdog itself
def _terminate(followed: dict[int, float], grace: float) -> None:
    """SIGTERM every followed process still running (same start time), then SIGKILL after ``grace`` s."""
    def alive() -> list[int]:
        return [pid for pid, started in followed.items() if start_time(pid) == started]

    for pid in alive():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _follow(followed: dict[int, float], pids: list[int]) -> None:
    for pid in pids:
        if pid not in followed and pid != os.getpid() and (started := start_time(pid)) is not None:
            followed[pid] = started


def watch(parent: int, interval: float, grace: float, commands: int) -> None:
    """The watchdog's loop: follow ``parent``'s descendants until ``parent`` says stop on the file
    descriptor ``commands`` (return) or dies (terminate what it left, then return)."""
    parent_started = start_time(parent)
    followed: dict[int, float] = {}
    folders: list[str] = []
    _follow(followed, descendants(parent))
    pending = b""
    while True:
        ready, _, _ = select.select([commands], [], [], interval)
        if ready:
            chunk = os.read(commands, 4096)
            if not chunk:
                break  # EOF: the parent is gone (or closed without "stop")
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                word, _, argument = line.decode(errors="replace").strip().partition(" ")
                if word == "stop":
                    return
                if word == "adopt" and argument.isdigit():
                    _follow(followed, [int(argument), *descendants(int(argument))])
                if word == "remove" and argument:
                    folders.append(argument)
        if parent_started is None or start_time(parent) != parent_started:
            break
        _follow(followed, descendants(parent))
        followed = {pid: started for pid, started in followed.items() if start_time(pid) == started}
    _terminate(followed, grace)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _main(argv: list[str]) -> None:
    for name in ("SIGINT", "SIGHUP"):  # a Ctrl-C or a closed terminal kills the run, not its watchdog
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    parent, interval, grace = int(argv[0]), float(argv[1]), float(argv[2])
    watch(parent, interval, grace, sys.stdin.fileno())


if __name__ == "__main__":
    _main(sys.argv[1:])
