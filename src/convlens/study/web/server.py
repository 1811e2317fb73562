"""Run the study server: check the settings, migrate once, then uvicorn with one or more worker processes.

The one entry point is ``convlens study serve`` (``convlens serve`` is its alias), which calls
:func:`run_server` with :class:`ServerSettings`. Everything a typo could break is checked before anything
starts (:meth:`ServerSettings.check`: the port 1-65535 free on the host, the host an address of this
machine, every rate limit and the rate-limit storage) and refused with :class:`ServerSettingsError` (one line;
the CLI exits 2). The parent process then prepares the database — Alembic migrations, the study's claim,
the rounds — and starts uvicorn on :func:`convlens.study.web.app.app_from_env`; workers only check the
schema. Nothing on this path imports torch or the model code, so a worker is up in well under a second
(``timeout_worker_healthcheck`` is generous all the same, for a machine under load).

Stopping: SIGTERM or SIGINT finish the requests in flight (up to ``graceful_timeout`` seconds) and run the
application's shutdown, which closes the database connections; :func:`run_server` then returns
``"interrupted"`` for SIGINT (Ctrl-C; the CLI exits 130) and re-raises SIGTERM (the process ends as
terminated, as a service manager expects). uvicorn's own access log is off (it would log query strings
with Prolific ids); the application logs one line per request without the query string.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import socket
from dataclasses import dataclass, fields
from typing import Any

from convlens.study.web.settings import RATE_LIMITS, AppSettings

__all__ = ["ServerSettings", "ServerSettingsError", "log_config", "run_server"]

WORKER_HEALTHCHECK_S = 60


class ServerSettingsError(ValueError):
    """Settings the server cannot start with (one clear line)."""


@dataclass(frozen=True, kw_only=True)
class ServerSettings(AppSettings):
    """How ``convlens study serve`` runs a study: the application's settings, and where and how to serve it."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    proxy_headers: bool = False
    forwarded_allow_ips: str = "127.0.0.1"
    graceful_timeout: int = 10
    log_level: str = "info"

    def check(self) -> None:
        """Refuse settings that cannot work (:class:`ServerSettingsError`), before anything starts."""
        from convlens.study.store.config import check_rate_limit
        from convlens.study.web.throttle import check_storage

        if not 1 <= self.port <= 65535:
            raise ServerSettingsError(f"--port {self.port}: a port is 1-65535")
        if self.workers < 1:
            raise ServerSettingsError(f"--workers {self.workers}: at least 1")
        if self.log_level.lower() not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ServerSettingsError(f"--log-level {self.log_level!r}: use critical, error, warning, info or debug")
        for name in RATE_LIMITS:
            value = getattr(self, f"rate_limit_{name}")
            if value is not None:
                try:
                    check_rate_limit(value, f"--rate-limit-{name.replace('_', '-')}")
                except ValueError as exc:
                    raise ServerSettingsError(str(exc)) from None
        try:
            check_storage(self.rate_limit_storage)
        except ValueError as exc:
            raise ServerSettingsError(f"--rate-limit-storage: {exc}") from None
        check_address(self.host, self.port)


def check_address(host: str, port: int) -> None:
    """The host is an address of this machine and the port is free there (bound and released at once)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ServerSettingsError(f"--host {host!r}: not an address or a known host name ({exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServerSettingsError(f"--port {port}: already in use on {host}; stop the other server or "
                                          "choose another port") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ServerSettingsError(f"--host {host}: not an address of this machine") from None
            if exc.errno == errno.EACCES:
                raise ServerSettingsError(f"--port {port}: permission denied (ports below 1024 need privileges; "
                                          "serve behind a reverse proxy)") from None
            raise ServerSettingsError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None


def log_config(level: str = "INFO") -> dict[str, Any]:
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["study"] = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    config["handlers"]["study"] = {"formatter": "study", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
    config["loggers"]["convlens.study"] = {"handlers": ["study"], "level": level.upper(), "propagate": False}
    return config


def _supervisor_class() -> type:
    from uvicorn.supervisors.multiprocess import Multiprocess

    class Supervisor(Multiprocess):
        """uvicorn's worker supervisor, remembering which signal stopped it."""

        stopped_by: int | None = None

        def handle_int(self) -> None:
            self.stopped_by = signal.SIGINT
            super().handle_int()

        def handle_term(self) -> None:
            self.stopped_by = signal.SIGTERM
            super().handle_term()

    return Supervisor


def run_server(settings: ServerSettings) -> str:
    """Check ``settings``, prepare the database and serve until SIGTERM/SIGINT; returns ``"interrupted"``
    after Ctrl-C (SIGTERM is re-raised once the server has shut down cleanly)."""
    import uvicorn

    from convlens.study.game.opening import database_url, open_runtime
    from convlens.study.store.config import load_secrets, load_study
    from convlens.study.web.app import ENV_SETTINGS

    settings.check()
    load_study(settings.study_dir)  # a missing or broken study stops here, before the secrets are read
    load_secrets(settings.study_dir)  # a bad CONVLENS_STUDY_ADMIN_TOKEN stops here, not in every worker
    _, engine = open_runtime(settings.study_dir, settings.db, migrate=True)
    engine.dispose()
    app = {field.name: getattr(settings, field.name) for field in fields(AppSettings)}
    app.update(study_dir=os.path.abspath(settings.study_dir), db=database_url(settings.study_dir, settings.db))
    os.environ[ENV_SETTINGS] = json.dumps(app)
    config = uvicorn.Config("convlens.study.web.app:app_from_env", factory=True, host=settings.host,
                            port=settings.port, workers=settings.workers, access_log=False,
                            log_config=log_config(settings.log_level), log_level=settings.log_level.lower(),
                            proxy_headers=settings.proxy_headers, forwarded_allow_ips=settings.forwarded_allow_ips,
                            timeout_graceful_shutdown=settings.graceful_timeout,
                            timeout_worker_healthcheck=WORKER_HEALTHCHECK_S)
    if settings.workers == 1:
        server = uvicorn.Server(config)
        try:
            server.run()  # re-raises the signal that stopped it, after the graceful shutdown
        except KeyboardInterrupt:
            return "interrupted"
        if not server.started:
            raise ServerSettingsError("the server did not start (see the log above)")
        return "stopped"
    supervisor = _supervisor_class()(config, sockets=[config.bind_socket()])
    supervisor.run()
    if supervisor.stopped_by == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
    return "interrupted" if supervisor.stopped_by == signal.SIGINT else "stopped"
