"""Run the study server: migrate once, then uvicorn with one or more worker processes.

``convlens serve STUDY_DIR`` and ``python -m convlens.study.web.server STUDY_DIR`` (the same, without loading
the rest of the CLI) prepare the database in the parent process — Alembic migrations, the study's claim,
the rounds — and then start uvicorn on :func:`convlens.study.web.app.app_from_env`; workers only check the
schema. uvicorn handles SIGTERM/SIGINT by finishing in-flight requests (up to
``graceful_timeout`` seconds) and running the application's shutdown, which closes the database
connections. uvicorn's own access log is off (it would log query strings with Prolific ids); the
application logs one line per request without the query string.
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Any

__all__ = ["log_config", "main", "serve"]


def log_config(level: str = "INFO") -> dict[str, Any]:
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["study"] = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    config["handlers"]["study"] = {"formatter": "study", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
    config["loggers"]["convlens.study"] = {"handlers": ["study"], "level": level.upper(), "propagate": False}
    return config


def serve(study_dir: str | os.PathLike[str], db: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          workers: int = 1, rate_limit_ip: str | None = None, rate_limit_participant: str | None = None,
          rate_limit_storage: str = "memory://", secure_cookies: bool = False, proxy_headers: bool = False,
          graceful_timeout: int = 10, log_level: str = "info", rate_limit_consent: str | None = None,
          rate_limit_admin_login: str | None = None) -> None:
    """Prepare the database and serve until SIGTERM/SIGINT."""
    import uvicorn

    from convlens.study.game.opening import database_url, open_runtime
    from convlens.study.store.config import load_secrets

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    load_secrets(study_dir)  # a bad CONVLENS_STUDY_ADMIN_TOKEN stops here, not in every worker
    _, engine = open_runtime(study_dir, db, migrate=True)
    engine.dispose()
    os.environ.update({
        "CONVLENS_STUDY_DIR": str(os.path.abspath(study_dir)), "CONVLENS_STUDY_DB": database_url(study_dir, db),
        "CONVLENS_STUDY_MIGRATE": "0", "CONVLENS_STUDY_RATE_IP": rate_limit_ip or "",
        "CONVLENS_STUDY_RATE_PARTICIPANT": rate_limit_participant or "",
        "CONVLENS_STUDY_RATE_CONSENT": rate_limit_consent or "",
        "CONVLENS_STUDY_RATE_ADMIN_LOGIN": rate_limit_admin_login or "",
        "CONVLENS_STUDY_RATE_STORAGE": rate_limit_storage,
        "CONVLENS_STUDY_SECURE_COOKIES": "1" if secure_cookies else "0",
    })
    uvicorn.run("convlens.study.web.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                access_log=False, log_config=log_config(log_level), log_level=log_level,
                proxy_headers=proxy_headers, timeout_graceful_shutdown=graceful_timeout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m convlens.study.web.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir")
    parser.add_argument("--db", default=None, help="database URL (default: sqlite file in STUDY_DIR)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rate-limit-ip", default=None)
    parser.add_argument("--rate-limit-participant", default=None)
    parser.add_argument("--rate-limit-consent", default=None)
    parser.add_argument("--rate-limit-admin-login", default=None)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    serve(args.study_dir, args.db, args.host, args.port, args.workers, args.rate_limit_ip,
          args.rate_limit_participant, log_level=args.log_level, rate_limit_consent=args.rate_limit_consent,
          rate_limit_admin_login=args.rate_limit_admin_login)


if __name__ == "__main__":
    main()
