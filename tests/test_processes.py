"""A run's helper processes never outlive it (issue 20): :class:`convlens.core.processes.ProcessWatchdog`
terminates what a run killed with SIGKILL had started — a child it adopted and the grandchildren it found
— and nothing else, then removes the folders it was given; closed normally, it leaves everything to the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from convlens.core.processes import _terminate, descendants, start_time

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists() or os.name != "posix",
                                reason="needs Linux /proc (the watchdog's way of finding descendants)")

DRIVER = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    from convlens.core.processes import ProcessWatchdog, descendants

    ready, close = Path(sys.argv[1]), sys.argv[2] == "close"
    with ProcessWatchdog(interval=0.2, grace=2.0) as watchdog:
        folder = ready.parent / "scratch dir"
        (folder / "inner").mkdir(parents=True)
        watchdog.remove_after(folder)
        child = subprocess.Popen(["sleep", "300"])
        watchdog.adopt(child.pid)  # followed at once
        shell = subprocess.Popen(["sh", "-c", "sleep 301 & sleep 302 & wait"])  # two grandchildren
        while len(descendants(shell.pid)) < 2:  # both started, however loaded the machine
            time.sleep(0.05)
        watchdog.scan()
        time.sleep(0.5)
        ready.write_text(f"{watchdog.pid} {child.pid} {shell.pid}")
        if not close:
            time.sleep(300)  # killed in here
    time.sleep(300)
""")


def _alive(pid: int) -> bool:
    return start_time(pid) is not None


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], list[int]]:
    script, ready = tmp_path / "driver.py", tmp_path / "ready.txt"
    script.write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), str(ready), mode])
    deadline = time.monotonic() + 600  # a hang guard only: the loop ends when the driver is ready or exits
    while not ready.exists() and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.05)
    assert ready.exists(), "the driver did not start its children"
    watchdog, child, shell = (int(v) for v in ready.read_text().split())
    return driver, [watchdog, child, shell, *descendants(shell)]


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_killed_run_leaves_no_process_behind(tmp_path: Path) -> None:
    driver, pids = _start(tmp_path, "kill")
    try:
        assert len(pids) == 5 and all(_alive(p) for p in pids)  # watchdog, sleep, sh and its two sleeps
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        assert _wait_gone(pids, 120) == []  # children, grandchildren and the watchdog (the sleeps last 300 s)
        assert not (tmp_path / "scratch dir").exists()  # removed by the watchdog, after the processes
    finally:
        _kill_all(pids)


def test_a_run_that_closes_its_watchdog_keeps_its_processes_and_the_watchdog_exits(tmp_path: Path) -> None:
    driver, pids = _start(tmp_path, "close")
    watchdog, others = pids[0], pids[1:]
    try:
        assert _wait_gone([watchdog], 120) == []
        driver.send_signal(signal.SIGKILL)  # after closing: the run itself answers for what it started
        driver.wait(timeout=30)
        time.sleep(1.0)
        assert all(_alive(p) for p in others)
        assert (tmp_path / "scratch dir" / "inner").is_dir()  # a closed watchdog leaves folders to the run
    finally:
        _kill_all(pids)


def test_a_reused_process_id_is_never_signalled() -> None:
    process = subprocess.Popen(["sleep", "30"])
    try:
        started = start_time(process.pid)
        assert started is not None
        _terminate({process.pid: started + 1.0}, grace=0.1)  # the same number, another start time
        assert process.poll() is None
        _terminate({process.pid: started}, grace=0.1)
        assert process.wait(timeout=300) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
