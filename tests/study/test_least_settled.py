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

from convlens.study.game.assignment import POLICIES, Candidate, LeastSettledPolicy, PastPlay
from convlens.study.game.settle import (
    confidence,
    content_words,
    description_rate,
    fold_typos,
    knowledge_gradient,
    one_edit_apart,
    play_value,
    round_evidence,
)
from convlens.study.store.db import Play
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
    assert content_words("I think it looks like wheels", "rocket") == frozenset({"wheel"})  # hedges dropped
    assert content_words("I think the wheels", "rocket", drop_hedges=False) == frozenset({"think", "wheel"})
    assert content_words("just a guess", "") == content_words("no idea", "") == frozenset()
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


def test_confidence_and_knowledge_gradient_by_hand() -> None:
    assert confidence(0, 0) == pytest.approx(0.5)
    assert confidence(1, 0) == pytest.approx(0.75)  # Beta(2, 1): P(theta > 1/2) = 1 - (1/2)^2
    assert confidence(2, 0) == pytest.approx(0.875)
    assert confidence(1, 2) == pytest.approx(11 / 16)  # Beta(2, 3): symmetric to 2-1
    assert confidence(1.25, 1) == pytest.approx(1 - _beta_cdf_half(2.25, 2), rel=1e-6)
    assert knowledge_gradient(0, 0) == pytest.approx(0.25)  # 0.75 - 0.5
    assert knowledge_gradient(1, 1) == pytest.approx(11 / 16 - 0.5)
    assert knowledge_gradient(1, 0) == pytest.approx(0.875 - 0.75)  # the rival side would only lower it
    assert knowledge_gradient(2, 0) == pytest.approx(0.9375 - 0.875)
    five_four = 1 - _beta_cdf_half(6, 5)
    assert knowledge_gradient(5, 4) == pytest.approx(1 - _beta_cdf_half(7, 5) - five_four, rel=1e-6)
    assert knowledge_gradient(5, 4) < knowledge_gradient(1, 0)  # a long dispute yields to a fresh question


def test_round_evidence_by_hand() -> None:
    plays = [("win", 0, "stripes"), ("win", 0, "dark stripes"), ("win", 2, "wheels"), ("lose", 0, "wheel"),
             ("resign", 5, "ignored"), ("win", 1, None), ("win", 3, "the left"), ("win", 0, "just a guess"),
             ("win", 4, "i think it looks like stripes")]
    evidence = round_evidence(plays, "cat")
    assert (evidence.plays, evidence.described) == (9, 5)  # no text, stop-words/hedges only, the resign: none
    assert evidence.votes == pytest.approx({"stripe": 3.0, "dark": 1.0, "wheel": 1.25})  # wrong guess: 1/4
    assert (evidence.leader, evidence.leader_weight) == ("stripe", 3.0)
    assert (evidence.rival, evidence.rival_weight) == ("wheel", 1.25)  # "dark" goes with the leader
    rate = 0.8
    gain = 1 - _beta_cdf_half(5.0, 2.25) - (1 - _beta_cdf_half(4.0, 2.25))  # one more for the leader
    assert play_value(evidence, rate) == pytest.approx((5 + 4 * rate) / (9 + 4) * gain, rel=1e-6)
    assert description_rate([evidence, round_evidence([("resign", 0, None)])]) == pytest.approx((5 + 1) / (10 + 2))


def _candidate(name: str, *descriptions: str | None, assigned: int | None = None, gold: bool = False) -> Candidate:
    history = tuple(PastPlay("resign", 5) if d is None else PastPlay("win", 0, d) for d in descriptions)
    count = len(history) if assigned is None else assigned
    return Candidate(name, gold, count, None if gold else f"c:{name}", "img", "layer", "cat", history)


def test_hand_values_of_typical_rounds() -> None:
    policy = LeastSettledPolicy()

    def value(candidate: Candidate, rate: float = 1.0) -> float:
        return play_value(policy.evidence(candidate), rate)

    assert value(_candidate("fresh")) == pytest.approx(0.25)
    assert value(_candidate("split", "stripes", "wheels")) == pytest.approx(0.1875)
    assert value(_candidate("one", "stripes")) == pytest.approx(0.125)
    assert value(_candidate("agree", "stripes", "striped")) == pytest.approx(0.0625)
    assert value(_candidate("typo", "stripes", "stripes", "stirpes")) == pytest.approx(0.96875 - 0.9375)  # 3-0
    assert value(_candidate("hopeless", *[None] * 6)) == pytest.approx(4 / 10 * 0.25)
    assert value(_candidate("hopeless", *[None] * 6), rate=0.5) == pytest.approx(2 / 10 * 0.25)


@pytest.mark.parametrize(("names", "expected"), [
    # rate (5 + 1) / (5 + 2) = 6/7: fresh 6/7 x 0.25 = 0.214 > split 0.905 x 0.1875 = 0.170 > one 0.886 x
    # 0.125 = 0.111 > agree 0.905 x 0.0625 = 0.057
    (["fresh", "split", "one", "agree"], "fresh"),
    (["split", "one", "agree"], "split"),
    # rate (3 + 1) / (9 + 2) = 0.364: one 0.491 x 0.125 = 0.061 > hopeless 0.145 x 0.25 = 0.0364 ~ agree
    # 0.576 x 0.0625 = 0.0360
    (["one", "agree", "hopeless"], "one"),
    # rate 3/10: agree 0.533 x 0.0625 = 0.033 > hopeless 0.12 x 0.25 = 0.030 (six plays, no description)
    (["agree", "hopeless"], "agree"),
    # rate (2 + 1) / (4 + 2) = 0.5: two resigns 2/6 x 0.25 = 0.083 > agree 4/6 x 0.0625 = 0.042
    (["agree", "resigned"], "resigned"),
])
def test_which_round_is_chosen_next(names: list[str], expected: str) -> None:
    pool = {"fresh": _candidate("fresh"), "split": _candidate("split", "stripes", "wheels"),
            "one": _candidate("one", "stripes"), "agree": _candidate("agree", "stripes", "striped"),
            "hopeless": _candidate("hopeless", *[None] * 6), "resigned": _candidate("resigned", None, None)}
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
    (study_dir / "study.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def _round_of(app: Any, play: str) -> tuple[str, bool]:
    runtime = app.state.runtime
    with runtime.reader.begin() as session:
        round_id = session.scalar(select(Play.round_id).where(Play.public_id == play))
    return round_id, runtime.rounds[round_id].gold


def _play_everything(app: Any, words: dict[str, str], default: str) -> None:
    """One participant plays every round once (the study sets ``one_round_per_image: false``): a correct
    guess at level 0 described by ``words[round]``."""
    player = ApiPlayer(app)
    while not (view := player.next()).get("done"):
        round_id, _ = _round_of(app, view["play"])
        answer = app.state.runtime.rounds[round_id].true_class
        assert player.act(view["play"], "guess", class_name=answer).status_code == 200
        text = words.get(round_id, default)
        assert player.act(view["play"], "describe", text=text, language="en").status_code == 200  # then the answer


def test_the_server_gives_the_next_play_to_the_least_settled_round(study_dir: Path) -> None:
    """Two participants describe every round alike ("fur"), except round A (both "wheels": settled) and
    round B ("stripes" then "spots": contested); the third participant's first cluster round is B."""
    _set(study_dir, assignment_policy="least-settled", plays_per_round=10, one_round_per_image=False, quota=None,
         rounds_per_player=1000)  # every round for every participant
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
