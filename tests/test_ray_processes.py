"""``--engine ray`` and the machine it runs on (issues 20 and 23): an address where no Ray answers is one line
and exit code 2 within seconds (Ray itself retries for minutes), a local Ray is the run's own even where another
Ray already runs (``RAY_ADDRESS`` set), and a driver killed with SIGKILL leaves none of its Ray daemons behind.

Skipped with a message when Ray is not installed or cannot start here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convlens.core.processes import descendants, start_time
from convlens.data.synthetic import SyntheticShapes
from convlens.runners.ray_engine import RAY_SOCKET_TAIL, RayEngineError, RayOptions, _probe_address, ray_session

pytest.importorskip("ray", reason="Ray is not installed: pip install 'convlens[ray]'")
pytestmark = [pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.timeout(1800)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def not_ray() -> Iterator[int]:
    """A port where something accepts connections and answers like a web server, not like Ray."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    server.close()


@pytest.mark.parametrize("command", ["explain", "evaluate"])
def test_an_address_where_nothing_listens_is_one_line_at_once(tmp_path: Path, command: str) -> None:
    from convlens.cli.main import app

    address = f"127.0.0.1:{_free_port()}"
    image = tmp_path / "x.png"
    SyntheticShapes(size=1, seed=0).load(0).image.save(image)
    source = [str(image)] if command == "explain" else ["--data", "synthetic", "--limit", "1"]
    started = time.monotonic()
    result = CliRunner().invoke(app, [command, *source, "--engine", "ray", "--ray-address", address,
                                      "--out", str(tmp_path / "out")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: --ray-address {address}: no Ray cluster there"), result.output
    assert time.monotonic() - started < 60 and not (tmp_path / "out").exists()


def test_an_address_that_is_not_ray_times_out_with_one_error(not_ray: int) -> None:
    started = time.monotonic()
    with pytest.raises(RayEngineError, match=r"something answers there, but not Ray \(no gRPC answer within 1 s\)"), \
            ray_session(RayOptions(address=f"127.0.0.1:{not_ray}", connect_timeout=1.0)):
        pass
    assert time.monotonic() - started < 30
    for bad in ("ray://nohost", "127.0.0.1:99999"):
        with pytest.raises(RayEngineError, match="expected auto, ray://HOST:PORT or HOST:PORT"), \
                ray_session(RayOptions(address=bad)):
            pass


DRIVER = textwrap.dedent("""
    import json, sys, time
    import ray
    from convlens.runners.ray_engine import RayOptions, ray_session

    with ray_session(RayOptions(workers=1)) as session:
        @ray.remote
        def where() -> str:
            return ray.get_runtime_context().get_node_id()
        ray.get(where.remote())  # a worker process, too
        json.dump({"started": session.started, "cpus": session.resources.get("CPU"),
                   "gcs": ray.get_runtime_context().gcs_address}, open(sys.argv[1] + ".tmp", "w"))
        __import__("os").replace(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(600)  # killed in here
""")


def _wait(path: Path, process: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)


def _stop(pids: list[int]) -> None:
    for pid in pids:
        if start_time(pid) is not None:
            os.kill(pid, signal.SIGKILL)


def test_a_local_ray_is_the_runs_own_and_dies_with_a_killed_driver(tmp_path: Path) -> None:
    """Another Ray runs first (``ray start --head``, its address in RAY_ADDRESS, as a user's shell may have it);
    the run still starts its own local Ray; SIGKILL the driver, and every one of its Ray processes is gone
    within the watchdog's grace period (Ray's own agents linger for about a minute otherwise)."""
    other_temp = tempfile.mkdtemp(prefix="cl20r", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _free_port()
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1",
                        "RAY_ADDRESS": f"127.0.0.1:{port}"}
    other = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", f"--temp-dir={other_temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    other_pids: list[int] = []
    driver_pids: list[int] = []
    try:
        deadline = time.monotonic() + 600  # a hang guard: the loop ends when the port opens or the head exits
        while time.monotonic() < deadline and other.poll() is None:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        else:
            pytest.skip("Ray cannot start a head node here")
        other_pids = [other.pid, *descendants(other.pid)]
        _probe_address(f"127.0.0.1:{port}", 30.0)  # a real Ray head passes the check (HTTP/2 SETTINGS)
        before = set(Path("/tmp").glob("convlens-ray-*"))
        script, ready = tmp_path / "driver.py", tmp_path / "ready.json"
        script.write_text(DRIVER)
        driver = subprocess.Popen([sys.executable, str(script), str(ready)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        _wait(ready, driver, 600)  # ends when the driver is ready or exits
        if not ready.exists():
            driver.kill()
            pytest.fail(f"the driver did not start its Ray: {driver.communicate()[1].decode()[-2000:]}")
        found = json.loads(ready.read_text())
        assert found["started"] and not found["gcs"].endswith(f":{port}")  # its own Ray, not the other one
        driver_pids = descendants(driver.pid)
        names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in driver_pids if start_time(pid)}
        assert {"raylet", "gcs_server"} <= names, names
        short = set(Path("/tmp").glob("convlens-ray-*")) - before  # under a long TMPDIR, the driver's Ray folder
        assert bool(short) == (len(os.fsencode(tempfile.gettempdir())) + RAY_SOCKET_TAIL > 107), short
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(start_time(p) is not None for p in driver_pids):
            time.sleep(0.2)
        left = [Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")[:80] for p in driver_pids
                if start_time(p) is not None]
        assert left == [], left
        deadline = time.monotonic() + 30  # the watchdog removes the folder right after stopping the processes
        while time.monotonic() < deadline and any(folder.exists() for folder in short):
            time.sleep(0.2)
        assert not any(folder.exists() for folder in short), short
        assert all(start_time(p) is not None for p in other_pids[:1])  # the other Ray was left alone
    finally:
        _stop(driver_pids)
        other.terminate()
        try:
            other.wait(timeout=30)
        except subprocess.TimeoutExpired:
            other.kill()
        _stop([*other_pids, *descendants(other.pid)])
        shutil.rmtree(other_temp, ignore_errors=True)
