"""The real server (``convlens study serve`` in its own process, loopback): concurrent load with nothing lost or
duplicated, SIGKILL in the middle of the load, SIGTERM, Ctrl-C (exit 130), several workers — on SQLite and on
PostgreSQL; no torch in any server process; bad settings refused in one line (exit 2); secure cookies and
HSTS; trusted proxy headers; chunked bodies over the limit; Prolific ids kept out of the log."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from study.conftest import CLASSES, CSRF_META, set_study
from study.helpers import LiveServer, LoadResult, free_port, lost_and_duplicated, run_load

PLAYERS, SUBMISSIONS = 6, 20  # small for `make test`; benchmarks/bench_study.py runs 50 x 100


def _open_study(study_dir: Path) -> None:
    """Long games for the load: every round for every player, enough slots for all of them."""
    set_study(study_dir, plays_per_round=1000, quota=None, rounds_per_player=1000, one_round_per_image=False)


def _url(study_dir: Path, database: str) -> str:
    return database if database.startswith("postgresql") else f"sqlite:///{study_dir / 'study.sqlite'}"


async def _retry_pending(url: str, result: LoadResult, clients: dict) -> dict[int, int]:
    """After the restart, each player repeats its unanswered request with the same request id."""
    statuses = {}
    for index, (path, body) in list(result.pending.items()):
        old = clients[index]
        async with httpx.AsyncClient(base_url=url, cookies=old.cookies, headers=dict(old.headers), timeout=300) as c:
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

    with httpx.Client(base_url=url, timeout=300) as client:
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


def _serve(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convlens", "study", "serve", *args], capture_output=True, text=True,
                          timeout=timeout)


def _one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    text = " ".join(result.stderr.split())
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert text.startswith("error:") and text.count("error:") == 1 and "Traceback" not in result.stderr, text
    assert all(f in text for f in fragments), text


def test_serve_refuses_a_broken_study(study_dir: Path) -> None:
    (study_dir / "study.json").write_text("not json")
    result = _serve(str(study_dir), "--port", str(free_port()))
    _one_line(result, str(study_dir / "study.json"))
    assert not (study_dir / "study.sqlite").exists()


@pytest.mark.parametrize(("options", "fragments"), [
    (["--port", "70000"], ["--port 70000", "1-65535"]),
    (["--port", "0"], ["--port 0", "1-65535"]),
    (["--host", "no-such-host.invalid"], ["--host", "no-such-host.invalid"]),
    (["--host", "192.0.2.1"], ["not an address of this machine"]),
    (["--rate-limit-ip", "5/minut"], ["--rate-limit-ip", "'5/minut'", "not a rate limit"]),
    (["--rate-limit-participant", "lots-per-fortnight"], ["--rate-limit-participant", "not a rate limit"]),
    (["--rate-limit-consent", ""], ["--rate-limit-consent"]),
    (["--rate-limit-storage", "nope://"], ["--rate-limit-storage", "nope://"]),
    (["--workers", "0"], ["--workers 0"]),
])
def test_bad_settings_are_one_line_and_exit_2(study_dir: Path, options: list[str], fragments: list[str]) -> None:
    from typer.testing import CliRunner

    from convlens.cli.main import app

    args = options if "--port" in options else [*options, "--port", str(free_port())]
    result = CliRunner().invoke(app, ["study", "serve", str(study_dir), *args])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and text.startswith("error:") and text.count("error:") == 1, result.output
    assert all(f in text for f in fragments) and "Traceback" not in result.output, text
    assert not (study_dir / "study.sqlite").exists()  # refused before anything was touched


def test_port_in_use_bad_study_paths_and_study_json_limits(study_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        _one_line(_serve(str(study_dir), "--port", str(taken.getsockname()[1])), "already in use")
    afile = tmp_path / "a-file"
    afile.write_text("not a study")
    _one_line(_serve(str(afile), "--port", str(free_port())), str(afile), "not a folder")
    _one_line(_serve(str(tmp_path / "missing"), "--port", str(free_port())), "no study.json")
    config = json.loads((study_dir / "study.json").read_text())
    config["rate_limit_ip"] = "lots-per-fortnight"
    (study_dir / "study.json").write_text(json.dumps(config))
    _one_line(_serve(str(study_dir), "--port", str(free_port())), "rate_limit_ip", "not a rate limit")


def _torch_in(pid: int) -> bool:
    return "torch" in Path(f"/proc/{pid}/maps").read_text()


def test_ctrl_c_exits_130_after_a_clean_shutdown_and_no_process_holds_torch(study_dir: Path) -> None:
    """Two workers on SQLite come up; neither they nor their parent ever load torch (no libtorch mapped);
    Ctrl-C (SIGINT to the process group, as a terminal sends it) shuts them down cleanly with exit 130."""
    import psutil

    server = LiveServer(study_dir, workers=2).start()
    try:
        processes = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
        assert len(processes) >= 3  # parent + 2 workers (and multiprocessing's helper)
        assert not any(_torch_in(p.pid) for p in processes)
        os.killpg(server.process.pid, signal.SIGINT)
        assert server.process.wait(timeout=600) == 130
    finally:
        server.kill()
    log = server.log.read_text()
    assert log.count("shut down cleanly") == 2 and "Traceback" not in log
    single = LiveServer(study_dir).start()
    single.process.send_signal(signal.SIGINT)
    assert single.process.wait(timeout=600) == 130 and "shut down cleanly" in single.log.read_text()


MODEL_CODE = ("torch", "torchvision", "timm", "convlens.models", "convlens.methods", "convlens.runners", "convlens.inv",
              "sentence_transformers")


def test_export_the_app_and_a_least_settled_play_never_import_model_code(study_dir: Path, tmp_path: Path) -> None:
    """`convlens study export` (the CLI, in a fresh interpreter), and the application itself playing a round
    under the least-settled policy (which reads descriptions with the label pipeline's text tools), load
    neither torch nor any model code."""
    server = LiveServer(study_dir).start()
    server.terminate()
    check = f"heavy = [m for m in sys.modules if m.startswith({MODEL_CODE!r})]\nassert not heavy, heavy\n"
    code = ("import sys\nfrom convlens.cli.main import app\n"
            "try:\n    app(sys.argv[1:], prog_name='convlens')\nexcept SystemExit as done:\n    assert not done.code\n"
            + check + "print('no model code')\n")
    result = subprocess.run([sys.executable, "-c", code, "study", "export", str(study_dir), "--out",
                             str(tmp_path / "x")], capture_output=True, text=True, timeout=600)  # hang guard
    assert result.returncode == 0 and "no model code" in result.stdout, result.stderr
    assert (tmp_path / "x" / "plays.csv").is_file()
    set_study(study_dir, assignment_policy="least-settled")
    play = (f"import sys\nsys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
            "from study.conftest import ApiPlayer, make_app\n"
            f"app = make_app({str(study_dir)!r})\nplayer = ApiPlayer(app)\nview = player.next()\n"
            "player.act(view['play'], 'guess', class_name='cat')\n"
            "assert player.act(view['play'], 'describe', text='striped fur', language='en').status_code == 200\n"
            "assert not player.next().get('done')\n" + check + "print('no model code')\n")
    result = subprocess.run([sys.executable, "-c", play], capture_output=True, text=True, timeout=600)  # hang guard
    assert result.returncode == 0 and "no model code" in result.stdout, result.stderr


def _consent_cookies(url: str) -> httpx.Response:
    """Consent over plain HTTP with the CSRF cookie sent by hand (a client keeps a Secure cookie for HTTPS)."""
    with httpx.Client(base_url=url, timeout=300) as client:
        page = client.get("/")
        csrf = CSRF_META.search(page.text).group(1)
        cookie = page.headers["set-cookie"].split(";", 1)[0]
        form = {"csrftoken": csrf, "consent": "yes", "consent_version": "1"}
        return client.post("/consent", data=form, headers={"cookie": cookie})


def test_secure_cookies_and_hsts(study_dir: Path) -> None:
    """--secure-cookies (TLS at the proxy): every cookie Secure, HSTS on every response."""
    server = LiveServer(study_dir, extra=("--secure-cookies",)).start()
    try:
        page = httpx.get(server.url + "/")
        assert "max-age=31536000" in page.headers["strict-transport-security"]
        assert "secure" in page.headers["set-cookie"].lower()  # the CSRF cookie
        consent = _consent_cookies(server.url)
        session = next(v for k, v in consent.headers.multi_items() if k == "set-cookie" and "dr_session" in v)
        assert "secure" in session.lower() and "httponly" in session.lower()
    finally:
        server.kill()
    plain = LiveServer(study_dir).start()
    try:
        page = httpx.get(plain.url + "/")
        assert "strict-transport-security" not in page.headers and "secure" not in page.headers["set-cookie"].lower()
    finally:
        plain.kill()


def _statuses(url: str, forwarded: list[str]) -> list[int]:
    return [httpx.get(url + "/leaderboard", headers={"x-forwarded-for": ip, "x-forwarded-proto": "https"}).status_code
            for ip in forwarded]


def test_proxy_headers_key_the_limits_by_the_real_client(study_dir: Path) -> None:
    """Behind a trusted proxy (--proxy-headers, loopback trusted by default) each client address has its own
    allowance and X-Forwarded-Proto https turns on HSTS; without the option every client is the proxy."""
    limits = ("--rate-limit-ip", "3/minute", "--rate-limit-consent", "1000/minute")
    trusted = LiveServer(study_dir, extra=(*limits, "--proxy-headers"), limits=True).start()
    try:
        assert _statuses(trusted.url, ["10.0.0.1"] * 4 + ["10.0.0.2"]) == [200, 200, 200, 429, 200]
        assert "strict-transport-security" in httpx.get(
            trusted.url + "/", headers={"x-forwarded-for": "10.0.0.3", "x-forwarded-proto": "https"}).headers
        assert "text/html" in httpx.get(trusted.url + "/", headers={"x-forwarded-for": "10.0.0.1"}).headers[
            "content-type"]  # a limited page answers with a page
    finally:
        trusted.kill()
    direct = LiveServer(study_dir, extra=limits, limits=True).start()
    try:
        assert _statuses(direct.url, ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]) == [200, 200, 200, 429]
    finally:
        direct.kill()


def test_rate_limit_storage_is_used(study_dir: Path) -> None:
    """An explicit --rate-limit-storage memory:// counts (and a storage the limits library cannot use stops
    the server: test_bad_settings_are_one_line_and_exit_2)."""
    server = LiveServer(study_dir, extra=("--rate-limit-ip", "2/minute", "--rate-limit-storage", "memory://"),
                        limits=True).start()
    try:
        assert [httpx.get(server.url + "/leaderboard").status_code for _ in range(3)] == [200, 200, 429]
        assert httpx.get(server.url + "/healthz").status_code == 200  # the health check is never limited
    finally:
        server.kill()
