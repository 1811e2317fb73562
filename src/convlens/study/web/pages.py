"""HTML pages (Jinja2, autoescaped) and the admin area.

``GET /`` consent (or "this study is full") · ``POST /consent`` · ``GET /play`` game · ``GET /leaderboard`` ·
``GET /stats`` · ``GET /done`` (the completion code, only after the quota) · ``GET /admin`` (login form or
progress, paged: ``?rounds=N&people=M``) · ``POST /admin/login|logout`` · ``GET /admin/api/progress`` ·
``GET /admin/thumb/{round}`` · ``GET /admin/export/{table}.{csv|jsonl}`` (streaming; also study.json).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import ValidationError
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from convlens.study.batch.export import ROWS, export_rows, format_rows, snapshot_session, study_metadata
from convlens.study.game.actions import PLAYER_SCORING, STUDY_FULL, GameError, StudyRuntime
from convlens.study.game.queries import leaderboard, player_stats, progress
from convlens.study.store.db import AdminSignout, utcnow
from convlens.study.web.schemas import ConsentForm
from convlens.study.web.security import (
    ADMIN_COOKIE,
    ADMIN_SESSION_S,
    SESSION_COOKIE,
    admin_cookie_id,
    admin_cookie_valid,
    admin_cookie_value,
    check_admin_token,
)

__all__ = ["ADMIN_ROUTES", "PAGE_ROUTES", "is_admin", "render"]

LANGUAGE_NAMES = {"en": "English", "it": "Italiano", "de": "Deutsch", "fr": "Français", "es": "Español",
                  "pt": "Português", "nl": "Nederlands"}
EXPORT_NAME = re.compile(r"^(rounds|plays|events|participants)\.(csv|jsonl)$")
ROUND_ID = re.compile(r"^[0-9a-f]{12}$")
SESSION_MAX_AGE = 60 * 60 * 24 * 30


def _runtime(request: Request) -> StudyRuntime:
    return request.app.state.runtime


def _secure(request: Request) -> bool:
    return bool(request.app.state.secure_cookies) or request.url.scheme == "https"


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    csrf = request.scope.get("csrftoken")
    runtime = _runtime(request)
    page = request.app.state.templates.get_template(template).render(
        request=request, config=runtime.config, quota=runtime.quota, csrf_token=csrf() if csrf else "", **context)
    return HTMLResponse(page, status_code=status)


def _full(runtime: StudyRuntime) -> bool:
    with runtime.reader.begin() as session:
        return runtime.capacity(session) == 0


async def consent_page(request: Request) -> Response:
    runtime = _runtime(request)
    if await run_in_threadpool(runtime.known_participant, request.cookies.get(SESSION_COOKIE)):
        return RedirectResponse("/play", status_code=303)
    if await run_in_threadpool(_full, runtime):
        return render(request, "full.html")
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
    except GameError as exc:  # consent text changed, this Prolific id already took part, or the study is full
        if exc.message == STUDY_FULL:
            return render(request, "full.html", status=409)
        return render(request, "consent.html", status=exc.status, params=params, errors=[exc.message])
    response = RedirectResponse("/play", status_code=303)
    response.set_cookie(SESSION_COOKIE, token, max_age=SESSION_MAX_AGE, httponly=True, samesite="lax",
                        secure=_secure(request))
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
    """The completion code, only for a participant whose quota is finished (checked on the server)."""
    runtime, token = _runtime(request), request.cookies.get(SESSION_COOKIE)
    if not await run_in_threadpool(runtime.known_participant, token):
        return RedirectResponse("/", status_code=303)
    if not await run_in_threadpool(runtime.completed, token):
        return RedirectResponse("/play", status_code=303)
    return render(request, "done.html")


def _signed_out(runtime: StudyRuntime, cookie_id: str) -> bool:
    with runtime.reader.begin() as session:
        return session.scalar(select(AdminSignout.cookie_id).where(AdminSignout.cookie_id == cookie_id)) is not None


def is_admin(request: Request) -> bool:
    """Bearer token (GET only: no state change takes one), or an admin cookie issued less than 8 hours ago and
    not signed out; tokens and signatures compared in constant time."""
    secrets = request.app.state.secrets
    authorization = request.headers.get("authorization", "")
    if authorization.startswith("Bearer ") and request.method in ("GET", "HEAD"):
        return check_admin_token(authorization[7:], secrets.admin_token)
    cookie = request.cookies.get(ADMIN_COOKIE)
    if not admin_cookie_valid(cookie, secrets.signing_key, secrets.admin_token):
        return False
    return not _signed_out(_runtime(request), admin_cookie_id(cookie) or "")


def _page_number(request: Request, name: str) -> int:
    value = request.query_params.get(name, "1")
    return int(value) if value.isdigit() and len(value) < 7 else 1


async def admin_page(request: Request) -> Response:
    if not await run_in_threadpool(is_admin, request):
        return render(request, "admin_login.html", error=None)
    data = await run_in_threadpool(progress, _runtime(request), _page_number(request, "rounds"),
                                   _page_number(request, "people"))
    return render(request, "admin.html", data=data, tables=list(ROWS))


async def admin_login(request: Request) -> Response:
    secrets = request.app.state.secrets
    token = (await request.form()).get("token")
    if not isinstance(token, str) or not check_admin_token(token, secrets.admin_token):
        return render(request, "admin_login.html", status=403, error="Wrong admin token.")
    response = RedirectResponse("/admin", status_code=303)
    response.set_cookie(ADMIN_COOKIE, admin_cookie_value(secrets.signing_key, secrets.admin_token), httponly=True,
                        samesite="strict", secure=_secure(request), max_age=ADMIN_SESSION_S)
    return response


def _sign_out(runtime: StudyRuntime, cookie_id: str) -> None:
    with runtime.write() as session:
        if session.get(AdminSignout, cookie_id) is None:
            session.add(AdminSignout(cookie_id=cookie_id, signed_out_at=utcnow()))


async def admin_logout(request: Request) -> Response:
    """Forget the cookie in the browser and refuse it on the server from now on (every worker)."""
    cookie = request.cookies.get(ADMIN_COOKIE)
    secrets = request.app.state.secrets
    if admin_cookie_valid(cookie, secrets.signing_key, secrets.admin_token):
        await run_in_threadpool(_sign_out, _runtime(request), admin_cookie_id(cookie))
    response = RedirectResponse("/admin", status_code=303)
    response.delete_cookie(ADMIN_COOKIE)
    return response


def _forbidden() -> JSONResponse:
    return JSONResponse({"detail": "admin token required"}, status_code=401)


async def admin_progress(request: Request) -> Response:
    if not await run_in_threadpool(is_admin, request):
        return _forbidden()
    data = await run_in_threadpool(progress, _runtime(request), _page_number(request, "rounds"),
                                   _page_number(request, "people"))
    return JSONResponse(data)


def admin_thumbnail(request: Request, round_id: str) -> Response:
    """A round's last reveal level (what its cluster shows at most), for the admin's list of rounds."""
    if not is_admin(request):
        return _forbidden()
    runtime = _runtime(request)
    if not ROUND_ID.match(round_id) or round_id not in runtime.rounds:
        raise GameError(404, "unknown round")
    path = runtime.files.image(round_id, f"level{runtime.config.levels - 1}.png")
    return Response(path.read_bytes(), media_type="image/png")


def admin_export(request: Request, name: str) -> Response:
    """Stream one exported table (``plays.csv``, ``events.jsonl``, ...) or ``study.json``; participant text in
    CSV is neutralised for spreadsheets (``?raw=1``: exact), JSON Lines stays exact."""
    if not is_admin(request):
        return _forbidden()
    runtime = _runtime(request)
    raw_csv = request.query_params.get("raw") == "1"
    if name == "study.json":
        return JSONResponse(study_metadata(runtime.config, request.app.state.backend, runtime.quota,
                                           csv_cells="raw" if raw_csv else "neutralised"))
    match = EXPORT_NAME.match(name)
    if match is None:
        raise GameError(404, "unknown export; use <rounds|plays|events|participants>.<csv|jsonl> or study.json")
    table, fmt = match.groups()

    def chunks() -> Any:
        with snapshot_session(request.app.state.engine) as session, session.begin():
            yield from format_rows(export_rows(session, table), table, fmt, neutralise=not raw_csv)

    media = "text/csv" if fmt == "csv" else "application/x-ndjson"
    return StreamingResponse(chunks(), media_type=f"{media}; charset=utf-8",
                             headers={"content-disposition": f'attachment; filename="{name}"'})


PAGE_ROUTES = [("/", consent_page, "GET"), ("/consent", consent_submit, "POST"), ("/play", play_page, "GET"),
               ("/leaderboard", leaderboard_page, "GET"), ("/stats", stats_page, "GET"), ("/done", done_page, "GET")]
ADMIN_ROUTES = [("/admin", admin_page, "GET"), ("/admin/login", admin_login, "POST"),
                ("/admin/logout", admin_logout, "POST"), ("/admin/api/progress", admin_progress, "GET"),
                ("/admin/thumb/{round_id}", admin_thumbnail, "GET"), ("/admin/export/{name}", admin_export, "GET")]
