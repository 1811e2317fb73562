"""Assignment: random order per player, never a round twice, never a second round of an image the player
already played (the default), the plays-per-round cap (also under concurrency, on SQLite and PostgreSQL, for
plays and for registrations), pluggable policies, no give-up while eligible rounds remain."""

from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from convlens.study.game import plan
from convlens.study.game.assignment import (
    POLICIES,
    AssignmentPolicy,
    Candidate,
    UniformPolicy,
    participant_rng,
    register_policy,
)
from convlens.study.store.config import load_rounds
from convlens.study.store.db import Play, Round
from study.conftest import ApiPlayer, make_app, set_study, true_class


def _set(study_dir: Path, **fields: Any) -> None:
    set_study(study_dir, **fields)


def _play_all(player: ApiPlayer) -> list[str]:
    plays = []
    while not (view := player.next()).get("done"):
        plays.append(view["play"])
        player.act(view["play"], "resign")
    return plays


def _rounds_of(app: Any, plays: list[str]) -> list[str]:
    with app.state.runtime.reader.begin() as session:
        by_play = dict(session.execute(select(Play.public_id, Play.round_id).where(Play.public_id.in_(plays))).all())
    return [by_play[p] for p in plays]


def _images_of(app: Any, plays: list[str]) -> list[str]:
    return [app.state.runtime.rounds[r].image_id for r in _rounds_of(app, plays)]


def test_one_round_per_image_by_default(study_dir: Path) -> None:
    """A finished play shows the true class and the full image: after any play of image X (won, lost or
    resigned) the player is never assigned another round of X — one round of each image, then done."""
    _set(study_dir, plays_per_round=10)
    app = make_app(study_dir)
    assert app.state.runtime.config.one_round_per_image  # the default of study.json
    images = {r.image_id for r in load_rounds(study_dir)}
    assert len(images) < len(load_rounds(study_dir))  # several rounds per image: the rule matters here
    for index in range(4):
        player = ApiPlayer(app)
        seen: list[str] = []
        while not (view := player.next()).get("done"):
            (image,) = _images_of(app, [view["play"]])
            assert image not in seen, f"player {index} got a second round of image {image}"
            seen.append(image)
            if len(seen) % 2:
                player.act(view["play"], "resign")
            else:
                player.act(view["play"], "guess", class_name=true_class(app, view["play"]))
                player.act(view["play"], "skip")
        assert sorted(seen) == sorted(images)  # one round of every image (the caps leave room)
    app.state.engine.dispose()


def test_each_player_gets_every_round_once_in_a_random_order(study_dir: Path) -> None:
    """With ``one_round_per_image: false`` (a team's explicit choice) and a quota of every round, every player
    meets every round."""
    _set(study_dir, plays_per_round=10, one_round_per_image=False, quota=None, rounds_per_player=1000)
    app = make_app(study_dir)
    orders = [_rounds_of(app, _play_all(ApiPlayer(app))) for _ in range(3)]
    everything = sorted(r.round_id for r in load_rounds(study_dir))
    for order in orders:
        assert sorted(order) == everything  # no round twice, none missing, gold rounds included
    assert len({tuple(order) for order in orders}) == 3  # each player's own order
    app.state.engine.dispose()


def test_plays_per_round_cap_and_gold_for_everyone(study_dir: Path) -> None:
    """One play per round: participants join until the study is full; every one of them gets the gold round,
    no cluster round is played twice, and the slots left could not give anyone a full quota."""
    _set(study_dir, plays_per_round=1, one_round_per_image=False, quota=4, gold_rate=0.25)
    app = make_app(study_dir)
    rounds = load_rounds(study_dir)
    gold = {r.round_id for r in rounds if r.gold}
    seen = []
    while True:
        try:
            player = ApiPlayer(app)
        except AssertionError:  # the consent was refused: the study is full
            break
        seen.append(set(_rounds_of(app, _play_all(player))))
    normal = Counter(r for s in seen for r in s if r not in gold)
    assert all(len(s) == 4 and len(s & gold) == 1 for s in seen)  # a full quota, one gold round each
    assert max(normal.values()) == 1 and len(seen) == (len(rounds) - len(gold)) // 3
    assert TestClient(app).get("/").text.count('id="study-full"') == 1
    app.state.engine.dispose()


def test_concurrent_players_never_exceed_the_cap(study_dir: Path, database: str) -> None:
    """Twelve registrations at once where eight fit, then the eight play at once: the registrations that fit
    get a full quota, the rest the full page, and no round passes its cap."""
    _set(study_dir, plays_per_round=2, one_round_per_image=False, quota=7, gold_rate=0.0)
    app = make_app(study_dir, database)
    slots = 2 * sum(not r.gold for r in load_rounds(study_dir))

    def join(_: int) -> ApiPlayer | None:
        try:
            return ApiPlayer(app)
        except AssertionError:
            return None

    with ThreadPoolExecutor(max_workers=6) as pool:
        players = [p for p in pool.map(join, range(12)) if p is not None]
        assert len(players) == slots // 7
        orders = list(pool.map(_play_all, players))
    assert all(len(order) == 7 for order in orders)
    with app.state.runtime.reader.begin() as session:
        assigned = dict(session.execute(select(Round.id, Round.assigned).where(~Round.gold)).all())
        plays = Counter(session.scalars(select(Play.round_id)))
    assert max(assigned.values()) <= 2 and all(plays[r] == n for r, n in assigned.items())
    assert sum(assigned.values()) == 7 * len(players)  # every claimed slot was played, none twice
    app.state.engine.dispose()


def test_uniform_policy_is_uniform_and_replayable() -> None:
    candidates = [Candidate(f"r{i:02d}", False, 0, None, "img", "layer") for i in range(10)]
    counts = Counter(UniformPolicy().choose(candidates, random.Random(s), "p").round_id for s in range(5000))
    assert set(counts) == {c.round_id for c in candidates}
    assert max(counts.values()) < 600 and min(counts.values()) > 400  # 500 expected each (~5 sigma band)
    first = UniformPolicy().choose(candidates, participant_rng(0, "abc", 3), "abc")
    assert all(UniformPolicy().choose(candidates[::-1], participant_rng(0, "abc", 3), "abc") == first
               for _ in range(3))  # same participant and play number -> same round, whatever the row order


class _Heaviest(AssignmentPolicy):
    name = "first-id"

    def choose(self, candidates: Any, rng: random.Random, participant: str) -> Candidate:
        return min(candidates, key=lambda c: c.round_id)


def test_a_registered_policy_is_used_by_the_server(study_dir: Path) -> None:
    register_policy("first-id", _Heaviest)
    try:
        _set(study_dir, assignment_policy="first-id", plays_per_round=10, one_round_per_image=False, quota=5,
             gold_rate=0.0)
        app = make_app(study_dir)
        order = _rounds_of(app, _play_all(ApiPlayer(app)))
        normal = sorted(r.round_id for r in load_rounds(study_dir) if not r.gold)
        assert sorted(order) == normal[:5]  # the policy's picks (in a shuffled order)
        app.state.engine.dispose()
    finally:
        POLICIES.pop("first-id")


class _FirstNormal(AssignmentPolicy):
    name = "first-normal"

    def choose(self, candidates: Any, rng: random.Random, participant: str) -> Candidate:
        return min((c for c in candidates if not c.gold), key=lambda c: c.round_id)


def test_failed_claims_never_end_the_game_while_rounds_remain(study_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Other players may take a round's last slot between the candidate list and the claim: the server asks
    the policy again while candidates remain (here 12 claims fail in a row), not a fixed number of times."""
    _set(study_dir, plays_per_round=1, one_round_per_image=False, quota=2, gold_rate=0.0)
    app = make_app(study_dir)
    runtime = app.state.runtime
    normal = sorted(r for r, spec in runtime.rounds.items() if not spec.gold)
    assert len(normal) > 14
    with runtime.write() as session:  # taken by others: at the cap, but still in the stale candidate list
        session.execute(update(Round).where(Round.id.in_(normal[:12])).values(assigned=1))

    def stale(session: Any, config: Any, policy: Any, exclude_rounds: set, exclude_items: set) -> list[Candidate]:
        return [Candidate(r.id, r.gold, 0, r.cluster_id, r.image_id, r.layer) for r in session.scalars(select(Round))
                if r.id not in exclude_rounds and not r.gold]

    monkeypatch.setattr(plan, "_candidates", stale)
    monkeypatch.setattr(runtime, "policy", _FirstNormal())
    player = ApiPlayer(app)
    assert sorted(_rounds_of(app, _play_all(player))) == normal[12:14]
    app.state.engine.dispose()
