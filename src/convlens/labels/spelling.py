"""Misspellings in players' words: merged into their frequent form, or removed when they spell a class name.

Players mistype ("whiskrs", "petlas", "hanldebar"); left alone, every slip becomes a label of its own, and
a misspelt class name ("tgier", "diasy") slips past class-name removal. :func:`spelling_fixes` decides,
for every word the study's usable descriptions contain, with rapidfuzz's optimal-string-alignment (OSA)
similarity ``1 - distance / max(len)`` (one adjacent swap, dropped, doubled or replaced letter is one edit):

* a word that simplemma's English dictionary does not know and that is at least ``min_similarity`` similar
  to a word of a class name (or its plural) is a **misspelt class name** and removed like the name;
* a word that simplemma does not know, of at least ``min_length`` letters, is **merged** into the most
  similar word of the vocabulary that players used more often, or as often when that word is a known
  English word (ties: the more frequent), when the similarity is at least ``min_similarity``.

Known English words are never changed ("cap" stays "cap" next to "cup"): a slip that makes another real
word cannot be told from that word. The threshold was measured on generated slips (``benchmarks/
bench_crowd.py``, section "spelling"); every fix is written into the audit row of each play it touched
and counted in ``labels.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_MIN_LENGTH", "DEFAULT_MIN_SIMILARITY", "SpellingFix", "spelling_fixes"]

DEFAULT_MIN_SIMILARITY = 0.75
DEFAULT_MIN_LENGTH = 3
CLASS_NAME = "class name"


@dataclass(frozen=True)
class SpellingFix:
    """A word changed before labelling: ``target`` is its frequent form, or ``""`` for a misspelt class name
    (``kind`` = ``"class name"``, ``matched`` the name word it resembles)."""

    word: str
    target: str
    similarity: float
    kind: str
    matched: str = ""

    def describe(self) -> str:
        if self.kind == CLASS_NAME:
            return f"misspelt class name {self.word!r} (~{self.matched!r}, similarity {self.similarity:.2f}) removed"
        return f"spelling {self.word!r} -> {self.target!r} (similarity {self.similarity:.2f})"


def _known(word: str) -> bool:
    from convlens.labels.text import is_known_english

    return is_known_english(word)


def spelling_fixes(
    counts: Mapping[str, int], class_words: frozenset[str] = frozenset(), *,
    min_similarity: float = DEFAULT_MIN_SIMILARITY, min_length: int = DEFAULT_MIN_LENGTH,
    known: Callable[[str], bool] = _known,
) -> dict[str, SpellingFix]:
    """word -> fix for the words of ``counts`` (word -> number of plays using it) that are misspelt.

    ``class_words``: the words of the study's class names (see :func:`convlens.labels.text.name_words`).
    A merge into a word that is itself merged follows on to that word's form.
    """
    from rapidfuzz.distance import OSA
    from rapidfuzz.process import cdist

    unknown = sorted(w for w in counts if len(w) >= min_length and w not in class_words and not known(w))
    if not unknown:
        return {}
    fixes: dict[str, SpellingFix] = {}
    names = sorted(w for w in class_words if len(w) >= max(min_length, 4))  # "cat" is too short to be sure
    if names:
        similarity = cdist(unknown, names, scorer=OSA.normalized_similarity, workers=1)
        for row, word in enumerate(unknown):
            best = int(np.argmax(similarity[row]))
            if similarity[row, best] >= min_similarity:
                fixes[word] = SpellingFix(word, "", float(similarity[row, best]), CLASS_NAME, names[best])
    remaining = [w for w in unknown if w not in fixes]
    vocabulary = sorted((w for w in counts if w not in class_words), key=lambda w: (-counts[w], w))
    if not remaining or not vocabulary:
        return fixes
    similarity = cdist(remaining, vocabulary, scorer=OSA.normalized_similarity, workers=1)
    frequency = np.asarray([counts[w] for w in vocabulary])
    is_known = np.asarray([known(w) for w in vocabulary])
    for row, word in enumerate(remaining):
        more = (frequency > counts[word]) | (is_known & (frequency == counts[word]))
        allowed = more & (similarity[row] >= min_similarity)
        if not allowed.any():
            continue
        order = np.lexsort((-frequency, -similarity[row]))  # most similar, then most frequent
        best = int(next(i for i in order if allowed[i]))
        fixes[word] = SpellingFix(word, vocabulary[best], float(similarity[row, best]), "merged")
    for word, fix in list(fixes.items()):  # a rare slip of a slip: to the final form (frequency grows: no cycle)
        target = fix.target
        while target in fixes and fixes[target].target:
            target = fixes[target].target
        if target != fix.target:
            fixes[word] = SpellingFix(word, target, fix.similarity, fix.kind)
    return fixes
