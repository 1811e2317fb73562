"""The ``least-settled`` assignment policy and its measure: hand-computed values, hand cases of which round
is chosen next, and the policy at work in the server."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from scipy.special import beta as beta_function
from sqlalchemy import select

from convlens.study.assignment import POLICIES, Candidate, LeastSettledPolicy, PastPlay
from convlens.study.db import Play
from convlens.study.settle import (
    content_words,
    fold_typos,
    one_edit_apart,
    play_value,
    round_evidence,
    unsettled_probability,
)
from study.conftest import ApiPlayer, make_app


def _osa_distance(a: str, b: str) -> int:
    """Optimal string alignment distance, the textbook dynamic programme."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


@settings(max_examples=400, deadline=None)
@given(st.text("abcs", max_size=6), st.text("abcs", max_size=6))
def test_one_edit_apart_is_osa_distance_one(a: str, b: str) -> None:
    assert one_edit_apart(a, b) == (_osa_distance(a, b) == 1)


def test_content_words_clean_like_the_label_pipeline() -> None:
    assert content_words("The CAT's <b>Stripes</b>, striped!! 🐯", "cat") == frozenset({"stripe"})
    assert content_words("I think the wheels", "rocket") == frozenset({"think", "wheel"})
    assert content_words("cats", "cat") == frozenset()  # nothing but the class name
    assert content_words("the left side", "side") == frozenset()  # "left": an authors' stop-word


def test_typos_fold_into_the_stronger_word() -> None:
    assert fold_typos({"stripe": 2.0, "stirpe": 1.0, "wheel": 1.0, "whel": 0.5, "ear": 1.0, "eat": 0.5}) == {
        "stripe": "stripe", "stirpe": "stripe", "wheel": "wheel", "whel": "wheel", "ear": "ear",
        "eat": "eat"}  # "eat": under 4 letters, never folded
    assert fold_typos({"stripe": 2.0, "stirpes": 1.0})["stirpes"] == "stripe"  # plural left on a typo
    assert fold_typos({"stripe": 1.0, "stirpe": 1.0}) == {"stripe": "stripe", "stirpe": "stirpe"}  # no stronger one


def _beta_cdf_half(a: float, b: float) -> float:
    value, _ = integrate.quad(lambda x: x ** (a - 1) * (1 - x) ** (b - 1), 0, 0.5)
    return value / beta_function(a, b)


def test_unsettled_probability_by_hand() -> None:
    assert unsettled_probability(0, 0, 0) == 1.0  # no description: no label at all
    assert unsettled_probability(1, 0, 1) == pytest.approx(0.25)  # Beta(2, 1): (1/2)^2
    assert unsettled_probability(2, 0, 2) == pytest.approx(0.125)  # Beta(3, 1): (1/2)^3
    assert unsettled_probability(1, 1, 2) == pytest.approx(0.5)
    assert unsettled_probability(2, 1, 3) == pytest.approx(5 / 16)  # Beta(3, 2): (C(4,3) + C(4,4)) / 2^4
    assert unsettled_probability(1.7, 1.05, 3) == pytest.approx(_beta_cdf_half(2.7, 2.05), rel=1e-6)


def test_round_evidence_by_hand() -> None:
    plays = [("win", 0, "stripes"), ("win", 0, "dark stripes"), ("win", 2, "wheels"), ("lose", 0, "wheel"),
             ("resign", 5, "ignored"), ("win", 1, None), ("win", 3, "the left")]
    evidence = round_evidence(plays, "cat")
    assert (evidence.plays, evidence.described) == (7, 4)  # no text, stop-words only and the resign: none
    assert evidence.votes == pytest.approx({"stripe": 2.0, "dark": 1.0, "wheel": 0.8 + 0.25})
    assert (evidence.leader, evidence.leader_weight) == ("stripe", 2.0)
    assert (evidence.rival, evidence.rival_weight) == ("wheel", pytest.approx(1.05))  # "dark" goes with the leader
    expected = (4 + 1) / (7 + 2) * _beta_cdf_half(3.0, 2.05)
    assert play_value(evidence) == pytest.approx(expected, rel=1e-6)


def _candidate(name: str, *descriptions: str | None, assigned: int | None = None, gold: bool = False) -> Candidate:
    history = tuple(PastPlay("resign", 5) if d is None else PastPlay("win", 0, d) for d in descriptions)
    count = len(history) if assigned is None else assigned
    return Candidate(name, gold, count, None if gold else f"c:{name}", "img", "layer", "cat", history)


def test_hand_values_of_typical_rounds() -> None:
    policy = LeastSettledPolicy()
    assert policy.value(_candidate("fresh")) == pytest.approx(0.5)  # 1 x 1/2
    assert policy.value(_candidate("split", "stripes", "wheels")) == pytest.approx(0.375)  # 1/2 x 3/4
    assert policy.value(_candidate("one", "stripes")) == pytest.approx(0.25 * 2 / 3)
    assert policy.value(_candidate("agree", "stripes", "striped")) == pytest.approx(0.125 * 3 / 4)
    assert policy.value(_candidate("typo", "stripes", "stripes", "stirpes")) == pytest.approx(1 / 16 * 4 / 5)
    assert policy.value(_candidate("hopeless", *[None] * 6)) == pytest.approx(1 / 8)  # 1 x (0 + 1) / (6 + 2)


@pytest.mark.parametrize(("names", "expected"), [
    (["fresh", "split", "one", "agree"], "fresh"),  # a round without any label first
    (["split", "one", "agree"], "split"),  # then the most contested
    (["one", "agree", "hopeless"], "one"),  # 0.167 > 0.125 (six resigns) > 0.094
    (["agree", "hopeless"], "hopeless"),  # nobody described it yet, but it loses priority with every resign
])
def test_which_round_is_chosen_next(names: list[str], expected: str) -> None:
    pool = {"fresh": _candidate("fresh"), "split": _candidate("split", "stripes", "wheels"),
            "one": _candidate("one", "stripes"), "agree": _candidate("agree", "stripes", "striped"),
            "hopeless": _candidate("hopeless", *[None] * 6)}
    candidates = [pool[n] for n in names]
    for seed in range(20):
        assert LeastSettledPolicy().choose(candidates, random.Random(seed), "p").round_id == expected


def test_ties_go_to_the_round_assigned_least_then_at_random() -> None:
    busy = _candidate("a-busy", assigned=2)  # two plays in flight, none finished: same value as the fresh ones
    fresh = [_candidate(f"b{i}") for i in range(4)]
    chosen = Counter(LeastSettledPolicy().choose([busy, *fresh], random.Random(s), "p").round_id for s in range(400))
    assert set(chosen) == {f"b{i}" for i in range(4)} and min(chosen.values()) > 60  # 100 expected each


def test_gold_rounds_mixed_in_at_the_uniform_rate() -> None:
    candidates = [_candidate(f"r{i}") for i in range(8)] + [_candidate(f"g{i}", gold=True) for i in range(2)]
    gold = sum(LeastSettledPolicy().choose(candidates, random.Random(s), "p").gold for s in range(4000))
    assert 650 < gold < 950  # 800 expected (2 of 10), ~5 sigma band
    assert LeastSettledPolicy().choose(candidates[8:], random.Random(0), "p").gold  # only gold left


def _set(study_dir: Path, **fields: Any) -> None:
    config = json.loads((study_dir / "study.json").read_text())
    config.update(fields)
    (study_dir / "study.json").write_text(json.dumps(config))


def _round_of(app: Any, play: str) -> tuple[str, bool]:
    runtime = app.state.runtime
    with runtime.reader.begin() as session:
        round_id = session.scalar(select(Play.round_id).where(Play.public_id == play))
    return round_id, runtime.rounds[round_id].gold


def _play_everything(app: Any, words: dict[str, str], default: str) -> None:
    """One participant plays every round once: a correct guess at level 0 described by ``words[round]``."""
    player = ApiPlayer(app)
    while not (view := player.next()).get("done"):
        round_id, _ = _round_of(app, view["play"])
        answer = app.state.runtime.rounds[round_id].true_class
        assert player.act(view["play"], "guess", class_name=answer).status_code == 200
        text = words.get(round_id, default)
        assert player.act(view["play"], "describe", text=text, language="en").status_code == 200


def test_the_server_gives_the_next_play_to_the_least_settled_round(study_dir: Path) -> None:
    """Two participants describe every round alike ("fur"), except round A (both "wheels": settled) and
    round B ("stripes" then "spots": contested); the third participant's first cluster round is B."""
    _set(study_dir, assignment_policy="least-settled", plays_per_round=10)
    assert POLICIES["least-settled"] is LeastSettledPolicy
    app = make_app(study_dir)
    normal = sorted(r for r, spec in app.state.runtime.rounds.items() if not spec.gold)
    a, b = normal[0], normal[1]
    _play_everything(app, {a: "wheels", b: "stripes"}, "soft fur")
    _play_everything(app, {a: "the wheels", b: "spots"}, "fur")
    third = ApiPlayer(app)
    while True:
        view = third.next()
        round_id, gold = _round_of(app, view["play"])
        if not gold:
            break
        third.act(view["play"], "resign")
    assert round_id == b
    app.state.engine.dispose()
