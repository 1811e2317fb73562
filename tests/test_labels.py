"""Label NLP per class (INV label analysis): cleaning, class-name removal, text clusters, representative
words, lemma merge — each on hand-made cases whose answer is worked out in the test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from convlens.labels.labelling import (
    RULE_SILHOUETTE,
    RULE_SMALL,
    candidate_words,
    choose_text_clusters,
    label_class,
    lemmatize_en,
    merge_by_lemma,
    representative_word,
)
from convlens.labels.text import clean_description, english_share, load_stop_words, remove_class_names, words
from labels_helpers import ToyEmbedder


# ------------------------------------------------------------------------------------------ cleaning
@pytest.mark.parametrize(("raw", "names", "expected"), [
    ("The Golf Ball's dimples", ["golf ball"], "the dimples"),
    ("a golfball with dimples", ["golf ball"], "a with dimples"),
    ("golf-ball dimples", ["golf ball"], "dimples"),
    ("two parachutes in the sky", ["parachute"], "two in the sky"),
    ("the parachutes' strings", ["parachute"], "the strings"),
    ("parachute’s canopy", ["parachute"], "canopy"),
    ("a parachutist falling", ["parachute"], "a parachutist falling"),  # whole words only
    ("PARACHUTE red", ["parachute"], "red"),
    ("gas pump nozzle", ["gas pump", "pump"], "nozzle"),
    ("the churches tower", ["church"], "the tower"),
    ("english_springer ears", ["English springer"], "ears"),
])
def test_class_name_removal(raw: str, names: list[str], expected: str) -> None:
    result = clean_description(raw, names)
    assert result.text == expected


def test_class_name_only_is_excluded_with_a_reason() -> None:
    result = clean_description("Golf Ball!", ["golf ball"])
    assert result.text is None and result.reason == "nothing but the class name"


@pytest.mark.parametrize(("raw", "reason_start"), [
    ("", "empty description"),
    ("   ", "empty description"),
    ("🪂🪂 🎈", "no words"),
    ("<br><hr/>", "no words"),
    ("1234 !!", "no words"),
    ("x" * 1001, "too long: 1001 characters > 1000"),
])
def test_unusable_text_gets_a_reason(raw: str, reason_start: str) -> None:
    result = clean_description(raw, ["tench"])
    assert result.text is None and result.reason is not None and result.reason.startswith(reason_start)


def test_html_and_emoji_are_removed_not_the_words() -> None:
    assert clean_description("<b>Red</b> &amp; blue 🪂 stripes", ["tench"]).text == "red & blue stripes"
    assert clean_description("<script>alert(1)</script> fins", ["tench"]).text == "alert(1) fins"
    assert clean_description("x" * 1000, ["tench"]).text == "x" * 1000  # the bound is inclusive


def test_words_keep_inner_apostrophes_and_hyphens() -> None:
    assert words("t-shirt, don't 123 wings! café") == ["t-shirt", "don't", "wings", "café"]
    assert remove_class_names("a b", []) == "a b"


def test_stop_words_are_nltk_plus_the_authors_additions() -> None:
    stop = load_stop_words()
    assert len(stop) == 192  # 179 NLTK words + 14 additions, "most" in both
    for word in ("the", "and", "don't", "something", "like", "multiple", "lower", "upper", "typical", "maybe",
                 "center", "least", "most", "previous", "next", "left", "right"):
        assert word in stop
    for word in ("wing", "red", "canopy", "stripes"):
        assert word not in stop


def test_english_share_flags_italian() -> None:
    assert english_share("the wings are red") == 1.0
    assert english_share("le ali sono rosse") < 0.5


# ------------------------------------------------------------------------------- text clusters (step 5)
def test_fewer_than_three_descriptions_each_form_a_cluster() -> None:
    for n in (0, 1, 2):
        assignment, silhouettes, rule = choose_text_clusters(np.eye(3)[:n])
        assert assignment.tolist() == list(range(n)) and silhouettes == {} and rule == RULE_SMALL


def test_three_points_silhouette_by_hand() -> None:
    # cosine distances: d(x1,x2)=0.2, d(x1,x3)=1, d(x2,x3)=1.6 -> complete linkage joins x1,x2 first;
    # k = 2 is the only k in 2..n-1; silhouette on Euclidean distances, s(x3) = 0 (singleton).
    x = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, -1.0]])
    assignment, silhouettes, rule = choose_text_clusters(x)
    s1 = 1 - math.sqrt(0.4) / math.sqrt(2.0)
    s2 = 1 - math.sqrt(0.4) / math.sqrt(3.2)
    assert rule == RULE_SILHOUETTE and assignment.tolist() == [0, 0, 1]
    assert silhouettes == {2: pytest.approx((s1 + s2) / 3, abs=1e-12)}


def test_three_obvious_groups_are_found() -> None:
    directions = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    rng = np.random.default_rng(0)
    points = np.concatenate([d + 0.01 * rng.standard_normal((4, 3)) for d in directions])
    assignment, silhouettes, _ = choose_text_clusters(points)
    assert assignment.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert max(silhouettes, key=silhouettes.__getitem__) == 3


@pytest.mark.parametrize("seed", range(6))
def test_tree_cut_equals_sklearn_refit_per_k(seed: int) -> None:
    """Independent re-computation: sklearn AgglomerativeClustering refitted for every k, silhouette per k."""
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    x = np.random.default_rng(seed).standard_normal((12, 5))
    assignment, silhouettes, _ = choose_text_clusters(x)
    expected = {}
    partitions = {}
    for k in range(2, len(x)):
        labels = AgglomerativeClustering(n_clusters=k, metric="cosine", linkage="complete").fit_predict(x)
        partitions[k] = labels
        expected[k] = silhouette_score(x, labels)
    assert silhouettes == pytest.approx(expected, abs=1e-10)
    best = max(expected, key=lambda k: (expected[k], -k))
    assert adjusted_rand_score(partitions[best], assignment) == 1.0


def test_zero_vectors_are_rejected() -> None:
    with pytest.raises(ValueError, match="zero vector"):
        choose_text_clusters(np.array([[1.0, 0], [0, 0], [0, 1.0]]))


# ----------------------------------------------------------------------- representative word (step 6)
def test_representative_word_weights_descriptions_by_frequency() -> None:
    # silk=(0,1,0); red=(1,0,0); sky=(0,0,1); texts "silk" x1 and "red sky" x3
    # score(silk) = 1*1 + 3*0 = 1; score(red) = score(sky) = 1*0 + 3/sqrt(2) -> tie, "red" seen first
    candidates = ["silk", "red", "sky"]
    vectors = np.eye(3)[[1, 0, 2]]
    texts = np.array([[0.0, 1, 0], [1.0, 0, 1]])
    word, score = representative_word(candidates, vectors, texts, [1, 3])
    assert word == "red" and score == pytest.approx(3 / math.sqrt(2))
    # unweighted (each description once) "silk" wins with 1 > 1/sqrt(2)
    assert representative_word(candidates, vectors, texts, [1, 1]) == ("silk", pytest.approx(1.0))
    assert representative_word([], np.zeros((0, 3)), texts, [1, 3]) == ("", 0.0)


def test_candidates_skip_stop_words_in_first_seen_order() -> None:
    assert candidate_words(["the red sky", "sky and the sea", "it is"], load_stop_words()) == ["red", "sky", "sea"]


# ----------------------------------------------------------------------------------- lemma merge (step 7)
def test_simplemma_lemmas() -> None:
    assert [lemmatize_en(w) for w in ("wings", "stripes", "feathers", "running", "wheel")] == [
        "wing", "stripe", "feather", "run", "wheel"]


def test_lemma_merge_takes_the_form_of_most_clusters_then_most_descriptions() -> None:
    reps = ["wings", "wing", "stripe", "stripes", "stripe", "", "sky"]
    sizes = [5, 2, 1, 9, 1, 3, 1]
    merged = merge_by_lemma(reps, sizes)
    # wing/wings: one cluster each -> more descriptions: "wings" (5 > 2); stripe: 2 clusters vs 1 -> "stripe"
    assert [label for _, label in merged] == ["wings", "wings", "stripe", "stripe", "stripe", "", "sky"]
    assert [lemma for lemma, _ in merged][:2] == ["wing", "wing"]


def test_lemma_merge_ties_are_alphabetical() -> None:
    merged = merge_by_lemma(["b", "a"], [1, 1], lemmatize=lambda w: "same")
    assert [label for _, label in merged] == ["a", "a"]


# ---------------------------------------------------------------------------------- one class end to end
TABLE = {
    "red": [1, 0, 0, 0], "canopy": [0.9, 0.1, 0, 0], "strings": [0, 1, 0, 0], "ropes": [0, 0.9, 0.1, 0],
    "sky": [0, 0, 1, 0], "blue": [0, 0.1, 0.9, 0],
}


def test_label_class_end_to_end_with_a_toy_embedder() -> None:
    texts = ["red canopy", "canopy", "canopy", "ropes strings", "strings", "blue sky", "sky", "sky", "sky"]
    labelling = label_class("parachute", texts, ToyEmbedder(TABLE), load_stop_words())
    assert labelling.texts == ["red canopy", "canopy", "ropes strings", "strings", "blue sky", "sky"]
    assert labelling.counts == [1, 2, 1, 1, 1, 3]
    assert labelling.k == 3 and labelling.assignment.tolist() == [0, 0, 1, 1, 2, 2]
    # cluster 0: canopy is used by all 3 plays, red by 1; cluster 1: strings 2 of 2, ropes 1; cluster 2: sky 4 of 4
    assert [c.label for c in labelling.clusters] == ["canopy", "strings", "sky"]
    assert [c.representative_score for c in labelling.clusters] == [1.0, 1.0, 1.0]
    assert labelling.label_of("blue sky") == (2, "sky")
    assert labelling.lemma_plays == {"red": 1, "canopy": 3, "rope": 1, "string": 2, "blue": 1, "sky": 4}
    assert labelling.labels_by_lemma == {"canopy": "canopy", "string": "strings", "sky": "sky"}


def test_label_class_one_description() -> None:
    labelling = label_class("tench", ["green scales"], ToyEmbedder(TABLE), load_stop_words())
    assert labelling.rule == RULE_SMALL and labelling.k == 1
    # one play uses each word: the tie goes to the last word, the head of the noun phrase
    assert labelling.clusters[0].label == "scales"


def test_label_class_only_stop_words_gives_an_empty_label() -> None:
    labelling = label_class("tench", ["it is the same", "it is"], ToyEmbedder(TABLE), load_stop_words())
    assert [c.label for c in labelling.clusters] == ["", ""]
