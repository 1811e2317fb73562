"""Test infrastructure: a throw-away PostgreSQL cluster, a real uvicorn server process, async load players."""

from __future__ import annotations

import asyncio
import atexit
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CSRF_META = re.compile(r'name="csrf-token" content="([^"]*)"')
UNLIMITED = "1000000/minute"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bindir() -> Path | None:
    configured = os.environ.get("CONVLENS_PG_BINDIR")
    candidates = [Path(configured)] if configured else sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((c for c in candidates if (c / "initdb").is_file() and (c / "pg_ctl").is_file()), None)


class PostgresCluster:
    """initdb + pg_ctl in a temporary folder on a free loopback port; databases created on demand.

    PostgreSQL refuses to run as root: as root the cluster runs as the ``postgres`` system user (created
    by Debian's package) through ``runuser``; otherwise as the current user.
    """

    def __init__(self, bindir: Path, base: Path, run_as: list[str]) -> None:
        self.bindir, self.base, self.run_as = bindir, base, run_as
        self.port = free_port()
        self.count = 0

    @classmethod
    def start_or_skip(cls, parent: Path | None = None) -> PostgresCluster:
        """``parent``: where its folder goes (a short path: the server's socket lives there)."""
        bindir = _pg_bindir()
        if bindir is None:
            pytest.skip("PostgreSQL is not installed (bash scripts/install_system_deps.sh installs it)")
        run_as: list[str] = []
        base = Path(tempfile.mkdtemp(prefix="convlens-pg-", dir=parent))
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
            if shutil.which("runuser") is None:
                pytest.skip("running as root without runuser: cannot start PostgreSQL as a normal user")
            os.chown(base, user.pw_uid, user.pw_gid)
            run_as = ["runuser", "-u", "postgres", "--"]
        cluster = cls(bindir, base, run_as)
        atexit.register(cluster.stop)  # also when the run is interrupted (idempotent)
        try:
            cluster._start()
        except (subprocess.CalledProcessError, OSError) as exc:
            shutil.rmtree(base, ignore_errors=True)
            pytest.skip(f"could not start a PostgreSQL cluster: {exc}")
        return cluster

    def _run(self, *args: str) -> None:
        subprocess.run([*self.run_as, *args], check=True, capture_output=True, timeout=900)  # a hang guard

    def _start(self) -> None:
        data = self.base / "data"
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", "convlens", "-A", "trust", "-E", "UTF8",
                  "--no-instructions")
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(self.base / "log"),
                  "-w", "-t", "600", "start")  # waits for readiness; 600 s only catches a hang

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://convlens@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        import psycopg

        self.count += 1
        name = f"study_{os.getpid()}_{self.count}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=convlens dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if not (self.base / "data" / "postmaster.pid").exists():
            shutil.rmtree(self.base, ignore_errors=True)
            return
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.base / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


class LiveServer:
    """``python -m convlens.study.web.server`` in its own process (and process group) on a loopback port."""

    def __init__(self, study_dir: Path, db: str | None = None, workers: int = 1, log: Path | None = None) -> None:
        self.study_dir, self.db, self.workers = study_dir, db, workers
        self.port = free_port()
        self.log = log or study_dir / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600.0) -> LiveServer:
        command = [sys.executable, "-m", "convlens.study.web.server", str(self.study_dir), "--port", str(self.port),
                   "--workers", str(self.workers), "--rate-limit-ip", UNLIMITED, "--rate-limit-participant", UNLIMITED,
                   "--rate-limit-consent", UNLIMITED]
        if self.db:
            command += ["--db", self.db]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        self._wait_healthy(timeout)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server not healthy after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the server's process group (the server and any worker it started)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=300)

    def terminate(self, timeout: float = 300.0) -> int:
        """SIGTERM and wait: the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


@dataclass
class LoadResult:
    acknowledged: list[tuple[str, str, int]] = field(default_factory=list)  # (action, request id, player)
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    pending: dict[int, tuple[str, dict]] = field(default_factory=dict)  # player -> unacknowledged request
    elapsed: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


async def _join(client: Any) -> str:
    page = await client.get("/")
    csrf = CSRF_META.search(page.text).group(1)
    response = await client.post("/consent", data={"csrftoken": csrf, "consent": "yes", "consent_version": "1"})
    assert response.status_code == 303, response.text
    return csrf


def _next_action(view: dict, rng: random.Random, classes: list[str]) -> tuple[str, dict]:
    if view.get("done"):
        raise RuntimeError("player ran out of rounds: the load study needs more rounds or plays per round")
    play = view["play"]
    if view["state"] == "active":
        draw = rng.random()
        if view["level"] < view["levels"] - 1 and draw < 0.45:
            return f"/api/plays/{play}/reveal", {"level": view["level"] + 1}
        if draw < 0.52:
            return f"/api/plays/{play}/resign", {}
        return f"/api/plays/{play}/guess", {"class_name": rng.choice(classes)}
    if view["state"] in ("win", "lose") and not view["described"] and rng.random() < 0.8:
        return f"/api/plays/{play}/describe", {"text": f"edges and colour {rng.randrange(1000)}", "language": "en"}
    return "/api/next", {}


async def play(base_url: str, index: int, submissions: int, classes: list[str], result: LoadResult,
               clients: dict[int, Any]) -> None:
    """One simulated player: consent, then ``submissions`` acknowledged actions (each one stored event).

    Stops at the first refused or failed request (recorded in ``result.failures``; a request without an
    answer stays in ``result.pending``).
    """
    import httpx

    rng = random.Random(index)
    client = httpx.AsyncClient(base_url=base_url, timeout=300)  # a hang guard: a loaded machine answers late
    clients[index] = client
    try:
        csrf = await _join(client)
        client.headers["x-csrftoken"] = csrf
        view: dict = {"state": "over", "play": None, "described": True}  # first action: /api/next
        done = 0
        while done < submissions:
            path, body = _next_action(view, rng, classes)
            body = {"request_id": str(uuid.uuid4()), **body}
            result.pending[index] = (path, body)
            start = time.perf_counter()
            response = await client.post(path, json=body)
            result.latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                result.failures.append(f"{path} {response.status_code} {response.text[:200]}")
                return
            del result.pending[index]
            view = response.json()
            if path != "/api/next" or not view.get("resumed"):
                result.acknowledged.append((path.rsplit("/", 1)[-1], body["request_id"], index))
                done += 1
    except httpx.HTTPError as exc:
        result.failures.append(f"player {index}: {type(exc).__name__}")


async def run_load(base_url: str, players: int, submissions: int, classes: list[str],
                   stop_after: int | None = None) -> tuple[LoadResult, list[asyncio.Task], dict[int, Any]]:
    """``players`` concurrent players x ``submissions``; with ``stop_after`` the run returns once that many
    submissions are acknowledged (the players keep going until the caller kills the server)."""
    result = LoadResult()
    clients: dict[int, Any] = {}
    start = time.perf_counter()
    tasks = [asyncio.create_task(play(base_url, i, submissions, classes, result, clients)) for i in range(players)]
    if stop_after is None:
        await asyncio.gather(*tasks)
    else:
        while len(result.acknowledged) < stop_after and not all(t.done() for t in tasks):
            await asyncio.sleep(0.01)
    result.elapsed = time.perf_counter() - start
    return result, tasks, clients


def stored_requests(db_url: str) -> dict[str, int]:
    """request id -> number of stored events, read straight from the database."""
    from sqlalchemy import create_engine, func, select

    from convlens.study.store.db import Event

    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(Event.request_id, func.count()).group_by(Event.request_id)).all()
    finally:
        engine.dispose()
    return {request_id: count for request_id, count in rows}


def lost_and_duplicated(db_url: str, result: LoadResult) -> tuple[list[str], list[str], dict[str, int]]:
    stored = stored_requests(db_url)
    lost = [rid for _, rid, _ in result.acknowledged if rid not in stored]
    duplicated = [rid for rid, count in stored.items() if count > 1]
    return lost, duplicated, stored
