"""Web security of the study server: CSRF, admin authentication, body and header hygiene.

* CSRF: ``asgi-csrf`` (signed double-submit cookie ``dr_csrf``; every POST must echo it in the
  ``X-CSRFToken`` header or the ``csrftoken`` form field), plus a Fetch-Metadata check refusing
  state-changing requests that the browser marks ``Sec-Fetch-Site: cross-site``. asgi-csrf lets any request
  with ``Authorization: Bearer ...`` skip its check; no state-changing route here uses a bearer token, so the
  header is removed from POSTs before the check (:func:`csrf_protect`). A POST must be JSON or an
  urlencoded form (415 otherwise: a multipart body would reach asgi-csrf's multipart parser, which fails
  with a 500 on the python-multipart it is installed with).
* Admin: the token from ``secrets.json`` is compared with :func:`hmac.compare_digest` (constant time); a
  successful login sets an HttpOnly cookie ``<issue time>.<random id>.<HMAC of both and the token>`` (never
  the token itself), refused :data:`ADMIN_SESSION_S` seconds after it was issued, and at once after "Sign
  out" (its id is stored in ``admin_signouts``, shared by every worker).
* Request bodies over :data:`MAX_BODY_BYTES` are refused with 413 — declared (``Content-Length``) or
  streamed (chunked: counted as it arrives); every response carries a strict Content-Security-Policy (no
  inline script), ``nosniff``, ``no-referrer`` (Prolific ids in URLs never leak) and ``frame-ancestors
  'none'``; over HTTPS (or with ``--secure-cookies``) also HSTS, and the session and admin cookies are
  ``Secure``.
* Rate limits: :mod:`convlens.study.web.throttle`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request

__all__ = [
    "ADMIN_COOKIE",
    "ADMIN_SESSION_S",
    "CSRF_COOKIE",
    "HSTS",
    "MAX_BODY_BYTES",
    "SESSION_COOKIE",
    "BodyLimitMiddleware",
    "BodyTooLargeError",
    "SecurityHeadersMiddleware",
    "admin_cookie_id",
    "admin_cookie_valid",
    "admin_cookie_value",
    "check_admin_token",
    "client_ip",
    "csrf_protect",
]

SESSION_COOKIE = "dr_session"
ADMIN_COOKIE = "dr_admin"
CSRF_COOKIE = "dr_csrf"
MAX_BODY_BYTES = 64 * 1024
ADMIN_SESSION_S = 8 * 3600
CLOCK_SKEW_S = 60
CSP = ("default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; form-action 'self'; "
       "base-uri 'none'; frame-ancestors 'none'")
HSTS = "max-age=31536000; includeSubDomains"
BODY_TYPES = (b"application/json", b"application/x-www-form-urlencoded")
ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


def check_admin_token(given: str | None, expected: str) -> bool:
    """Constant-time comparison of the admin token (bytes of equal or different length alike)."""
    return hmac.compare_digest((given or "").encode(), expected.encode())


def admin_cookie_value(signing_key: str, admin_token: str, issued: int | None = None,
                       cookie_id: str | None = None) -> str:
    """``<issued>.<id>.<HMAC-SHA256(signing key, "admin:<issued>:<id>:<token>")>``; ``issued``: Unix seconds
    (default now), ``id``: 32 random hex digits (default: new), what "Sign out" records."""
    issued = int(time.time()) if issued is None else issued
    cookie_id = cookie_id or secrets.token_hex(16)
    mac = hmac.new(signing_key.encode(), f"admin:{issued}:{cookie_id}:{admin_token}".encode(), hashlib.sha256)
    return f"{issued}.{cookie_id}.{mac.hexdigest()}"


def admin_cookie_id(value: str | None) -> str | None:
    """The random id of a well-formed admin cookie (what sign-out stores), else None."""
    parts = (value or "").split(".")
    if len(parts) != 3 or len(parts[1]) != 32 or any(c not in "0123456789abcdef" for c in parts[1]):
        return None
    return parts[1]


def admin_cookie_valid(value: str | None, signing_key: str, admin_token: str, now: float | None = None) -> bool:
    """The cookie was signed with this key and token and issued at most :data:`ADMIN_SESSION_S` ago (constant-time
    comparison of the MAC; a changed admin token or signing key invalidates every cookie). Whether it was signed
    out is the caller's check (:func:`admin_cookie_id`, the database)."""
    issued_text = (value or "").split(".")[0]
    cookie_id = admin_cookie_id(value)
    if cookie_id is None or not issued_text.isdigit() or len(issued_text) > 12:
        return False
    issued, now = int(issued_text), time.time() if now is None else now
    if not now - ADMIN_SESSION_S <= issued <= now + CLOCK_SKEW_S:
        return False
    expected = admin_cookie_value(signing_key, admin_token, issued, cookie_id)
    return hmac.compare_digest((value or "").encode(), expected.encode())


def client_ip(request: Request) -> str:
    return "ip:" + (request.client.host if request.client else "unknown")


async def _send_json(send: Callable, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _media_type(headers: list[tuple[bytes, bytes]]) -> bytes:
    value = dict(headers).get(b"content-type", b"")
    return value.split(b";", 1)[0].strip().lower()


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
            raw = list(scope.get("headers") or [])
            headers = dict(raw)
            if headers.get(b"sec-fetch-site", b"") == b"cross-site":
                await _send_json(send, 403, "cross-site request refused")
                return
            kind = _media_type(raw)
            if kind and kind not in BODY_TYPES:
                await _send_json(send, 415, f"unsupported body type {kind.decode('latin-1')[:60]!r}: send JSON or "
                                            "an urlencoded form")
                return
            scope = {**scope, "headers": [(k, v) for k, v in raw if k != b"authorization"]}  # no bearer skip
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
    """Adds CSP and friends to every response; ``no-store`` on API, image and admin responses; HSTS when the
    request came over HTTPS (as uvicorn reads it, from a trusted proxy's headers too) or ``secure`` is set."""

    def __init__(self, app: ASGIApp, secure: bool = False) -> None:
        self.app = app
        self.secure = secure

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        no_store = not scope["path"].startswith("/static/")
        https = self.secure or scope.get("scheme") == "https"

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
                if no_store:
                    headers.append((b"cache-control", b"no-store"))
                if https:
                    headers.append((b"strict-transport-security", HSTS.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
