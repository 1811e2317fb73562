"""Web security of the study server: CSRF, admin authentication, rate-limit keys, body and header hygiene.

* CSRF: ``asgi-csrf`` (signed double-submit cookie ``dr_csrf``; every POST must echo it in the
  ``X-CSRFToken`` header or the ``csrftoken`` form field), plus a Fetch-Metadata check refusing
  state-changing requests that the browser marks ``Sec-Fetch-Site: cross-site``.
* Admin: the token from ``secrets.json`` is compared with :func:`hmac.compare_digest` (constant time); a
  successful login sets an HttpOnly cookie ``<issue time>.<HMAC of issue time and token>`` (never the token
  itself), refused by the server :data:`ADMIN_SESSION_S` seconds after it was issued.
* Rate limits (slowapi / limits): per IP over all routes; per participant over the game's actions (keyed by
  the session only when it belongs to a participant, else by IP, so a random cookie per request escapes
  nothing); the consent form and admin login have strict per-IP limits of their own.
* Request bodies over :data:`MAX_BODY_BYTES` are refused with 413 — declared (``Content-Length``) or
  streamed (chunked: counted as it arrives); every response carries a strict
  Content-Security-Policy (no inline script), ``nosniff``, ``no-referrer`` (Prolific ids in URLs never
  leak) and ``frame-ancestors 'none'``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request

__all__ = [
    "ADMIN_COOKIE",
    "ADMIN_SESSION_S",
    "CSRF_COOKIE",
    "MAX_BODY_BYTES",
    "SESSION_COOKIE",
    "BodyLimitMiddleware",
    "BodyTooLargeError",
    "SecurityHeadersMiddleware",
    "admin_cookie_valid",
    "admin_cookie_value",
    "check_admin_token",
    "client_ip",
    "csrf_protect",
    "participant_key",
]

SESSION_COOKIE = "dr_session"
ADMIN_COOKIE = "dr_admin"
CSRF_COOKIE = "dr_csrf"
MAX_BODY_BYTES = 64 * 1024
ADMIN_SESSION_S = 8 * 3600
CLOCK_SKEW_S = 60
CSP = ("default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; form-action 'self'; "
       "base-uri 'none'; frame-ancestors 'none'")
ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


def check_admin_token(given: str | None, expected: str) -> bool:
    """Constant-time comparison of the admin token (bytes of equal or different length alike)."""
    return hmac.compare_digest((given or "").encode(), expected.encode())


def admin_cookie_value(signing_key: str, admin_token: str, issued: int | None = None) -> str:
    """``<issued>.<HMAC-SHA256(signing key, "admin:<issued>:<token>")>``; ``issued``: Unix seconds (default now)."""
    issued = int(time.time()) if issued is None else issued
    mac = hmac.new(signing_key.encode(), f"admin:{issued}:{admin_token}".encode(), hashlib.sha256).hexdigest()
    return f"{issued}.{mac}"


def admin_cookie_valid(value: str | None, signing_key: str, admin_token: str, now: float | None = None) -> bool:
    """The cookie was signed with this key and token and issued at most :data:`ADMIN_SESSION_S` ago (constant-time
    comparison of the MAC; a changed admin token or signing key invalidates every cookie)."""
    issued_text, dot, _ = (value or "").partition(".")
    if not dot or not issued_text.isdigit() or len(issued_text) > 12:
        return False
    issued, now = int(issued_text), time.time() if now is None else now
    if not now - ADMIN_SESSION_S <= issued <= now + CLOCK_SKEW_S:
        return False
    expected = admin_cookie_value(signing_key, admin_token, issued)
    return hmac.compare_digest((value or "").encode(), expected.encode())


def client_ip(request: Request) -> str:
    return "ip:" + (request.client.host if request.client else "unknown")


def participant_key(request: Request) -> str:
    """Rate-limit key of a game action: the participant (hashed session token) when the session cookie belongs
    to one, else the client address — a made-up cookie per request must not give a fresh allowance."""
    token = request.cookies.get(SESSION_COOKIE)
    if token and request.app.state.runtime.known_participant(token):
        return "p:" + hashlib.sha256(token.encode()).hexdigest()[:32]
    return client_ip(request)


async def _send_json(send: Callable, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _csrf_failed(scope: dict, send: Callable, message_id: Any) -> None:
    await _send_json(send, 403, "CSRF check failed: reload the page (missing or wrong CSRF token)")


def csrf_protect(app: ASGIApp, signing_key: str, secure: bool) -> ASGIApp:
    """Wrap ``app`` with asgi-csrf and a Fetch-Metadata cross-site refusal."""
    from asgi_csrf import asgi_csrf

    protected = asgi_csrf(app, cookie_name=CSRF_COOKIE, signing_secret=signing_key, cookie_secure=secure,
                          cookie_samesite="Strict", always_protect={"/consent", "/admin/login", "/admin/logout"},
                          send_csrf_failed=_csrf_failed)

    async def fetch_metadata(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            headers = dict(scope.get("headers") or [])
            if headers.get(b"sec-fetch-site", b"") == b"cross-site":
                await _send_json(send, 403, "cross-site request refused")
                return
        await protected(scope, receive, send)

    return fetch_metadata


class BodyTooLargeError(Exception):
    """Raised into the application when a streamed body passes the limit (caught by the middleware)."""


class BodyLimitMiddleware:
    """413 for request bodies over ``limit`` bytes: declared (``Content-Length``) or streamed (chunked).

    A streamed body is counted as the application reads it; once over the limit the read raises
    :class:`BodyTooLargeError`, and whatever the inner layers make of that (FastAPI's 400 for an unreadable JSON
    body, a 500, or the exception itself out of the CSRF form parser) the client gets one 413."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _send_json(send, 413, f"request body over {self.limit} bytes")
            return
        received, over, answered = 0, False, False

        async def counted() -> dict:
            nonlocal received, over
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                over = True
                raise BodyTooLargeError(f"request body over {self.limit} bytes")
            return message

        async def guarded(message: dict) -> None:
            nonlocal answered
            if not over:
                await send(message)
            elif not answered:  # the inner layers' answer to the aborted read becomes the 413
                answered = True
                await _send_json(send, 413, f"request body over {self.limit} bytes")

        try:
            await self.app(scope, counted, guarded)
        except BodyTooLargeError:
            if not answered:
                answered = True
                await _send_json(send, 413, f"request body over {self.limit} bytes")


class SecurityHeadersMiddleware:
    """Adds CSP and friends to every response; ``no-store`` on API, image and admin responses."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        no_store = not scope["path"].startswith("/static/")

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
                if no_store:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
