"""The Deep Reveal web application (FastAPI): :func:`create_app` for one study directory and database.

Middleware, outermost first: request log (method, path without query string — Prolific ids stay out of
the logs — status, milliseconds), security headers, body-size limit, CSRF (:mod:`convlens.study.web.security`);
slowapi rate limits (:class:`RateLimits`) are decorators on the routes (its ASGI middleware re-sends the
response start for every chunk of a streamed response, which breaks the streaming export). Errors: a refused
action answers ``{"detail": message}`` with its 4xx status; invalid bodies answer FastAPI's 422 with the failing fields.

``convlens serve`` runs :func:`app_from_env` in uvicorn workers (settings from ``CONVLENS_STUDY_*``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address

from convlens.study.game.actions import GameError
from convlens.study.game.opening import open_runtime
from convlens.study.store.config import load_secrets
from convlens.study.web.api import ACTION_ROUTES, READ_ROUTES
from convlens.study.web.pages import ADMIN_ROUTES, PAGE_ROUTES
from convlens.study.web.security import (
    BodyLimitMiddleware,
    SecurityHeadersMiddleware,
    client_ip,
    csrf_protect,
    participant_key,
)

__all__ = ["app_from_env", "create_app"]

HERE = Path(__file__).resolve().parent
access_log = logging.getLogger("convlens.study.access")
logger = logging.getLogger("convlens.study")


class AccessLogMiddleware:
    """One log line per request: method, path (no query string), status, duration in ms."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            access_log.info("%s %s %d %.1fms", scope["method"], scope["path"], status,
                            1000 * (time.perf_counter() - start))


def _templates() -> Environment:
    return Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                       trim_blocks=True, lstrip_blocks=True)


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(GameError)
    async def game_error(request: Request, exc: GameError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RateLimitExceeded)
    async def too_many(request: Request, exc: RateLimitExceeded) -> JSONResponse:
        return JSONResponse({"detail": f"too many requests ({exc.detail}); wait a moment"}, status_code=429,
                            headers={"retry-after": "60"})


@dataclass(frozen=True)
class RateLimits:
    """slowapi limit strings: per IP (every route but /healthz), per participant (game actions), and per IP on
    the consent form and the admin login/logout (strict: they are the unauthenticated state changes)."""

    ip: str
    participant: str
    consent: str
    admin_login: str


def _routes(app: FastAPI, limiter: Limiter, limits: RateLimits) -> None:
    """Every route limited per client IP; game actions also per participant; the forms per IP, strictly."""
    per_ip = limiter.shared_limit(limits.ip, scope="ip", key_func=get_remote_address)
    per_participant = limiter.shared_limit(limits.participant, scope="participant", key_func=participant_key)
    forms = {"/consent": limiter.shared_limit(limits.consent, scope="consent", key_func=client_ip),
             "/admin/login": limiter.shared_limit(limits.admin_login, scope="admin-login", key_func=client_ip)}
    forms["/admin/logout"] = forms["/admin/login"]
    for path, endpoint in ACTION_ROUTES:
        app.add_api_route(path, per_ip(per_participant(endpoint)), methods=["POST"])
    for path, endpoint in READ_ROUTES:
        app.add_api_route(path, endpoint if path == "/healthz" else per_ip(endpoint), methods=["GET"])
    for path, endpoint, method in [*PAGE_ROUTES, *ADMIN_ROUTES]:
        limited = per_ip(forms[path](endpoint) if method == "POST" else endpoint)
        app.add_api_route(path, limited, methods=[method], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")


def create_app(study_dir: str | os.PathLike[str], db: str | None = None, *, migrate: bool = True,
               rate_limit_ip: str | None = None, rate_limit_participant: str | None = None,
               rate_limit_consent: str | None = None, rate_limit_admin_login: str | None = None,
               rate_limit_storage: str = "memory://", secure_cookies: bool = False) -> Any:
    """The ASGI application for ``study_dir`` on database URL ``db`` (default: STUDY_DIR/study.sqlite).

    ``migrate=False`` (server workers) only checks the schema; the rate limits default to study.json's.
    """
    runtime, engine = open_runtime(study_dir, db, migrate=migrate)
    secrets = load_secrets(study_dir)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        logger.info("serving study %s (%d rounds) on %s", runtime.config.study_id, len(runtime.rounds),
                    engine.dialect.name)
        yield
        engine.dispose()
        logger.info("shut down cleanly: database connections closed")

    app = FastAPI(title=runtime.config.title, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    limiter = Limiter(key_func=get_remote_address, storage_uri=rate_limit_storage)
    app.state.runtime, app.state.engine, app.state.secrets = runtime, engine, secrets
    app.state.limiter, app.state.backend, app.state.secure_cookies = limiter, engine.dialect.name, secure_cookies
    app.state.templates = _templates()
    _handlers(app)
    config = runtime.config
    _routes(app, limiter, RateLimits(rate_limit_ip or config.rate_limit_ip,
                                     rate_limit_participant or config.rate_limit_participant,
                                     rate_limit_consent or config.rate_limit_consent,
                                     rate_limit_admin_login or config.rate_limit_admin_login))
    wrapped = csrf_protect(app, secrets.signing_key, secure_cookies)
    wrapped = BodyLimitMiddleware(wrapped)
    wrapped = SecurityHeadersMiddleware(wrapped)
    wrapped = AccessLogMiddleware(wrapped)
    wrapped.state = app.state  # tests and tools reach the runtime through the outer app
    wrapped.fastapi = app
    return wrapped


def app_from_env() -> Any:
    """Factory for ``uvicorn --factory`` workers: study and options from ``CONVLENS_STUDY_*`` variables."""
    env = os.environ
    return create_app(
        env["CONVLENS_STUDY_DIR"], env.get("CONVLENS_STUDY_DB") or None,
        migrate=env.get("CONVLENS_STUDY_MIGRATE", "0") == "1",
        rate_limit_ip=env.get("CONVLENS_STUDY_RATE_IP") or None,
        rate_limit_participant=env.get("CONVLENS_STUDY_RATE_PARTICIPANT") or None,
        rate_limit_consent=env.get("CONVLENS_STUDY_RATE_CONSENT") or None,
        rate_limit_admin_login=env.get("CONVLENS_STUDY_RATE_ADMIN_LOGIN") or None,
        rate_limit_storage=env.get("CONVLENS_STUDY_RATE_STORAGE", "memory://"),
        secure_cookies=env.get("CONVLENS_STUDY_SECURE_COOKIES", "0") == "1",
    )
