"""How settled a round's label is, from its descriptions so far: the measure behind ``least-settled`` assignment.

A round's descriptions are compared through their normalised content words (:func:`content_words`; no
embedding model runs in the server). Its *leader* is the best-supported word (the would-be best label), its
*rival* the strongest word among the descriptions that do not mention the leader (:func:`round_evidence`).
The value of one more play (:func:`play_value`) is P(the play gives a usable description) times the
optimistic knowledge gradient of the leader-vs-rival decision (Chen, Lin & Zhou, ICML 2013, "Optimistic
knowledge gradient policy for optimal budget allocation in crowdsourcing", Beta(1, 1) priors).

Why this measure: it is largest for an unplayed round and for a tie, and shrinks both as descriptions agree
and during a long dispute between two words (synonyms the server cannot know are one concept), which a plain
"probability that the leader is wrong" would feed forever; and rounds that players rarely describe lose
priority instead of absorbing every play. Hand values (right guesses, rate 1): unplayed 0.25; 1-1 split
0.1875; one description 0.125; two agreeing 0.0625; six resigns 4/10 x 0.25 = 0.1.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

__all__ = [
    "HEDGES",
    "RoundEvidence",
    "confidence",
    "content_words",
    "description_rate",
    "evidence_weight",
    "fold_typos",
    "knowledge_gradient",
    "one_edit_apart",
    "play_value",
    "round_evidence",
]

HEDGES = frozenset((
    "think", "guess", "believe", "feel", "feeling", "seem", "appear", "look", "see", "notice", "sure", "pretty",
    "probably", "clearly", "obviously", "obvious", "basically", "mostly", "definitely", "certainly", "perhaps",
    "possibly", "kind", "sort", "thing", "stuff", "lucky", "idea", "gut", "familiar",
))
MIN_TYPO_LENGTH = 4
WRONG_WEIGHT = 0.25
PRIOR = 1.0
PRIOR_PLAYS = 4.0


@lru_cache(maxsize=100_000)
def _lemma(word: str) -> str:
    from convlens.labels.labelling import lemmatize_en

    return lemmatize_en(word)


@lru_cache(maxsize=65_536)
def content_words(text: str, class_name: str = "", drop_hedges: bool = True) -> frozenset[str]:
    """Lemmas of the non-stop-word tokens of ``text`` with the class name removed (empty if unusable);
    hedges (:data:`HEDGES`) dropped unless ``drop_hedges`` is false.

    The label pipeline's cleaning (HTML, Unicode, the class name and its possessive removed;
    :func:`convlens.labels.text.clean_description`), letter tokens, its stop-words dropped, simplemma lemmas
    ("stripes", "striped" -> "stripe"). Hedges report the player's certainty or act of seeing ("i think",
    "looks like", "no idea"), not what is in the image: without them "i think wheels" and "i think stripes"
    would agree on "think". Typos are folded per round (:func:`fold_typos`)."""
    from convlens.labels.text import clean_description, load_stop_words, words

    cleaned = clean_description(text, [class_name] if class_name else [])
    if cleaned.text is None:
        return frozenset()
    stop = load_stop_words()
    lemmas = (_lemma(w) for w in words(cleaned.text) if w not in stop and len(w) > 1)
    return frozenset(lemma for lemma in lemmas if not (drop_hedges and lemma in HEDGES))


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


def evidence_weight(correct: bool) -> float:
    """Support one description gives its words: 1 for a right guess, 1/4 for a wrong one."""
    return 1.0 if correct else WRONG_WEIGHT


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


def round_evidence(plays: Iterable[tuple[str, int, str | None]], class_name: str = "",
                   drop_hedges: bool = True) -> RoundEvidence:
    """Evidence from a round's finished plays, each ``(outcome, level, description)``; outcome is
    win | lose | resign (descriptions of resigns are not used, as in the label pipeline).

    Every described guess counts for each of its content words (typos folded into a word one edit away with
    more support), :func:`evidence_weight`: 1 for a right guess, 1/4 for a wrong one (the INV label score's
    discount). The reveal level is not used: a description at level 5 says as much about what players see as
    one at level 0. Words written together ("dark" in "dark stripes") support each other and do not compete:
    the rival is taken among the descriptions that do not mention the leader."""
    evidence = RoundEvidence()
    texts: list[tuple[frozenset[str], float]] = []
    for outcome, _level, description in plays:
        evidence.plays += 1
        if outcome not in ("win", "lose") or not description:
            continue
        words = content_words(description, class_name, drop_hedges)
        if words:
            texts.append((words, evidence_weight(outcome == "win")))
    evidence.described = len(texts)
    raw: dict[str, float] = defaultdict(float)
    for words, weight in texts:
        for word in words:
            raw[word] += weight
    folded = fold_typos(raw)
    _leader_and_rival([(frozenset(folded[w] for w in words), weight) for words, weight in texts], evidence)
    return evidence


def confidence(leader: float, rival: float) -> float:
    """max(P, 1 - P), P = P(theta > 1/2) for theta ~ Beta(leader + 1, rival + 1)."""
    from scipy.special import betainc

    p = 1.0 - float(betainc(leader + PRIOR, rival + PRIOR, 0.5))
    return max(p, 1.0 - p)


@lru_cache(maxsize=65_536)
def knowledge_gradient(leader: float, rival: float) -> float:
    """Largest gain in :func:`confidence` that one more description (for either side) can bring:
    ``max(c(a + 1, b), c(a, b + 1)) - c(a, b)`` (0.25 with no description, 0.1875 at 1-1, 0.0625 for two
    agreeing, 0.10 at 5-4)."""
    now = confidence(leader, rival)
    return max(confidence(leader + 1, rival), confidence(leader, rival + 1)) - now


def description_rate(evidences: Iterable[RoundEvidence]) -> float:
    """The study's share of finished plays with a usable description, (sum d + 1) / (sum n + 2)."""
    described = plays = 0
    for evidence in evidences:
        described += evidence.described
        plays += evidence.plays
    return (described + 1.0) / (plays + 2.0)


def play_value(evidence: RoundEvidence, rate: float = 1.0) -> float:
    """P(a usable description) x optimistic knowledge gradient of the leader-vs-rival decision;
    ``rate``: the study's description rate (:func:`description_rate`).

    P(description) = (d + k r) / (n + k): the share of the round's n finished plays that gave a usable
    description (d), shrunk towards the study's rate r with k = :data:`PRIOR_PLAYS` pseudo-plays (empirical
    Bayes): two resigns say little about a round, ten say it is hard to describe."""
    p_description = (evidence.described + PRIOR_PLAYS * rate) / (evidence.plays + PRIOR_PLAYS)
    return p_description * knowledge_gradient(evidence.leader_weight, evidence.rival_weight)
