"""The real server (uvicorn in its own process, loopback): concurrent load with nothing lost or duplicated,
SIGKILL in the middle of the load, SIGTERM, several workers — on SQLite and on PostgreSQL; chunked bodies
over the limit; Prolific ids kept out of the log."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from study.conftest import CLASSES, CSRF_META
from study.helpers import LiveServer, LoadResult, lost_and_duplicated, run_load

PLAYERS, SUBMISSIONS = 6, 20  # small for `make test`; benchmarks/bench_study.py runs 50 x 100


def _open_study(study_dir: Path) -> None:
    config = json.loads((study_dir / "study.json").read_text())
    config.update(plays_per_round=1000, rounds_per_player=1000, one_round_per_image=False)  # long games: load
    (study_dir / "study.json").write_text(json.dumps(config))


def _url(study_dir: Path, database: str) -> str:
    return database if database.startswith("postgresql") else f"sqlite:///{study_dir / 'study.sqlite'}"


async def _retry_pending(url: str, result: LoadResult, clients: dict) -> dict[int, int]:
    """After the restart, each player repeats its unanswered request with the same request id."""
    statuses = {}
    for index, (path, body) in list(result.pending.items()):
        old = clients[index]
        async with httpx.AsyncClient(base_url=url, cookies=old.cookies, headers=dict(old.headers), timeout=60) as c:
            statuses[index] = (await c.post(path, json=body)).status_code
    return statuses


def _check_full_load(server: LiveServer, url: str) -> None:
    result, _, _ = asyncio.run(run_load(server.url, PLAYERS, SUBMISSIONS, CLASSES))
    assert result.failures == []
    assert len(result.acknowledged) == PLAYERS * SUBMISSIONS
    lost, duplicated, stored = lost_and_duplicated(url, result)
    assert lost == [] and duplicated == []
    assert sum(stored.values()) == PLAYERS * SUBMISSIONS  # no event that was not acknowledged
    assert {"next", "reveal", "guess", "describe"} <= {kind for kind, _, _ in result.acknowledged}


def _check_sigkill(server: LiveServer, url: str, before: int) -> None:
    async def load_then_kill() -> tuple:
        result, tasks, clients = await run_load(server.url, PLAYERS, 10_000, CLASSES, stop_after=60)
        server.kill()  # SIGKILL while every player has a request in flight
        await asyncio.gather(*tasks)
        return result, clients

    result, clients = asyncio.run(load_then_kill())
    assert len(result.acknowledged) >= 60 and len(result.failures) == PLAYERS  # every player saw the crash
    lost, duplicated, _ = lost_and_duplicated(url, result)
    assert lost == [] and duplicated == []
    server.start()  # same database, same port
    statuses = asyncio.run(_retry_pending(server.url, result, clients))
    assert statuses and set(statuses.values()) == {200}  # applied now, or answered from the stored state
    for index, (_, body) in result.pending.items():
        result.acknowledged.append(("retry", body["request_id"], index))
    lost, duplicated, stored = lost_and_duplicated(url, result)
    assert lost == [] and duplicated == []
    assert sum(stored.values()) == before + len(result.acknowledged)  # nothing stored beyond what was answered


def test_load_then_sigkill_lose_and_duplicate_nothing(study_dir: Path, database: str) -> None:
    """Concurrent players x submissions: every acknowledged one stored exactly once; then a SIGKILL in the
    middle of the load, a restart, and the unanswered requests retried with their request ids."""
    _open_study(study_dir)
    url = _url(study_dir, database)
    server = LiveServer(study_dir, database).start()
    try:
        _check_full_load(server, url)
        _check_sigkill(server, url, before=PLAYERS * SUBMISSIONS)
    finally:
        server.kill()


def _chunked_post_is_413(url: str) -> None:
    """A chunked body (no Content-Length) over the limit, on a real socket: 413 on the API and on a form."""
    def chunks(head: bytes) -> Iterator[bytes]:
        yield head
        for _ in range(20):
            yield b"a" * 4096

    with httpx.Client(base_url=url, timeout=30) as client:
        csrf = CSRF_META.search(client.get("/").text).group(1)
        form = {"csrftoken": csrf, "consent": "yes", "consent_version": "1"}
        assert client.post("/consent", data=form).status_code in (200, 303)
        api = client.post("/api/next", content=chunks(b'{"request_id": "'),
                          headers={"x-csrftoken": csrf, "content-type": "application/json"})
        assert api.status_code == 413, api.text
        consent = client.post("/consent", content=chunks(f"csrftoken={csrf}&consent=yes&nickname=".encode()),
                              headers={"content-type": "application/x-www-form-urlencoded"})
        assert consent.status_code == 413, consent.text


def test_sigterm_stops_cleanly(study_dir: Path) -> None:
    server = LiveServer(study_dir).start()
    assert httpx.get(server.url + "/?PROLIFIC_PID=secret123&STUDY_ID=s1&SESSION_ID=x9").status_code == 200
    _chunked_post_is_413(server.url)
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
    assert server.terminate() in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown
    log = server.log.read_text()
    assert "shut down cleanly" in log and "Application shutdown complete" in log and "GET /healthz 200" in log
    assert "GET / 200" in log  # the request with the Prolific parameters is logged ...
    assert "secret123" not in log and "PROLIFIC" not in log  # ... without its query string


def test_several_workers_on_postgresql(study_dir: Path, postgres_url: str) -> None:
    _open_study(study_dir)
    server = LiveServer(study_dir, postgres_url, workers=2).start()
    try:
        result, _, _ = asyncio.run(run_load(server.url, 4, 10, CLASSES))
    finally:
        server.kill()
    assert result.failures == [] and len(result.acknowledged) == 40
    lost, duplicated, stored = lost_and_duplicated(postgres_url, result)
    assert lost == [] and duplicated == [] and sum(stored.values()) == 40


def test_serve_refuses_a_broken_study(study_dir: Path) -> None:
    (study_dir / "study.json").write_text("not json")
    with pytest.raises(RuntimeError, match="exited"):
        LiveServer(study_dir).start()  # ends when the server exits
