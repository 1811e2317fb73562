"""Read-only views: leaderboard, a player's stats, the admin's progress tables."""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, func, select

from convlens.study.game.actions import StudyRuntime
from convlens.study.store.db import Participant, Play, Round

__all__ = ["display_name", "leaderboard", "player_stats", "progress"]


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
        plays = list(session.scalars(select(Play).where(Play.participant_id == me.id, Play.state != "active")
                                     .order_by(Play.position.desc())))
    outcomes = {state: sum(p.state == state for p in plays) for state in ("win", "lose", "resign")}
    win_levels = [p.level for p in plays if p.state == "win"]
    return {
        "name": display_name(me), "public_id": me.public_id, "score": me.score, "rank": better + 1,
        "plays": len(plays), **outcomes,
        "mean_win_level": sum(win_levels) / len(win_levels) if win_levels else None,
        "history": [{"round_number": p.position, "outcome": p.state, "level": p.level, "points": p.score,
                     "guessed_class": p.guessed_class, "true_class": runtime.rounds[p.round_id].true_class}
                    for p in plays],
    }


def progress(runtime: StudyRuntime) -> dict[str, Any]:
    """Per round (plays, outcomes, mean level) and per participant, plus gold accuracy."""
    finished = Play.state != "active"
    per_round = (select(Play.round_id, func.count().label("plays"),
                        func.sum(case((Play.state == "win", 1), else_=0)).label("wins"),
                        func.sum(case((Play.state == "lose", 1), else_=0)).label("losses"),
                        func.sum(case((Play.state == "resign", 1), else_=0)).label("resigns"),
                        func.avg(Play.level).label("mean_level"))
                 .where(finished).group_by(Play.round_id))
    with runtime.reader.begin() as session:
        stats = {row.round_id: row for row in session.execute(per_round)}
        rounds = list(session.scalars(select(Round).order_by(Round.gold, Round.image_id, Round.layer_depth,
                                                                Round.cluster_index)))
        people = list(session.scalars(select(Participant).order_by(Participant.id)))
        active = session.scalar(select(func.count()).select_from(Play).where(Play.state == "active"))
    round_rows = []
    for r in rounds:
        row = stats.get(r.id)
        round_rows.append({
            "round_id": r.id, "cluster_id": r.cluster_id or "", "gold": r.gold, "true_class": r.true_class,
            "assigned": r.assigned, "plays": row.plays if row else 0, "wins": row.wins if row else 0,
            "losses": row.losses if row else 0, "resigns": row.resigns if row else 0,
            "mean_level": float(row.mean_level) if row and row.mean_level is not None else None,
        })
    gold_plays = sum(p.gold_plays for p in people)
    gold_correct = sum(p.gold_correct for p in people)
    return {
        "rounds": round_rows,
        "participants": [{"public_id": p.public_id, "name": display_name(p), "plays": p.plays, "wins": p.wins,
                          "score": p.score, "gold_plays": p.gold_plays, "gold_correct": p.gold_correct,
                          "prolific_pid": p.prolific_pid or ""} for p in people],
        "totals": {"participants": len(people), "finished_plays": sum(p.plays for p in people),
                   "active_plays": active, "rounds": sum(not r.gold for r in rounds),
                   "gold_rounds": sum(r.gold for r in rounds), "plays_per_round": runtime.config.plays_per_round},
        "gold_accuracy": gold_correct / gold_plays if gold_plays else None,
    }
