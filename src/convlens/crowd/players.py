"""A simulated crowd for Deep Reveal: planted concepts, players' behaviour and their words (no I/O here).

:mod:`convlens.crowd.play` makes these players play the real server over HTTP; this module decides what
they do: :func:`plan_crowd` plants one concept per cluster round (with rising and falling trends over
depth), :class:`PlayerModel` guesses, resigns and describes, and :func:`paraphrase` says a concept the way
people do (inflections, synonyms, typos, templates, fillers). Why: a crowd whose truth is known tests
what the label pipeline and the global report must recover. Everything is drawn from generators seeded
by :func:`seeded` (SHA-256 of the seed and a key), so a round's planted concept depends only on (seed,
round) and a player's behaviour in a round only on (seed, player, round), not on the order of play.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from convlens.study.game.assignment import seeded

__all__ = [
    "CONCEPTS",
    "FILLERS",
    "OFF_TOPIC",
    "TEMPLATES",
    "Concept",
    "CrowdModel",
    "CrowdPlan",
    "PlantedRound",
    "PlayerModel",
    "paraphrase",
    "plan_crowd",
    "seeded",
    "typo",
]


@dataclass(frozen=True)
class Concept:
    """A visual concept and the words people use for it."""

    name: str
    forms: tuple[str, ...] = ()
    synonyms: tuple[str, ...] = ()
    modifiers: tuple[str, ...] = ()

    @property
    def words(self) -> tuple[str, ...]:
        """Every word that names the concept: head, inflections, synonyms."""
        return (self.name, *self.forms, *self.synonyms)


def _c(name: str, forms: str, synonyms: str, modifiers: str) -> Concept:
    return Concept(name, tuple(forms.split()), tuple(synonyms.split()), tuple(modifiers.split()))


CONCEPTS: tuple[Concept, ...] = (
    _c("stripes", "stripe striped", "bands", "dark thin"),
    _c("ears", "ear", "", "pointy furry"),
    _c("whiskers", "whisker", "bristles", "long white"),
    _c("fur", "furry", "coat", "soft fluffy"),
    _c("eyes", "eye", "pupils", "green bright"),
    _c("nose", "noses", "snout muzzle", "pink wet"),
    _c("wheels", "wheel", "tyres tires", "round black"),
    _c("wings", "wing winged", "fins", "wide metal"),
    _c("handle", "handles", "grip", "curved small"),
    _c("foam", "foamy", "froth bubbles", "white light"),
    _c("cup", "cups", "mug", "ceramic white"),
    _c("saucer", "saucers", "plate dish", "round white"),
    _c("helmet", "helmets", "visor", "shiny white"),
    _c("flag", "flags", "banner", "american small"),
    _c("suit", "suits", "spacesuit uniform", "bulky white"),
    _c("gloves", "glove", "mittens", "thick white"),
    _c("flames", "flame flaming", "fire exhaust", "orange bright"),
    _c("smoke", "smoky", "vapour vapor", "grey thick"),
    _c("tower", "towers", "gantry scaffold", "tall metal"),
    _c("nozzle", "nozzles", "thruster", "big round"),
    _c("mane", "manes", "hair", "long flowing"),
    _c("hooves", "hoof", "feet", "dark hard"),
    _c("legs", "leg legged", "limbs", "long thin"),
    _c("tail", "tails", "", "long bushy"),
    _c("saddle", "saddles", "seat", "leather brown"),
    _c("grass", "grassy", "lawn meadow", "green short"),
    _c("windows", "window", "portholes", "small round"),
    _c("spots", "spot spotted", "dots patches", "dark round"),
    _c("teeth", "tooth", "fangs", "sharp white"),
    _c("paws", "paw", "claws", "soft small"),
    _c("beans", "bean", "grains", "roasted brown"),
    _c("steam", "steamy", "mist", "hot rising"),
    _c("spoon", "spoons", "teaspoon", "silver small"),
    _c("reflection", "reflections reflective", "shine glare", "bright shiny"),
    _c("edges", "edge", "outline contour", "sharp straight"),
    _c("logo", "logos", "emblem badge", "printed small"),
)
OFF_TOPIC: tuple[str, ...] = (
    "no idea", "just a guess", "the colours", "the background", "the shape of it", "it looked familiar",
    "lucky guess", "the corner", "blurry pixels", "gut feeling", "the overall shape", "something dark",
)
FILLERS: tuple[str, ...] = ("i think", "maybe", "probably", "pretty sure", "kind of", "clearly", "i guess", "mostly")
TEMPLATES: tuple[str, ...] = (
    "{w}", "{w}", "the {w}", "{m} {w}", "the {m} {w}", "i saw the {w}", "it has {m} {w}", "looks like {w}",
    "because of the {w}", "{w} visible", "those {m} {w}",
)
CLASS_TEMPLATES: tuple[str, ...] = ("the {c}'s {w}", "{w} of the {c}", "{m} {w} like a {c}", "{c} {w}")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class CrowdModel:
    """Every probability of the simulated crowd (defaults: a plausible, imperfect crowd)."""

    concepts_per_class: int = 3
    trends: bool = True
    trend_strength: float = 0.8
    clarity: tuple[float, float] = (0.55, 0.95)
    guess: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 1.0)
    correct: tuple[float, ...] = (0.5, 0.6, 0.7, 0.78, 0.85, 0.9)
    skill: float = 0.1
    resign: float = 0.03
    resign_last: float = 0.25
    describe: float = 0.9
    other: float = 0.1
    inflection: float = 0.25
    synonym: float = 0.2
    typo: float = 0.06
    filler: float = 0.25
    class_name: float = 0.15

    def __post_init__(self) -> None:
        if len(self.guess) != len(self.correct) or len(self.guess) < 2:
            raise ValueError("guess and correct need one probability per reveal level (at least two)")
        if self.concepts_per_class < (2 if self.trends else 1):
            raise ValueError("trends need at least two concepts per class (one rising, one falling)")


@dataclass(frozen=True)
class PlantedRound:
    """What the simulator planted in one cluster round."""

    round_id: str
    cluster_id: str
    true_class: str
    depth: int
    n_layers: int
    concept: str
    clarity: float


@dataclass
class CrowdPlan:
    """The planted truth of a simulated study: concepts per class, trends, one concept per round."""

    seed: int
    model: CrowdModel
    class_concepts: dict[str, list[str]]
    rising: dict[str, str]
    falling: dict[str, str]
    rounds: dict[str, PlantedRound]
    classes: list[str] = field(default_factory=list)
    study_id: str | None = None  # the study planned (recovery refuses a labels folder of another study)

    def concept(self, name: str) -> Concept:
        found = next((c for c in CONCEPTS if c.name == name), None)
        if found is None:
            raise KeyError(f"concept {name!r} is not in the crowd vocabulary (convlens.crowd.players.CONCEPTS)")
        return found

    def depth_weights(self, class_name: str, depth: int, n_layers: int) -> list[tuple[str, float]]:
        """(concept, weight) of the class's concepts at ``depth``: rising/falling ones tilted by depth."""
        x = depth / (n_layers - 1) if n_layers > 1 else 0.5
        tilt = self.model.trend_strength * (2 * x - 1)
        weights = []
        for name in self.class_concepts[class_name]:
            if self.rising.get(class_name) == name:
                weights.append((name, 1 + tilt))
            elif self.falling.get(class_name) == name:
                weights.append((name, 1 - tilt))
            else:
                weights.append((name, 1.0))
        return weights

    def clarity_factor(self, class_name: str, concept: str, depth: int, n_layers: int) -> float:
        """How much of a round's clarity its planted concept keeps at ``depth``: a rising concept is named
        less often in shallow clusters, ``1 - (s / 2)(1 - x)``; a falling one in deep clusters, ``1 - (s / 2) x``."""
        x = depth / (n_layers - 1) if n_layers > 1 else 0.5
        if self.rising.get(class_name) == concept:
            return 1 - self.model.trend_strength / 2 * (1 - x)
        if self.falling.get(class_name) == concept:
            return 1 - self.model.trend_strength / 2 * x
        return 1.0

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "study_id": self.study_id, "model": asdict(self.model), "classes": self.classes,
                "class_concepts": self.class_concepts, "rising": self.rising, "falling": self.falling,
                "concept_words": {n: list(self.concept(n).words) for names in self.class_concepts.values()
                                  for n in names},
                "rounds": {k: asdict(v) for k, v in sorted(self.rounds.items())}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CrowdPlan:
        model = data["model"]
        model = CrowdModel(**{k: tuple(v) if isinstance(v, list) else v for k, v in model.items()})
        rounds = {k: PlantedRound(**v) for k, v in data["rounds"].items()}
        return cls(data["seed"], model, data["class_concepts"], data["rising"], data["falling"], rounds,
                   data.get("classes", []), data.get("study_id"))


def _weighted(rng: random.Random, weights: Sequence[tuple[str, float]]) -> str:
    names = [n for n, _ in weights]
    return rng.choices(names, weights=[max(w, 0.0) for _, w in weights])[0]


def plan_crowd(rounds: Sequence[Any], classes: Sequence[str], model: CrowdModel | None = None,
               seed: int = 0) -> CrowdPlan:
    """Plant concepts in the cluster rounds (objects with round_id, cluster_id, true_class, gold, layer_depth,
    n_layers, e.g. :class:`~convlens.study.store.config.RoundSpec`).

    Each class gets ``concepts_per_class`` concepts of :data:`CONCEPTS` (disjoint between classes while the
    pool lasts). With ``trends`` on, the class's first concept *rises* with depth and its second *falls*: at
    relative depth x = depth / (layers - 1) their weights are ``1 + s (2x - 1)`` and ``1 - s (2x - 1)``
    (s = ``trend_strength``), the others weigh 1. Every cluster round gets one concept drawn with these
    weights and a *clarity* c (the chance that a described correct guess names it), uniform in ``clarity``
    times :meth:`CrowdPlan.clarity_factor`. So a trend concept's frequency changes with depth both across
    clusters (how many carry it) and within them (how many players name it): the global report's per-layer
    mean over labelled clusters sees the second and part of the first."""
    model = model or CrowdModel()
    pool = [c.name for c in CONCEPTS]
    seeded(seed, "concepts").shuffle(pool)
    played = sorted({r.true_class for r in rounds if not r.gold})
    class_concepts: dict[str, list[str]] = {}
    for index, name in enumerate(played):
        start = index * model.concepts_per_class
        class_concepts[name] = [pool[(start + j) % len(pool)] for j in range(model.concepts_per_class)]
    rising = {k: v[0] for k, v in class_concepts.items()} if model.trends else {}
    falling = {k: v[1] for k, v in class_concepts.items()} if model.trends else {}
    plan = CrowdPlan(seed, model, class_concepts, rising, falling, {}, list(classes))
    for r in rounds:
        if r.gold or r.layer_depth is None:
            continue
        rng = seeded(seed, "round", r.round_id)
        concept = _weighted(rng, plan.depth_weights(r.true_class, r.layer_depth, r.n_layers))
        clarity = rng.uniform(*model.clarity) * plan.clarity_factor(r.true_class, concept, r.layer_depth, r.n_layers)
        plan.rounds[r.round_id] = PlantedRound(r.round_id, r.cluster_id or "", r.true_class, r.layer_depth,
                                               r.n_layers, concept, clarity)
    return plan


def typo(word: str, rng: random.Random) -> str:
    """One random slip: two adjacent letters swapped, a letter dropped, doubled or replaced."""
    if len(word) < 3:
        return word
    i = rng.randrange(len(word) - 1)
    kind = rng.randrange(4)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    if kind == 2:
        return word[:i] + word[i] + word[i:]
    return word[:i] + rng.choice(LETTERS.replace(word[i], "")) + word[i + 1:]


def paraphrase(concept: Concept, class_name: str, model: CrowdModel, rng: random.Random) -> str:
    """One player's words for ``concept``: its head word, an inflection (``inflection``) or a synonym
    (``synonym``), misspelt with ``typo`` (one adjacent swap, dropped, doubled or replaced letter), inside a
    template (:data:`TEMPLATES`: "the {m} {w}", "looks like {w}", ...) with a modifier of the concept, a filler
    ("i think", "pretty sure", ...) with ``filler``, and the class name mixed in ("the cat's stripes") with
    ``class_name``. A planted concept counts as recovered when the pipeline's best label is one of its
    words (head, inflections, synonyms; compared by lemma too)."""
    draw = rng.random()
    if draw < model.synonym and concept.synonyms:
        word = rng.choice(concept.synonyms)
    elif draw < model.synonym + model.inflection and concept.forms:
        word = rng.choice(concept.forms)
    else:
        word = concept.name
    if rng.random() < model.typo:
        word = typo(word, rng)
    modifier = rng.choice(concept.modifiers) if concept.modifiers else ""
    templates = CLASS_TEMPLATES if rng.random() < model.class_name else TEMPLATES
    text = rng.choice(templates).format(w=word, m=modifier, c=class_name)
    if rng.random() < model.filler:
        text = f"{rng.choice(FILLERS)} {text}"
    return " ".join(text.split())


class PlayerModel:
    """One simulated participant: traits drawn from (seed, player); decisions per round from (seed, player,
    round). ``act`` and ``description`` are called in the order of the play.

    At reveal level k the player guesses with probability ``guess[k]`` (always at the last level, unless
    resigning with ``resign_last``), resigns with ``resign``, else asks for more. A guess is right with
    probability ``correct[k] + skill + (c - 0.6) / 2`` (clipped to 0.02..0.98), otherwise a uniformly drawn
    other class. After a guess the player describes with ``describe``: after a right guess the planted
    concept with probability c, another concept of the class (drawn with the depth weights) with ``other``,
    else an off-topic phrase (:data:`OFF_TOPIC`); after a wrong guess a concept of the guessed class with
    probability 1/2, the planted concept with 1/4, else off-topic."""

    def __init__(self, plan: CrowdPlan, index: int) -> None:
        self.plan, self.index = plan, index
        traits = seeded(plan.seed, "player", index)
        self.skill = traits.uniform(-plan.model.skill, plan.model.skill)
        self.rng = traits
        self.round: PlantedRound | None = None
        self.last_concept = ""  # the concept the last description names ("" for off-topic or none)

    def start(self, planted: PlantedRound | None, round_key: str) -> None:
        """A new play of ``round_key`` (``planted`` is None for gold rounds)."""
        self.round = planted
        self.rng = seeded(self.plan.seed, "play", self.index, round_key)

    def act(self, level: int, levels: int, true_class: str | None) -> tuple[str, str | None]:
        """("reveal" | "resign" | "guess", guessed class) at reveal ``level``; ``true_class`` is what the
        simulator knows of the round (the player only uses it to be right with the model's probability)."""
        model, rng = self.plan.model, self.rng
        last = level >= levels - 1
        if last and rng.random() < model.resign_last:
            return "resign", None
        if not last and rng.random() < model.resign:
            return "resign", None
        if not last and rng.random() >= model.guess[min(level, len(model.guess) - 1)]:
            return "reveal", None
        clarity = self.round.clarity if self.round else 0.6
        p_correct = model.correct[min(level, len(model.correct) - 1)] + self.skill + (clarity - 0.6) / 2
        if true_class is None or rng.random() < min(max(p_correct, 0.02), 0.98):
            return "guess", true_class
        others = [c for c in self.plan.classes if c != true_class]
        return "guess", rng.choice(others) if others else true_class

    def description(self, guessed: str, correct: bool) -> tuple[str | None, str]:
        """(text or None, kind): kind is planted | other | guessed-class | off-topic | none; the concept it
        names is left in :attr:`last_concept`."""
        model, rng, planted = self.plan.model, self.rng, self.round
        self.last_concept = ""
        if rng.random() >= model.describe:
            return None, "none"
        draw = rng.random()
        if planted is not None and correct:
            if draw < planted.clarity:
                return self._say(planted.concept, guessed), "planted"
            if draw < planted.clarity + model.other:
                weights = [(n, w) for n, w in self.plan.depth_weights(planted.true_class, planted.depth,
                                                                        planted.n_layers) if n != planted.concept]
                if weights:
                    return self._say(_weighted(rng, weights), guessed), "other"
        elif planted is not None and draw < 0.5 and self.plan.class_concepts.get(guessed):
            return self._say(rng.choice(self.plan.class_concepts[guessed]), guessed), "guessed-class"
        elif planted is not None and 0.5 <= draw < 0.75:
            return self._say(planted.concept, guessed), "planted"
        return rng.choice(OFF_TOPIC), "off-topic"

    def _say(self, concept: str, guessed: str) -> str:
        self.last_concept = concept
        return paraphrase(self.plan.concept(concept), guessed, self.plan.model, self.rng)
