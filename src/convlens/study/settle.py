"""How settled a round's label is, from its descriptions so far: the measure behind ``least-settled`` assignment.

No embedding model runs in the server, so a round's descriptions are compared through their normalised
content words (:func:`content_words`): the label pipeline's cleaning (HTML, Unicode, the class name and
its possessive removed; :func:`convlens.concepts.text.clean_description`), letter tokens, the pipeline's
stop-words dropped, simplemma lemmas ("stripes", "striped" -> "stripe"), and typos folded into a word
one edit away (also once a plural "s"/"es" the lemmatiser left on a misspelt word is dropped) that has
more support in the same round (:func:`fold_typos`; words of 4+ letters).

Evidence of a round (:func:`round_evidence`): every described guess votes for each of its content words
with the weight its label would get in the INV label score, w = (1 - 0.1 k) at reveal level k, divided by
4 for a wrong guess. The *leader* is the word with the most weight (the would-be best label); its rival
is the strongest word among descriptions that do not mention the leader (words written together, like
"dark" in "dark stripes", support each other and do not compete).

Value of one more play (:func:`play_value`) = P(the play gives a usable description) x P(the leader is
not the round's settled label):

* P(description) = (d + 1) / (n + 2), the Beta(1, 1)-posterior mean of the share of finished plays that
  gave a usable description (d of n; resigns and empty or stop-word-only texts give none) — rounds that
  nobody can describe lose priority instead of absorbing every play;
* P(unsettled) = P(theta < 1/2) for theta ~ Beta(a + 1, b + 1), a and b the leader's and the rival's
  weights: the posterior probability that the rival, not the leader, is the more frequent answer
  (Sheng, Provost & Ipeirotis, KDD 2008, "label uncertainty", applied to the two strongest answers);
  1 when the round has no described guess yet (no label at all).

Hand values: no description 1 x 1/2 = 0.5; two different words 0.5 x 3/4 = 0.375; one description
0.25 x 2/3 = 0.167; two agreeing 0.125 x 3/4 = 0.094 (all at level 0, correct guesses).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

__all__ = [
    "RoundEvidence",
    "content_words",
    "fold_typos",
    "one_edit_apart",
    "play_value",
    "round_evidence",
    "unsettled_probability",
    "vote_weight",
]

MIN_TYPO_LENGTH = 4
WRONG_WEIGHT = 0.25
PRIOR = 1.0


@lru_cache(maxsize=65_536)
def content_words(text: str, class_name: str = "") -> frozenset[str]:
    """Lemmas of the non-stop-word tokens of ``text`` with the class name removed (empty if unusable)."""
    from convlens.concepts.labels import lemmatize_en
    from convlens.concepts.text import clean_description, load_stop_words, words

    cleaned = clean_description(text, [class_name] if class_name else [])
    if cleaned.text is None:
        return frozenset()
    stop = load_stop_words()
    return frozenset(lemmatize_en(w) for w in words(cleaned.text) if w not in stop and len(w) > 1)


def one_edit_apart(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` differ by exactly one insertion, deletion, substitution or swap of two
    adjacent letters (optimal-string-alignment distance 1)."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) > len(b):
        a, b = b, a
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    if len(a) < len(b):
        return a[i:] == b[i + 1:]
    if a[i + 1:] == b[i + 1:]:
        return True
    return i + 1 < len(a) and a[i] == b[i + 1] and a[i + 1] == b[i] and a[i + 2:] == b[i + 2:]


def _typo_of(word: str, other: str) -> bool:
    """``word`` is one edit from ``other``, also after dropping a plural ending the lemmatiser could not
    strip from a misspelt (unknown) word: "stirpes" is a typo of "stripe"."""
    stems = {word, word[:-1] if word.endswith("s") else word, word[:-2] if word.endswith("es") else word}
    return any(one_edit_apart(stem, other) for stem in stems)


def fold_typos(weights: Mapping[str, float]) -> dict[str, str]:
    """word -> the word it is counted as: a word of 4+ letters one edit away from a word with more weight
    (ties: alphabetical) is folded into the strongest such word; others map to themselves."""
    order = sorted(weights, key=lambda w: (-weights[w], w))
    target: dict[str, str] = {}
    for rank, word in enumerate(order):
        heavier = [w for w in order[:rank] if target[w] == w and len(word) >= MIN_TYPO_LENGTH
                   and weights[w] > weights[word] and _typo_of(word, w)]
        target[word] = heavier[0] if heavier else word
    return target


def vote_weight(level: int, correct: bool) -> float:
    """The INV label-score weight of one game: (1 - 0.1 level), divided by 4 for a wrong guess."""
    return (1.0 - 0.1 * level) * (1.0 if correct else WRONG_WEIGHT)


@dataclass
class RoundEvidence:
    """A round's finished plays seen through their content words."""

    plays: int = 0
    described: int = 0
    votes: dict[str, float] = field(default_factory=dict)
    leader: str | None = None
    leader_weight: float = 0.0
    rival: str | None = None
    rival_weight: float = 0.0


def _leader_and_rival(described: Sequence[tuple[frozenset[str], float]], evidence: RoundEvidence) -> None:
    votes: dict[str, float] = defaultdict(float)
    for words, weight in described:
        for word in words:
            votes[word] += weight
    if not votes:
        return
    evidence.votes = dict(votes)
    evidence.leader = min(votes, key=lambda w: (-votes[w], w))
    evidence.leader_weight = votes[evidence.leader]
    rivals: dict[str, float] = defaultdict(float)
    for words, weight in described:
        if evidence.leader not in words:
            for word in words:
                rivals[word] += weight
    if rivals:
        evidence.rival = min(rivals, key=lambda w: (-rivals[w], w))
        evidence.rival_weight = rivals[evidence.rival]


def round_evidence(plays: Iterable[tuple[str, int, str | None]], class_name: str = "") -> RoundEvidence:
    """Evidence from a round's finished plays, each ``(outcome, level, description)``; outcome is
    win | lose | resign (descriptions of resigns are not used, as in the label pipeline)."""
    evidence = RoundEvidence()
    texts: list[tuple[frozenset[str], float]] = []
    for outcome, level, description in plays:
        evidence.plays += 1
        if outcome not in ("win", "lose") or not description:
            continue
        words = content_words(description, class_name)
        if words:
            texts.append((words, vote_weight(level, outcome == "win")))
    evidence.described = len(texts)
    raw: dict[str, float] = defaultdict(float)
    for words, weight in texts:
        for word in words:
            raw[word] += weight
    folded = fold_typos(raw)
    _leader_and_rival([(frozenset(folded[w] for w in words), weight) for words, weight in texts], evidence)
    return evidence


def unsettled_probability(leader_weight: float, rival_weight: float, described: int) -> float:
    """P(theta < 1/2), theta ~ Beta(leader + 1, rival + 1); 1 without any described guess."""
    if described == 0:
        return 1.0
    from scipy.special import betainc

    return float(betainc(leader_weight + PRIOR, rival_weight + PRIOR, 0.5))


def play_value(evidence: RoundEvidence) -> float:
    """P(a usable description) x P(the leader is not the settled label)."""
    p_description = (evidence.described + 1.0) / (evidence.plays + 2.0)
    return p_description * unsettled_probability(evidence.leader_weight, evidence.rival_weight, evidence.described)
