"""Read-only views: leaderboard, a player's stats, and the admin's progress (a summary that scales: totals,
capacity, rounds by state, finished plays over time, and one page of rounds and of participants)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from convlens.study.game.actions import StudyRuntime, aware
from convlens.study.store.db import Participant, PlannedRound, Play, Round

__all__ = ["PAGE_SIZE", "display_name", "leaderboard", "player_stats", "progress"]

PAGE_SIZE = 50
FINISHED = ("win", "lose", "resign")
ROUND_STATES = ("complete", "reserved", "in progress", "not started")


def display_name(participant: Participant) -> str:
    return participant.nickname or f"Player {participant.public_id[:6]}"


def leaderboard(runtime: StudyRuntime, limit: int = 20) -> list[dict[str, Any]]:
    """Top players by score (ties: more wins, then earlier registration)."""
    query = (select(Participant).where(Participant.plays > 0)
             .order_by(Participant.score.desc(), Participant.wins.desc(), Participant.id).limit(limit))
    with runtime.reader.begin() as session:
        return [{"rank": i + 1, "name": display_name(p), "score": p.score, "plays": p.plays, "wins": p.wins,
                 "public_id": p.public_id} for i, p in enumerate(session.scalars(query))]


def player_stats(runtime: StudyRuntime, token: str | None) -> dict[str, Any]:
    """Score, rank, outcomes, mean winning level and the finished plays (newest first)."""
    with runtime.reader.begin() as session:
        me = runtime.participant(session, token)
        better = session.scalar(select(func.count()).select_from(Participant).where(Participant.score > me.score))
        plays = list(session.scalars(select(Play).where(Play.participant_id == me.id, Play.state.in_(FINISHED))
                                     .order_by(Play.position.desc())))
    outcomes = {state: sum(p.state == state for p in plays) for state in FINISHED}
    win_levels = [p.level for p in plays if p.state == "win"]
    count = len(plays)
    return {
        "name": display_name(me), "public_id": me.public_id, "score": me.score, "rank": better + 1,
        "plays": count, "quota": me.quota or runtime.quota.total, **outcomes,
        "mean_win_level": sum(win_levels) / len(win_levels) if win_levels else None,
        "history": [{"round_number": count - i, "outcome": p.state, "level": p.level, "points": p.score,
                     "guessed_class": p.guessed_class, "true_class": runtime.rounds[p.round_id].true_class}
                    for i, p in enumerate(plays)],
    }


def _bucket(session: Session, hours: bool) -> Any:
    """SQL expression: a finished play's end time cut to its hour (or day)."""
    if session.get_bind().dialect.name == "postgresql":
        return func.date_trunc("hour" if hours else "day", Play.ended_at)
    return func.strftime("%Y-%m-%d %H:00:00" if hours else "%Y-%m-%d 00:00:00", Play.ended_at)


def _timeline(session: Session) -> dict[str, Any]:
    """Finished plays per hour (per day once the study runs over three days), and their running total."""
    first, last = session.execute(select(func.min(Play.ended_at), func.max(Play.ended_at))
                                  .where(Play.state.in_(FINISHED))).one()
    if first is None:
        return {"unit": "hour", "buckets": []}
    first, last = (value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
                   for value in (first, last))
    hours = aware(last) - aware(first) <= timedelta(days=3)
    bucket = _bucket(session, hours).label("bucket")
    rows = session.execute(select(bucket, func.count()).where(Play.state.in_(FINISHED))
                           .group_by(bucket).order_by(bucket)).all()
    total, buckets = 0, []
    for start, count in rows:
        total += count
        label = start if isinstance(start, str) else start.strftime("%Y-%m-%d %H:%M:%S")
        buckets.append({"start": label[:13] + ":00" if hours else label[:10], "plays": count, "total": total})
    return {"unit": "hour" if hours else "day", "buckets": buckets}


def _round_state(assigned: int, finished: int, cap: int, gold: bool) -> str:
    if gold:
        return "gold"
    if finished >= cap:
        return "complete"
    return "reserved" if assigned >= cap else "in progress" if assigned else "not started"


def _totals(session: Session, runtime: StudyRuntime) -> dict[str, Any]:
    states = dict(session.execute(select(Play.state, func.count()).group_by(Play.state)).all())
    people = session.execute(select(func.count(), func.count(Participant.completed_at),
                                    func.sum(Participant.gold_plays), func.sum(Participant.gold_correct))).one()
    cap = runtime.config.plays_per_round
    normal_finished = dict(session.execute(select(Play.round_id, func.count()).join(Round, Play.round_id == Round.id)
                                           .where(~Round.gold, Play.state.in_(FINISHED)).group_by(Play.round_id)).all())
    by_state = dict.fromkeys(ROUND_STATES, 0)
    for round_id, assigned in session.execute(select(Round.id, Round.assigned).where(~Round.gold)):
        by_state[_round_state(assigned, normal_finished.get(round_id, 0), cap, False)] += 1
    normal_rounds = sum(by_state.values())
    gold_plays, gold_correct = people[2] or 0, people[3] or 0
    return {
        "participants": people[0], "completed": people[1],
        "finished_plays": sum(states.get(s, 0) for s in FINISHED), "running_plays": states.get("active", 0)
        + states.get("guessed", 0), "planned_plays": session.scalar(select(func.count()).select_from(PlannedRound)),
        "abandoned_plays":
        states.get("abandoned", 0), "rounds": normal_rounds, "gold_rounds": len(runtime.rounds) - normal_rounds,
        "plays_per_round": cap, "quota": runtime.quota.total, "gold_per_participant": runtime.quota.gold,
        "slots": normal_rounds * cap, "slots_filled": sum(min(n, cap) for n in normal_finished.values()),
        "capacity": runtime.capacity(session), "rounds_by_state": by_state,
        "gold_accuracy": gold_correct / gold_plays if gold_plays else None,
        "lease_seconds": runtime.config.lease_seconds,
    }


def _round_page(session: Session, runtime: StudyRuntime, page: int) -> list[dict[str, Any]]:
    order = (Round.gold, Round.image_id, Round.layer_depth, Round.cluster_index, Round.id)
    rounds = list(session.scalars(select(Round).order_by(*order).offset((page - 1) * PAGE_SIZE).limit(PAGE_SIZE)))
    per_round = (select(Play.round_id, func.count().label("plays"),
                        func.sum(case((Play.state == "win", 1), else_=0)).label("wins"),
                        func.sum(case((Play.state == "lose", 1), else_=0)).label("losses"),
                        func.sum(case((Play.state == "resign", 1), else_=0)).label("resigns"),
                        func.avg(Play.level).label("mean_level"))
                 .where(Play.state.in_(FINISHED), Play.round_id.in_([r.id for r in rounds])).group_by(Play.round_id))
    stats = {row.round_id: row for row in session.execute(per_round)}
    cap = runtime.config.plays_per_round
    rows = []
    for r in rounds:
        row = stats.get(r.id)
        finished = row.plays if row else 0
        rows.append({
            "round_id": r.id, "cluster_id": r.cluster_id or "", "gold": r.gold, "true_class": r.true_class,
            "image_name": r.image_name, "layer": r.layer or "", "assigned": r.assigned, "plays": finished,
            "state": _round_state(r.assigned, finished, cap, r.gold), "wins": row.wins if row else 0,
            "losses": row.losses if row else 0, "resigns": row.resigns if row else 0,
            "mean_level": float(row.mean_level) if row and row.mean_level is not None else None,
        })
    return rows


def _participant_page(session: Session, page: int) -> list[dict[str, Any]]:
    query = select(Participant).order_by(Participant.id).offset((page - 1) * PAGE_SIZE).limit(PAGE_SIZE)
    return [{"public_id": p.public_id, "name": display_name(p), "plays": p.plays, "quota": p.quota, "wins": p.wins,
             "score": p.score, "gold_plays": p.gold_plays, "gold_correct": p.gold_correct,
             "gold_accuracy": p.gold_correct / p.gold_plays if p.gold_plays else None,
             "completed": p.completed_at is not None, "prolific_pid": p.prolific_pid or ""}
            for p in session.scalars(query)]


def progress(runtime: StudyRuntime, rounds_page: int = 1, participants_page: int = 1) -> dict[str, Any]:
    """The admin's summary: totals (capacity: participants the study can still take), rounds by state,
    finished plays over time, and one page (:data:`PAGE_SIZE` rows) of rounds and of participants."""
    with runtime.reader.begin() as session:
        totals = _totals(session, runtime)
        pages = {"rounds": max(1, -(-len(runtime.rounds) // PAGE_SIZE)),
                 "participants": max(1, -(-totals["participants"] // PAGE_SIZE))}
        rounds_page = min(max(1, rounds_page), pages["rounds"])
        participants_page = min(max(1, participants_page), pages["participants"])
        return {
            "totals": totals, "gold_accuracy": totals["gold_accuracy"], "timeline": _timeline(session),
            "rounds": _round_page(session, runtime, rounds_page),
            "participants": _participant_page(session, participants_page),
            "page": {"rounds": rounds_page, "participants": participants_page, "size": PAGE_SIZE,
                     "pages": pages},
        }
