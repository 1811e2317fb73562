"""The rules of Deep Reveal, one database transaction per player action.

Every action locks the participant's row first (``SELECT ... FOR UPDATE``; on SQLite every writing
transaction is ``BEGIN IMMEDIATE``), so one participant's requests apply one at a time; each appends one row
to ``events`` with the client's request id and what was on screen, and a request repeated with the same id
is answered from the stored state instead of being applied twice.

A play: ``start`` (the next planned round of the quota, :mod:`convlens.study.game.plan`) -> ``reveal`` (any number) ->
``guess`` (recorded; the answer stays hidden) -> ``describe`` or ``skip``, asked with the last reveal level
still on screen so the words say what led to the guess -> the answer and the full image; or ``resign``.
Nothing about the answer (class, correctness, points, a changed total) reaches the browser before the end.

Lease: each action keeps the participant's lease ``lease_seconds`` ahead. When it runs out (:meth:`sweep`,
or the participant's next request) a running play is recorded as ``abandoned`` and its slot goes back, a
guess waiting for its description counts without one, and the planned rounds are released; back later, a
participant gets a new plan if the study can still give the rest of the quota, else an end screen without
the code. Within the lease, a returning player continues the same play.

Scoring (:data:`SCORING_RULE`): a correct guess at reveal level k (0..5) earns ``100 - 10 k`` points,
mirroring the INV label weight ``1 - 0.1 k``; a wrong guess and a resign earn 0; descriptions earn nothing,
so that the text is never written for points. Gold rounds are scored like any round.
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

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
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
ENDED = ("win", "lose", "resign")
LEASE_SLACK = timedelta(seconds=60)
PT, PL, EV = Participant.__table__, Play.__table__, Event.__table__
ME_NAMES = ("id", "public_id", "plays", "wins", "score", "gold_plays", "gold_correct", "quota", "lease_expires_at",
            "completed_at")
ME = tuple(PT.c[name] for name in ME_NAMES)
PLAY = tuple(PL.c[name] for name in ("id", "public_id", "participant_id", "round_id", "position", "state", "level",
                                     "image_token", "guessed_class", "correct", "score", "description"))
# The hot path's statements, built once: SQLAlchemy then skips building them and their cache keys per request.
Q_ME = select(*ME).where(PT.c.token_hash == bindparam("b_hash")).with_for_update()
Q_ME_BY_ID = select(*ME).where(PT.c.id == bindparam("b_id"))
Q_PLAY = select(*PLAY).where(PL.c.public_id == bindparam("b_play")).with_for_update()
Q_ME_AND_PLAY = (select(*(c.label(f"me_{c.name}") for c in ME), *PLAY)
                 .select_from(PT.outerjoin(PL, PL.c.public_id == bindparam("b_play")))
                 .where(PT.c.token_hash == bindparam("b_hash")))
Q_ME_AND_PLAY_LOCKED = (select(*(c.label(f"me_{c.name}") for c in ME), *PLAY)
                        .select_from(PT.join(PL, PL.c.public_id == bindparam("b_play")))
                        .where(PT.c.token_hash == bindparam("b_hash")).with_for_update())
Q_RUNNING = select(*PLAY).where(PL.c.participant_id == bindparam("b_id"), PL.c.state.in_(RUNNING))
Q_IMAGE = (select(PL.c.round_id, PL.c.level, PL.c.state).join(PT, PT.c.id == PL.c.participant_id)
           .where(PL.c.image_token == bindparam("b_token"), PT.c.token_hash == bindparam("b_hash")))
Q_REPLAY = (select(EV.c.type, *PLAY).join(PL, EV.c.play_id == PL.c.id)
            .where(EV.c.participant_id == bindparam("b_id"), EV.c.request_id == bindparam("b_request")))
U_PLAY = update(PL).where(PL.c.id == bindparam("b_id"))  # SET: the keys of the parameters
U_ME = update(PT).where(PT.c.id == bindparam("b_id"))
I_PLAY, I_EVENT = insert(PL), insert(EV)
PR = PlannedRound.__table__
Q_PLANNED = (select(PR.c.id, PR.c.round_id, PR.c.position).where(PR.c.participant_id == bindparam("b_id"))
             .order_by(PR.c.position).limit(1))
D_PLANNED = delete(PR).where(PR.c.id == bindparam("b_id"))


@contextlib.contextmanager
def _orm(connection: Connection) -> Iterator[Session]:
    """An ORM session inside the action's transaction (planning, swapping, expiring: the rare paths)."""
    session = Session(bind=connection, expire_on_commit=False)
    try:
        yield session
        session.flush()
    finally:
        session.close()


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
    def engine(self) -> Any:
        return self.writer.kw["bind"]

    def _read(self) -> Any:
        """A connection for reading (on SQLite its transaction takes no write lock)."""
        return self.reader.kw["bind"].connect()

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
        """The session's participant as an ORM object (pages and queries; the game's actions use :meth:`_me`)."""
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
            if play.state == "guessed":  # the guess counts, without a description
                me = {name: getattr(participant, name) for name in ME_NAMES}
                ended = self._finished(me, {"round_id": play.round_id, "score": play.score},
                                       "win" if play.correct else "lose", now)
                for name, value in [*me.items(), *ended.items()]:
                    setattr(participant if name in ME_NAMES else play, name, value)
            else:
                release(session, play.round_id)
                play.state, play.ended_at, play.image_token = "abandoned", now, None
            session.add(Event(play_id=play.id, participant_id=play.participant_id, round_id=play.round_id,
                              type="expire", level=play.level, request_id=str(uuid.uuid4()), created_at=now,
                              screen="level"))
        participant.lease_expires_at = None

    # ------------------------------------------------------------------ plays (SQLAlchemy Core: the hot path)
    def _me(self, connection: Connection, token: str | None) -> dict[str, Any]:
        """The session's participant, its row locked (``FOR UPDATE``; SQLite: the transaction is the lock)."""
        if not token:
            raise GameError(401, "no participant session: start on the consent page")
        row = connection.execute(Q_ME, {"b_hash": hash_token(token)}).first()
        if row is None:
            raise GameError(401, "unknown participant session: start on the consent page")
        return dict(row._mapping)

    def _own_play(self, connection: Connection, me: dict[str, Any], play_id: str) -> dict[str, Any]:
        row = connection.execute(Q_PLAY, {"b_play": play_id}).first()
        if row is None:
            raise GameError(404, "unknown play")
        if row.participant_id != me["id"]:
            raise GameError(403, "this play belongs to another participant")
        return dict(row._mapping)

    def _me_and_play(self, connection: Connection, token: str | None,
                     play_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The participant and the play in one query, both rows locked (PostgreSQL locks them in the order of
        the query's tables: the participant first, as every transaction does; on SQLite the transaction itself
        is the lock). Without such a pair, the two separate queries say what is wrong (401, 404)."""
        query = Q_ME_AND_PLAY if connection.dialect.name == "sqlite" else Q_ME_AND_PLAY_LOCKED
        row = connection.execute(query, {"b_hash": hash_token(token), "b_play": play_id}).first() if token else None
        if row is None or row.me_id is None or row.id is None:
            me = self._me(connection, token)
            return me, self._own_play(connection, me, play_id)
        values = row._mapping
        me = {name: values[f"me_{name}"] for name in ME_NAMES}
        if values["participant_id"] != me["id"]:
            raise GameError(403, "this play belongs to another participant")
        return me, {column.name: values[column.name] for column in PLAY}

    def _lapsed_row(self, connection: Connection, me: dict[str, Any], now: datetime) -> tuple[dict[str, Any], bool]:
        """The participant after expiring its lease if it ran out (rare: through the ORM), and whether it did."""
        if me["lease_expires_at"] is None or aware(me["lease_expires_at"]) >= now:
            return me, False
        with _orm(connection) as session:
            self._expire(session, session.get(Participant, me["id"]), now)
        return dict(connection.execute(Q_ME_BY_ID, {"b_id": me["id"]}).one()._mapping), True

    def _insert_event(self, connection: Connection, play: dict[str, Any], kind: str, request_id: str, now: datetime,
                      **fields: Any) -> None:
        """The action's event; a request id used before raises IntegrityError (answered by :meth:`_replay`)."""
        connection.execute(I_EVENT, {"play_id": play["id"], "participant_id": play["participant_id"],
                                  "round_id": play["round_id"], "type": kind, "level": play["level"],
                                  "request_id": request_id, "created_at": now, "screen": "level", "guessed_class": None,
                                  "text": None, "language": None, **fields})

    def _lease_until(self, me: dict[str, Any], now: datetime) -> datetime | None:
        return None if me["completed_at"] else now + self.lease

    def _replay(self, token: str | None, request_id: str, kind: str, play_id: str | None) -> dict[str, Any] | None:
        """The answer to a request repeated with the same id: the play's state now (None if the id is new)."""
        with self._read() as connection:
            me = self._me(connection, token)
            row = connection.execute(Q_REPLAY, {"b_id": me["id"], "b_request": request_id}).first()
            if row is None:
                return None
            if row.type != kind or (play_id is not None and row.public_id != play_id):
                raise GameError(409, "this request id was already used for another action")
            play = {k: v for k, v in row._mapping.items() if k != "type"}
            return self.view(play, me, **({"resumed": True} if kind == "start" else {}))

    def _act(self, kind: str, token: str | None, play_id: str | None, request_id: str,
             apply: Callable[[Connection], dict[str, Any]]) -> dict[str, Any]:
        """Run one action in a writing transaction. A request id used before is answered from the stored state:
        detected by the unique index on (participant, request id) when the action runs again, or, when the
        rules refuse the repeat (409), by looking the id up."""
        try:
            with self.write_lock, self.engine.begin() as connection:
                return apply(connection)
        except IntegrityError:
            replayed = self._replay(token, request_id, kind, play_id)
            if replayed is None:
                raise
            return replayed
        except GameError as refused:
            if refused.status != 409:
                raise
            replayed = self._replay(token, request_id, kind, play_id)
            if replayed is None:
                raise
            return replayed

    def revealed(self, play: dict[str, Any]) -> float:
        """Percentage of the image's pixels revealed at the play's level (gold rounds: their own levels)."""
        levels = self.config.gold_percentages if self.rounds[play["round_id"]].gold else self.config.reveal_percentages
        return levels[play["level"]]

    def view(self, play: dict[str, Any], me: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """What the browser may know: never the class, the correctness, the points or the full image before
        the play ends; gold and cluster rounds look alike (their revealed share is what is on screen)."""
        state = play["state"]
        running = state in RUNNING
        body: dict[str, Any] = {
            "play": play["public_id"], "state": state, "level": play["level"], "levels": self.config.levels,
            "revealed": self.revealed(play), "image": f"/img/{play['image_token']}",
            "round_number": me["plays"] + 1 if running else me["plays"],
            "rounds_total": me["quota"] or self.quota.total, "score": me["score"], **extra,
        }
        if state == "guessed":
            body["guessed_class"] = play["guessed_class"]  # the player's own choice, not the answer
        elif state in ENDED:
            body |= {"true_class": self.rounds[play["round_id"]].true_class, "guessed_class": play["guessed_class"],
                     "correct": play["correct"], "points": play["score"],
                     "described": play["description"] is not None}
        return body

    def done_view(self, me: dict[str, Any]) -> dict[str, Any]:
        """The end screen: the completion code only for a participant who finished the quota."""
        if me["completed_at"] is None:
            return {"done": True, "completed": False, "score": me["score"],
                    "message": "Your session expired and the study has since filled up, so it cannot give you the "
                               "rest of your rounds. No completion code can be given; please return the study."}
        return {"done": True, "completed": True, "score": me["score"],
                "completion_code": self.config.completion_code, "completion_url": self.config.completion_url}

    def completed(self, token: str | None) -> bool:
        """Whether the session's participant finished the quota (the ``/done`` page's check)."""
        with self._read() as connection:
            try:
                return self._me(connection, token)["completed_at"] is not None
            except GameError:
                return False

    def next_play(self, token: str | None, request_id: str) -> dict[str, Any]:
        """The participant's running play (resumed), the next planned round, or ``done``."""

        def apply(connection: Connection) -> dict[str, Any]:
            now = self.clock()
            me, expired = self._lapsed_row(connection, self._me(connection, token), now)
            running = connection.execute(Q_RUNNING, {"b_id": me["id"]}).first()
            if running is not None:
                connection.execute(U_ME, {"b_id": me["id"], "lease_expires_at": now + self.lease})
                return self.view(dict(running._mapping), me, resumed=True)
            if me["plays"] >= (me["quota"] or self.quota.total):
                return self._done(connection, me, now)
            planned = connection.execute(Q_PLANNED, {"b_id": me["id"]}).first()
            adaptive = self.policy.needs_history and planned is not None and not self.rounds[planned.round_id].gold
            if planned is None or adaptive:
                with _orm(connection) as session:
                    entry = (self._next_planned(session, me) if planned is None
                             else session.get(PlannedRound, planned.id))
                    if entry is not None and self.policy.needs_history and not self.rounds[entry.round_id].gold:
                        entry = swap_at_start(session, config=self.config, rounds=self.rounds, policy=self.policy,
                                              participant=session.get(Participant, me["id"]), planned=entry)
                    planned = None if entry is None else (entry.id, entry.round_id, entry.position)
                if planned is None:
                    return self._done(connection, me, now)
            planned_id, round_id, position = planned
            play = {"public_id": secrets.token_hex(12), "participant_id": me["id"], "round_id": round_id,
                    "position": position, "state": "active", "level": 0,
                    "image_token": secrets.token_urlsafe(24), "guessed_class": None, "correct": None, "score": 0,
                    "description": None}
            connection.execute(D_PLANNED, {"b_id": planned_id})
            play["id"] = connection.execute(I_PLAY, {**play, "started_at": now}).inserted_primary_key[0]
            connection.execute(U_ME, {"b_id": me["id"], "lease_expires_at": now + self.lease})
            self._insert_event(connection, play, "start", request_id, now)
            return self.view(play, me, resumed=False, **({"expired": True} if expired else {}))

        return self._act("start", token, None, request_id, apply)

    def _done(self, connection: Connection, me: dict[str, Any], now: datetime) -> dict[str, Any]:
        if me["plays"] >= (me["quota"] or self.quota.total) and me["completed_at"] is None:
            me["completed_at"] = now
        connection.execute(U_ME, {"b_id": me["id"], "completed_at": me["completed_at"], "lease_expires_at": None})
        return self.done_view(me)

    def _next_planned(self, session: Session, me: dict[str, Any]) -> PlannedRound | None:
        """No planned round left (a lease ran out, or a participant from before migration 0003): plan the rest of
        the quota now, if the study can still give it (in a savepoint); the first planned round, or None."""
        query = (select(PlannedRound).where(PlannedRound.participant_id == me["id"])
                 .order_by(PlannedRound.position).limit(1))
        participant = session.get(Participant, me["id"])
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

    def _finished(self, me: dict[str, Any], play: dict[str, Any], state: str, now: datetime) -> dict[str, Any]:
        """End ``play`` as ``state``: the play's new values (the full image's token), ``me`` updated in place
        (totals, gold counts, completion)."""
        win = state == "win"
        me["plays"] += 1
        me["wins"] += int(win)
        me["score"] += play["score"]
        if self.rounds[play["round_id"]].gold:
            me["gold_plays"] += 1
            me["gold_correct"] += int(win)
        if me["plays"] >= (me["quota"] or self.quota.total) and me["completed_at"] is None:
            me["completed_at"] = now
        return {"state": state, "ended_at": now, "image_token": secrets.token_urlsafe(24)}

    def _save(self, connection: Connection, me: dict[str, Any], play: dict[str, Any], now: datetime,
              **changes: Any) -> None:
        """Write the play's ``changes`` and the participant's totals and lease. A move within a play (reveal,
        guess) leaves the participant's row alone while the lease is at most :data:`LEASE_SLACK` (or a tenth of
        the lease) short of its full length: renewing it at every click would cost a write for that precision."""
        play.update(changes)
        connection.execute(U_PLAY, {"b_id": play["id"], **changes})
        ended = "ended_at" in changes
        lease = me["lease_expires_at"]
        if not ended and lease is not None and aware(lease) > now + self.lease - min(LEASE_SLACK, self.lease / 10):
            return
        connection.execute(U_ME, {"b_id": me["id"], "plays": me["plays"], "wins": me["wins"], "score": me["score"],
                                  "gold_plays": me["gold_plays"], "gold_correct": me["gold_correct"],
                                  "completed_at": me["completed_at"], "lease_expires_at": self._lease_until(me, now)})

    def _acting(self, connection: Connection, token: str | None, play_id: str,
                running: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any], datetime]:
        """Lock the participant and the play; a lapsed lease expires first; the play must be in ``running``."""
        now = self.clock()
        me, play = self._me_and_play(connection, token, play_id)
        me, lapsed = self._lapsed_row(connection, me, now)
        if lapsed:
            play = self._own_play(connection, me, play_id)
            if play["state"] == "abandoned":
                raise GameError(409, EXPIRED.format(minutes=_minutes(self.config.lease_seconds)))
        if play["state"] not in running:
            if play["state"] == "guessed":
                raise GameError(409, "you already guessed")
            if running == ("guessed",):
                raise GameError(409, "describe after a guess (not during a round)" if play["state"] == "active"
                                else "a description belongs between the guess and the answer: this round is over")
            raise GameError(409, "this round is over")
        return me, play, now

    def reveal(self, token: str | None, play_id: str, request_id: str, level: int) -> dict[str, Any]:
        """Level k -> k+1: recorded (committed) before the new image token is returned."""

        def apply(connection: Connection) -> dict[str, Any]:
            me, play, now = self._acting(connection, token, play_id, ("active",))
            if level != play["level"] + 1 or level >= self.config.levels:
                raise GameError(409, f"cannot reveal level {level}: the round is at level {play['level']} "
                                     f"of 0..{self.config.levels - 1}")
            self._save(connection, me, play, now, level=level, image_token=secrets.token_urlsafe(24))
            self._insert_event(connection, play, "reveal", request_id, now)
            return self.view(play, me)

        return self._act("reveal", token, play_id, request_id, apply)

    def guess(self, token: str | None, play_id: str, request_id: str, class_name: str) -> dict[str, Any]:
        """Record the guess (and, hidden, whether it is right); the player is asked for a description next."""
        if class_name not in self.config.classes:
            raise GameError(422, f"unknown class {class_name[:100]!r}: choose one of the study's classes")

        def apply(connection: Connection) -> dict[str, Any]:
            me, play, now = self._acting(connection, token, play_id, ("active",))
            correct = class_name == self.rounds[play["round_id"]].true_class
            self._save(connection, me, play, now, guessed_class=class_name, correct=correct, state="guessed",
                       score=points_for(correct, play["level"]))
            self._insert_event(connection, play, "guess", request_id, now, guessed_class=class_name)
            return self.view(play, me)

        return self._act("guess", token, play_id, request_id, apply)

    def resign(self, token: str | None, play_id: str, request_id: str) -> dict[str, Any]:
        def apply(connection: Connection) -> dict[str, Any]:
            me, play, now = self._acting(connection, token, play_id, ("active",))
            self._save(connection, me, play, now, **self._finished(me, play, "resign", now))
            self._insert_event(connection, play, "resign", request_id, now)
            return self.view(play, me)

        return self._act("resign", token, play_id, request_id, apply)

    def describe(self, token: str | None, play_id: str, request_id: str, text: str, language: str) -> dict[str, Any]:
        """The free-text description, asked after the guess with the last level on screen; ends the play."""
        if language not in self.config.languages:
            raise GameError(422, f"language {language!r} is not one of this study's {self.config.languages}")

        def apply(connection: Connection) -> dict[str, Any]:
            me, play, now = self._acting(connection, token, play_id, ("guessed",))
            self._insert_event(connection, play, "describe", request_id, now, text=text, language=language)
            ended = self._finished(me, play, "win" if play["correct"] else "lose", now)
            self._save(connection, me, play, now, description=text, language=language, description_screen="level",
                       **ended)
            return self.view(play, me)

        return self._act("describe", token, play_id, request_id, apply)

    def skip(self, token: str | None, play_id: str, request_id: str) -> dict[str, Any]:
        """No description for this guess (recorded as a ``skip`` event); ends the play."""

        def apply(connection: Connection) -> dict[str, Any]:
            me, play, now = self._acting(connection, token, play_id, ("guessed",))
            self._insert_event(connection, play, "skip", request_id, now)
            self._save(connection, me, play, now, **self._finished(me, play, "win" if play["correct"] else "lose", now))
            return self.view(play, me)

        return self._act("skip", token, play_id, request_id, apply)

    def image_path(self, token: str | None, image_token: str) -> Any:
        """File for an image token of the participant's own play: the current level while the play runs (also
        while its description is asked), the full image once it ended (one indexed query, no lock)."""
        if not token:
            raise GameError(401, "no participant session: start on the consent page")
        with self._read() as connection:
            row = connection.execute(Q_IMAGE, {"b_token": image_token, "b_hash": hash_token(token)}).first()
        if row is None:
            raise GameError(404, "no such image")
        name = f"level{row.level}.png" if row.state in RUNNING else "full.png"
        return self.files.image(row.round_id, name)
