"""The rules of Deep Reveal, one database transaction per player action.

Every action locks the participant's row first (``SELECT ... FOR UPDATE``; on SQLite every writing
transaction is ``BEGIN IMMEDIATE``), so one participant's requests are applied one at a time in a
well-defined order; each action appends one row to ``events`` with the client's request id, and a
request repeated with the same id is answered from the stored state instead of being applied twice.

Scoring rule (:data:`SCORING_RULE`): a correct guess at reveal level k (0..5) earns ``100 - 10 k``
points (100 at 2 % revealed ... 50 at 30 %), mirroring the INV label weight ``1 - 0.1 k``; a wrong guess
and a resign earn 0; descriptions earn nothing, so that the text is never written for points. Gold rounds
are scored like any round (players cannot tell them apart).
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from convlens.study.game.assignment import AssignmentPolicy, Candidate, PastPlay, participant_rng
from convlens.study.store.config import RoundSpec, StudyConfig, StudyFiles
from convlens.study.store.db import Event, Participant, Play, Round, utcnow

__all__ = ["ALREADY_REGISTERED", "PLAYER_SCORING", "SCORING_RULE", "GameError", "StudyRuntime", "hash_token",
           "points_for"]

SCORING_RULE = ("correct guess at reveal level k (0..5): 100 - 10*k points; wrong guess: 0; resign: 0; "
                "descriptions: 0 (not rewarded, so that they are not written for points)")
PLAYER_SCORING = ("A correct guess earns 100 points at step 1 and 10 fewer for each extra step; a wrong guess or "
                  "giving up earns nothing.")
ALREADY_REGISTERED = ("this Prolific id has already taken part in the study: each participant may play it once "
                      "(if this is a mistake, contact the researchers through Prolific)")


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


@dataclass
class StudyRuntime:
    """What the server knows about its study: settings, rounds, policy and session factories."""

    config: StudyConfig
    files: StudyFiles
    rounds: dict[str, RoundSpec]
    policy: AssignmentPolicy
    writer: sessionmaker
    reader: sessionmaker
    write_lock: Any = field(default_factory=contextlib.nullcontext)

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """One writing transaction. On SQLite the process's writers queue on a lock (held through the
        commit) instead of SQLite's busy handler, which sleeps 1, 2, 5, 10... ms between retries."""
        with self.write_lock, self.writer.begin() as session:
            yield session

    # ------------------------------------------------------------------ participants
    def register(self, consent_version: str, nickname: str | None, params: dict[str, str | None]) -> tuple[str, str]:
        """New pseudonymous participant; returns (public id, session token). The token is stored hashed.

        A Prolific participant id registers once: a second registration with the same ``PROLIFIC_PID``
        (another browser, cleared cookies) is refused with 409 — the earlier session token is never handed
        out again, since anyone who knows a PID could take that session over. The unique index on
        ``participants.prolific_pid`` (migration 0002) backs the check against concurrent registrations."""
        if consent_version != self.config.consent_version:
            raise GameError(409, "the consent text changed; reload the page and read it again")
        token = secrets.token_urlsafe(32)
        public_id = secrets.token_hex(8)
        prolific_pid = params.get("prolific_pid")
        try:
            with self.write() as session:
                taken = select(Participant.id).where(Participant.prolific_pid == prolific_pid)
                if prolific_pid and session.scalar(taken) is not None:
                    raise GameError(409, ALREADY_REGISTERED)
                session.add(Participant(
                    public_id=public_id, token_hash=hash_token(token), nickname=nickname, prolific_pid=prolific_pid,
                    study_id_param=params.get("study_id"), session_id_param=params.get("session_id"),
                    consent_version=consent_version, created_at=utcnow(), score=0, plays=0, wins=0, gold_plays=0,
                    gold_correct=0,
                ))
        except IntegrityError as exc:  # a concurrent registration with the same PID won the race
            if prolific_pid:
                raise GameError(409, ALREADY_REGISTERED) from exc
            raise
        return public_id, token

    def participant(self, session: Session, token: str | None, lock: bool = False) -> Participant:
        if not token:
            raise GameError(401, "no participant session: start on the consent page")
        query = select(Participant).where(Participant.token_hash == hash_token(token))
        participant = session.scalar(query.with_for_update() if lock else query)
        if participant is None:
            raise GameError(401, "unknown participant session: start on the consent page")
        return participant

    def known_participant(self, token: str | None) -> bool:
        with self.reader.begin() as session:
            try:
                self.participant(session, token)
            except GameError:
                return False
        return True

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

    def _event(self, session: Session, play: Play, kind: str, request_id: str, **fields: Any) -> None:
        session.add(Event(play_id=play.id, participant_id=play.participant_id, round_id=play.round_id, type=kind,
                          level=play.level, request_id=request_id, created_at=utcnow(), **fields))

    def view(self, play: Play, participant: Participant, **extra: Any) -> dict[str, Any]:
        """What the browser may know: never the class or the full image before the round ends."""
        body: dict[str, Any] = {
            "play": play.public_id, "state": play.state, "level": play.level, "levels": self.config.levels,
            "image": f"/img/{play.image_token}", "round_number": play.position,
            "rounds_total": self.config.rounds_per_player, "score": participant.score, **extra,
        }
        if play.state != "active":
            body |= {"true_class": self.rounds[play.round_id].true_class, "guessed_class": play.guessed_class,
                     "correct": play.correct, "points": play.score, "described": play.description is not None}
        return body

    def done_view(self, participant: Participant) -> dict[str, Any]:
        return {"done": True, "score": participant.score, "completion_code": self.config.completion_code,
                "completion_url": self.config.completion_url}

    def next_play(self, token: str | None, request_id: str) -> dict[str, Any]:
        """The participant's active play (resumed), or a newly assigned round, or ``done``."""
        with self.write() as session:
            participant = self.participant(session, token, lock=True)
            active = session.scalar(select(Play).where(Play.participant_id == participant.id, Play.state == "active"))
            if active is not None:
                return self.view(active, participant, resumed=True)
            previous = self._replayed(session, participant, request_id, "start", None)
            if previous is not None:
                return self.view(session.get(Play, previous.play_id), participant, resumed=True)
            mine = select(func.count()).select_from(Play).where(Play.participant_id == participant.id)
            started = session.scalar(mine)
            if started >= self.config.rounds_per_player:
                return self.done_view(participant)
            round_id = self._assign(session, participant, started + 1)
            if round_id is None:
                return self.done_view(participant)
            play = Play(public_id=secrets.token_hex(12), participant_id=participant.id, round_id=round_id,
                        position=started + 1, state="active", level=0, image_token=secrets.token_urlsafe(24),
                        score=0, started_at=utcnow())
            session.add(play)
            session.flush()
            self._event(session, play, "start", request_id)
            return self.view(play, participant, resumed=False)

    def _candidates(self, session: Session, participant: Participant) -> list[Candidate]:
        """Rounds the participant may play next: never one already played; with ``one_round_per_image``
        (the default) never a round of an image already played in any state — the end of a play shows
        the true class and the full image, so every other round of that image would be a known answer."""
        played = select(Play.round_id).where(Play.participant_id == participant.id)
        cap = self.config.plays_per_round
        query = select(Round).where(Round.id.not_in(played), Round.gold | (Round.assigned < cap))
        if self.config.one_round_per_image:
            seen = (select(Round.image_id).join(Play, Play.round_id == Round.id)
                    .where(Play.participant_id == participant.id))
            query = query.where(Round.image_id.not_in(seen))
        rows = session.scalars(query)
        history = self._history(session, cap) if self.policy.needs_history else {}
        return [Candidate(r.id, r.gold, r.assigned, r.cluster_id, r.image_id, r.layer, r.true_class,
                          tuple(history.get(r.id, ()))) for r in rows]

    @staticmethod
    def _history(session: Session, cap: int) -> dict[str, list[PastPlay]]:
        """Finished plays of the non-gold rounds still under their cap, in play order."""
        query = (select(Play.round_id, Play.state, Play.level, Play.description).join(Round, Play.round_id == Round.id)
                 .where(~Round.gold, Round.assigned < cap, Play.state != "active").order_by(Play.id))
        history: dict[str, list[PastPlay]] = {}
        for round_id, state, level, description in session.execute(query):
            history.setdefault(round_id, []).append(PastPlay(state, level, description))
        return history

    def _assign(self, session: Session, participant: Participant, number: int) -> str | None:
        """Ask the policy, claim its pick atomically; a failed claim (another player took the round's last
        slot) removes that candidate and the policy is asked again, until a claim succeeds or none is left."""
        candidates = self._candidates(session, participant)
        cap = self.config.plays_per_round
        attempt = 0
        while candidates:
            rng = participant_rng(self.config.assignment_seed, participant.id, number, attempt)
            chosen = self.policy.choose(candidates, rng, participant.public_id)
            claim = update(Round).where(Round.id == chosen.round_id, Round.gold | (Round.assigned < cap))
            if session.execute(claim.values(assigned=Round.assigned + 1)).rowcount == 1:
                return chosen.round_id
            candidates = [c for c in candidates if c.round_id != chosen.round_id]
            attempt += 1
        return None

    def reveal(self, token: str | None, play_id: str, request_id: str, level: int) -> dict[str, Any]:
        """Level k -> k+1: recorded (committed) before the new image token is returned."""
        with self.write() as session:
            participant = self.participant(session, token, lock=True)
            play = self._own_play(session, participant, play_id)
            if self._replayed(session, participant, request_id, "reveal", play) is not None:
                return self.view(play, participant)
            if play.state != "active":
                raise GameError(409, "this round is over")
            if level != play.level + 1 or level >= self.config.levels:
                raise GameError(409, f"cannot reveal level {level}: the round is at level {play.level} "
                                     f"of 0..{self.config.levels - 1}")
            play.level = level
            play.image_token = secrets.token_urlsafe(24)
            self._event(session, play, "reveal", request_id)
            return self.view(play, participant)

    def _finish(self, session: Session, participant: Participant, play: Play, state: str) -> None:
        spec = self.rounds[play.round_id]
        play.state = state
        play.ended_at = utcnow()
        play.image_token = secrets.token_urlsafe(24)
        participant.plays += 1
        participant.wins += int(state == "win")
        participant.score += play.score
        if spec.gold:
            participant.gold_plays += 1
            participant.gold_correct += int(state == "win")

    def guess(self, token: str | None, play_id: str, request_id: str, class_name: str) -> dict[str, Any]:
        if class_name not in self.config.classes:
            raise GameError(422, f"unknown class {class_name[:100]!r}: choose one of the study's classes")
        with self.write() as session:
            participant = self.participant(session, token, lock=True)
            play = self._own_play(session, participant, play_id)
            if self._replayed(session, participant, request_id, "guess", play) is not None:
                return self.view(play, participant)
            if play.state != "active":
                raise GameError(409, "this round is over")
            correct = class_name == self.rounds[play.round_id].true_class
            play.guessed_class, play.correct, play.score = class_name, correct, points_for(correct, play.level)
            self._finish(session, participant, play, "win" if correct else "lose")
            self._event(session, play, "guess", request_id, guessed_class=class_name)
            return self.view(play, participant)

    def resign(self, token: str | None, play_id: str, request_id: str) -> dict[str, Any]:
        with self.write() as session:
            participant = self.participant(session, token, lock=True)
            play = self._own_play(session, participant, play_id)
            if self._replayed(session, participant, request_id, "resign", play) is not None:
                return self.view(play, participant)
            if play.state != "active":
                raise GameError(409, "this round is over")
            self._finish(session, participant, play, "resign")
            self._event(session, play, "resign", request_id)
            return self.view(play, participant)

    def describe(self, token: str | None, play_id: str, request_id: str, text: str, language: str) -> dict[str, Any]:
        """The free-text description after a guess (once per play)."""
        if language not in self.config.languages:
            raise GameError(422, f"language {language!r} is not one of this study's {self.config.languages}")
        with self.write() as session:
            participant = self.participant(session, token, lock=True)
            play = self._own_play(session, participant, play_id)
            if self._replayed(session, participant, request_id, "describe", play) is not None:
                return self.view(play, participant)
            if play.state not in ("win", "lose"):
                raise GameError(409, "describe after a guess (not during a round, nor after resigning)")
            if play.description is not None:
                raise GameError(409, "this play is already described")
            play.description, play.language = text, language
            self._event(session, play, "describe", request_id, text=text, language=language)
            return self.view(play, participant)

    def image_path(self, token: str | None, image_token: str) -> Any:
        """File for an image token of the participant's own play: current level, or full image once ended."""
        with self.reader.begin() as session:
            participant = self.participant(session, token)
            play = session.scalar(select(Play).where(Play.image_token == image_token))
            if play is None or play.participant_id != participant.id:
                raise GameError(404, "no such image")
            name = f"level{play.level}.png" if play.state == "active" else "full.png"
            return self.files.image(play.round_id, name)
