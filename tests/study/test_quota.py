"""Quota, capacity, leases and gold rounds: nobody is paid for nothing, nobody is admitted who cannot finish,
abandoned plays give their slot back, every participant meets gold rounds at the study's rate."""

from __future__ import annotations

import shutil
from collections import Counter
from datetime import timedelta
from functools import cache
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from convlens.study.batch.create import CreateOptions, create_study
from convlens.study.game.plan import Quota, capacity, resolve_quota
from convlens.study.store.config import RoundSpec, StudyConfig
from convlens.study.store.db import Event, PlannedRound, Play, Round, utcnow
from study.conftest import CLASSES, ApiPlayer, make_app, set_study, true_class


def _brute_capacity(slots: tuple[int, ...], gold: frozenset[int], quota: Quota) -> int:
    """The most participants who can each get ``quota.normal`` distinct items with an open slot and
    ``quota.gold`` distinct gold items, all distinct: an exhaustive search over the slot states."""

    @cache
    def best(state: tuple[int, ...]) -> int:
        found = 0
        for chosen in combinations(range(len(state)), quota.normal):
            if all(state[i] > 0 for i in chosen) and len(gold - set(chosen)) >= quota.gold:
                after = tuple(s - (i in chosen) for i, s in enumerate(state))
                found = max(found, 1 + best(after))
        return found

    return best(slots) if len(gold) >= quota.gold else 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=5), st.data())
def test_capacity_matches_an_exhaustive_search(slots: list[int], data: st.DataObject) -> None:
    items = len(slots)
    gold = frozenset(data.draw(st.sets(st.integers(0, items - 1))))
    normal = data.draw(st.integers(1, items))
    gold_count = data.draw(st.integers(0, max(0, items - normal)))
    quota = Quota(total=normal + gold_count, gold=gold_count)
    open_slots = {f"i{i}": s for i, s in enumerate(slots) if s}
    expected = _brute_capacity(tuple(slots), gold, quota)
    assert capacity(open_slots, {f"i{i}" for i in gold}, quota) == expected


def _spec(index: int, image: str, gold: bool = False) -> RoundSpec:
    return RoundSpec(round_id=f"r{index}", cluster_id=None if gold else f"c{index}", image_id=image,
                     image_name=image, layer=None if gold else "l", layer_depth=None if gold else 0, n_layers=1,
                     cluster_index=None if gold else 0, cluster_weight=None if gold else 1.0,
                     fmap_count=None if gold else 1, true_class="cat", gold=gold, inv_run="run")


def _config(**fields: Any) -> StudyConfig:
    return StudyConfig(study_id="s", title="t", classes=["cat", "dog"], reveal_percentages=[1, 2],
                       gold_percentages=[50, 60], **fields)


def test_quota_by_hand() -> None:
    """Three images (a, b with one cluster round each; c with two), a gold round on a."""
    rounds = [_spec(0, "a"), _spec(1, "b"), _spec(2, "c"), _spec(3, "c"), _spec(4, "a", gold=True)]
    assert resolve_quota(_config(), rounds) == Quota(total=3, gold=1)  # default 20, at most 3 images
    assert resolve_quota(_config(gold_rate=0.0), rounds) == Quota(total=3, gold=0)
    assert resolve_quota(_config(quota=2, gold_rate=0.5), rounds) == Quota(total=2, gold=1)
    assert resolve_quota(_config(rounds_per_player=2), rounds) == Quota(total=2, gold=1)  # former name: a bound
    with pytest.raises(ValueError, match="quota 4 cannot be finished: a participant can play at most 3 images"):
        resolve_quota(_config(quota=4), rounds)
    loose = _config(quota=5, one_round_per_image=False)  # rounds, not images: 4 cluster rounds + 1 gold
    assert resolve_quota(loose, rounds) == Quota(total=5, gold=1)


def _two_image_study(inv_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("chelsea", "coffee"):
        shutil.copytree(inv_run / name, run / name)
    study = tmp_path / "study"
    create_study(study, [run], CreateOptions(classes=CLASSES, plays_per_round=1, completion_code="PAID42"))
    return study


def _play_all(app: Any, player: ApiPlayer) -> tuple[int, dict]:
    rounds = 0
    while not (view := player.next()).get("done"):
        rounds += 1
        assert (view["round_number"], view["rounds_total"]) == (rounds, 2)
        player.act(view["play"], "resign")
    return rounds, view


def test_a_full_study_gives_no_code_and_no_play(inv_run: Path, tmp_path: Path) -> None:
    """The issue's case: 2 images, one play per round. Quota 2 (one round per image). Exactly the participants
    the capacity allows get in, play both rounds and then get the code; the rest see "this study is full"
    before consent, with no play and no code; /done gives nothing to anyone who has not finished."""
    study = _two_image_study(inv_run, tmp_path)
    app = make_app(study)
    rounds = app.state.runtime.rounds
    per_image = Counter(r.image_id for r in rounds.values())
    expected = min(per_image.values())  # each participant needs one round of each of the two images
    assert TestClient(app).get("/done", follow_redirects=False).headers["location"] == "/"  # no session: no code
    players, refused = [], 0
    for _ in range(10):
        browser = TestClient(app)
        page = browser.get("/")
        if 'id="study-full"' in page.text:
            refused += 1
            assert "consent-form" not in page.text and "PAID42" not in page.text
            assert browser.get("/play", follow_redirects=False).headers["location"] == "/"
            continue
        player = ApiPlayer(app)
        assert player.client.get("/done", follow_redirects=False).headers["location"] == "/play"  # not yet
        players.append(player)
    assert len(players) == expected and refused == 10 - expected
    for player in players:
        played, done = _play_all(app, player)
        assert played == 2 and done == {"done": True, "completed": True, "score": 0, "completion_code": "PAID42",
                                        "completion_url": None}
        assert "PAID42" in player.client.get("/done").text
    health = TestClient(app).get("/healthz").json()
    assert (health["quota"], health["capacity"]) == (2, 0)
    app.state.engine.dispose()


def test_a_consent_that_cannot_get_a_quota_is_refused(inv_run: Path, tmp_path: Path) -> None:
    """The full page also answers a consent form sent after the study filled up (409, nobody registered)."""
    study = _two_image_study(inv_run, tmp_path)
    app = make_app(study)
    browser = TestClient(app)
    csrf = browser.get("/").text.split('name="csrf-token" content="')[1].split('"')[0]
    while TestClient(app).get("/").text.count('id="study-full"') == 0:
        ApiPlayer(app)
    refused = browser.post("/consent", data={"csrftoken": csrf, "consent": "yes", "consent_version": "1"},
                           follow_redirects=False)
    assert refused.status_code == 409 and 'id="study-full"' in refused.text and "dr_session" not in refused.cookies
    app.state.engine.dispose()


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> Any:
        return self.now


def _assigned(app: Any) -> dict[str, int]:
    with app.state.runtime.reader.begin() as session:
        return dict(session.execute(select(Round.id, Round.assigned)).all())


def _lease_app(study_dir: Path) -> tuple[Any, Clock]:
    set_study(study_dir, lease_seconds=600, gold_rate=0.0, plays_per_round=1, one_round_per_image=False, quota=3)
    app = make_app(study_dir)
    clock = Clock()
    app.state.runtime.clock = clock
    return app, clock


def test_a_returning_player_within_the_lease_continues_the_same_play(study_dir: Path) -> None:
    app, clock = _lease_app(study_dir)
    player = ApiPlayer(app)
    view = player.act(player.next()["play"], "reveal", level=1).json()
    clock.now += timedelta(seconds=599)
    assert app.state.runtime.sweep() == 0
    assert player.next() == {**view, "resumed": True}
    clock.now += timedelta(seconds=599)  # the reload renewed the lease
    assert player.act(view["play"], "reveal", level=2).status_code == 200
    app.state.engine.dispose()


def test_an_expired_play_is_abandoned_and_its_slot_returns(study_dir: Path) -> None:
    """Past the lease: the running play is abandoned (an expire event), its slot and the planned rounds' slots
    go back; the returning player gets a new plan and the abandoned play does not count."""
    app, clock = _lease_app(study_dir)
    empty = _assigned(app)
    player = ApiPlayer(app)
    view = player.next()
    held = {r: n for r, n in _assigned(app).items() if n != empty[r]}
    assert sum(held.values()) == 3  # the quota: 3 slots claimed at consent
    clock.now += timedelta(seconds=601)
    assert app.state.runtime.sweep() == 1
    assert _assigned(app) == empty  # every slot back
    with app.state.runtime.reader.begin() as session:
        play = session.scalar(select(Play).where(Play.public_id == view["play"]))
        kinds = list(session.scalars(select(Event.type).where(Event.play_id == play.id).order_by(Event.id)))
        planned = session.scalar(select(func.count()).select_from(PlannedRound))
    assert (play.state, kinds, planned) == ("abandoned", ["start", "expire"], 0)
    refused = player.act(view["play"], "reveal", level=1)
    assert refused.status_code == 409 and "this round is over" in refused.json()["detail"]
    again = player.next()
    assert again["play"] != view["play"] and again["round_number"] == 1 and again["rounds_total"] == 3
    assert sum(_assigned(app).values()) == 3  # planned again, once
    app.state.engine.dispose()


def test_an_action_after_the_lease_says_so_and_the_next_round_follows(study_dir: Path) -> None:
    app, clock = _lease_app(study_dir)
    player = ApiPlayer(app)
    view = player.next()
    clock.now += timedelta(seconds=601)  # no sweep yet: the action itself finds the lease over
    refused = player.act(view["play"], "guess", class_name=CLASSES[0])
    assert refused.status_code == 409 and "expired after 10 minutes" in refused.json()["detail"]
    following = player.next()
    assert following["state"] == "active" and following["play"] != view["play"] and following["expired"] is True
    app.state.engine.dispose()


def test_a_guess_left_without_its_description_counts(study_dir: Path) -> None:
    app, clock = _lease_app(study_dir)
    player = ApiPlayer(app)
    view = player.next()
    player.act(view["play"], "guess", class_name=true_class(app, view["play"]))
    clock.now += timedelta(seconds=601)
    app.state.runtime.sweep()
    with app.state.runtime.reader.begin() as session:
        play = session.scalar(select(Play).where(Play.public_id == view["play"]))
    assert (play.state, play.description, play.score) == ("win", None, 100)  # measured, and scored
    assert player.next()["round_number"] == 2
    app.state.engine.dispose()


def test_a_player_back_after_the_lease_in_a_full_study_gets_no_code(study_dir: Path) -> None:
    app, clock = _lease_app(study_dir)
    late = ApiPlayer(app)
    late.next()
    clock.now += timedelta(seconds=601)
    app.state.runtime.sweep()
    while TestClient(app).get("/").text.count('id="study-full"') == 0:  # others take every slot meanwhile
        ApiPlayer(app)
    done = late.next()
    assert done["done"] is True and done["completed"] is False and "completion_code" not in done
    assert late.client.get("/done", follow_redirects=False).headers["location"] == "/play"
    app.state.engine.dispose()


def test_gold_rounds_for_every_participant_at_random_positions(study_dir: Path) -> None:
    """quota 5 at rate 0.2: one gold round each, at positions spread over the whole sequence; a gold round's
    view has the same fields as any other and shows its true revealed share (50 % at step 1)."""
    set_study(study_dir, quota=5, gold_rate=0.2, one_round_per_image=False, plays_per_round=1000)
    app = make_app(study_dir)
    runtime = app.state.runtime
    positions, keys = Counter(), set()
    for _ in range(24):
        player = ApiPlayer(app)
        golds = []
        while not (view := player.next()).get("done"):
            gold = _is_gold(runtime, view["play"])
            keys.add(frozenset(view))
            assert view["revealed"] == (50.0 if gold else 2.0)
            golds += [view["round_number"]] if gold else []
            player.act(view["play"], "resign")
        assert len(golds) == 1
        positions[golds[0]] += 1
    assert len(keys) == 1  # gold and cluster rounds answer with the same fields
    assert len(positions) >= 4 and set(positions) <= {1, 2, 3, 4, 5}  # 24 draws from 5 positions
    app.state.engine.dispose()


def _is_gold(runtime: Any, play_id: str) -> bool:
    with runtime.reader.begin() as session:
        return runtime.rounds[session.scalar(select(Play.round_id).where(Play.public_id == play_id))].gold


def test_the_server_sweeps_expired_leases_by_itself(study_dir: Path) -> None:
    """The background task of a running server expires the leases that ran out without any request of the
    participant (here the clock jumps; the task's period is shortened)."""
    import asyncio

    from convlens.study.web.app import _sweeper

    app, clock = _lease_app(study_dir)
    player = ApiPlayer(app)
    view = player.next()
    clock.now += timedelta(seconds=601)

    async def run() -> str:
        task = asyncio.create_task(_sweeper(app.state.runtime, 0.01))
        try:
            for _ in range(3000):  # until the task has swept (bounded, not a timing assumption)
                with app.state.runtime.reader.begin() as session:
                    state = session.scalar(select(Play.state).where(Play.public_id == view["play"]))
                if state == "abandoned":
                    return state
                await asyncio.sleep(0.01)
            return state
        finally:
            task.cancel()

    assert asyncio.run(run()) == "abandoned"
    app.state.engine.dispose()
