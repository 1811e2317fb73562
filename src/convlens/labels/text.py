"""Players' descriptions as text the label pipeline can use: cleaning, class-name removal, tokens, stop-words.

INV's label analysis (Bianchi et al., IJCAI-24, LabelAnalysis.ipynb) lower-cases each description,
removes the class name and its ``'s`` possessive as whole words, and takes the whitespace tokens that are
not stop-words as candidate labels. Here, with every decision recorded for the audit trail:

* :func:`clean_description` unescapes HTML entities, removes tags, normalises Unicode (NFKC, curly
  apostrophes), replaces emoji, symbols and control characters by spaces, lower-cases and collapses
  whitespace. Texts longer than ``max_chars`` are not used (a reason is returned, nothing is truncated).
* :func:`class_name_pattern` matches a class name as whole words, with any space, hyphen or underscore
  (or none) between its words, followed by an optional possessive (``'s``, ``s'``, ``'``) or plural
  (``s``, ``es``). The plural goes beyond the authors' code, which left "parachutes" in place and so
  could make the class name itself a label.
* :func:`words` are letter runs (apostrophes and hyphens inside a word kept; digits and punctuation
  dropped), unlike the authors' ``split(' ')`` which kept punctuation on tokens ("wings," != "wings").
* :func:`load_stop_words`: NLTK's English list plus the authors' 14 additions, shipped as package data.
* every class name of the study is removed from every description (not only the guessed class's, as the
  authors did: a wrong guess otherwise keeps the true class's name), and so are the single words of the
  play's own class names ("tiger" of "tiger cat").
* :func:`load_non_visual_words` (package data ``non_visual_en.txt``): words that name nothing visible —
  about the guess ("no idea", "just guessed", "pretty sure"), fitting any picture ("the colours", "the
  background", "the shape"), or too vague alone ("something dark"). :func:`content_words` keeps the
  words that are none of these; a description without one names no visual content and is not used for
  labels (the audit says which words it had).
* :class:`Translator`: the hook for non-English descriptions. Off by default: such descriptions are
  excluded with a reason. The authors translated Italian answers with an online service (DeepL,
  IT -> EN-US, the class name as context); plug any translator with this interface to do the same.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Protocol, runtime_checkable

__all__ = [
    "DEFAULT_MAX_CHARS",
    "CleanResult",
    "Translator",
    "class_name_pattern",
    "clean_description",
    "content_words",
    "english_share",
    "is_english_tag",
    "is_known_english",
    "load_non_visual_words",
    "load_stop_words",
    "name_words",
    "remove_class_names",
    "words",
]

DEFAULT_MAX_CHARS = 1000
_TAG = re.compile(r"<[^<>]*>")
_WORD = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*")
_SPACE = re.compile(r"\s+")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u00b4": "'", "`": "'"})
_DROP_CATEGORIES = ("S", "C")  # symbols (emoji, math, currency) and control/format/unassigned characters


@runtime_checkable
class Translator(Protocol):
    """Translates descriptions into English (a plug-in; none is built in, so nothing goes online).

    ``translate(texts, source, context)`` returns one English text per input; ``source`` is the
    BCP-47 tag the player chose (e.g. ``"it"``); ``context`` is the class name (DeepL's ``context``).
    """

    name: str

    def translate(self, texts: Sequence[str], source: str, context: str | None = None) -> list[str]: ...


@dataclass(frozen=True)
class CleanResult:
    """A cleaned description, or ``text=None`` and the reason it cannot be used."""

    text: str | None
    reason: str | None = None


def is_english_tag(tag: str) -> bool:
    """True for ``en``, ``en-US``, ... and for an empty tag (the game's default language is English)."""
    return tag.strip().lower().replace("_", "-").split("-")[0] in ("", "en")


def normalise_text(raw: str) -> str:
    """HTML entities unescaped, tags removed, NFKC, straight apostrophes, no symbols, lower case."""
    text = _TAG.sub(" ", html.unescape(raw))
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
    text = "".join(
        " " if unicodedata.category(ch)[0] in _DROP_CATEGORIES and not ch.isspace() else ch for ch in text
    )
    return _SPACE.sub(" ", text.lower()).strip()


@lru_cache(maxsize=256)
def class_name_pattern(names: tuple[str, ...]) -> re.Pattern[str] | None:
    """Whole-word pattern for the class names (words joined by optional space/hyphen/underscore) with
    an optional possessive or plural ending; ``None`` when no name has a word."""
    alternatives = []
    for name in names:
        parts = re.findall(r"[^\W_]+", name.lower().translate(_APOSTROPHES))
        if parts:
            alternatives.append(r"[\s_-]*".join(re.escape(p) for p in parts))
    if not alternatives:
        return None
    alternatives.sort(key=len, reverse=True)
    return re.compile(r"(?<![\w'])(?:" + "|".join(alternatives) + r")(?:'s|s'|es|s|')?(?![\w'])")


def remove_class_names(text: str, names: Sequence[str]) -> str:
    """``text`` without the class names (see :func:`class_name_pattern`), whitespace collapsed."""
    pattern = class_name_pattern(tuple(names))
    if pattern is None:
        return text
    return _SPACE.sub(" ", pattern.sub(" ", text)).strip()


def words(text: str) -> list[str]:
    """Letter runs of ``text`` in order (apostrophes/hyphens inside a word kept)."""
    return _WORD.findall(text)


def clean_description(raw: str, class_names: Sequence[str], max_chars: int = DEFAULT_MAX_CHARS) -> CleanResult:
    """Clean one description for the class whose names are ``class_names`` (the class-name removal of the
    authors' ``LabelAnalysis.ipynb``).

    Returns the cleaned text, or ``None`` with the reason: empty, longer than ``max_chars`` (on the raw
    text), nothing but symbols/markup, or nothing left once the class name is removed.
    """
    if not raw.strip():
        return CleanResult(None, "empty description")
    if len(raw) > max_chars:
        return CleanResult(None, f"too long: {len(raw)} characters > {max_chars} (raise max_chars to use it)")
    text = normalise_text(raw)
    if not words(text):
        return CleanResult(None, "no words (only symbols, emoji, digits or markup)")
    text = remove_class_names(text, class_names)
    if not words(text):
        return CleanResult(None, "nothing but the class name")
    return CleanResult(text)


def english_share(text: str) -> float:
    """Share of the words that simplemma knows as English (1.0 for a text without words)."""
    import simplemma

    return float(simplemma.in_target_language(text, lang="en")) if words(text) else 1.0


@lru_cache(maxsize=1)
def load_stop_words() -> frozenset[str]:
    """NLTK's 179 English stop-words plus the INV authors' 14 (package data ``stopwords_en.txt``)."""
    text = resources.files("convlens.labels").joinpath("data/stopwords_en.txt").read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


@lru_cache(maxsize=1)
def load_non_visual_words() -> dict[str, str]:
    """word -> category (``meta``, ``generic``, ``vague``) from package data ``non_visual_en.txt``."""
    text = resources.files("convlens.labels").joinpath("data/non_visual_en.txt").read_text(encoding="utf-8")
    found: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        category, _, listed = line.partition(":")
        for word in listed.split():
            found.setdefault(word, category.strip())
    return found


def name_words(names: Sequence[str]) -> frozenset[str]:
    """The lower-case words of class names (``"tiger cat"`` -> tiger, cat), with their plural ``s``."""
    found = {w for name in names for w in words(normalise_text(name))}
    return frozenset(found | {w + "s" for w in found})


@lru_cache(maxsize=65536)
def is_known_english(word: str) -> bool:
    """True when simplemma's English dictionary knows ``word`` (offline; used to leave real words unmerged)."""
    import simplemma

    return bool(simplemma.is_known(word, lang="en"))


# Prepositions that end the noun phrase a description starts with ("the handle *of* the cup": the head is
# "handle"); a content word list puts that head last, where English noun phrases have it.
PREPOSITIONS = frozenset((
    "of", "on", "in", "with", "at", "near", "under", "over", "from", "by", "for", "to", "behind", "above", "below",
    "around", "inside", "outside", "like", "through", "between", "against", "along", "across", "into", "onto",
    "without", "beside", "besides", "among", "within", "upon",
))


def content_words(
    text: str, stop_words: frozenset[str], non_visual: Mapping[str, str] | None = None,
    removed: frozenset[str] = frozenset(),
) -> tuple[list[str], list[str]]:
    """``(content, dropped)``: the words of ``text`` that may name something visible and the non-visual ones
    (``category:word``); stop-words and ``removed`` (class-name words) are neither.

    ``content`` keeps the order of the text except for its **head**, moved to the end: the last content word
    of the first stretch between prepositions that has one ("the handle of the white cup" -> handle is the
    head: ``["white", "cup", "handle"]``; "looks like sharp teeth" -> teeth).
    """
    non_visual = load_non_visual_words() if non_visual is None else non_visual
    content, dropped = [], []
    head: int | None = None
    stretch_start = 0
    for word in words(text):
        if word in PREPOSITIONS:
            if head is None and len(content) > stretch_start:
                head = len(content) - 1
            stretch_start = len(content)
        if word in stop_words or word in removed or word in PREPOSITIONS or len(word) < 2:
            continue
        if word in non_visual:
            dropped.append(f"{non_visual[word]}:{word}")
        else:
            content.append(word)
    if head is not None and head != len(content) - 1:
        content.append(content.pop(head))
    return content, dropped
