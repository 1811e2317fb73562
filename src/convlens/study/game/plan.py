"""A participant's quota, planned at consent: nobody is admitted who cannot finish, nobody is paid for less.

*Quota* (:class:`Quota`): the rounds a participant must finish (win, lose or resign) for the completion
code; ``gold`` of them are gold rounds (``round(gold_rate x quota)``, at least one when the study has gold
rounds and a positive rate), at random positions. ``study.json``'s ``quota`` must be one a participant can
finish in an empty study (:func:`resolve_quota`); the former ``rounds_per_player`` is read as an upper bound.

*Items*: what a participant may have at most once — an image with ``one_round_per_image`` (the default: the
end of a play shows its image whole), else a round. *Open slots*: per item, the unused plays-per-round slots
of its non-gold rounds.

*Plan* (:func:`plan_rounds`): at consent the server claims the whole quota in one transaction — a slot of a
non-gold round per normal position (the assignment policy picks) and a gold round per gold position (no cap;
those whose image has the fewest open slots, so that gold does not block them) — as planned rounds. If the
study cannot give the quota, nothing is claimed and the newcomer sees "this study is full" before any play.
Planned slots are released when the participant's lease runs out (:mod:`.actions`).

*Capacity* (:func:`capacity`): how many more participants the study can take now. k participants can each be
given n = quota - gold distinct normal items and ``gold`` distinct gold items exactly when
``sum_i min(s_i, k) >= k n`` over the open slots s_i, the images that also carry a gold round contributing at
most ``k (|gold items| - gold)`` of that sum, and ``|gold items| >= gold``: a participant takes an item at
most once, so an item serves at most k of them (Gale's condition for bipartite b-matchings).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import bindparam, select, text, update
from sqlalchemy.orm import Session

from convlens.study.game.assignment import AssignmentPolicy, Candidate, PastPlay, seeded
from convlens.study.store.config import RoundSpec, StudyConfig
from convlens.study.store.db import Participant, PlannedRound, Play, Round

__all__ = ["DEFAULT_QUOTA", "Quota", "StudyFullError", "capacity", "claim", "item_key", "lock_rounds", "open_slots",
           "plan_rounds", "release", "resolve_quota", "swap_at_start"]

DEFAULT_QUOTA = 20
RUNNING = ("active", "guessed")
COUNTED = ("active", "guessed", "win", "lose", "resign")  # plays that fill a position of the quota


class StudyFullError(Exception):
    """The study cannot give this participant a full quota now."""


@dataclass(frozen=True, kw_only=True)
class Quota:
    """Rounds a participant must finish (``total``), of which ``gold`` are gold rounds."""

    total: int
    gold: int

    @property
    def normal(self) -> int:
        return self.total - self.gold


def item_key(spec: RoundSpec | Round, per_image: bool) -> str:
    """What a participant may have once: the round's image (``one_round_per_image``) or the round."""
    return spec.image_id if per_image else (spec.round_id if isinstance(spec, RoundSpec) else spec.id)


def gold_count(total: int, rate: float, gold_items: int) -> int:
    if rate <= 0 or gold_items == 0:
        return 0
    return min(gold_items, total - 1, max(1, round(rate * total)))


def _fits(total: int, rate: float, normal_items: set[str], gold_items: set[str]) -> Quota | None:
    gold = gold_count(total, rate, len(gold_items))
    quota = Quota(total=total, gold=gold)
    if quota.normal < 1 or quota.normal > len(normal_items) or total > len(normal_items | gold_items):
        return None
    return quota


def resolve_quota(config: StudyConfig, rounds: Iterable[RoundSpec]) -> Quota:
    """The study's quota: ``quota`` (refused with ``ValueError`` if no participant could finish it even in an
    empty study), else the largest one up to ``rounds_per_player`` (else :data:`DEFAULT_QUOTA`) that fits."""
    per_image = config.one_round_per_image
    specs = list(rounds)
    normal = {item_key(r, per_image) for r in specs if not r.gold}
    gold = {item_key(r, per_image) for r in specs if r.gold}
    if config.quota is not None:
        found = _fits(config.quota, config.gold_rate, normal, gold)
        if found is None:
            unit = "images" if per_image else "rounds"
            raise ValueError(f"quota {config.quota} cannot be finished: a participant can play at most "
                             f"{len(normal | gold)} {unit} ({len(normal)} with a cluster round"
                             f"{', one round per image' if per_image else ''}) and needs at least one cluster "
                             "round; lower the quota")
        return found
    wanted = min(config.rounds_per_player or DEFAULT_QUOTA, max(1, len(normal | gold)))
    for total in range(wanted, 0, -1):
        found = _fits(total, config.gold_rate, normal, gold)
        if found is not None:
            return found
    raise ValueError("the study has no cluster round to play")


def open_slots(session: Session, config: StudyConfig) -> dict[str, int]:
    """item -> unused plays-per-round slots of its non-gold rounds (items without any left out)."""
    cap = config.plays_per_round
    item = Round.image_id if config.one_round_per_image else Round.id
    slots: dict[str, int] = {}
    for key, assigned in session.execute(select(item, Round.assigned).where(~Round.gold, Round.assigned < cap)):
        slots[key] = slots.get(key, 0) + cap - assigned
    return slots


def _normal_capacity(slots: Mapping[str, int], gold_items: set[str], quota: Quota, k: int) -> int:
    plain = sum(min(s, k) for item, s in slots.items() if item not in gold_items)
    shared = sum(min(s, k) for item, s in slots.items() if item in gold_items)
    return plain + min(shared, k * (len(gold_items) - quota.gold))


def capacity(slots: Mapping[str, int], gold_items: set[str], quota: Quota) -> int:
    """How many more participants can each be given a full quota (see the module docstring)."""
    if len(gold_items) < quota.gold:
        return 0
    low, high = 0, sum(slots.values()) // quota.normal
    while low < high:  # the largest k that fits: the condition holds for every smaller k
        k = (low + high + 1) // 2
        if _normal_capacity(slots, gold_items, quota, k) >= k * quota.normal:
            low = k
        else:
            high = k - 1
    return low


ROUNDS_LOCK = 0x636F6E766C656E73  # "convlens": the advisory lock of transactions that change several rounds


def lock_rounds(session: Session) -> None:
    """Serialise the transactions that claim or release several rounds (planning, swapping, expiring): on
    PostgreSQL a transaction-scoped advisory lock, so that two of them never wait on each other's rows
    (a deadlock); SQLite runs one writer at a time anyway."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ROUNDS_LOCK})


_ROUNDS = Round.__table__
_CLAIM = (update(_ROUNDS).where(_ROUNDS.c.id == bindparam("b_round"), _ROUNDS.c.assigned < bindparam("b_cap"))
          .values(assigned=_ROUNDS.c.assigned + 1))
_CLAIM_GOLD = update(_ROUNDS).where(_ROUNDS.c.id == bindparam("b_round")).values(assigned=_ROUNDS.c.assigned + 1)
_RELEASE = update(_ROUNDS).where(_ROUNDS.c.id == bindparam("b_round")).values(assigned=_ROUNDS.c.assigned - 1)


def claim(session: Session, round_id: str, cap: int | None) -> bool:
    """One more play of ``round_id`` (under ``cap`` when given), atomically; False when the round is full."""
    if cap is None:
        return session.execute(_CLAIM_GOLD, {"b_round": round_id}).rowcount == 1
    return session.execute(_CLAIM, {"b_round": round_id, "b_cap": cap}).rowcount == 1


def release(session: Session, round_id: str) -> None:
    """Give a planned or abandoned play's slot back."""
    session.execute(_RELEASE, {"b_round": round_id})


def _history(session: Session, cap: int, also: tuple[str, ...] = ()) -> dict[str, list[PastPlay]]:
    """Finished plays of the non-gold rounds still under their cap (and of the rounds ``also``), in play order."""
    open_rounds = (Round.assigned < cap) | Round.id.in_(also) if also else Round.assigned < cap
    query = (select(Play.round_id, Play.state, Play.level, Play.description).join(Round, Play.round_id == Round.id)
             .where(~Round.gold, open_rounds, Play.state.in_(("win", "lose", "resign")))
             .order_by(Play.id))
    history: dict[str, list[PastPlay]] = {}
    for round_id, state, level, description in session.execute(query):
        history.setdefault(round_id, []).append(PastPlay(state, level, description))
    return history


def _candidates(session: Session, config: StudyConfig, policy: AssignmentPolicy, exclude_rounds: set[str],
                exclude_items: set[str]) -> list[Candidate]:
    """Non-gold rounds under their cap, not among ``exclude_rounds`` nor of ``exclude_items``."""
    per_image, cap = config.one_round_per_image, config.plays_per_round
    slots = open_slots(session, config)
    history = _history(session, cap) if policy.needs_history else {}
    rows = session.execute(select(Round.id, Round.assigned, Round.cluster_id, Round.image_id, Round.layer,
                                  Round.true_class).where(~Round.gold, Round.assigned < cap))
    found = []
    for round_id, assigned, cluster_id, image_id, layer, true_class in rows:
        item = image_id if per_image else round_id
        if round_id in exclude_rounds or item in exclude_items:
            continue
        found.append(Candidate(round_id, False, assigned, cluster_id, image_id, layer, true_class,
                               tuple(history.get(round_id, ())), slots.get(item, 0)))
    return found


def _taken(session: Session, participant: Participant, rounds: Mapping[str, RoundSpec],
           per_image: bool) -> tuple[set[str], set[str]]:
    """(round ids, items) the participant already has: planned or played rounds, and their items — except the
    image of an abandoned play, which never showed its answer (the abandoned round itself stays excluded)."""
    states = dict(session.execute(select(Play.round_id, Play.state).where(Play.participant_id == participant.id)).all())
    planned = set(session.scalars(select(PlannedRound.round_id).where(PlannedRound.participant_id == participant.id)))
    shown = {r for r, state in states.items() if state != "abandoned"} | planned
    return set(states) | planned, {item_key(rounds[r], per_image) for r in shown}


def _pick_normal(session: Session, config: StudyConfig, policy: AssignmentPolicy, participant: Participant,
                 candidates: list[Candidate], tag: tuple[object, ...]) -> Candidate | None:
    """Ask the policy and claim its pick; a failed claim (another player took the last slot) drops that
    candidate and the policy is asked again, until a claim succeeds or none is left."""
    attempt = 0
    while candidates:
        rng = seeded(config.assignment_seed, participant.id, *tag, attempt)
        chosen = policy.choose(candidates, rng, participant.public_id)
        if claim(session, chosen.round_id, config.plays_per_round):
            return chosen
        candidates = [c for c in candidates if c.round_id != chosen.round_id]
        attempt += 1
    return None


def plan_rounds(session: Session, *, config: StudyConfig, rounds: Mapping[str, RoundSpec], policy: AssignmentPolicy,
                participant: Participant, normal: int, gold: int, first_position: int,
                plan_number: int) -> list[PlannedRound]:
    """Claim ``normal`` non-gold and ``gold`` gold rounds for ``participant`` and add them as planned rounds at
    positions ``first_position ...`` (gold at random positions, the rest shuffled). Raises
    :class:`StudyFullError` when the study cannot give them (the caller's transaction is then rolled back)."""
    lock_rounds(session)
    per_image = config.one_round_per_image
    played, items = _taken(session, participant, rounds, per_image)
    slots = open_slots(session, config)
    gold_pool = sorted((slots.get(item_key(spec, per_image), 0), spec.round_id) for spec in rounds.values()
                       if spec.gold and spec.round_id not in played)
    rng = seeded(config.assignment_seed, participant.id, "plan", plan_number)
    rng.shuffle(gold_pool)
    gold_pool.sort(key=lambda entry: entry[0])  # fewest open slots first, ties in random order
    gold_ids: list[str] = []
    for _, round_id in gold_pool:
        item = item_key(rounds[round_id], per_image)
        if len(gold_ids) < gold and item not in items:
            gold_ids.append(round_id)
            items.add(item)
            claim(session, round_id, None)
    if len(gold_ids) < gold:
        raise StudyFullError(f"only {len(gold_ids)} of {gold} gold rounds left for this participant")
    normal_ids: list[str] = []
    candidates = _candidates(session, config, policy, played, items) if normal else []
    for pick in range(normal):
        chosen = _pick_normal(session, config, policy, participant, candidates, ("plan", plan_number, pick))
        if chosen is None:
            raise StudyFullError(f"only {len(normal_ids)} of {normal} cluster rounds left for this participant")
        normal_ids.append(chosen.round_id)
        item = item_key(rounds[chosen.round_id], per_image)
        candidates = [c for c in candidates if item_key(rounds[c.round_id], per_image) != item]
    return _place(session, participant, normal_ids, gold_ids, first_position, rng)


def _place(session: Session, participant: Participant, normal_ids: list[str], gold_ids: list[str],
           first_position: int, rng: random.Random) -> list[PlannedRound]:
    total = len(normal_ids) + len(gold_ids)
    gold_positions = set(rng.sample(range(total), len(gold_ids)))
    rng.shuffle(normal_ids)
    normal_iter, gold_iter = iter(normal_ids), iter(gold_ids)
    planned = []
    for index in range(total):
        round_id = next(gold_iter) if index in gold_positions else next(normal_iter)
        planned.append(PlannedRound(participant_id=participant.id, round_id=round_id,
                                    position=first_position + index))
    session.add_all(planned)
    return planned


def swap_at_start(session: Session, *, config: StudyConfig, rounds: Mapping[str, RoundSpec], policy: AssignmentPolicy,
                  participant: Participant, planned: PlannedRound) -> PlannedRound:
    """For an adaptive policy (``needs_history``): when a planned non-gold round is due, ask the policy again,
    with the history of now, among the participant's planned non-gold rounds and the open rounds of items
    still free for them. A planned pick swaps positions with the due one; a free pick is claimed and takes
    the due one's place, whose slot is released (the quota stays guaranteed). Returns the round to start."""
    lock_rounds(session)
    per_image = config.one_round_per_image
    played, items = _taken(session, participant, rounds, per_image)
    mine = [p for p in session.scalars(select(PlannedRound).where(PlannedRound.participant_id == participant.id))
            if not rounds[p.round_id].gold]
    candidates = _candidates(session, config, policy, played, items)
    history = _history(session, config.plays_per_round, also=tuple(p.round_id for p in mine))
    for entry in mine:
        spec = rounds[entry.round_id]
        candidates.append(Candidate(spec.round_id, False, 0, spec.cluster_id, spec.image_id, spec.layer,
                                    spec.true_class, tuple(history.get(spec.round_id, ())), 0))
    by_round = {entry.round_id: entry for entry in mine}
    attempt = 0
    while candidates:
        rng = seeded(config.assignment_seed, participant.id, "start", planned.position, attempt)
        chosen = policy.choose(candidates, rng, participant.public_id)
        if chosen.round_id in by_round:
            other = by_round[chosen.round_id]
            other.position, planned.position = planned.position, other.position
            return other
        if claim(session, chosen.round_id, config.plays_per_round):
            release(session, planned.round_id)
            planned.round_id = chosen.round_id
            return planned
        candidates = [c for c in candidates if c.round_id != chosen.round_id]
        attempt += 1
    return planned
