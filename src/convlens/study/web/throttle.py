"""Rate limits of the study server (the ``limits`` library, fixed windows), keyed so that a lab behind one
NAT address can run a session.

Which limit counts a request (:class:`RateLimits`; every value is checked at start-up, so a typo stops the
server instead of switching a limit off):

* every request but ``/healthz`` and ``/static/`` — ``ip``, keyed by the *participant* when the session
  cookie belongs to one (so the registered players behind one address never share an allowance), else by
  the client address;
* game actions (``POST /api/...``) — also ``participant``, by participant (by address for a session that
  is not a participant's: a made-up cookie per request gains nothing);
* the consent form (``POST /consent``: the one unauthenticated state change that registers someone) —
  ``consent`` per address (generous: a class registers at once) and ``consent_session`` per browser session
  (its CSRF cookie);
* admin sign-in and sign-out — ``admin_login`` per address.

Behind a reverse proxy the address is the proxy's unless uvicorn trusts its forwarded headers
(``--proxy-headers``, ``--forwarded-allow-ips``). Counters live in ``storage`` (``memory://`` per process;
with several workers use a shared store such as ``redis://``, else each worker counts on its own).
A refused request gets 429 with ``Retry-After``: JSON on the API, an HTML page on the pages.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import cookie_parser

from convlens.study.store.config import check_rate_limit
from convlens.study.web.security import CSRF_COOKIE, SESSION_COOKIE

__all__ = ["RateLimitMiddleware", "RateLimits", "check_storage", "html_route"]

EXEMPT = ("/healthz",)
JSON_PREFIXES = ("/api/", "/img/", "/admin/api/", "/admin/export/", "/admin/thumb/")


@dataclass(frozen=True, kw_only=True)
class RateLimits:
    """Limit strings (``"600/minute"``, ``"60/minute;1000/hour"``) of the study server, see the module."""

    ip: str
    participant: str
    consent: str
    consent_session: str
    admin_login: str

    def __post_init__(self) -> None:
        for item in fields(self):
            check_rate_limit(getattr(self, item.name), f"rate limit {item.name.replace('_', '-')}")


def check_storage(uri: str) -> str:
    """The ``limits`` storage URI as its asynchronous variant; ``ValueError`` when ``limits`` cannot use it."""
    from limits.errors import ConfigurationError
    from limits.storage import storage_from_string

    scheme = uri.split("://", 1)[0]
    if "://" not in uri or not scheme:
        raise ValueError(f"rate-limit storage {uri!r} is not a URI such as memory:// or redis://HOST:6379")
    asynchronous = uri if scheme.startswith("async+") else f"async+{uri}"
    try:
        storage_from_string(asynchronous)
    except (ConfigurationError, ValueError, ImportError) as exc:
        raise ValueError(f"rate-limit storage {uri!r}: {exc}") from None
    return asynchronous


def html_route(path: str) -> bool:
    """Whether a path answers with a page (not JSON or an image)."""
    return not path.startswith(JSON_PREFIXES)


class RateLimitMiddleware:
    """ASGI middleware applying :class:`RateLimits` (see the module docstring); ``known(token)`` tells whether a
    session token belongs to a participant, ``page(status, message)`` renders the HTML 429 page,
    ``remembered``: SHA-256 hashes of tokens known to belong to participants (checked first, no query)."""

    def __init__(self, app: Any, limits: RateLimits, storage: str, known: Callable[[str], bool],
                 page: Callable[[int, str], bytes], remembered: set[str] | None = None) -> None:
        from limits import parse_many
        from limits.aio.strategies import FixedWindowRateLimiter
        from limits.storage import storage_from_string

        self.app, self.known, self.page = app, known, page
        self.remembered = remembered if remembered is not None else set()  # hashes of known participant tokens
        self.limiter = FixedWindowRateLimiter(storage_from_string(check_storage(storage)))
        self.items = {item.name: parse_many(getattr(limits, item.name)) for item in fields(limits)}

    async def _participant(self, token: str | None) -> str | None:
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).hexdigest()
        if digest not in self.remembered and not await run_in_threadpool(self.known, token):
            return None
        return "p:" + digest[:32]

    def _checks(self, scope: dict, address: str, participant: str | None, cookies: dict[str, str]) -> list[tuple]:
        path, method = scope["path"], scope["method"]
        checks = [("ip", participant or address)]
        if method == "POST" and path.startswith("/api/"):
            checks.append(("participant", participant or address))
        elif method == "POST" and path == "/consent":
            csrf = cookies.get(CSRF_COOKIE, "none")
            checks += [("consent", address), ("consent_session", "s:" + hashlib.sha256(csrf.encode()).hexdigest())]
        elif method == "POST" and path in ("/admin/login", "/admin/logout"):
            checks.append(("admin_login", address))
        return checks

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT or scope["path"].startswith("/static/"):
            await self.app(scope, receive, send)
            return
        raw = dict(scope.get("headers") or []).get(b"cookie")
        cookies = cookie_parser(raw.decode("latin-1")) if raw else {}
        client = scope.get("client")
        address = "ip:" + (client[0] if client else "unknown")
        token = cookies.get(SESSION_COOKIE)
        participant = await self._participant(token)
        for name, key in self._checks(scope, address, participant, cookies):
            for item in self.items[name]:
                if not await self.limiter.hit(item, name, key):
                    stats = await self.limiter.get_window_stats(item, name, key)
                    await self._refuse(scope, send, max(1, math.ceil(stats.reset_time - time.time())))
                    return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: dict, send: Callable, retry_after: int) -> None:
        message = f"too many requests; wait {retry_after} s and try again"
        if html_route(scope["path"]):
            body, kind = self.page(429, message), b"text/html; charset=utf-8"
        else:
            body, kind = json.dumps({"detail": message}).encode(), b"application/json"
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(retry_after).encode())]})
        await send({"type": "http.response.body", "body": body})
