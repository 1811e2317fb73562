"""Which rounds a participant plays: a pluggable policy behind a small interface.

At consent the server plans the participant's whole quota (:mod:`convlens.study.game.plan`): it claims one
slot of a non-gold round per normal position, asking the policy each time to pick among the *eligible*
rounds — not yet played or planned by this participant, with ``one_round_per_image`` (the default) not of
an image the participant already has (the end of a play shows the answer), and assigned fewer than
``plays_per_round`` times — with a random generator seeded by (study seed, participant number, position,
retry), so every assignment can be replayed for an audit (the participant number is the participant's
database row id, in order of registration: a replay of the same players in the same order — e.g. the
simulated crowd of :mod:`convlens.crowd.play` — gets the same assignments). Each pick is claimed
atomically (``UPDATE rounds SET assigned = assigned + 1 WHERE assigned < cap``), so concurrent players
never push a round past its cap; if the claim fails the policy is asked again without that round, for as
long as candidates remain. Gold rounds are placed by the planner itself (a study-set share of every
quota, at random positions), never by the policy.

Policies: ``uniform`` (:class:`UniformPolicy`: every eligible round of the images with the most open slots
equally likely, so the slots run out evenly and the last participants can still be given a full quota)
and ``least-settled`` (:class:`LeastSettledPolicy`: the next play goes to the round where one more play is
worth most, by the measure of :mod:`convlens.study.game.settle`; being adaptive, it is asked again when
each planned play starts, with the history of that moment). A new policy subclasses
:class:`AssignmentPolicy` (``needs_history = True`` to receive each candidate's finished plays and to be
asked again at the start of each play) and registers itself with :func:`register_policy`;
``study.json``'s ``assignment_policy`` names it.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from convlens.study.game.settle import RoundEvidence

__all__ = [
    "POLICIES",
    "AssignmentPolicy",
    "Candidate",
    "LeastSettledPolicy",
    "PastPlay",
    "UniformPolicy",
    "get_policy",
    "participant_rng",
    "register_policy",
    "seeded",
]


@dataclass(frozen=True)
class PastPlay:
    """A finished play of a round: outcome (win | lose | resign), reveal level, description (or None)."""

    outcome: str
    level: int
    description: str | None = None


@dataclass(frozen=True)
class Candidate:
    """An eligible round as the policy sees it (``history`` only for policies that need it)."""

    round_id: str
    gold: bool
    assigned: int
    cluster_id: str | None
    image_id: str
    layer: str | None
    true_class: str | None = None
    history: tuple[PastPlay, ...] = ()
    image_open: int = 0  # open slots of the candidate's image (its round, without one_round_per_image)


class AssignmentPolicy(ABC):
    """Chooses the next round among eligible candidates (never empty when called)."""

    name: str = ""
    needs_history: bool = False

    @abstractmethod
    def choose(self, candidates: Sequence[Candidate], rng: random.Random, participant: str) -> Candidate:
        """Return one of ``candidates``; ``rng`` is seeded per participant and play number."""


class UniformPolicy(AssignmentPolicy):
    """Every eligible round of the images with the most open slots equally likely (the planner shuffles the
    quota's order): slots run out evenly over the images, so a full quota of distinct images stays possible
    for as many participants as the caps allow."""

    name = "uniform"

    def choose(self, candidates: Sequence[Candidate], rng: random.Random, participant: str) -> Candidate:
        most = max(c.image_open for c in candidates)
        ordered = sorted((c for c in candidates if c.image_open == most), key=lambda c: c.round_id)
        return ordered[rng.randrange(len(ordered))]  # sorted: independent of database row order


class LeastSettledPolicy(AssignmentPolicy):
    """The next play goes to the round where one more description can do most for its label (the optimistic
    knowledge gradient of its leading word vs its rival), weighted by the chance that a play gives a
    description at all (:func:`convlens.study.game.settle.play_value`); ties (e.g. all unplayed rounds) go to
    the round assigned least, then at random. Gold candidates (the server's planner never passes any: it
    places gold rounds itself) are mixed in at the uniform rate: with probability ``gold candidates /
    candidates`` a random gold round.

    The plays-per-round cap still bounds every round; the policy decides where the plays go first, so
    a study that stops at a budget of plays (participants x rounds per player) spends it on the rounds
    that need it.
    """

    name = "least-settled"
    needs_history = True
    drop_hedges = True

    def evidence(self, candidate: Candidate) -> RoundEvidence:
        return _evidence(candidate.history, candidate.true_class or "", self.drop_hedges)

    def values(self, candidates: Sequence[Candidate]) -> dict[str, float]:
        """round id -> value of one more play (:func:`convlens.study.game.settle.play_value`), the description
        rate taken over ``candidates``."""
        from convlens.study.game.settle import description_rate, play_value

        evidence = {c.round_id: self.evidence(c) for c in candidates}
        rate = description_rate(evidence.values())
        return {round_id: play_value(e, rate) for round_id, e in evidence.items()}

    def choose(self, candidates: Sequence[Candidate], rng: random.Random, participant: str) -> Candidate:
        ordered = sorted(candidates, key=lambda c: c.round_id)
        gold = [c for c in ordered if c.gold]
        normal = [c for c in ordered if not c.gold]
        if not normal or (gold and rng.random() < len(gold) / len(ordered)):
            return gold[rng.randrange(len(gold))]
        values = self.values(normal)
        top = max(values.values())
        best = [c for c in normal if values[c.round_id] >= top - 1e-12]
        fewest = min(c.assigned for c in best)
        best = [c for c in best if c.assigned == fewest]
        return best[rng.randrange(len(best))]


@lru_cache(maxsize=100_000)
def _evidence(history: tuple[PastPlay, ...], class_name: str, drop_hedges: bool) -> RoundEvidence:
    """A round's evidence, memoised on its (immutable) history: a round is recomputed only when one of its
    plays ended or was described since the last assignment."""
    from convlens.study.game.settle import round_evidence

    return round_evidence(((p.outcome, p.level, p.description) for p in history), class_name, drop_hedges)


POLICIES: dict[str, Callable[[], AssignmentPolicy]] = {"uniform": UniformPolicy,
                                                       "least-settled": LeastSettledPolicy}


def register_policy(name: str, factory: Callable[[], AssignmentPolicy]) -> None:
    POLICIES[name] = factory


def get_policy(name: str) -> AssignmentPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown assignment policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name]()


def seeded(*parts: object) -> random.Random:
    """A generator seeded by SHA-256 of the parts joined by ``:`` (stable across runs and Python hash seeds);
    the one seeding rule of the study server's assignments and of the simulated crowd."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def participant_rng(seed: int, participant: str | int, play_number: int, attempt: int = 0) -> random.Random:
    """Deterministic generator for one assignment (study seed, participant number, play number, retry)."""
    return seeded(seed, participant, play_number, attempt)
