"""HTML pages (Jinja2, autoescaped) and the admin area.

``GET /`` consent · ``POST /consent`` · ``GET /play`` game · ``GET /leaderboard`` · ``GET /stats`` ·
``GET /done`` · ``GET /admin`` (login form or progress) · ``POST /admin/login|logout`` ·
``GET /admin/api/progress`` · ``GET /admin/export/{table}.{csv|jsonl}`` (streaming; also study.json).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from convlens.study.batch.export import ROWS, export_rows, format_rows, snapshot_session, study_metadata
from convlens.study.game.actions import PLAYER_SCORING, GameError, StudyRuntime
from convlens.study.game.queries import leaderboard, player_stats, progress
from convlens.study.web.schemas import ConsentForm
from convlens.study.web.security import (
    ADMIN_COOKIE,
    ADMIN_SESSION_S,
    SESSION_COOKIE,
    admin_cookie_valid,
    admin_cookie_value,
    check_admin_token,
)

__all__ = ["ADMIN_ROUTES", "PAGE_ROUTES", "is_admin", "render"]

LANGUAGE_NAMES = {"en": "English", "it": "Italiano", "de": "Deutsch", "fr": "Français", "es": "Español",
                  "pt": "Português", "nl": "Nederlands"}
EXPORT_NAME = re.compile(r"^(rounds|plays|events|participants)\.(csv|jsonl)$")
SESSION_MAX_AGE = 60 * 60 * 24 * 30


def _runtime(request: Request) -> StudyRuntime:
    return request.app.state.runtime


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    csrf = request.scope.get("csrftoken")
    runtime = _runtime(request)
    page = request.app.state.templates.get_template(template).render(
        request=request, config=runtime.config, csrf_token=csrf() if csrf else "", **context)
    return HTMLResponse(page, status_code=status)


async def consent_page(request: Request) -> Response:
    runtime = _runtime(request)
    if await run_in_threadpool(runtime.known_participant, request.cookies.get(SESSION_COOKIE)):
        return RedirectResponse("/play", status_code=303)
    names = (("prolific_pid", "PROLIFIC_PID"), ("study_id", "STUDY_ID"), ("session_id", "SESSION_ID"))
    params = {key: request.query_params.get(name, "")[:64] for key, name in names}
    return render(request, "consent.html", params=params, errors=[])


async def consent_submit(request: Request) -> Response:
    runtime = _runtime(request)
    raw = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    params = {k: raw.get(k, "")[:64] for k in ("prolific_pid", "study_id", "session_id")}
    try:
        form = ConsentForm.model_validate({**raw, "consent": raw.get("consent") == "yes"})
    except ValidationError as exc:
        errors = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return render(request, "consent.html", status=422, params=params, errors=errors)
    errors = [] if form.consent else ["Please tick the box to agree before playing."]
    if form.nickname and len(form.nickname) > runtime.config.max_nickname_chars:
        errors.append(f"The nickname may have at most {runtime.config.max_nickname_chars} characters.")
    if errors:
        return render(request, "consent.html", status=422, params=params, errors=errors)
    ids = {k: getattr(form, k) or None for k in params}
    try:
        _, token = await run_in_threadpool(runtime.register, form.consent_version, form.nickname or None, ids)
    except GameError as exc:  # consent text changed, or this Prolific id already took part
        return render(request, "consent.html", status=exc.status, params=params, errors=[exc.message])
    response = RedirectResponse("/play", status_code=303)
    response.set_cookie(SESSION_COOKIE, token, max_age=SESSION_MAX_AGE, httponly=True, samesite="lax",
                        secure=request.app.state.secure_cookies)
    return response


async def play_page(request: Request) -> Response:
    if not await run_in_threadpool(_runtime(request).known_participant, request.cookies.get(SESSION_COOKIE)):
        return RedirectResponse("/", status_code=303)
    languages = [(tag, LANGUAGE_NAMES.get(tag, tag)) for tag in _runtime(request).config.languages]
    return render(request, "play.html", languages=languages, scoring_rule=PLAYER_SCORING)


async def leaderboard_page(request: Request) -> Response:
    rows = await run_in_threadpool(leaderboard, _runtime(request))
    return render(request, "leaderboard.html", rows=rows)


async def stats_page(request: Request) -> Response:
    try:
        stats = await run_in_threadpool(player_stats, _runtime(request), request.cookies.get(SESSION_COOKIE))
    except GameError:
        return RedirectResponse("/", status_code=303)
    return render(request, "stats.html", stats=stats, scoring_rule=PLAYER_SCORING)


async def done_page(request: Request) -> Response:
    return render(request, "done.html")


def is_admin(request: Request) -> bool:
    """Bearer token or an admin cookie issued less than 8 hours ago, both compared in constant time."""
    secrets = request.app.state.secrets
    authorization = request.headers.get("authorization", "")
    if authorization.startswith("Bearer "):
        return check_admin_token(authorization[7:], secrets.admin_token)
    return admin_cookie_valid(request.cookies.get(ADMIN_COOKIE), secrets.signing_key, secrets.admin_token)


async def admin_page(request: Request) -> Response:
    if not is_admin(request):
        return render(request, "admin_login.html", error=None)
    data = await run_in_threadpool(progress, _runtime(request))
    return render(request, "admin.html", data=data, tables=list(ROWS))


async def admin_login(request: Request) -> Response:
    secrets = request.app.state.secrets
    token = (await request.form()).get("token")
    if not isinstance(token, str) or not check_admin_token(token, secrets.admin_token):
        return render(request, "admin_login.html", status=403, error="Wrong admin token.")
    response = RedirectResponse("/admin", status_code=303)
    response.set_cookie(ADMIN_COOKIE, admin_cookie_value(secrets.signing_key, secrets.admin_token), httponly=True,
                        samesite="strict", secure=request.app.state.secure_cookies, max_age=ADMIN_SESSION_S)
    return response


async def admin_logout(request: Request) -> Response:
    response = RedirectResponse("/admin", status_code=303)
    response.delete_cookie(ADMIN_COOKIE)
    return response


def _forbidden() -> JSONResponse:
    return JSONResponse({"detail": "admin token required"}, status_code=401)


async def admin_progress(request: Request) -> Response:
    if not is_admin(request):
        return _forbidden()
    return JSONResponse(await run_in_threadpool(progress, _runtime(request)))


def admin_export(request: Request, name: str) -> Response:
    """Stream one exported table (``plays.csv``, ``events.jsonl``, ...) or ``study.json``."""
    if not is_admin(request):
        return _forbidden()
    runtime = _runtime(request)
    if name == "study.json":
        return JSONResponse(study_metadata(runtime.config, request.app.state.backend))
    match = EXPORT_NAME.match(name)
    if match is None:
        raise GameError(404, "unknown export; use <rounds|plays|events|participants>.<csv|jsonl> or study.json")
    table, fmt = match.groups()

    def chunks() -> Any:
        with snapshot_session(request.app.state.engine) as session, session.begin():
            yield from format_rows(export_rows(session, table), table, fmt)

    media = "text/csv" if fmt == "csv" else "application/x-ndjson"
    return StreamingResponse(chunks(), media_type=f"{media}; charset=utf-8",
                             headers={"content-disposition": f'attachment; filename="{name}"'})


PAGE_ROUTES = [("/", consent_page, "GET"), ("/consent", consent_submit, "POST"), ("/play", play_page, "GET"),
               ("/leaderboard", leaderboard_page, "GET"), ("/stats", stats_page, "GET"), ("/done", done_page, "GET")]
ADMIN_ROUTES = [("/admin", admin_page, "GET"), ("/admin/login", admin_login, "POST"),
                ("/admin/logout", admin_logout, "POST"), ("/admin/api/progress", admin_progress, "GET"),
                ("/admin/export/{name}", admin_export, "GET")]
