"""Security: escaping, CSRF, rate limits, admin token (constant-time), paths, body size, headers."""

from __future__ import annotations

import html.parser
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from convlens.study.store.config import StudyFiles, load_secrets
from convlens.study.web import security
from study.conftest import CLASSES, CSRF_META, ApiPlayer, make_app

XSS_NAME = "<script>window.pwned=1</script>"
XSS_TEXT = '<img src=x onerror="window.pwned=2">'


class _Scripts(html.parser.HTMLParser):
    """Collects script elements and inline event-handler attributes of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict] = []
        self.handlers: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script":
            self.scripts.append(values)
        if tag == "img":
            self.images.append(values.get("src") or "")
        self.handlers += [name for name, _ in attrs if name.startswith("on")]


def _parse(page: str) -> _Scripts:
    parser = _Scripts()
    parser.feed(page)
    return parser


def _admin(app: Any, study_dir: Path) -> TestClient:
    client = TestClient(app)
    csrf = CSRF_META.search(client.get("/admin").text).group(1)
    token = load_secrets(study_dir).admin_token
    response = client.post("/admin/login", data={"csrftoken": csrf, "token": token}, follow_redirects=False)
    assert response.status_code == 303
    assert client.cookies.get("dr_admin") and client.cookies.get("dr_admin") != token  # an HMAC, not the token
    return client


def test_script_nickname_and_description_are_inert(app: Any, study_dir: Path) -> None:
    player = ApiPlayer(app, nickname=XSS_NAME)
    play = player.next()["play"]
    player.act(play, "guess", class_name=CLASSES[0])
    assert player.act(play, "describe", text=XSS_TEXT, language="en").status_code == 200
    board = player.client.get("/leaderboard").text
    admin_page = _admin(app, study_dir).get("/admin").text
    for page in (board, admin_page, player.client.get("/stats").text):
        parsed = _parse(page)
        assert all(s.get("src", "").startswith("/static/") for s in parsed.scripts)  # only our own script files
        assert parsed.handlers == [] and "x" not in parsed.images
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in board and XSS_NAME not in board
    assert "&lt;script&gt;" in admin_page and XSS_NAME not in admin_page
    export = _admin(app, study_dir).get("/admin/export/plays.jsonl").text
    assert XSS_TEXT.replace('"', '\\"') in export  # stored verbatim, escaped only where shown as HTML


def test_csrf_is_required_on_every_state_change(app: Any, player: ApiPlayer) -> None:
    body = {"request_id": str(uuid.uuid4())}
    assert player.client.post("/api/next", json=body).status_code == 403  # no header
    assert player.client.post("/api/next", json=body, headers={"x-csrftoken": "forged"}).status_code == 403
    cross = player.client.post("/api/next", json=body, headers={"x-csrftoken": player.csrf,
                                                                  "sec-fetch-site": "cross-site"})
    assert cross.status_code == 403 and "cross-site" in cross.json()["detail"]
    stranger = TestClient(app)  # another browser: its own CSRF cookie, so the player's token is worthless there
    stranger.get("/")
    stranger.cookies.set("dr_session", player.client.cookies.get("dr_session"))
    assert stranger.post("/api/next", json=body, headers={"x-csrftoken": player.csrf}).status_code == 403
    fresh = TestClient(app)
    fresh.get("/")
    form = {"consent": "yes", "consent_version": "1"}
    assert fresh.post("/consent", data=form, follow_redirects=False).status_code == 403
    assert TestClient(app).post("/consent", data=form, follow_redirects=False).status_code == 403  # no cookie at all
    assert fresh.post("/admin/login", data={"token": "x"}).status_code == 403
    assert player.client.post("/api/next", json=body, headers={"x-csrftoken": player.csrf}).status_code == 200


def test_consent_is_required_and_versioned(app: Any) -> None:
    client = TestClient(app)
    csrf = CSRF_META.search(client.get("/").text).group(1)
    unticked = client.post("/consent", data={"csrftoken": csrf, "consent_version": "1"}, follow_redirects=False)
    assert unticked.status_code == 422 and "tick the box" in unticked.text
    old = client.post("/consent", data={"csrftoken": csrf, "consent": "yes", "consent_version": "0"})
    assert old.status_code == 409
    long_name = client.post("/consent", data={"csrftoken": csrf, "consent": "yes", "consent_version": "1",
                                              "nickname": "n" * 33}, follow_redirects=False)
    assert long_name.status_code == 422 and "at most 32" in long_name.text


def test_rate_limits_per_participant_and_per_ip(study_dir: Path) -> None:
    app = make_app(study_dir, rate_limit_participant="4/minute")
    player = ApiPlayer(app)  # the consent POST counts for the address (no session yet)
    play = player.next()["play"]
    for level in (1, 2, 3):
        assert player.act(play, "reveal", level=level).status_code == 200
    limited = player.act(play, "reveal", level=4)
    assert limited.status_code == 429 and "too many requests" in limited.json()["detail"]
    assert ApiPlayer(app).next()["level"] == 0  # another participant is not limited by the first one
    app.state.engine.dispose()
    by_ip = make_app(study_dir, rate_limit_ip="5/minute")
    client = TestClient(by_ip)
    statuses = [client.get("/leaderboard").status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    by_ip.state.engine.dispose()


def test_admin_token_compared_in_constant_time(app: Any, study_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = security.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    token = load_secrets(study_dir).admin_token
    client = TestClient(app)
    assert client.get("/admin/api/progress").status_code == 401
    assert client.get("/admin/api/progress", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert (b"wrong", token.encode()) in calls
    good = client.get("/admin/api/progress", headers={"authorization": f"Bearer {token}"})
    assert good.status_code == 200 and good.json()["totals"]["rounds"] > 0
    csrf = CSRF_META.search(client.get("/admin").text).group(1)
    refused = client.post("/admin/login", data={"csrftoken": csrf, "token": token[:-1]})
    assert refused.status_code == 403 and (token[:-1].encode(), token.encode()) in calls
    assert security.check_admin_token(token, token) and not security.check_admin_token(None, token)


def test_paths_cannot_leave_the_study_folder(app: Any, study_dir: Path) -> None:
    files = StudyFiles(study_dir)
    for round_id, name in (("..", "study.json"), ("abc", "../../secrets.json"), ("/etc", "passwd"),
                           ("abc/../..", "secrets.json")):
        with pytest.raises(PermissionError):
            files.image(round_id, name)
    client = TestClient(app)
    for path in ("/static/../secrets.json", "/static/%2e%2e/secrets.json", "/img/..%2Fsecrets.json",
                 "/img/" + "a" * 31 + "/", "/admin/export/..%2Fsecrets.json"):
        response = client.get(path)
        assert response.status_code in (401, 404, 422), path
        assert "admin_token" not in response.text


def test_body_size_limit_and_security_headers(app: Any, player: ApiPlayer) -> None:
    big = player.client.post("/api/next", content=b"{" + b" " * 70_000 + b"}",
                             headers={"x-csrftoken": player.csrf, "content-type": "application/json"})
    assert big.status_code == 413
    page = player.client.get("/play")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["x-frame-options"] == "DENY"
    session = next(c for c in player.client.cookies.jar if c.name == "dr_session")
    assert session.has_nonstandard_attr("HttpOnly") or "httponly" in str(session._rest).lower()


def test_a_bearer_header_does_not_skip_csrf(app: Any, player: ApiPlayer) -> None:
    """asgi-csrf skips its check for ``Authorization: Bearer``; no state change here takes a bearer token."""
    body = {"request_id": str(uuid.uuid4())}
    forged = player.client.post("/api/next", json=body, headers={"authorization": "Bearer x"})
    assert forged.status_code == 403 and "CSRF" in forged.json()["detail"]
    fresh = TestClient(app)
    fresh.get("/")
    form = {"consent": "yes", "consent_version": "1"}
    assert fresh.post("/consent", data=form, headers={"authorization": "Bearer x"},
                      follow_redirects=False).status_code == 403


def test_multipart_and_other_bodies_are_a_clean_4xx(app: Any, player: ApiPlayer) -> None:
    files = {"file": ("a.txt", b"hello", "text/plain")}
    for path in ("/consent", "/admin/login", "/api/next"):
        response = player.client.post(path, data={"csrftoken": player.csrf}, files=files,
                                      headers={"x-csrftoken": player.csrf})
        assert response.status_code == 415 and "urlencoded" in response.json()["detail"], path
    plain = player.client.post("/api/next", content=b"{}", headers={"x-csrftoken": player.csrf,
                                                                     "content-type": "text/plain"})
    assert plain.status_code == 415
    assert player.post("/api/next").status_code == 200  # JSON still passes


def test_sign_out_invalidates_the_admin_cookie_on_the_server(app: Any, study_dir: Path) -> None:
    admin = _admin(app, study_dir)
    cookie = admin.cookies.get("dr_admin")
    assert admin.get("/admin/api/progress").status_code == 200
    csrf = CSRF_META.search(admin.get("/admin").text).group(1)
    assert admin.post("/admin/logout", data={"csrftoken": csrf}, follow_redirects=False).status_code == 303
    thief = TestClient(app)  # someone who kept a copy of the cookie
    thief.cookies.set("dr_admin", cookie)
    assert thief.get("/admin/api/progress").status_code == 401
    assert 'name="token"' in thief.get("/admin").text  # the login form, not the progress
    again = _admin(app, study_dir)  # signing in again gives a new, working cookie
    assert again.cookies.get("dr_admin") != cookie and again.get("/admin/api/progress").status_code == 200


def test_rate_limited_pages_answer_with_a_page(study_dir: Path) -> None:
    limited = make_app(study_dir, rate_limit_ip="2/minute")
    client = TestClient(limited)
    statuses = [client.get("/leaderboard") for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    page = statuses[-1]
    assert page.headers["content-type"].startswith("text/html") and int(page.headers["retry-after"]) >= 1
    assert "<h1>Too many requests</h1>" in page.text and "{" not in page.text.split("<main>")[1].split("</main>")[0]
    api = client.get("/api/leaderboard")
    assert api.status_code == 429 and api.json()["detail"].startswith("too many requests")
    limited.state.engine.dispose()


def test_a_class_behind_one_address_is_not_throttled_as_one(study_dir: Path) -> None:
    """Once registered, participants are limited each on their own: 12 players behind one address (one NAT)
    with an address limit of 30 requests a minute: their 24 anonymous requests (consent page and form) count
    for the address, their 72 game requests do not; anonymous traffic then meets the address's limit."""
    from study.conftest import set_study

    set_study(study_dir, plays_per_round=100)
    app = make_app(study_dir, rate_limit_ip="30/minute", rate_limit_consent="100/minute")
    for _ in range(12):
        player = ApiPlayer(app)
        view = player.next()
        assert player.act(view["play"], "reveal", level=1).status_code == 200
        shown = player.act(view["play"], "reveal", level=2).json()["image"]
        assert player.client.get(shown).status_code == 200
        assert player.act(view["play"], "resign").status_code == 200
        assert player.client.get("/stats").status_code == 200
    stranger = TestClient(app)
    statuses = [stranger.get("/leaderboard").status_code for _ in range(7)]
    assert statuses == [200] * 6 + [429]  # 30 - 24 left for the address
    app.state.engine.dispose()


def test_the_admin_page_summarises_and_pages(app: Any, study_dir: Path) -> None:
    """Capacity, gold accuracy, rounds by state, a timeline, a thumbnail per round and pages of 50 rows."""
    from convlens.study.game.queries import PAGE_SIZE

    for _ in range(2):
        player = ApiPlayer(app)
        while not (view := player.next()).get("done"):
            player.act(view["play"], "resign")
    admin = _admin(app, study_dir)
    page = admin.get("/admin").text
    data = admin.get("/admin/api/progress").json()
    totals = data["totals"]
    assert totals["completed"] == 2 and totals["finished_plays"] == 6 and totals["capacity"] >= 1
    assert f'<span class="big" id="capacity">{totals["capacity"]}</span>' in page
    assert sum(totals["rounds_by_state"].values()) == totals["rounds"] and 'id="timeline"' in page
    assert data["gold_accuracy"] == 0.0 and "0%" in page  # both resigned their gold round
    rounds = data["rounds"]
    assert len(rounds) == min(PAGE_SIZE, len(app.state.runtime.rounds))
    assert page.count('class="thumb"') == len(rounds)
    thumb = admin.get(f"/admin/thumb/{rounds[0]['round_id']}")
    assert thumb.status_code == 200 and thumb.content.startswith(b"\x89PNG")
    assert TestClient(app).get(f"/admin/thumb/{rounds[0]['round_id']}").status_code == 401
    assert admin.get("/admin/thumb/../secrets").status_code in (401, 404)
    assert admin.get("/admin?rounds=99999&people=abc").status_code == 200  # clamped, not an error
