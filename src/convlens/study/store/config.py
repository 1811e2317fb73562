"""A study's settings and rounds, as written by ``convlens study create`` into STUDY_DIR.

Files of a study directory:

* ``study.json`` — :class:`StudyConfig`: what the team sets (title, study and consent versions, consent
  text, classes, languages, plays per round, the participant's quota and share of gold rounds, the play
  lease, completion code/redirect, rate limits) and what creation recorded (INV runs used, reveal levels,
  convlens version). The team may edit the text fields after creation; the server reads the file at
  start and refuses a file it cannot use (an unparsable rate limit, a quota nobody can finish).
  ``one_round_per_image`` (default true) gives each participant at most one round per image: once a play
  ends the player sees the true class and the full image, so any later round of that image (another
  layer, cluster or its gold round) would be a known answer. Set it to false only for a study that wants
  every player on every round.
* ``rounds.json`` — one :class:`RoundSpec` per round (image x layer x cluster, plus gold rounds).
* ``images/<round_id>/level<k>.png`` (k = 0..5) and ``full.png`` — rendered once at creation.
* ``secrets.json`` (mode 0600) — the admin token and the key that signs CSRF cookies.
* ``study.sqlite`` — the default database (created by ``convlens serve``).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LANGUAGE_PATTERN",
    "RoundSpec",
    "StudyConfig",
    "StudyFiles",
    "StudySecrets",
    "check_rate_limit",
    "load_rounds",
    "load_secrets",
    "load_study",
]

FORMAT = "convlens-deep-reveal-study"
FORMAT_VERSION = 1
LANGUAGE_PATTERN = r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}$"  # a BCP-47 tag (language[-region...])
STUDY_JSON = "study.json"
ROUNDS_JSON = "rounds.json"
SECRETS_JSON = "secrets.json"
ADMIN_TOKEN_MIN = 16

DEFAULT_CONSENT = (
    "This is a research study about how people describe what image classifiers look at. You will see "
    "partly revealed images and guess their class; you may describe what made you decide. We record your "
    "guesses, descriptions, timing and an optional nickname under a random pseudonymous id; no name, e-mail "
    "or IP address is stored. Participation is voluntary and you may stop at any time."
)


def check_rate_limit(value: str, name: str = "rate limit") -> str:
    """``value`` if the ``limits`` library parses it (``"600/minute"``, ``"60/minute;1000/hour"``), else
    ``ValueError`` naming it: a typo must stop the server, never switch the limit off."""
    from limits import parse_many

    try:
        parsed = parse_many(value)
    except ValueError:
        parsed = []
    if not parsed:
        raise ValueError(f"{name} {value!r} is not a rate limit such as 600/minute or 60/minute;1000/hour")
    return value


class InvRunRecord(BaseModel):
    """One INV run folder used by the study."""

    path: str
    name: str
    format_version: int
    images: int
    layers: list[str]


class StudyConfig(BaseModel):
    """``study.json``."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    study_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    title: str = Field(min_length=1, max_length=200)
    study_version: str = Field(default="1", min_length=1, max_length=40)
    consent_version: str = Field(default="1", min_length=1, max_length=40)
    consent_text: str = Field(default=DEFAULT_CONSENT, min_length=1, max_length=20_000)
    classes: list[str] = Field(min_length=2)
    languages: list[str] = Field(default_factory=lambda: ["en", "it"], min_length=1)
    plays_per_round: int = Field(default=3, ge=1, le=10_000)
    quota: int | None = Field(default=None, ge=1, le=100_000)
    rounds_per_player: int | None = Field(default=None, ge=1, le=100_000)
    gold_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    lease_seconds: int = Field(default=1200, ge=1, le=7 * 24 * 3600)
    completion_code: str | None = Field(default=None, max_length=64)
    completion_url: str | None = Field(default=None, max_length=500, pattern=r"^https?://")
    assignment_policy: str = "uniform"
    assignment_seed: int = 0
    one_round_per_image: bool = True
    rate_limit_ip: str = "600/minute"
    rate_limit_participant: str = "120/minute"
    rate_limit_consent: str = "60/minute;1000/hour"
    rate_limit_consent_session: str = "10/minute"
    rate_limit_admin_login: str = "10/minute"
    max_description_chars: int = Field(default=1000, ge=10, le=10_000)
    max_nickname_chars: int = Field(default=32, ge=1, le=100)
    reveal_percentages: list[float] = Field(min_length=2)
    gold_percentages: list[float] = Field(min_length=2)
    layer_choice: list[str] | None = None
    inv_runs: list[InvRunRecord] = Field(default_factory=list)
    convlens_version: str = ""

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, value: list[str]) -> list[str]:
        cleaned = [c.strip() for c in value]
        if any(not c or len(c) > 100 for c in cleaned) or len(set(cleaned)) != len(cleaned):
            raise ValueError("classes must be distinct, non-empty names of at most 100 characters")
        return cleaned

    @field_validator("languages")
    @classmethod
    def _language_tags(cls, value: list[str]) -> list[str]:
        import re

        for tag in value:
            if not re.fullmatch(LANGUAGE_PATTERN, tag):
                raise ValueError(f"{tag!r} is not a BCP-47 language tag such as en, it or pt-BR")
        return value

    @field_validator("rate_limit_ip", "rate_limit_participant", "rate_limit_consent", "rate_limit_consent_session",
                     "rate_limit_admin_login")
    @classmethod
    def _rate_limits(cls, value: str) -> str:
        return check_rate_limit(value)

    @model_validator(mode="after")
    def _levels_match(self) -> StudyConfig:
        if len(self.gold_percentages) != len(self.reveal_percentages):
            raise ValueError("gold_percentages and reveal_percentages need the same number of levels")
        return self

    @property
    def levels(self) -> int:
        return len(self.reveal_percentages)


class RoundSpec(BaseModel):
    """One round: an INV cluster shown through its map, or a gold round (known answer, high reveal).

    The one definition of a round's fields: the database's ``rounds`` table, the export's ``rounds`` table
    and the label pipeline's reader (:class:`convlens.labels.export.Round`) carry exactly these names. The
    reader sits below this package and reads CSV, where a null is an empty cell: its text fields
    (``cluster_id``, ``layer``) hold ``""`` where this model holds None, its numbers keep None
    (tests/study/test_export.py checks every field's round trip)."""

    model_config = ConfigDict(extra="forbid")

    round_id: str
    cluster_id: str | None
    image_id: str
    image_name: str
    layer: str | None
    layer_depth: int | None
    n_layers: int
    cluster_index: int | None
    cluster_weight: float | None
    fmap_count: int | None
    true_class: str
    gold: bool
    inv_run: str


class StudySecrets(BaseModel):
    admin_token: str = Field(min_length=ADMIN_TOKEN_MIN)
    signing_key: str = Field(min_length=32)


class StudyFiles:
    """Paths inside a study directory; :meth:`image` never leaves ``images/``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.images = self.root / "images"
        self._checked: dict[tuple[str, str], Path] = {}

    @property
    def config(self) -> Path:
        return self.root / STUDY_JSON

    @property
    def rounds(self) -> Path:
        return self.root / ROUNDS_JSON

    @property
    def secrets(self) -> Path:
        return self.root / SECRETS_JSON

    @property
    def sqlite(self) -> Path:
        return self.root / "study.sqlite"

    def image(self, round_id: str, name: str) -> Path:
        """``images/<round_id>/<name>``, refusing any path that resolves outside ``images/`` (each checked path
        is remembered: the server asks for the same few thousand files again and again)."""
        found = self._checked.get((round_id, name))
        if found is not None:
            return found
        path = (self.images / round_id / name).resolve()
        if not path.is_relative_to(self.images) or path.parent.parent != self.images:
            raise PermissionError(f"image path {round_id}/{name} leaves the study's images folder")
        if len(self._checked) < 100_000:
            self._checked[(round_id, name)] = path
        return path


def check_study_folder(root: str | os.PathLike[str]) -> StudyFiles:
    """The study folder's paths; ``NotADirectoryError`` when the path is a file (one clear line)."""
    files = StudyFiles(root)
    if files.root.exists() and not files.root.is_dir():
        raise NotADirectoryError(f"{files.root}: not a folder (give the study folder made by `convlens study create`)")
    return files


def load_study(root: str | os.PathLike[str]) -> StudyConfig:
    files = check_study_folder(root)
    if not files.config.is_file():
        raise FileNotFoundError(f"{files.root}: no {STUDY_JSON}; create the study with `convlens study create`")
    try:
        config = StudyConfig.model_validate_json(files.config.read_text(encoding="utf-8"))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        raise ValueError(f"{files.config}: {where}: {first['msg']}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{files.config}: not UTF-8 text") from None
    if config.format != FORMAT or config.format_version != FORMAT_VERSION:
        raise ValueError(f"{files.config}: format {config.format} v{config.format_version}, expected v{FORMAT_VERSION}")
    return config


def load_rounds(root: str | os.PathLike[str]) -> list[RoundSpec]:
    """``rounds.json``; ``ValueError`` naming the file when it is missing or malformed."""
    path = StudyFiles(root).rounds
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [RoundSpec.model_validate(entry) for entry in data["rounds"]]
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (create the study with `convlens study create`)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a rounds file written by `convlens study create` "
                         f"({type(exc).__name__})") from None


def new_secrets() -> StudySecrets:
    return StudySecrets(admin_token=secrets.token_urlsafe(24), signing_key=secrets.token_urlsafe(48))


def write_secrets(root: Path, value: StudySecrets) -> None:
    path = Path(root) / SECRETS_JSON
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value.model_dump_json(indent=2))


def load_secrets(root: str | os.PathLike[str]) -> StudySecrets:
    """``secrets.json``; ``CONVLENS_STUDY_ADMIN_TOKEN`` in the environment overrides the admin token (validated
    like the file's: at least 16 characters, else ``ValueError``)."""
    path = check_study_folder(root).secrets
    try:
        value = StudySecrets.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (the admin token and signing key made by `convlens study create`)"
                                ) from None
    except (ValidationError, UnicodeDecodeError):
        raise ValueError(f"{path}: not a secrets file written by `convlens study create`") from None
    override = os.environ.get("CONVLENS_STUDY_ADMIN_TOKEN")
    if not override:
        return value
    try:
        return StudySecrets.model_validate({**value.model_dump(), "admin_token": override})
    except ValidationError:
        raise ValueError(f"CONVLENS_STUDY_ADMIN_TOKEN is too short ({len(override)} characters): the admin token "
                         f"needs at least {ADMIN_TOKEN_MIN} characters") from None
