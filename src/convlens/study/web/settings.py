"""What the study application is built with (:class:`AppSettings`), shared by ``create_app``'s workers and
``convlens study serve``'s :class:`~convlens.study.web.server.ServerSettings`, which extends it. Kept apart
from the application so that the serving parent process never imports FastAPI for it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RATE_LIMITS", "AppSettings"]

RATE_LIMITS = ("ip", "participant", "consent", "consent_session", "admin_login")
"""The rate limits a study sets (``rate_limit_<name>``; None = study.json's)."""


@dataclass(frozen=True, kw_only=True)
class AppSettings:
    """What a server worker needs to build the application (rate limits: None = study.json's)."""

    study_dir: str
    db: str | None = None
    rate_limit_ip: str | None = None
    rate_limit_participant: str | None = None
    rate_limit_consent: str | None = None
    rate_limit_consent_session: str | None = None
    rate_limit_admin_login: str | None = None
    rate_limit_storage: str = "memory://"
    secure_cookies: bool = False
