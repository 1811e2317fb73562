"""Pydantic models of every request body and form (unknown fields refused; text bounded)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from convlens.study.store.config import LANGUAGE_PATTERN

__all__ = [
    "PLAY_ID_PATTERN",
    "ConsentForm",
    "DescribeRequest",
    "GuessRequest",
    "NextRequest",
    "ResignRequest",
    "RevealRequest",
    "SkipRequest",
]

PLAY_ID_PATTERN = r"^[0-9a-f]{24}$"
REQUEST_ID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
MAX_TEXT = 10_000  # hard bound; the study's own (smaller) limit is checked by the server
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _no_control_characters(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("text must not contain control characters")
    return value


RequestId = Annotated[str, Field(pattern=REQUEST_ID_PATTERN, description="client-made UUID; retries reuse it")]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TEXT),
                 AfterValidator(_no_control_characters)]
ShortText = Annotated[str, StringConstraints(strip_whitespace=True, max_length=64),
                      AfterValidator(_no_control_characters)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NextRequest(_Request):
    request_id: RequestId


class RevealRequest(_Request):
    request_id: RequestId
    level: int = Field(ge=1, le=99, description="the level asked for: current level + 1")


class GuessRequest(_Request):
    request_id: RequestId
    class_name: str = Field(min_length=1, max_length=100)


class ResignRequest(_Request):
    request_id: RequestId


class SkipRequest(_Request):
    request_id: RequestId


class DescribeRequest(_Request):
    request_id: RequestId
    text: Text
    language: str = Field(pattern=LANGUAGE_PATTERN, max_length=35)


class ConsentForm(_Request):
    """The consent page's form; Prolific's URL parameters travel in hidden fields."""

    model_config = ConfigDict(extra="ignore")

    consent: bool
    consent_version: str = Field(min_length=1, max_length=40)
    nickname: ShortText | None = None
    prolific_pid: ShortText | None = None
    study_id: ShortText | None = None
    session_id: ShortText | None = None
