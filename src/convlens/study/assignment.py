"""Which round a participant plays next: a pluggable policy behind a small interface.

The server computes the *eligible* rounds — not yet played by this participant, and (for non-gold rounds)
assigned fewer than ``plays_per_round`` times — and asks the policy to pick one with a random generator
seeded by (study seed, participant, play number), so every assignment can be replayed for an audit. The
pick is then claimed atomically (``UPDATE rounds SET assigned = assigned + 1 WHERE assigned < cap``), so
concurrent players never push a round past its cap; if the claim fails the policy is asked again.

Gold rounds are eligible for every participant (no cap: each participant's attention is measured) and
compete with the normal rounds on equal terms under the uniform policy, so they are mixed into each
participant's random order at the rate ``gold rounds / eligible rounds``.

A new policy (e.g. one favouring rounds whose labels are least settled) subclasses
:class:`AssignmentPolicy` and registers itself with :func:`register_policy`; ``study.json``'s
``assignment_policy`` names it.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "POLICIES",
    "AssignmentPolicy",
    "Candidate",
    "UniformPolicy",
    "get_policy",
    "participant_rng",
    "register_policy",
]


@dataclass(frozen=True)
class Candidate:
    """An eligible round as the policy sees it."""

    round_id: str
    gold: bool
    assigned: int
    cluster_id: str | None
    image_id: str
    layer: str | None


class AssignmentPolicy(ABC):
    """Chooses the next round among eligible candidates (never empty when called)."""

    name: str = ""

    @abstractmethod
    def choose(self, candidates: Sequence[Candidate], rng: random.Random, participant: str) -> Candidate:
        """Return one of ``candidates``; ``rng`` is seeded per participant and play number."""


class UniformPolicy(AssignmentPolicy):
    """Every eligible round equally likely: a random order per participant, gold rounds mixed in."""

    name = "uniform"

    def choose(self, candidates: Sequence[Candidate], rng: random.Random, participant: str) -> Candidate:
        ordered = sorted(candidates, key=lambda c: c.round_id)  # independent of database row order
        return ordered[rng.randrange(len(ordered))]


POLICIES: dict[str, Callable[[], AssignmentPolicy]] = {"uniform": UniformPolicy}


def register_policy(name: str, factory: Callable[[], AssignmentPolicy]) -> None:
    POLICIES[name] = factory


def get_policy(name: str) -> AssignmentPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown assignment policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name]()


def participant_rng(seed: int, participant: str, play_number: int, attempt: int = 0) -> random.Random:
    """Deterministic generator for one assignment (study seed, participant public id, play number, retry)."""
    digest = hashlib.sha256(f"{seed}:{participant}:{play_number}:{attempt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))
