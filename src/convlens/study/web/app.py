"""The Deep Reveal web application (FastAPI): :func:`create_app` for one study directory and database.

Middleware, outermost first: request log (method, path without query string — Prolific ids stay out of
the logs — status, milliseconds), security headers (HSTS over HTTPS), body-size limit, rate limits
(:mod:`convlens.study.web.throttle`), CSRF with the body-type check (:mod:`convlens.study.web.security`).
Errors: a refused action answers ``{"detail": message}`` with its 4xx status; invalid bodies answer
FastAPI's 422 with the failing fields. A background task expires the leases that ran out
(:meth:`convlens.study.game.actions.StudyRuntime.sweep`) every :data:`SWEEP_S` seconds.

``convlens study serve`` runs :func:`app_from_env` in uvicorn workers (settings from
``CONVLENS_STUDY_APP``, JSON of :class:`AppSettings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from convlens.study.game.actions import GameError
from convlens.study.game.opening import open_runtime
from convlens.study.store.config import load_secrets
from convlens.study.web.api import ACTION_ROUTES, READ_ROUTES
from convlens.study.web.pages import ADMIN_ROUTES, PAGE_ROUTES
from convlens.study.web.security import BodyLimitMiddleware, SecurityHeadersMiddleware, csrf_protect
from convlens.study.web.settings import AppSettings
from convlens.study.web.throttle import RateLimitMiddleware, RateLimits

__all__ = ["ENV_SETTINGS", "SWEEP_S", "AppSettings", "app_from_env", "create_app"]

HERE = Path(__file__).resolve().parent
ENV_SETTINGS = "CONVLENS_STUDY_APP"
SWEEP_S = 30.0
THREADS = 10  # = the engine's pool size (convlens.study.store.db.make_engine)
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


def _routes(app: FastAPI) -> None:
    for path, endpoint in ACTION_ROUTES:
        app.add_api_route(path, endpoint, methods=["POST"])
    for path, endpoint in READ_ROUTES:
        app.add_api_route(path, endpoint, methods=["GET"])
    for path, endpoint, method in [*PAGE_ROUTES, *ADMIN_ROUTES]:
        app.add_api_route(path, endpoint, methods=[method], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")


async def _sweeper(runtime: Any, every: float) -> None:
    """Expire the leases that ran out, every ``every`` seconds, for as long as the server runs."""
    while True:
        await asyncio.sleep(every)
        try:
            await run_in_threadpool(runtime.sweep)
        except Exception:  # a database hiccup must not end the task: the next round tries again
            logger.exception("lease sweep failed")


def create_app(study_dir: str | os.PathLike[str], db: str | None = None, *, migrate: bool = True,
               rate_limit_ip: str | None = None, rate_limit_participant: str | None = None,
               rate_limit_consent: str | None = None, rate_limit_consent_session: str | None = None,
               rate_limit_admin_login: str | None = None, rate_limit_storage: str = "memory://",
               secure_cookies: bool = False) -> Any:
    """The ASGI application for ``study_dir`` on database URL ``db`` (default: STUDY_DIR/study.sqlite).

    ``migrate=False`` (server workers) only checks the schema; the rate limits default to study.json's.
    """
    runtime, engine = open_runtime(study_dir, db, migrate=migrate)
    secrets = load_secrets(study_dir)
    config = runtime.config
    limits = RateLimits(ip=rate_limit_ip or config.rate_limit_ip,
                        participant=rate_limit_participant or config.rate_limit_participant,
                        consent=rate_limit_consent or config.rate_limit_consent,
                        consent_session=rate_limit_consent_session or config.rate_limit_consent_session,
                        admin_login=rate_limit_admin_login or config.rate_limit_admin_login)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # as many threads for the synchronous endpoints as database connections: more would only queue for
        # a connection (or SQLite's one writer) while contending for the interpreter
        to_thread.current_default_thread_limiter().total_tokens = THREADS
        logger.info("serving study %s (%d rounds, quota %d) on %s", config.study_id, len(runtime.rounds),
                    runtime.quota.total, engine.dialect.name)
        sweeper = asyncio.create_task(_sweeper(runtime, min(SWEEP_S, max(1.0, config.lease_seconds / 4))))
        yield
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        engine.dispose()
        logger.info("shut down cleanly: database connections closed")

    app = FastAPI(title=config.title, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime, app.state.engine, app.state.secrets = runtime, engine, secrets
    app.state.backend, app.state.secure_cookies = engine.dialect.name, secure_cookies
    app.state.templates = _templates()
    app.state.limits = limits
    _handlers(app)
    _routes(app)

    def page(status: int, message: str) -> bytes:
        template = app.state.templates.get_template("message.html")
        return template.render(config=config, csrf_token="", title="Too many requests", message=message,
                               status=status).encode()

    wrapped = csrf_protect(app, secrets.signing_key, secure_cookies)
    wrapped = RateLimitMiddleware(wrapped, limits, rate_limit_storage, runtime.known_participant, page,
                                  runtime.known_tokens)
    wrapped = BodyLimitMiddleware(wrapped)
    wrapped = SecurityHeadersMiddleware(wrapped, secure=secure_cookies)
    wrapped = AccessLogMiddleware(wrapped)
    wrapped.state = app.state  # tests and tools reach the runtime through the outer app
    wrapped.fastapi = app
    return wrapped


def app_from_env() -> Any:
    """Factory for ``uvicorn --factory`` workers: :class:`AppSettings` as JSON in ``CONVLENS_STUDY_APP``."""
    values = asdict(AppSettings(**json.loads(os.environ[ENV_SETTINGS])))
    return create_app(values.pop("study_dir"), values.pop("db"), migrate=False, **values)
