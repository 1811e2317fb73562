"""The game's API: whole rounds (describe before the answer), order rules, integrity of what the browser may
see, idempotent retries."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from convlens.study.store.db import Event, Participant, Play
from study.conftest import CLASSES, ApiPlayer, make_app, set_study, true_class


def _events(app: Any, play_id: str) -> list[tuple[str, int, str | None, str | None]]:
    with app.state.runtime.reader.begin() as session:
        play = session.scalar(select(Play).where(Play.public_id == play_id))
        rows = session.scalars(select(Event).where(Event.play_id == play.id).order_by(Event.id))
        return [(e.type, e.level, e.guessed_class, e.text) for e in rows]


def _image(player: ApiPlayer, view: dict) -> bytes:
    response = player.client.get(view["image"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert "no-store" in response.headers["cache-control"]
    return response.content


def _round_file(app: Any, play_id: str, name: str) -> bytes:
    with app.state.runtime.reader.begin() as session:
        round_id = session.scalar(select(Play.round_id).where(Play.public_id == play_id))
    return (app.state.runtime.files.images / round_id / name).read_bytes()


HIDDEN = {"true_class", "correct", "points", "described"}


def test_whole_round_reveal_guess_describe_then_the_answer(app: Any, player: ApiPlayer) -> None:
    """The description is asked after the guess with the last level still shown, and nothing about the answer
    (class, correctness, points, a changed score, the full image) comes before it is sent."""
    view = player.next()
    assert view["state"] == "active" and view["level"] == 0 and not HIDDEN & set(view)
    assert _image(player, view) == _round_file(app, view["play"], "level0.png")
    for level in (1, 2):
        view = player.act(view["play"], "reveal", level=level).json()
        assert view["level"] == level and not HIDDEN & set(view)
        assert _image(player, view) == _round_file(app, view["play"], f"level{level}.png")
    answer = true_class(app, view["play"])
    asked = player.act(view["play"], "guess", class_name=answer)
    guessed = asked.json()
    assert (guessed["state"], guessed["guessed_class"], guessed["score"], guessed["level"]) == ("guessed", answer, 0, 2)
    assert set(guessed) == {"play", "state", "level", "levels", "revealed", "image", "round_number", "rounds_total",
                            "score", "guessed_class"}  # an allow-list: nothing about the answer
    assert guessed["image"] == view["image"]  # the same level-2 image stays on screen
    assert _image(player, guessed) == _round_file(app, view["play"], "level2.png")
    assert player.next() == {**guessed, "resumed": True}  # a reload asks for the description again
    described = player.act(view["play"], "describe", text="  pointy ears  ", language="it").json()
    assert (described["state"], described["true_class"], described["points"], described["score"]) == (
        "win", answer, 80, 80)
    assert described["described"] is True
    assert _image(player, described) == _round_file(app, view["play"], "full.png")  # the full image only now
    assert _events(app, view["play"]) == [("start", 0, None, None), ("reveal", 1, None, None),
                                          ("reveal", 2, None, None), ("guess", 2, answer, None),
                                          ("describe", 2, None, "pointy ears")]
    with app.state.runtime.reader.begin() as session:
        play = session.scalar(select(Play).where(Play.public_id == view["play"]))
        screens = list(session.scalars(select(Event.screen).where(Event.play_id == play.id)))
    assert play.description_screen == "level" and set(screens) == {"level"}


def test_a_skipped_description_is_an_event_and_ends_the_round(app: Any, player: ApiPlayer) -> None:
    view = player.next()
    wrong = next(c for c in CLASSES if c != true_class(app, view["play"]))
    guessed = player.act(view["play"], "guess", class_name=wrong).json()
    assert guessed["state"] == "guessed" and "correct" not in guessed
    skipped = player.act(view["play"], "skip").json()
    assert (skipped["state"], skipped["correct"], skipped["described"]) == ("lose", False, False)
    assert [e[0] for e in _events(app, view["play"])] == ["start", "guess", "skip"]
    assert player.act(view["play"], "describe", text="late", language="en").status_code == 409  # after the answer


def test_scoring_rule_lose_resign_and_totals(study_dir: Path) -> None:
    set_study(study_dir, quota=None, rounds_per_player=3, one_round_per_image=False, gold_rate=0.0)
    app = make_app(study_dir)
    player = ApiPlayer(app)
    view = player.next()
    wrong = next(c for c in CLASSES if c != true_class(app, view["play"]))
    player.act(view["play"], "guess", class_name=wrong)
    lost = player.act(view["play"], "skip").json()
    assert (lost["state"], lost["points"], lost["correct"]) == ("lose", 0, False)
    view = player.next()
    for level in range(1, 6):
        view = player.act(view["play"], "reveal", level=level).json()
    player.act(view["play"], "guess", class_name=true_class(app, view["play"]))
    won = player.act(view["play"], "describe", text="ears", language="en").json()
    assert won["points"] == 50  # 100 - 10 * 5
    view = player.next()
    resigned = player.act(view["play"], "resign").json()
    assert (resigned["state"], resigned["points"], resigned["score"]) == ("resign", 0, 50)
    stats = player.client.get("/api/stats").json()
    assert (stats["score"], stats["win"], stats["lose"], stats["resign"], stats["rank"]) == (50, 1, 1, 1, 1)
    app.state.engine.dispose()


def test_order_rules_answer_clear_4xx(app: Any, player: ApiPlayer) -> None:
    view = player.next()
    play = view["play"]
    assert player.act(play, "reveal", level=2).status_code == 409  # skipping a level
    assert player.act(play, "reveal", level=0).status_code == 422  # levels start at 1
    assert player.act(play, "describe", text="x", language="en").status_code == 409  # before a guess
    assert player.act(play, "skip").status_code == 409  # nothing to skip yet
    assert player.act(play, "guess", class_name="zebra").status_code == 422  # not a study class
    for level in range(1, 6):
        view = player.act(play, "reveal", level=level).json()
    beyond = player.act(play, "reveal", level=6)
    assert beyond.status_code == 409 and "0..5" in beyond.json()["detail"]
    player.act(play, "guess", class_name=CLASSES[0])
    again = player.act(play, "guess", class_name=CLASSES[1])
    assert again.status_code == 409 and again.json()["detail"] == "you already guessed"
    assert player.act(play, "resign").status_code == 409  # no giving up once the guess is in
    assert player.act(play, "reveal", level=5).status_code == 409
    assert player.act(play, "describe", text="ok", language="en").status_code == 200
    assert player.act(play, "describe", text="twice", language="en").status_code == 409
    assert player.act(play, "skip").status_code == 409
    resigned = player.next()["play"]
    player.act(resigned, "resign")
    assert player.act(resigned, "describe", text="x", language="en").status_code == 409


@pytest.mark.parametrize(("body", "status"), [
    ({"level": 1}, 422),  # no request id
    ({"request_id": "not-a-uuid", "level": 1}, 422),
    ({"request_id": str(uuid.uuid4()), "level": 1, "extra": 1}, 422),
    ({"request_id": str(uuid.uuid4()), "level": "one"}, 422),
])
def test_bodies_are_validated(player: ApiPlayer, body: dict, status: int) -> None:
    play = player.next()["play"]
    response = player.client.post(f"/api/plays/{play}/reveal", json=body, headers={"x-csrftoken": player.csrf})
    assert response.status_code == status


def test_text_bounds_language_and_control_characters(app: Any, player: ApiPlayer) -> None:
    play = player.next()["play"]
    player.act(play, "guess", class_name=CLASSES[0])
    assert player.act(play, "describe", text="x" * 1001, language="en").status_code == 422
    assert player.act(play, "describe", text="a\x00b", language="en").status_code == 422
    assert player.act(play, "describe", text="   ", language="en").status_code == 422
    assert player.act(play, "describe", text="ok", language="fr").status_code == 422  # not offered by the study
    assert player.act(play, "describe", text="x" * 1000, language="en").status_code == 200


def test_plays_images_and_sessions_are_private(app: Any, player: ApiPlayer) -> None:
    view = player.next()
    other = ApiPlayer(app)
    assert other.act(view["play"], "reveal", level=1).status_code == 403
    assert other.client.get(view["image"]).status_code == 404
    assert other.act("0" * 24, "reveal", level=1).status_code == 404
    assert other.act("../../etc", "reveal", level=1).status_code in (404, 422)
    old_image = view["image"]
    player.act(view["play"], "reveal", level=1)
    assert player.client.get(old_image).status_code == 404  # a token dies when the level changes
    anonymous = ApiPlayer.__new__(ApiPlayer)
    from fastapi.testclient import TestClient

    anonymous.client, anonymous.csrf = TestClient(app), player.csrf
    anonymous.client.cookies.set("dr_csrf", player.client.cookies.get("dr_csrf"))
    assert anonymous.post("/api/next").status_code == 401


def test_retry_with_same_request_id_is_applied_once(app: Any, player: ApiPlayer) -> None:
    play = player.next()["play"]
    rid = str(uuid.uuid4())
    first = player.act(play, "reveal", request_id=rid, level=1)
    second = player.act(play, "reveal", request_id=rid, level=1)
    assert first.status_code == second.status_code == 200 and second.json()["level"] == 1
    assert [e[0] for e in _events(app, play)] == ["start", "reveal"]
    reused = player.act(play, "resign", request_id=rid)
    assert reused.status_code == 409 and "already used" in reused.json()["detail"]
    resumed = player.next()
    assert resumed["play"] == play and resumed["resumed"] is True  # reload: the same round, no new event
    assert [e[0] for e in _events(app, play)] == ["start", "reveal"]


def test_never_sends_the_answer_or_full_image_during_a_round(app: Any, player: ApiPlayer) -> None:
    view = player.next()
    full = _round_file(app, view["play"], "full.png")
    answer = true_class(app, view["play"])
    for level in range(1, 6):
        assert _image(player, view) != full
        raw = player.act(view["play"], "reveal", level=level)
        assert "true_class" not in raw.json() and f'"{answer}"' not in raw.text.replace('"classes"', "")
        view = raw.json()
    page = player.client.get("/play").text
    assert "/img/" not in page and answer not in player.client.get("/api/stats").text  # nothing finished yet
    guessed = player.act(view["play"], "guess", class_name=answer)
    assert answer not in guessed.text.replace(f'"guessed_class":"{answer}"', "")  # only the player's own words
    assert _image(player, guessed.json()) != full and answer not in player.client.get("/api/stats").text


def test_done_view_with_completion_code(study_dir: Path) -> None:
    set_study(study_dir, quota=2)
    app = make_app(study_dir)
    player = ApiPlayer(app, query="?PROLIFIC_PID=p123&STUDY_ID=s9&SESSION_ID=x7")
    for number in (1, 2):
        view = player.next()
        assert (view["round_number"], view["rounds_total"]) == (number, 2)
        player.act(view["play"], "resign")
    done = player.next()
    assert done == {"done": True, "completed": True, "score": 0, "completion_code": "DONE42", "completion_url": None}
    with app.state.runtime.reader.begin() as session:
        person = session.scalar(select(Participant))
    assert (person.prolific_pid, person.study_id_param, person.session_id_param) == ("p123", "s9", "x7")
    app.state.engine.dispose()


def test_health_and_pages(app: Any, player: ApiPlayer) -> None:
    health = player.client.get("/healthz").json()
    assert health["status"] == "ok" and health["database"] == "sqlite" and health["rounds"] > 0
    assert health["quota"] == 3 and health["capacity"] >= 1
    for path in ("/play", "/leaderboard", "/stats"):
        assert player.client.get(path).status_code == 200
    from fastapi.testclient import TestClient

    stranger = TestClient(app)
    assert stranger.get("/play", follow_redirects=False).headers["location"] == "/"
    assert stranger.get("/", follow_redirects=False).status_code == 200
