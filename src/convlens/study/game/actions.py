"""The rules of Deep Reveal, one database transaction per player action.

Every action locks the participant's row first (``SELECT ... FOR UPDATE``; on SQLite every writing
transaction is ``BEGIN IMMEDIATE``), so one participant's requests are applied one at a time in a
well-defined order; each action appends one row to ``events`` with the client's request id and what the
player had on screen, and a request repeated with the same id is answered from the stored state instead
of being applied twice.

A play: ``start`` (the next planned round of the quota, :mod:`convlens.study.game.plan`) -> ``reveal``\\* ->
``guess`` (recorded; the answer stays hidden) -> ``describe`` or ``skip`` — asked with the last reveal level
still on screen, so the words say what led to the guess — -> the answer and the full image; or ``resign``
(the answer at once). Nothing about the answer (class, correctness, points, a changed total) reaches the
browser before the play ends.

Lease: each action keeps the participant's lease ``lease_seconds`` ahead. When it runs out
(:meth:`StudyRuntime.sweep`, or the participant's next request) a running play is recorded as
``abandoned`` and its slot goes back, a guess still waiting for its description counts without one, and the
planned rounds are released; a participant who comes back later gets a new plan if the study can still
give the rest of the quota, else an end screen without the code. Within the lease, a returning player
continues the same play.

Scoring rule (:data:`SCORING_RULE`): a correct guess at reveal level k (0..5) earns ``100 - 10 k``
points (100 at 2 % revealed ... 50 at 30 %), mirroring the INV label weight ``1 - 0.1 k``; a wrong guess
and a resign earn 0; descriptions earn nothing, so that the text is never written for points. Gold rounds
are scored like any round (nothing tells them apart but their content).
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from convlens.study.game.assignment import AssignmentPolicy
from convlens.study.game.plan import (
    COUNTED,
    RUNNING,
    Quota,
    StudyFullError,
    capacity,
    item_key,
    lock_rounds,
    open_slots,
    plan_rounds,
    release,
    swap_at_start,
)
from convlens.study.store.config import RoundSpec, StudyConfig, StudyFiles
from convlens.study.store.db import Event, Participant, PlannedRound, Play, utcnow

__all__ = ["ALREADY_REGISTERED", "PLAYER_SCORING", "SCORING_RULE", "STUDY_FULL", "GameError", "StudyRuntime",
           "aware", "hash_token", "points_for"]

SCORING_RULE = ("correct guess at reveal level k (0..5): 100 - 10*k points; wrong guess: 0; resign: 0; "
                "descriptions: 0 (not rewarded, so that they are not written for points)")
PLAYER_SCORING = ("A correct guess earns 100 points at step 1 and 10 fewer for each extra step; a wrong guess or "
                  "giving up earns nothing.")
ALREADY_REGISTERED = ("this Prolific id has already taken part in the study: each participant may play it once "
                      "(if this is a mistake, contact the researchers through Prolific)")
STUDY_FULL = "this study is full: it cannot give a new participant all of their rounds"
EXPIRED = "this round expired after {minutes} without activity; a new round is ready"
ENDED = ("finished", "win", "lose", "resign")


class GameError(Exception):
    """A request the rules refuse: HTTP ``status`` and a message for the player."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def points_for(correct: bool, level: int) -> int:
    return 100 - 10 * level if correct else 0


def aware(moment: datetime) -> datetime:
    """A database time as an aware UTC datetime (SQLite hands back naive UTC times)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _minutes(seconds: int) -> str:
    return f"{seconds // 60} minutes" if seconds >= 120 else f"{seconds} seconds"


@dataclass
class StudyRuntime:
    """What the server knows about its study: settings, rounds, quota, policy, session factories, clock."""

    config: StudyConfig
    files: StudyFiles
    rounds: dict[str, RoundSpec]
    policy: AssignmentPolicy
    writer: sessionmaker
    reader: sessionmaker
    quota: Quota
    write_lock: Any = field(default_factory=contextlib.nullcontext)
    clock: Callable[[], datetime] = utcnow
    known_tokens: set[str] = field(default_factory=set)  # hashes of registered sessions (they never go away)

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """One writing transaction. On SQLite the process's writers queue on a lock (held through the
        commit) instead of SQLite's busy handler, which sleeps 1, 2, 5, 10... ms between retries."""
        with self.write_lock, self.writer.begin() as session:
            yield session

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.config.lease_seconds)

    @property
    def gold_items(self) -> set[str]:
        return {item_key(r, self.config.one_round_per_image) for r in self.rounds.values() if r.gold}

    def capacity(self, session: Session) -> int:
        """How many more participants the study can give a full quota now."""
        return capacity(open_slots(session, self.config), self.gold_items, self.quota)

    # ------------------------------------------------------------------ participants
    def register(self, consent_version: str, nickname: str | None, params: dict[str, str | None]) -> tuple[str, str]:
        """New pseudonymous participant with the whole quota planned; returns (public id, session token).

        The token is stored hashed. A Prolific participant id registers once (409: the earlier session
        token is never handed out again, since anyone who knows a PID could take that session over; the
        unique index of migration 0002 backs the check against concurrent registrations). A study that
        cannot give the quota answers 409 :data:`STUDY_FULL` and registers nobody."""
        if consent_version != self.config.consent_version:
            raise GameError(409, "the consent text changed; reload the page and read it again")
        self.sweep()
        token = secrets.token_urlsafe(32)
        public_id = secrets.token_hex(8)
        prolific_pid = params.get("prolific_pid")
        now = self.clock()
        try:
            with self.write() as session:
                taken = select(Participant.id).where(Participant.prolific_pid == prolific_pid)
                if prolific_pid and session.scalar(taken) is not None:
                    raise GameError(409, ALREADY_REGISTERED)
                participant = Participant(
                    public_id=public_id, token_hash=hash_token(token), nickname=nickname, prolific_pid=prolific_pid,
                    study_id_param=params.get("study_id"), session_id_param=params.get("session_id"),
                    consent_version=consent_version, created_at=now, score=0, plays=0, wins=0, gold_plays=0,
                    gold_correct=0, quota=self.quota.total, lease_expires_at=now + self.lease)
                session.add(participant)
                session.flush()
                self._plan(session, participant, self.quota.normal, self.quota.gold, 1, 0)
        except IntegrityError as exc:  # a concurrent registration with the same PID won the race
            if prolific_pid:
                raise GameError(409, ALREADY_REGISTERED) from exc
            raise
        except StudyFullError:
            raise GameError(409, STUDY_FULL) from None
        self.known_tokens.add(hash_token(token))
        return public_id, token

    def _plan(self, session: Session, participant: Participant, normal: int, gold: int, first: int,
              number: int) -> None:
        plan_rounds(session, config=self.config, rounds=self.rounds, policy=self.policy, participant=participant,
                    normal=normal, gold=gold, first_position=first, plan_number=number)

    def participant(self, session: Session, token: str | None, lock: bool = False) -> Participant:
        if not token:
            raise GameError(401, "no participant session: start on the consent page")
        query = select(Participant).where(Participant.token_hash == hash_token(token))
        participant = session.scalar(query.with_for_update() if lock else query)
        if participant is None:
            raise GameError(401, "unknown participant session: start on the consent page")
        return participant

    def known_participant(self, token: str | None) -> bool:
        """Whether the session token belongs to a participant (registered tokens are remembered in-process)."""
        if not token:
            return False
        digest = hash_token(token)
        if digest in self.known_tokens:
            return True
        with self.reader.begin() as session:
            found = session.scalar(select(Participant.id).where(Participant.token_hash == digest)) is not None
        if found:
            self.known_tokens.add(digest)
        return found

    # ------------------------------------------------------------------ leases
    def sweep(self, now: datetime | None = None, limit: int = 200) -> int:
        """Expire the leases that ran out (each participant in its own short transaction); returns how many."""
        now = now or self.clock()
        with self.reader.begin() as session:
            due = list(session.scalars(select(Participant.id).where(Participant.lease_expires_at < now)
                                       .order_by(Participant.lease_expires_at).limit(limit)))
        for participant_id in due:
            with self.write() as session:
                participant = session.scalar(select(Participant).where(Participant.id == participant_id)
                                             .with_for_update())
                if participant.lease_expires_at is not None and aware(participant.lease_expires_at) < now:
                    self._expire(session, participant, now)
        return len(due)

    def _expire(self, session: Session, participant: Participant, now: datetime) -> None:
        """The lease ran out: release the planned rounds, abandon a running play (slot back), count a guess
        that waited for its description without one."""
        lock_rounds(session)
        planned = list(session.scalars(select(PlannedRound).where(PlannedRound.participant_id == participant.id)))
        for entry in planned:
            release(session, entry.round_id)
        session.execute(delete(PlannedRound).where(PlannedRound.participant_id == participant.id))
        running = list(session.scalars(select(Play).where(Play.participant_id == participant.id,
                                                          Play.state.in_(RUNNING)).with_for_update()))
        for play in running:
            if play.state == "guessed":
                self._finish(session, participant, play, "win" if play.correct else "lose", now)
            else:
                release(session, play.round_id)
                play.state, play.ended_at, play.image_token = "abandoned", now, None
            self._event(session, play, "expire", str(uuid.uuid4()), now)
        participant.lease_expires_at = None

    def _renew(self, participant: Participant, now: datetime) -> None:
        participant.lease_expires_at = None if participant.completed_at else now + self.lease

    def _lapsed(self, session: Session, participant: Participant, now: datetime) -> bool:
        """Expire the participant's own lease if it ran out (True then)."""
        if participant.lease_expires_at is not None and aware(participant.lease_expires_at) < now:
            self._expire(session, participant, now)
            return True
        return False

    # ------------------------------------------------------------------ plays
    def _own_play(self, session: Session, participant: Participant, play_id: str) -> Play:
        play = session.scalar(select(Play).where(Play.public_id == play_id).with_for_update())
        if play is None:
            raise GameError(404, "unknown play")
        if play.participant_id != participant.id:
            raise GameError(403, "this play belongs to another participant")
        return play

    def _replayed(self, session: Session, participant: Participant, request_id: str, kind: str,
                  play: Play | None) -> Event | None:
        query = select(Event).where(Event.participant_id == participant.id, Event.request_id == request_id)
        previous = session.scalar(query)
        if previous is not None and (previous.type != kind or (play is not None and previous.play_id != play.id)):
            raise GameError(409, "this request id was already used for another action")
        return previous

    def _event(self, session: Session, play: Play, kind: str, request_id: str, now: datetime, **fields: Any) -> None:
        session.add(Event(play_id=play.id, participant_id=play.participant_id, round_id=play.round_id, type=kind,
                          level=play.level, request_id=request_id, created_at=now, screen="level", **fields))

    def revealed(self, play: Play) -> float:
        """Percentage of the image's pixels revealed at the play's level (gold rounds: their own levels)."""
        levels = self.config.gold_percentages if self.rounds[play.round_id].gold else self.config.reveal_percentages
        return levels[play.level]

    def view(self, play: Play, participant: Participant, **extra: Any) -> dict[str, Any]:
        """What the browser may know: never the class, the correctness, the points or the full image before
        the play ends; gold and cluster rounds look alike (their revealed share is what is on screen)."""
        running = play.state in ("active", "guessed")
        body: dict[str, Any] = {
            "play": play.public_id, "state": play.state, "level": play.level, "levels": self.config.levels,
            "revealed": self.revealed(play), "image": f"/img/{play.image_token}",
            "round_number": participant.plays + 1 if running else participant.plays,
            "rounds_total": participant.quota or self.quota.total, "score": participant.score, **extra,
        }
        if play.state == "guessed":
            body["guessed_class"] = play.guessed_class  # the player's own choice, not the answer
        elif play.state in ENDED:
            body |= {"true_class": self.rounds[play.round_id].true_class, "guessed_class": play.guessed_class,
                     "correct": play.correct, "points": play.score, "described": play.description is not None}
        return body

    def done_view(self, participant: Participant) -> dict[str, Any]:
        """The end screen: the completion code only for a participant who finished the quota."""
        if participant.completed_at is None:
            return {"done": True, "completed": False, "score": participant.score,
                    "message": "Your session expired and the study has since filled up, so it cannot give you the "
                               "rest of your rounds. No completion code can be given; please return the study."}
        return {"done": True, "completed": True, "score": participant.score,
                "completion_code": self.config.completion_code, "completion_url": self.config.completion_url}

    def completed(self, token: str | None) -> bool:
        """Whether the session's participant finished the quota (the ``/done`` page's check)."""
        with self.reader.begin() as session:
            try:
                return self.participant(session, token).completed_at is not None
            except GameError:
                return False

    def next_play(self, token: str | None, request_id: str) -> dict[str, Any]:
        """The participant's running play (resumed), the next planned round, or ``done``."""
        with self.write() as session:
            now = self.clock()
            participant = self.participant(session, token, lock=True)
            expired = self._lapsed(session, participant, now)
            running = session.scalar(select(Play).where(Play.participant_id == participant.id,
                                                        Play.state.in_(RUNNING)))
            if running is not None:
                self._renew(participant, now)
                return self.view(running, participant, resumed=True)
            previous = self._replayed(session, participant, request_id, "start", None)
            if previous is not None:
                return self.view(session.get(Play, previous.play_id), participant, resumed=True)
            if participant.plays >= (participant.quota or self.quota.total):
                participant.completed_at = participant.completed_at or now
                participant.lease_expires_at = None
                return self.done_view(participant)
            planned = self._next_planned(session, participant)
            if planned is None:
                participant.lease_expires_at = None
                return self.done_view(participant)
            if self.policy.needs_history and not self.rounds[planned.round_id].gold:
                planned = swap_at_start(session, config=self.config, rounds=self.rounds, policy=self.policy,
                                        participant=participant, planned=planned)
            play = Play(public_id=secrets.token_hex(12), participant_id=participant.id, round_id=planned.round_id,
                        position=planned.position, state="active", level=0, image_token=secrets.token_urlsafe(24),
                        score=0, started_at=now)
            session.delete(planned)
            session.add(play)
            self._renew(participant, now)
            session.flush()
            self._event(session, play, "start", request_id, now)
            return self.view(play, participant, resumed=False, **({"expired": True} if expired else {}))

    def _next_planned(self, session: Session, participant: Participant) -> PlannedRound | None:
        """The first planned round; without one (a lease ran out, or a participant from before migration 0003)
        the rest of the quota is planned now, if the study can still give it (in a savepoint)."""
        query = (select(PlannedRound).where(PlannedRound.participant_id == participant.id)
                 .order_by(PlannedRound.position).limit(1))
        planned = session.scalar(query)
        if planned is not None:
            return planned
        mine = list(session.execute(select(Play.round_id, Play.state, Play.position)
                                    .where(Play.participant_id == participant.id)))
        counted = [r for r, state, _ in mine if state in COUNTED]
        quota = participant.quota or self.quota.total
        need = quota - len(counted)
        gold = min(need, max(0, self.quota.gold - sum(self.rounds[r].gold for r in counted)))
        plans = session.scalar(select(func.count()).select_from(Event).where(
            Event.participant_id == participant.id, Event.type == "expire"))
        try:
            with session.begin_nested():
                self._plan(session, participant, need - gold, gold, 1 + max((p for *_, p in mine), default=0),
                           1 + plans)
        except StudyFullError:
            return None
        return session.scalar(query)

    def _finish(self, session: Session, participant: Participant, play: Play, state: str, now: datetime) -> None:
        spec = self.rounds[play.round_id]
        play.state = state
        play.ended_at = now
        play.image_token = secrets.token_urlsafe(24)
        participant.plays += 1
        participant.wins += int(state == "win")
        participant.score += play.score
        if spec.gold:
            participant.gold_plays += 1
            participant.gold_correct += int(state == "win")
        if participant.plays >= (participant.quota or self.quota.total):
            participant.completed_at = participant.completed_at or now

    def _acting(self, session: Session, token: str | None, play_id: str, request_id: str,
                kind: str) -> tuple[Participant, Play, Event | None, datetime]:
        """Lock the participant and the play; the earlier answer of a repeated request; a lapsed lease."""
        now = self.clock()
        participant = self.participant(session, token, lock=True)
        play = self._own_play(session, participant, play_id)
        previous = self._replayed(session, participant, request_id, kind, play)
        if previous is None and self._lapsed(session, participant, now) and play.state == "abandoned":
            raise GameError(409, EXPIRED.format(minutes=_minutes(self.config.lease_seconds)))
        return participant, play, previous, now

    def reveal(self, token: str | None, play_id: str, request_id: str, level: int) -> dict[str, Any]:
        """Level k -> k+1: recorded (committed) before the new image token is returned."""
        with self.write() as session:
            participant, play, previous, now = self._acting(session, token, play_id, request_id, "reveal")
            if previous is not None:
                return self.view(play, participant)
            if play.state != "active":
                raise GameError(409, "this round is over" if play.state != "guessed" else "you already guessed")
            if level != play.level + 1 or level >= self.config.levels:
                raise GameError(409, f"cannot reveal level {level}: the round is at level {play.level} "
                                     f"of 0..{self.config.levels - 1}")
            play.level = level
            play.image_token = secrets.token_urlsafe(24)
            self._renew(participant, now)
            self._event(session, play, "reveal", request_id, now)
            return self.view(play, participant)

    def guess(self, token: str | None, play_id: str, request_id: str, class_name: str) -> dict[str, Any]:
        """Record the guess (and, hidden, whether it is right); the player is asked for a description next."""
        if class_name not in self.config.classes:
            raise GameError(422, f"unknown class {class_name[:100]!r}: choose one of the study's classes")
        with self.write() as session:
            participant, play, previous, now = self._acting(session, token, play_id, request_id, "guess")
            if previous is not None:
                return self.view(play, participant)
            if play.state != "active":
                raise GameError(409, "this round is over" if play.state != "guessed" else "you already guessed")
            correct = class_name == self.rounds[play.round_id].true_class
            play.guessed_class, play.correct, play.score = class_name, correct, points_for(correct, play.level)
            play.state = "guessed"
            self._renew(participant, now)
            self._event(session, play, "guess", request_id, now, guessed_class=class_name)
            return self.view(play, participant)

    def resign(self, token: str | None, play_id: str, request_id: str) -> dict[str, Any]:
        with self.write() as session:
            participant, play, previous, now = self._acting(session, token, play_id, request_id, "resign")
            if previous is not None:
                return self.view(play, participant)
            if play.state != "active":
                raise GameError(409, "this round is over" if play.state != "guessed" else "you already guessed")
            self._finish(session, participant, play, "resign", now)
            self._renew(participant, now)
            self._event(session, play, "resign", request_id, now)
            return self.view(play, participant)

    def describe(self, token: str | None, play_id: str, request_id: str, text: str, language: str) -> dict[str, Any]:
        """The free-text description, asked after the guess with the last level on screen; ends the play."""
        if language not in self.config.languages:
            raise GameError(422, f"language {language!r} is not one of this study's {self.config.languages}")
        with self.write() as session:
            participant, play, previous, now = self._acting(session, token, play_id, request_id, "describe")
            if previous is not None:
                return self.view(play, participant)
            self._awaiting_description(play)
            play.description, play.language, play.description_screen = text, language, "level"
            self._event(session, play, "describe", request_id, now, text=text, language=language)
            self._finish(session, participant, play, "win" if play.correct else "lose", now)
            self._renew(participant, now)
            return self.view(play, participant)

    def skip(self, token: str | None, play_id: str, request_id: str) -> dict[str, Any]:
        """No description for this guess (recorded as a ``skip`` event); ends the play."""
        with self.write() as session:
            participant, play, previous, now = self._acting(session, token, play_id, request_id, "skip")
            if previous is not None:
                return self.view(play, participant)
            self._awaiting_description(play)
            self._event(session, play, "skip", request_id, now)
            self._finish(session, participant, play, "win" if play.correct else "lose", now)
            self._renew(participant, now)
            return self.view(play, participant)

    @staticmethod
    def _awaiting_description(play: Play) -> None:
        if play.state == "active":
            raise GameError(409, "describe after a guess (not during a round)")
        if play.state != "guessed":
            raise GameError(409, "a description belongs between the guess and the answer: this round is over"
                            if play.state in ENDED else "this round expired")

    def image_path(self, token: str | None, image_token: str) -> Any:
        """File for an image token of the participant's own play: the current level while the play runs (also
        while its description is asked), the full image once it ended."""
        with self.reader.begin() as session:
            participant = self.participant(session, token)
            play = session.scalar(select(Play).where(Play.image_token == image_token))
            if play is None or play.participant_id != participant.id:
                raise GameError(404, "no such image")
            name = f"level{play.level}.png" if play.state in ("active", "guessed") else "full.png"
            return self.files.image(play.round_id, name)
