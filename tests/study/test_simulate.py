"""The simulated crowd: its vocabulary and behaviour model (hand values and literal re-computations), and
the simulator playing the server over HTTP (what it logs is what the server stored; same seed, same
plays, in process and on uvicorn)."""

from __future__ import annotations

import math
import random
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from convlens.crowd.play import RoundOracle, simulate
from convlens.crowd.players import CONCEPTS, CrowdModel, CrowdPlan, PlayerModel, paraphrase, plan_crowd, typo
from convlens.labels.labelling import lemmatize_en
from convlens.labels.text import load_stop_words
from convlens.study.batch.create import CreateOptions, create_study
from convlens.study.game.settle import one_edit_apart
from convlens.study.store.db import Participant, Play, Round
from study.conftest import CLASSES, make_app


def test_vocabulary_words_name_one_concept_each() -> None:
    stop = load_stop_words()
    owners: dict[str, str] = {}
    for concept in CONCEPTS:
        for word in concept.words:
            assert word not in stop and word not in CLASSES, word
            for key in (word, lemmatize_en(word)):
                assert owners.setdefault(key, concept.name) == concept.name, (word, owners[key])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([w for c in CONCEPTS for w in c.words]), st.integers(0, 10_000))
def test_a_typo_is_one_edit(word: str, seed: int) -> None:
    slipped = typo(word, random.Random(seed))
    assert one_edit_apart(word, slipped) or slipped == word  # a doubled letter next to itself may equal a swap


def test_paraphrase_uses_the_concept_the_class_and_the_model() -> None:
    stripes = next(c for c in CONCEPTS if c.name == "stripes")
    plain = CrowdModel(typo=0, filler=0, class_name=0, synonym=0, inflection=0)
    texts = [paraphrase(stripes, "cat", plain, random.Random(s)) for s in range(200)]
    assert all("stripes" in t.split() and "cat" not in t for t in texts)
    named = CrowdModel(typo=0, filler=0, class_name=1, synonym=1, inflection=0)
    texts = [paraphrase(stripes, "cat", named, random.Random(s)) for s in range(200)]
    assert all("cat" in t and "bands" in t for t in texts)
    slips = CrowdModel(typo=1, filler=1, synonym=0, inflection=0)
    texts = [paraphrase(stripes, "cat", slips, random.Random(s)) for s in range(200)]
    assert sum("stripes" not in t.split() for t in texts) > 150  # misspelt (or a swap that changes nothing)


def _rounds(count: int, depths: int = 3, name: str = "cat") -> list[SimpleNamespace]:
    return [SimpleNamespace(round_id=f"r{i}", cluster_id=f"c{i}", true_class=name, gold=False,
                            layer_depth=i % depths, n_layers=depths) for i in range(count)]


def test_plan_weights_and_clarity_by_hand() -> None:
    plan = plan_crowd(_rounds(3), ["cat", "dog"], CrowdModel(concepts_per_class=3, trend_strength=0.8), seed=5)
    rising, falling = plan.rising["cat"], plan.falling["cat"]
    flat = next(c for c in plan.class_concepts["cat"] if c not in (rising, falling))
    assert dict(plan.depth_weights("cat", 0, 3)) == pytest.approx({rising: 0.2, falling: 1.8, flat: 1.0})
    assert dict(plan.depth_weights("cat", 1, 3)) == pytest.approx({rising: 1.0, falling: 1.0, flat: 1.0})
    assert dict(plan.depth_weights("cat", 2, 3)) == pytest.approx({rising: 1.8, falling: 0.2, flat: 1.0})
    assert plan.clarity_factor("cat", rising, 0, 3) == pytest.approx(0.6)
    assert plan.clarity_factor("cat", falling, 0, 3) == pytest.approx(1.0)
    assert plan.clarity_factor("cat", falling, 2, 3) == pytest.approx(0.6)
    assert plan.clarity_factor("cat", flat, 2, 3) == 1.0
    assert CrowdPlan.from_json(plan.to_json()).to_json() == plan.to_json()


def test_planted_concepts_follow_the_depth_weights() -> None:
    plan = plan_crowd(_rounds(6000), ["cat", "dog"], CrowdModel(trend_strength=0.8), seed=1)
    rising = plan.rising["cat"]
    for depth, weight in ((0, 0.2), (2, 1.8)):
        planted = [r for r in plan.rounds.values() if r.depth == depth]
        share = sum(r.concept == rising for r in planted) / len(planted)
        expected = weight / 3.0  # weights sum to 3 at every depth
        assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / len(planted))
    again = plan_crowd(_rounds(6000), ["cat", "dog"], CrowdModel(trend_strength=0.8), seed=1)
    assert again.to_json() == plan.to_json()


def _stop_distribution(model: CrowdModel) -> dict[tuple[str, int], float]:
    """P(the play ends with action a at level k), written out from the model's rules."""
    levels = len(model.guess)
    result: dict[tuple[str, int], float] = {}
    alive = 1.0
    for k in range(levels - 1):
        result[("resign", k)] = alive * model.resign
        result[("guess", k)] = alive * (1 - model.resign) * model.guess[k]
        alive *= (1 - model.resign) * (1 - model.guess[k])
    result[("resign", levels - 1)] = alive * model.resign_last
    result[("guess", levels - 1)] = alive * (1 - model.resign_last)
    return result


def test_players_stop_and_guess_as_the_model_says() -> None:
    model = CrowdModel()
    plan = plan_crowd(_rounds(9), CLASSES, model, seed=2)
    planted = plan.rounds["r0"]
    counts: Counter[tuple[str, int]] = Counter()
    right: Counter[int] = Counter()
    player = PlayerModel(plan, 0)
    n = 20_000
    for i in range(n):
        player.start(planted, f"key{i}")
        level = 0
        while (decision := player.act(level, 6, "cat"))[0] == "reveal":
            level += 1
        counts[(decision[0], level)] += 1
        right[level] += decision == ("guess", "cat")
    for key, p in _stop_distribution(model).items():
        assert abs(counts[key] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, key
    for level in (0, 5):
        p = model.correct[level] + player.skill + (planted.clarity - 0.6) / 2
        guesses = counts[("guess", level)]
        assert abs(right[level] / guesses - p) < 4 * math.sqrt(p * (1 - p) / guesses)


def test_descriptions_follow_clarity_and_outcome() -> None:
    model = CrowdModel(describe=1.0, other=0.2)
    plan = plan_crowd(_rounds(9), CLASSES, model, seed=3)
    planted = plan.rounds["r0"]
    player = PlayerModel(plan, 1)
    kinds: Counter[str] = Counter()
    for i in range(4000):
        player.start(planted, f"k{i}")
        kinds[player.description("cat", True)[1]] += 1
    other = min(0.2, 1 - planted.clarity)
    assert abs(kinds["planted"] / 4000 - planted.clarity) < 0.04
    assert abs(kinds["other"] / 4000 - other) < 0.03 and set(kinds) <= {"planted", "other", "off-topic"}
    wrong: Counter[str] = Counter()
    for i in range(4000):
        player.start(planted, f"w{i}")
        wrong[player.description("dog", False)[1]] += 1  # "dog" has no concepts: no guessed-class words
    assert set(wrong) == {"planted", "off-topic"} and abs(wrong["planted"] / 4000 - 0.25) < 0.03


@pytest.fixture(scope="module")
def small_study(inv_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("crowd") / "study"
    create_study(target, [inv_run], CreateOptions(classes=CLASSES, gold=1, plays_per_round=3, rounds_per_player=6))
    return target


def _fresh(small_study: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(small_study, target)
    return target


def _stored(app: Any) -> list[tuple[str, str, int, str | None, str | None]]:
    with app.state.runtime.reader.begin() as session:
        rows = session.execute(select(Play.round_id, Play.state, Play.level, Play.guessed_class, Play.description)
                               .order_by(Play.id)).all()
    return [tuple(r) for r in rows]


def _logged(run: Any) -> list[tuple[str, str, int, str | None, str | None]]:
    return [(p.round_id, p.outcome, p.level, p.guessed_class, p.description) for p in run.plays]


def test_what_the_simulator_did_is_what_the_server_stored(small_study: Path, tmp_path: Path) -> None:
    study = _fresh(small_study, tmp_path, "a")
    plan = plan_crowd(RoundOracle(study).rounds.values(), CLASSES, seed=7)
    app = make_app(study)
    run = simulate(study, plan, participants=8, app=app, concurrent=3)
    assert run.unknown_images == 0 and run.participants == 8
    assert _stored(app) == _logged(run)  # every play, in order, with its outcome, level, guess and words
    with app.state.runtime.reader.begin() as session:
        nicknames = sorted(session.scalars(select(Participant.nickname)))
    assert nicknames == sorted(f"sim-{i}" for i in range(8))  # joined through the consent form
    kinds = Counter(p.kind for p in run.plays)
    assert kinds["planted"] > 0 and sum(p.outcome == "resign" for p in run.plays) > 0
    app.state.engine.dispose()


def test_enough_participants_join_to_fill_every_round(small_study: Path, tmp_path: Path) -> None:
    """``participants=None``: participants keep joining until every non-gold round started its plays per round,
    although the server gives each of them at most one round per image."""
    study = _fresh(small_study, tmp_path, "fill")
    plan = plan_crowd(RoundOracle(study).rounds.values(), CLASSES, seed=3)
    app = make_app(study)
    run = simulate(study, plan, participants=None, app=app, concurrent=3)
    runtime = app.state.runtime
    with runtime.reader.begin() as session:
        assigned = dict(session.execute(select(Round.id, Round.assigned).where(~Round.gold)).all())
        played = session.execute(select(Play.participant_id, Round.image_id).join(Round, Play.round_id == Round.id))
        pairs = [tuple(row) for row in played]
    assert set(assigned.values()) == {runtime.config.plays_per_round}  # every round reached its target
    assert len(pairs) == len(set(pairs))  # nobody got two rounds of one image
    images = len({spec.image_id for spec in runtime.rounds.values()})
    assert run.participants >= len(assigned) * runtime.config.plays_per_round / images
    assert sum(p.round_id in assigned for p in run.plays) == sum(assigned.values())
    app.state.engine.dispose()


def test_rounds_with_the_same_picture_are_told_apart_by_the_play(small_study: Path, tmp_path: Path) -> None:
    """Two rounds of one image given a byte-identical level-0 picture (as deep 7x7 layers produce): the
    simulator describes each play with its own round's concept, known from the play id, not the picture."""
    from convlens.study.batch.create import identical_level0_images
    from convlens.study.store.config import load_rounds

    study = _fresh(small_study, tmp_path, "same-picture")
    rounds = [r for r in load_rounds(study) if not r.gold]
    first = rounds[0]
    twin = next(r for r in rounds[1:] if r.image_id == first.image_id)
    shutil.copy(study / "images" / first.round_id / "level0.png", study / "images" / twin.round_id / "level0.png")
    assert [sorted(g) for g in identical_level0_images(study, [r.round_id for r in rounds])] == [
        sorted([first.round_id, twin.round_id])]
    plan = plan_crowd(RoundOracle(study).rounds.values(), CLASSES, seed=5)
    app = make_app(study)
    run = simulate(study, plan, participants=None, app=app, concurrent=3)
    assert _stored(app) == _logged(run)  # the stored round of every play is the one the simulator played
    played = Counter(p.round_id for p in run.plays)
    assert played[first.round_id] > 0 and played[twin.round_id] > 0
    assert run.shared_images == played[first.round_id] + played[twin.round_id]
    app.state.engine.dispose()


def test_study_create_says_when_rounds_share_a_picture(small_study: Path) -> None:
    from convlens.study.batch.create import identical_level0_images
    from convlens.study.store.config import load_rounds

    ids = [r.round_id for r in load_rounds(small_study)]
    assert identical_level0_images(small_study, ids) == []  # the tests' tiny CNN gives distinct pictures


def test_same_seed_same_plays_in_process_and_on_uvicorn(small_study: Path, tmp_path: Path) -> None:
    plans = {seed: plan_crowd(RoundOracle(small_study).rounds.values(), CLASSES, seed=seed) for seed in (11, 12)}
    logs = []
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        study = _fresh(small_study, tmp_path, name)
        app = make_app(study)
        logs.append(_logged(simulate(study, plans[seed], participants=10, app=app, budget=25)))
        app.state.engine.dispose()
    served_study = _fresh(small_study, tmp_path, "d")
    logs.append(_logged(simulate(served_study, plans[11], participants=10, budget=25)))  # uvicorn, own process
    assert len(logs[0]) == 25 and logs[0] == logs[1] == logs[3]
    assert logs[2] != logs[0]


@pytest.mark.parametrize(("args", "message"), [
    (["study", "simulate", "{tmp}/missing"], "no study.json"),
    (["study", "simulate", "{study}", "--participants", "0"], "must be >= 1"),
    (["study", "simulate", "{study}", "--trend-strength", "2"], "--trend-strength must be in 0..1"),
    (["study", "simulate", "{study}", "--concepts-per-class", "1"], "at least two concepts per class"),
    (["study", "recovery", "{tmp}/missing.json", "{tmp}"], "FileNotFoundError"),
])
def test_cli_bad_input_is_one_line_and_exit_2(small_study: Path, tmp_path: Path, args: list[str],
                                              message: str) -> None:
    from typer.testing import CliRunner

    from convlens.cli.main import app

    study = _fresh(small_study, tmp_path, "cli")
    result = CliRunner().invoke(app, [a.format(tmp=tmp_path, study=study) for a in args])
    text = " ".join(result.output.split())  # rich wraps long lines at the terminal width
    assert result.exit_code == 2 and text.startswith("error:") and message in text, result.output
    assert "Traceback" not in result.output and text.count("error:") == 1
    assert not (study / "simulation").exists()
