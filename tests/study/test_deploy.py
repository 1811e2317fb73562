"""The deployment recipes in deploy/ work as the README says: the nginx example in front of the real server
(TLS, HTTP -> HTTPS, the client's own address for the rate limits, HSTS and Secure cookies, bounded bodies),
the systemd units (systemd-analyze; every option the CLI's), and backups while the server runs."""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from convlens.cli.main import app as cli
from study.conftest import CSRF_META
from study.helpers import LiveServer, free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def proxied(study_dir: Path, tmp_path: Path) -> Iterator[tuple[str, str, LiveServer]]:
    """The study served as deploy/ says, behind deploy/nginx-deep-reveal.conf on loopback ports."""
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (bash scripts/install_system_deps.sh installs it)")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    server = LiveServer(study_dir, extra=("--proxy-headers", "--secure-cookies", "--rate-limit-ip", "5/minute"),
                        limits=True).start()
    http, https = free_port(), free_port()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=study.example.org", "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True, timeout=600)
    site = (DEPLOY / "nginx-deep-reveal.conf").read_text()
    site = site.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}").replace("listen 80;", f"listen {http};")
    site = site.replace("listen 443 ", f"listen {https} ").replace("[::]:80", f"[::]:{http}")
    site = site.replace("[::]:443", f"[::]:{https}")
    site = site.replace("/etc/letsencrypt/live/study.example.org/fullchain.pem", str(tmp_path / "cert.pem"))
    site = site.replace("/etc/letsencrypt/live/study.example.org/privkey.pem", str(tmp_path / "key.pem"))
    if not _ipv6():
        site = "\n".join(line for line in site.splitlines() if "[::]" not in line)
    logs = tmp_path / "nginx"
    logs.mkdir()
    (tmp_path / "nginx.conf").write_text(
        f"worker_processes 1;\npid {logs}/nginx.pid;\nerror_log {logs}/error.log;\nevents {{}}\n"
        f"http {{\n access_log {logs}/access.log;\n client_body_temp_path {logs}/body;\n"
        f" proxy_temp_path {logs}/proxy;\n{site}\n}}\n")
    command = [NGINX, "-p", str(logs), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"]
    nginx = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600  # a hang guard: waits for nginx to answer
        while time.monotonic() < deadline:
            try:
                httpx.get(f"https://127.0.0.1:{https}/healthz", verify=False, timeout=2)
                break
            except httpx.HTTPError:
                if nginx.poll() is not None:
                    pytest.fail(f"nginx exited: {nginx.stderr.read().decode()}")
                time.sleep(0.05)
        yield f"http://127.0.0.1:{http}", f"https://127.0.0.1:{https}", server
    finally:
        nginx.terminate()
        nginx.wait(timeout=300)
        server.kill()


def _client(address: str) -> httpx.Client:
    """A client whose connections come from ``address`` (another loopback address: another machine)."""
    return httpx.Client(verify=False, timeout=300, transport=httpx.HTTPTransport(local_address=address, verify=False))


def test_the_nginx_example_serves_the_study(proxied: tuple[str, str, LiveServer]) -> None:
    plain, secure, _ = proxied
    redirect = httpx.get(plain + "/?PROLIFIC_PID=x", follow_redirects=False)
    assert redirect.status_code == 301 and redirect.headers["location"].startswith("https://")
    with _client("127.0.0.2") as browser:
        page = browser.get(secure + "/")
        assert page.status_code == 200 and "max-age=31536000" in page.headers["strict-transport-security"]
        csrf = CSRF_META.search(page.text).group(1)
        consent = browser.post(secure + "/consent", data={"csrftoken": csrf, "consent": "yes", "consent_version": "1"})
        session = next(v for k, v in consent.headers.multi_items() if k == "set-cookie" and "dr_session" in v)
        assert consent.status_code == 303 and "secure" in session.lower() and "httponly" in session.lower()
        view = browser.post(secure + "/api/next", json={"request_id": "8f14e45f-ceea-467f-a0e6-1f0e5a3c1d2b"},
                            headers={"x-csrftoken": csrf})
        assert view.status_code == 200 and view.json()["state"] == "active"
        big = browser.post(secure + "/api/next", content=b"x" * 70_000, headers={"x-csrftoken": csrf,
                                                                               "content-type": "application/json"})
        assert big.status_code == 413


def test_behind_nginx_each_client_has_its_own_allowance(proxied: tuple[str, str, LiveServer]) -> None:
    """The server trusts nginx's X-Forwarded-For, which nginx sets to the client's own address (a header the
    client sends is replaced): one client's limit (5 a minute here) leaves the others theirs."""
    _, secure, _ = proxied
    with _client("127.0.0.3") as first, _client("127.0.0.4") as second:
        spoofed = [first.get(secure + "/leaderboard", headers={"x-forwarded-for": f"10.0.0.{i}"}).status_code
                   for i in range(6)]
        assert spoofed == [200] * 5 + [429]  # a made-up address per request gains nothing
        assert second.get(secure + "/leaderboard").status_code == 200


def test_systemd_units_verify_and_use_real_options(tmp_path: Path) -> None:
    """Every option of the units' command lines is one the CLI has; systemd-analyze accepts the units."""
    text = (DEPLOY / "convlens-study.service").read_text()
    execs = re.findall(r"^#?\s*ExecStart=(.*)$", text, flags=re.MULTILINE)
    help_text = CliRunner().invoke(cli, ["study", "serve", "--help"], terminal_width=200).output
    for line in execs:
        options = [word for word in shlex.split(line.replace("...", "")) if word.startswith("--")]
        assert options and all(option in help_text for option in options), (line, options)
    backup = (DEPLOY / "convlens-study-backup.service").read_text()
    assert "study backup" in backup and "--out" in CliRunner().invoke(cli, ["study", "backup", "--help"]).output
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    convlens = str(Path(sys.executable).with_name("convlens"))
    for name in ("convlens-study.service", "convlens-study-backup.service", "convlens-study-backup.timer"):
        unit = (DEPLOY / name).read_text().replace("/opt/convlens/.venv/bin/convlens", convlens)
        unit = re.sub(r"^(User|Group)=convlens$", r"\1=root", unit, flags=re.MULTILINE)
        (tmp_path / name).write_text(unit)
    result = subprocess.run([analyze, "verify", *(str(tmp_path / n) for n in (
        "convlens-study.service", "convlens-study-backup.service", "convlens-study-backup.timer"))],
        capture_output=True, text=True, timeout=600)  # hang guard
    problems = [line for line in result.stderr.splitlines() if "convlens-study" in line]  # warnings, too
    assert problems == [], result.stderr


def test_a_backup_while_serving_is_a_whole_database(study_dir: Path, tmp_path: Path) -> None:
    server = LiveServer(study_dir).start()
    try:
        for _ in range(3):
            with httpx.Client(base_url=server.url, timeout=300) as client:
                csrf = CSRF_META.search(client.get("/").text).group(1)
                client.post("/consent", data={"csrftoken": csrf, "consent": "yes", "consent_version": "1"})
                client.post("/api/next", json={"request_id": "8f14e45f-ceea-467f-a0e6-1f0e5a3c1d2b"},
                            headers={"x-csrftoken": csrf})
        result = CliRunner().invoke(cli, ["study", "backup", str(study_dir), "--out", str(tmp_path / "b.sqlite")])
        assert result.exit_code == 0, result.output
        assert "3 participants, 3 plays, 3 events" in result.output
        again = CliRunner().invoke(cli, ["study", "backup", str(study_dir), "--out", str(tmp_path / "b.sqlite")])
        assert again.exit_code == 2 and "exists" in again.output  # a backup never replaces a file
    finally:
        server.kill()
    with sqlite3.connect(tmp_path / "b.sqlite") as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert copy.execute("SELECT COUNT(*) FROM events WHERE type = 'start'").fetchone()[0] == 3
    restored = tmp_path / "restored"
    shutil.copytree(study_dir, restored, ignore=shutil.ignore_patterns("study.sqlite*", "server.log"))
    shutil.copy(tmp_path / "b.sqlite", restored / "study.sqlite")
    exported = CliRunner().invoke(cli, ["study", "export", str(restored), "--out", str(tmp_path / "x")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "x" / "plays.csv").read_text().count("\n") == 4  # header + 3 plays
    never = CliRunner().invoke(cli, ["study", "backup", str(tmp_path / "restored-none"), "--out",
                                     str(tmp_path / "c.sqlite")])
    assert never.exit_code == 2 and "no database" in " ".join(never.output.split())
