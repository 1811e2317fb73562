"""Hardening of the study server: one registration per Prolific id (migration 0002, both backends), the
schema head matching the models, the admin cookie's server-side expiry, rate-limit keys a made-up cookie
cannot escape, streamed bodies over the limit, the environment's admin token validated, consent only from a
ticked box, the reveal percentages from study.json, CLI errors printed verbatim."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from convlens.cli.main import app as cli_app
from convlens.study.game.actions import GameError
from convlens.study.game.opening import StudyDatabaseError
from convlens.study.store.config import load_secrets
from convlens.study.store.db import Base, Participant, make_engine, upgrade, utcnow
from convlens.study.web import security
from study.conftest import CSRF_META, ApiPlayer, make_app, set_study

PID = "5f1e2d3c4b5a69788796a5b4"


def _consent(client: TestClient, **fields: str) -> Any:
    csrf = CSRF_META.search(client.get("/").text).group(1)
    form = {"csrftoken": csrf, "consent": "yes", "consent_version": "1", **fields}
    return client.post("/consent", data=form, follow_redirects=False)


def _participant(public_id: str, pid: str | None) -> Participant:
    return Participant(public_id=public_id, token_hash=hashlib.sha256(public_id.encode()).hexdigest(),
                       prolific_pid=pid, consent_version="1", created_at=utcnow(), score=0, plays=0, wins=0,
                       gold_plays=0, gold_correct=0)


def test_a_prolific_id_registers_once(study_dir: Path, database: str) -> None:
    """Another browser with the same PROLIFIC_PID gets a 409 page and no session (the first participant's
    token is never handed out); players without a Prolific id register as often as they come; the unique
    index refuses a duplicate even when the check is bypassed."""
    app = make_app(study_dir, database)
    first = ApiPlayer(app, query=f"?PROLIFIC_PID={PID}&STUDY_ID=s1&SESSION_ID=a1")
    assert not first.next().get("done")
    again = TestClient(app)  # new browser, no cookie
    refused = _consent(again, prolific_pid=PID, study_id="s1", session_id="a2")
    assert refused.status_code == 409 and "already taken part" in refused.text and "<form" in refused.text
    assert again.cookies.get("dr_session") is None
    assert again.get("/play", follow_redirects=False).headers["location"] == "/"
    for _ in range(2):
        ApiPlayer(app)  # no Prolific id: NULLs stay allowed
    runtime = app.state.runtime
    with runtime.reader.begin() as session:
        assert session.scalar(select(func.count()).where(Participant.prolific_pid == PID)) == 1
        assert session.scalar(select(func.count()).where(Participant.prolific_pid.is_(None))) == 2
    with pytest.raises(IntegrityError), runtime.write() as session:
        session.add(_participant("dup0000000000000", PID))
    app.state.engine.dispose()


def test_a_registration_race_on_one_prolific_id_is_a_409(app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two registrations with one id at once: the one whose check ran before the other's commit still gets a
    409 (the unique index's IntegrityError), not a 500."""
    runtime = app.state.runtime
    runtime.register("1", None, {"prolific_pid": PID})
    real = runtime.write

    @contextlib.contextmanager
    def blind_write() -> Iterator[Any]:
        with real() as session:
            monkeypatch.setattr(session, "scalar", lambda *args, **kwargs: None)  # the other one is not visible
            yield session

    monkeypatch.setattr(runtime, "write", blind_write)
    with pytest.raises(GameError) as refused:
        runtime.register("1", None, {"prolific_pid": PID})
    assert refused.value.status == 409 and "already taken part" in refused.value.message
    runtime.register("1", None, {"prolific_pid": None})  # without an id the insert still goes through


def test_migration_head_matches_the_models(database: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """On SQLite and PostgreSQL the migrations give the models' schema, an empty database created at once at
    HEAD gives the same, and db.HEAD (what a start compares with, without loading Alembic) is Alembic's head."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import inspect

    from convlens.study.store.db import HEAD, _alembic_config, _create_fresh, schema_revision

    migrated = make_engine(database)
    upgrade(migrated, "0001")  # not empty: the migrations run, one after the other
    upgrade(migrated)
    fresh = make_engine(f"sqlite:///{tmp_path / 'fresh.sqlite'}" if database.startswith("sqlite")
                        else request.getfixturevalue("postgres").new_database())
    assert _create_fresh(fresh) and not _create_fresh(fresh)  # an empty database: created at HEAD, once
    for engine in (migrated, fresh):
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            assert ScriptDirectory.from_config(_alembic_config(connection)).get_current_head() == HEAD
            tables = inspect(connection).get_table_names()
        assert schema_revision(engine) == HEAD and sorted(tables) == sorted([*Base.metadata.tables, "alembic_version"])
    upgrade(fresh)  # a no-op at HEAD
    for engine in (migrated, fresh):
        engine.dispose()


def test_migration_0002_refuses_duplicated_prolific_ids(tmp_path: Path) -> None:
    """A database from before the check, holding one id twice, is not silently edited: the upgrade stops."""
    engine = make_engine(f"sqlite:///{tmp_path / 'old.sqlite'}")
    upgrade(engine, "0001")
    with engine.begin() as connection:
        for name in ("a000000000000000", "b000000000000000"):
            connection.execute(Participant.__table__.insert().values(
                public_id=name, token_hash=name * 4, prolific_pid=PID, consent_version="1", created_at=utcnow(),
                score=0, plays=0, wins=0, gold_plays=0, gold_correct=0))
    with pytest.raises(StudyDatabaseError, match="registered more than once"):
        upgrade(engine)
    engine.dispose()


def test_admin_cookie_expires_after_8_hours(app: Any, study_dir: Path) -> None:
    keys = load_secrets(study_dir)
    now = int(time.time())
    client = TestClient(app)

    def status(cookie: str) -> int:
        client.cookies.set("dr_admin", cookie)
        return client.get("/admin/api/progress").status_code

    def issued(at: int) -> str:
        return security.admin_cookie_value(keys.signing_key, keys.admin_token, at)

    assert status(issued(now - 3600)) == 200
    assert status(issued(now - 8 * 3600 - 5)) == 401  # forged old issue time: correctly signed, expired
    assert status(issued(now + 3600)) == 401  # from the future
    old_mac = issued(now - 9 * 3600).split(".")[1]
    assert status(f"{now}.{old_mac}") == 401  # a fresh time on an old signature
    constant = hmac.new(keys.signing_key.encode(), b"admin:" + keys.admin_token.encode(), hashlib.sha256).hexdigest()
    assert status(constant) == 401  # the former never-expiring cookie
    client.cookies.clear()
    csrf = CSRF_META.search(client.get("/admin").text).group(1)
    login = client.post("/admin/login", data={"csrftoken": csrf, "token": keys.admin_token}, follow_redirects=False)
    cookie = client.cookies.get("dr_admin")
    assert login.status_code == 303 and abs(int(cookie.split(".")[0]) - now) < 60
    assert client.get("/admin/api/progress").status_code == 200


def test_admin_login_limited_per_ip_whatever_the_cookie(study_dir: Path) -> None:
    app = make_app(study_dir)  # study.json's admin-login limit: 10/minute
    client = TestClient(app)
    csrf = CSRF_META.search(client.get("/admin").text).group(1)
    statuses = []
    for _ in range(12):
        client.cookies.delete("dr_session")
        client.cookies.set("dr_session", secrets.token_urlsafe(32))  # a fresh made-up session each time
        statuses.append(client.post("/admin/login", data={"csrftoken": csrf, "token": "wrong"}).status_code)
    assert statuses == [403] * 10 + [429] * 2
    app.state.engine.dispose()


def test_consent_limited_per_ip_and_per_browser_whatever_the_cookie(study_dir: Path) -> None:
    """study.json's consent limits: 60 a minute per address (generous: a class behind one NAT registers at once)
    and 10 a minute per browser session (its CSRF cookie), whatever session cookie comes with it."""
    set_study(study_dir, plays_per_round=1000)
    app = make_app(study_dir, rate_limit_consent=None, rate_limit_consent_session=None)
    statuses = []
    for _ in range(61):
        client = TestClient(app)  # a new browser each time
        client.cookies.set("dr_session", secrets.token_urlsafe(32))
        statuses.append(_consent(client).status_code)
    assert statuses == [303] * 60 + [429]
    app.state.engine.dispose()
    app = make_app(study_dir, rate_limit_consent=None, rate_limit_consent_session=None)
    browser = TestClient(app)
    csrf = CSRF_META.search(browser.get("/").text).group(1)
    statuses = []
    for _ in range(11):
        browser.cookies.delete("dr_session")
        browser.cookies.set("dr_session", secrets.token_urlsafe(32))
        form = {"csrftoken": csrf, "consent": "yes", "consent_version": "1"}
        statuses.append(browser.post("/consent", data=form, follow_redirects=False).status_code)
    assert statuses == [303] * 10 + [429]
    assert TestClient(app).get("/").status_code == 200  # another browser at the same address still gets in
    app.state.engine.dispose()


def test_a_made_up_session_gets_no_allowance_of_its_own(study_dir: Path) -> None:
    """Game actions are limited per participant only for sessions that belong to one; others by address."""
    app = make_app(study_dir, rate_limit_participant="4/minute")
    player = ApiPlayer(app)
    real = player.client.cookies.get("dr_session")
    statuses = []
    for _ in range(6):
        player.client.cookies.delete("dr_session")
        player.client.cookies.set("dr_session", secrets.token_urlsafe(32))
        statuses.append(player.post("/api/next").status_code)
    assert statuses == [401] * 4 + [429] * 2
    player.client.cookies.delete("dr_session")
    player.client.cookies.set("dr_session", real)
    assert player.post("/api/next").status_code == 200  # the participant's own allowance is untouched
    app.state.engine.dispose()


def _streamed(head: bytes, size: int) -> Iterator[bytes]:
    yield head
    for _ in range(size // 4096 + 1):
        yield b"a" * 4096


def test_streamed_bodies_over_the_limit_get_413(app: Any, player: ApiPlayer) -> None:
    """Chunked bodies carry no Content-Length: counted as they arrive, 413 on the API and on the forms whose
    body asgi-csrf parses before the application sees it."""
    headers = {"x-csrftoken": player.csrf, "content-type": "application/json"}
    api = player.client.post("/api/next", content=_streamed(b'{"request_id": "', 70_000), headers=headers)
    assert api.status_code == 413 and "request body over" in api.json()["detail"]
    form_headers = {"content-type": "application/x-www-form-urlencoded"}
    for path in ("/consent", "/admin/login"):
        head = f"csrftoken={player.csrf}&consent=yes&consent_version=1&nickname=".encode()
        response = player.client.post(path, content=_streamed(head, 70_000), headers=form_headers)
        assert response.status_code == 413, (path, response.status_code, response.text[:200])
    assert player.post("/api/next").status_code == 200  # small bodies still pass


def test_a_short_admin_token_from_the_environment_is_refused(study_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVLENS_STUDY_ADMIN_TOKEN", "short")
    with pytest.raises(ValueError, match=r"CONVLENS_STUDY_ADMIN_TOKEN is too short \(5 characters\).*at least 16"):
        load_secrets(study_dir)
    result = CliRunner().invoke(cli_app, ["serve", str(study_dir), "--port", "1"])
    assert result.exit_code == 2 and "too short" in result.output and "Traceback" not in result.output
    monkeypatch.setenv("CONVLENS_STUDY_ADMIN_TOKEN", "t" * 16)
    assert load_secrets(study_dir).admin_token == "t" * 16


def test_only_a_ticked_box_counts_as_consent(app: Any) -> None:
    for value in ("true", "on", "1", "no"):  # the form's checkbox sends "yes"; nothing else is consent
        response = _consent(TestClient(app), consent=value)
        assert response.status_code == 422 and "tick the box" in response.text, value
    assert _consent(TestClient(app)).status_code == 303


def test_the_game_shows_the_study_reveal_percentages(study_dir: Path) -> None:
    """The share revealed comes from study.json through the API (gold rounds: their own levels), never from
    numbers in the script."""
    set_study(study_dir, reveal_percentages=[1.5, 3, 6, 12, 24, 48], gold_rate=0.0)
    app = make_app(study_dir)
    player = ApiPlayer(app)
    view = player.next()
    assert view["revealed"] == 1.5
    assert player.act(view["play"], "reveal", level=1).json()["revealed"] == 3.0
    script = player.client.get("/static/game.js").text
    assert "view.revealed" in script and "4.5" not in script and "PERCENT" not in script
    consent = " ".join(TestClient(app).get("/").text.split())
    assert "6 steps, 1.5&nbsp;% to 48&nbsp;% of the image" in consent
    app.state.engine.dispose()


def test_cli_errors_print_brackets_verbatim(tmp_path: Path) -> None:
    missing = tmp_path / "[/x]" / "study"
    result = CliRunner().invoke(cli_app, ["study", "export", str(missing)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    flat = result.output.replace("\n", "")
    assert flat.startswith("error:") and str(missing) in flat and "no study.json" in flat


def test_migration_0003_marks_the_former_flow_and_keeps_old_players_going(study_dir: Path, database: str) -> None:
    """A database from before quotas (revision 0002) with a described play and a participant in the middle of
    the game: after the upgrade the old describe event and play say the answer was on screen, and the old
    participant gets the rest of the study's quota planned and plays on."""
    from sqlalchemy import text

    from convlens.study.store.db import Event, Play

    engine = make_engine(database)
    upgrade(engine, "0002")
    rounds = [r for r in json.loads((study_dir / "rounds.json").read_text())["rounds"] if not r["gold"]]
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO study_meta (key, value) VALUES ('study_id', 'study'), "
                                "('study_version', '1')"))
        for spec in json.loads((study_dir / "rounds.json").read_text())["rounds"]:
            values = {k: v for k, v in spec.items() if k != "round_id"}
            connection.execute(text(
                "INSERT INTO rounds (id, cluster_id, image_id, image_name, layer, layer_depth, n_layers, "
                "cluster_index, cluster_weight, fmap_count, true_class, gold, inv_run, assigned) VALUES (:id, "
                ":cluster_id, :image_id, :image_name, :layer, :layer_depth, :n_layers, :cluster_index, "
                ":cluster_weight, :fmap_count, :true_class, :gold, :inv_run, 0)"), {"id": spec["round_id"], **values})
        person = connection.execute(Participant.__table__.insert().values(
            public_id="a" * 16, token_hash=hashlib.sha256(b"old-token").hexdigest(), consent_version="1",
            created_at=utcnow(), score=80, plays=1, wins=1, gold_plays=0, gold_correct=0)).inserted_primary_key[0]
        play = connection.execute(text(
            "INSERT INTO plays (public_id, participant_id, round_id, position, state, level, score, started_at, "
            "description, guessed_class, correct, ended_at) VALUES (:p, :who, :r, 1, 'win', 2, 80, :t, 'ears', "
            ":c, :yes, :t) RETURNING id"), {"p": "b" * 24, "who": person, "r": rounds[0]["round_id"], "t": utcnow(),
                                            "c": rounds[0]["true_class"], "yes": True}).scalar()
        for number, kind in enumerate(("start", "guess", "describe"), 1):
            connection.execute(text(
                "INSERT INTO events (play_id, participant_id, round_id, type, level, request_id, created_at) "
                "VALUES (:play, :who, :r, :k, 2, :q, :t)"), {"play": play, "who": person, "r": rounds[0]["round_id"],
                                                            "k": kind, "t": utcnow(),
                                                            "q": f"00000000-0000-4000-8000-00000000000{number}"})
    upgrade(engine)
    with engine.connect() as connection:
        screens = dict(connection.execute(select(Event.type, Event.screen)).all())
        described = connection.execute(select(Play.description_screen)).scalar()
    assert screens == {"start": "level", "guess": "level", "describe": "answer"} and described == "answer"
    engine.dispose()
    app = make_app(study_dir, database)
    old = TestClient(app)
    old.cookies.set("dr_session", "old-token")
    csrf = CSRF_META.search(old.get("/play").text).group(1)
    view = old.post("/api/next", json={"request_id": "00000000-0000-4000-8000-000000000009"},
                    headers={"x-csrftoken": csrf}).json()
    assert view["state"] == "active" and (view["round_number"], view["rounds_total"]) == (2, 3)
    app.state.engine.dispose()


def test_one_entry_point() -> None:
    """`convlens study serve` is the server's one command line (`convlens serve` its alias, the same options);
    the former argparse module entry point is gone."""
    from convlens.study.web import server

    def options(args: list[str]) -> set[str]:
        text = CliRunner().invoke(cli_app, [*args, "--help"], terminal_width=200).output
        return set(re.findall(r"--[a-z][a-z-]+", text))

    assert options(["study", "serve"]) == options(["serve"]) and "--rate-limit-storage" in options(["serve"])
    assert not hasattr(server, "main") and "argparse" not in Path(server.__file__).read_text()
    assert server.WORKER_HEALTHCHECK_S >= 30  # workers that start slowly on a busy machine are not killed
