"""JSON endpoints of the game (POST: CSRF header + per-participant rate limit) and the image route.

``POST /api/next`` · ``POST /api/plays/{play}/reveal|guess|describe|skip|resign`` · ``GET /img/{token}`` ·
``GET /api/stats`` · ``GET /api/leaderboard`` · ``GET /healthz`` (database, quota and capacity: how many
more participants the study can take).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from convlens.study.game.actions import GameError, StudyRuntime
from convlens.study.game.queries import leaderboard, player_stats
from convlens.study.web.schemas import (
    PLAY_ID_PATTERN,
    DescribeRequest,
    GuessRequest,
    NextRequest,
    ResignRequest,
    RevealRequest,
    SkipRequest,
)
from convlens.study.web.security import SESSION_COOKIE

__all__ = ["ACTION_ROUTES", "READ_ROUTES"]

PlayId = Annotated[str, Path(pattern=PLAY_ID_PATTERN)]
ImageToken = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{32}$")]


def _runtime(request: Request) -> StudyRuntime:
    return request.app.state.runtime


def _token(request: Request) -> str | None:
    return request.cookies.get(SESSION_COOKIE)


def next_round(request: Request, body: NextRequest) -> JSONResponse:
    """The active play, a newly assigned round, or ``{"done": true, ...}``."""
    return JSONResponse(_runtime(request).next_play(_token(request), body.request_id))


def reveal(request: Request, play_id: PlayId, body: RevealRequest) -> JSONResponse:
    """Go to ``level`` (= current + 1); the new image token is valid once the reveal is stored."""
    return JSONResponse(_runtime(request).reveal(_token(request), play_id, body.request_id, body.level))


def guess(request: Request, play_id: PlayId, body: GuessRequest) -> JSONResponse:
    return JSONResponse(_runtime(request).guess(_token(request), play_id, body.request_id, body.class_name))


def describe(request: Request, play_id: PlayId, body: DescribeRequest) -> JSONResponse:
    runtime = _runtime(request)
    if len(body.text) > runtime.config.max_description_chars:
        raise GameError(422, f"description longer than {runtime.config.max_description_chars} characters")
    return JSONResponse(runtime.describe(_token(request), play_id, body.request_id, body.text, body.language))


def skip(request: Request, play_id: PlayId, body: SkipRequest) -> JSONResponse:
    """No description for this guess: the play ends (recorded as a ``skip`` event)."""
    return JSONResponse(_runtime(request).skip(_token(request), play_id, body.request_id))


def resign(request: Request, play_id: PlayId, body: ResignRequest) -> JSONResponse:
    return JSONResponse(_runtime(request).resign(_token(request), play_id, body.request_id))


def image(request: Request, image_token: ImageToken) -> Response:
    """The current level's image of the participant's own running play (the full image once it ended)."""
    path = _runtime(request).image_path(_token(request), image_token)
    try:
        return Response(path.read_bytes(), media_type="image/png")
    except OSError:
        raise GameError(404, "no such image") from None


def stats(request: Request) -> dict[str, Any]:
    return player_stats(_runtime(request), _token(request))


def top(request: Request) -> dict[str, Any]:
    board = leaderboard(_runtime(request))
    return {"leaderboard": [{k: v for k, v in row.items() if k != "public_id"} for row in board]}


def health(request: Request) -> JSONResponse:
    """200 when the database answers (with the quota and the study's capacity: how many more participants it
    can give a full quota); 503 otherwise."""
    runtime = _runtime(request)
    try:
        with runtime.reader.begin() as session:
            session.execute(text("SELECT 1"))
            capacity = runtime.capacity(session)
    except Exception as exc:  # the health check reports any database failure
        return JSONResponse({"status": "error", "database": type(exc).__name__}, status_code=503)
    return JSONResponse({"status": "ok", "study": runtime.config.study_id, "rounds": len(runtime.rounds),
                         "database": request.app.state.backend, "quota": runtime.quota.total,
                         "capacity": capacity})


ACTION_ROUTES = [
    ("/api/next", next_round),
    ("/api/plays/{play_id}/reveal", reveal),
    ("/api/plays/{play_id}/guess", guess),
    ("/api/plays/{play_id}/describe", describe),
    ("/api/plays/{play_id}/skip", skip),
    ("/api/plays/{play_id}/resign", resign),
]
READ_ROUTES = [("/img/{image_token}", image), ("/api/stats", stats), ("/api/leaderboard", top), ("/healthz", health)]
