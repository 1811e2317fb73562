"""A browser made of raw ASGI messages: drives the study application in process with no HTTP client and no
HTTP parsing, so that a profile holds the server's own work only (benchmarks/bench_study.py)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from http.cookies import SimpleCookie
from typing import Any


class Browser:
    """One participant's cookies and CSRF token; :meth:`play` plays a whole round as the game page does."""

    def __init__(self, app: Any) -> None:
        self.app, self.cookies, self.csrf = app, {}, ""

    async def request(self, method: str, path: str, body: bytes = b"", content_type: str | None = None
                      ) -> tuple[int, bytes]:
        headers = [(b"host", b"t")]
        if self.cookies:
            headers.append((b"cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items()).encode()))
        if content_type:
            headers += [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        if self.csrf and method == "POST":
            headers.append((b"x-csrftoken", self.csrf.encode()))
        path_only, _, query = path.partition("?")
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path_only, "raw_path": path_only.encode(), "query_string": query.encode(),
                 "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000), "server": ("t", 80)}
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
        status, out, response_headers = 0, [], []

        async def send(message: dict) -> None:
            nonlocal status, response_headers
            if message["type"] == "http.response.start":
                status, response_headers = message["status"], message.get("headers", [])
            elif message["type"] == "http.response.body":
                out.append(message.get("body", b""))
        await self.app(scope, receive, send)
        for key, value in response_headers:
            if key.lower() == b"set-cookie":
                cookie: SimpleCookie = SimpleCookie()
                cookie.load(value.decode())
                for name, morsel in cookie.items():
                    self.cookies[name] = morsel.value
        return status, b"".join(out)

    async def join(self) -> None:
        status, page = await self.request("GET", "/")
        self.csrf = re.search(rb'name="csrf-token" content="([^"]*)"', page).group(1).decode()
        form = f"csrftoken={self.csrf}&consent=yes&consent_version=1".encode()
        status, _ = await self.request("POST", "/consent", form, "application/x-www-form-urlencoded")
        assert status == 303, status

    async def post(self, path: str, **body: Any) -> dict:
        body["request_id"] = str(uuid.uuid4())
        status, data = await self.request("POST", path, json.dumps(body).encode(), "application/json")
        assert status == 200, (status, data)
        return json.loads(data)

    async def play(self, classes: list[str]) -> int:
        """Start, two reveals, a guess and a description, fetching each new image; returns the 5 submissions
        (0 when the participant's quota is done)."""
        view = await self.post("/api/next")
        if view.get("done"):
            return 0
        await self.request("GET", view["image"])
        for level in (1, 2):
            view = await self.post(f"/api/plays/{view['play']}/reveal", level=level)
            await self.request("GET", view["image"])
        view = await self.post(f"/api/plays/{view['play']}/guess", class_name=classes[0])
        view = await self.post(f"/api/plays/{view['play']}/describe", text="stripes and ears", language="en")
        await self.request("GET", view["image"])
        return 5
