"""The study export reader's play validation rules (``convlens.labels.export``): each rule on a
one-play export written here, through :func:`read_export`, the reader ``convlens labels`` uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from convlens.labels.export import read_export
from labels_helpers import make_play, make_round, write_export


def _read_one(tmp_path: Path, **changes: Any) -> tuple[Any, str | None]:
    """The play (or None) and the invalid-row reason (or None) of a one-play export with ``changes``."""
    r = make_round("A", 0, 0, "tench", n_layers=1)
    play = {**make_play("p", r, "win", 1, "fins"), **changes}
    export = read_export(write_export(tmp_path / "e", [r], [play]))
    assert len(export.plays) + len(export.invalid) == 1  # never dropped silently
    return (export.plays[0] if export.plays else None), (export.invalid[0].reason if export.invalid else None)


@pytest.mark.parametrize(("changes", "reason"), [
    ({"level": 6}, "invalid row: level 6 is outside the reveal-level indices 0..5"),
    ({"level": -1}, "invalid row: level -1 is outside the reveal-level indices 0..5"),
    ({"level": "high"}, "invalid row: level 'high' is not a reveal-level index 0..5"),
    ({"outcome": "win", "correct": False}, "invalid row: outcome win contradicts correct='false'"),
    ({"outcome": "lose", "guessed_class": "church", "correct": True},
     "invalid row: outcome lose contradicts correct='true'"),
    ({"outcome": "win", "guessed_class": ""}, "invalid row: outcome win without guessed_class"),
    ({"outcome": "lose", "guessed_class": "", "correct": False}, "invalid row: outcome lose without guessed_class"),
    # correct inferred from guessed == true_class, then checked against the outcome
    ({"outcome": "lose", "guessed_class": "tench", "correct": None},
     "invalid row: outcome lose contradicts correct=''"),
    ({"outcome": "win", "guessed_class": "church", "correct": None},
     "invalid row: outcome win contradicts correct=''"),
])
def test_invalid_plays_are_kept_with_their_reason(tmp_path: Path, changes: dict[str, Any], reason: str) -> None:
    play, found = _read_one(tmp_path, **changes)
    assert play is None and found == reason


@pytest.mark.parametrize(("changes", "correct", "level"), [
    ({"outcome": "win", "guessed_class": "tench", "correct": None}, True, 1),  # inferred: guessed == true class
    ({"outcome": "lose", "guessed_class": "church", "correct": None}, False, 1),  # inferred: a different class
    ({"outcome": "lose", "guessed_class": "church", "correct": False, "level": 5}, False, 5),
    ({"outcome": "win", "level": "0.0"}, True, 0),  # a float-looking level from a spreadsheet
    ({"outcome": "resign", "guessed_class": "", "correct": None}, None, 1),  # no guess: correct stays unknown
])
def test_valid_plays_and_the_inferred_correct(tmp_path: Path, changes: dict[str, Any], correct: bool | None,
                                              level: int) -> None:
    play, found = _read_one(tmp_path, **changes)
    assert found is None and play is not None
    assert (play.correct, play.level) == (correct, level)
