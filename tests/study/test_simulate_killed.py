"""A ``convlens study simulate`` killed with SIGKILL leaves no study server running (issue 20)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convlens.core.processes import descendants, start_time
from convlens.study.batch.create import CreateOptions, create_study
from study.conftest import CLASSES

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _server_of(pid: int) -> int | None:
    for child in descendants(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"convlens.study.web.server" in command:
            return child
    return None


def test_a_killed_simulation_stops_its_server(inv_run: Path, tmp_path: Path) -> None:
    study = tmp_path / "study"
    create_study(study, [inv_run], CreateOptions(classes=CLASSES, gold=1, plays_per_round=3, rounds_per_player=6))
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "convlens.cli.main", "study", "simulate", str(study)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        deadline = time.monotonic() + 120
        while server is None and time.monotonic() < deadline and run.poll() is None:
            server = _server_of(run.pid)
            time.sleep(0.02)
        assert server is not None, "the simulation never started its server"
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        deadline = time.monotonic() + 30
        while start_time(server) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert start_time(server) is None, "the study server outlived the killed simulation"
    finally:
        if run.poll() is None:
            run.kill()
        if server is not None and start_time(server) is not None:
            os.kill(server, signal.SIGKILL)
