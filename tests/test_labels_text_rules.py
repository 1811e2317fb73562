"""The rules that turn players' words into concept words, each on hand-made texts: non-visual words and the
head of a phrase, misspellings and misspelt class names, the concept word of a text cluster, the label of a
wrong guess, the bounded cluster-count search, and the filter measured on a held-out list."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from convlens.labels.labelling import choose_text_clusters, concept_word, lemmatize_en, own_word
from convlens.labels.spelling import spelling_fixes
from convlens.labels.text import clean_description, content_words, load_non_visual_words, load_stop_words, name_words

STOP = load_stop_words()
CLASSES = ["tiger cat", "espresso", "moped", "daisy"]
HELD_OUT = Path(__file__).parent / "labels_data" / "heldout_descriptions.tsv"


# ------------------------------------------------------------------------------- non-visual words, the head
@pytest.mark.parametrize(("text", "content", "dropped"), [
    ("no idea", [], ["meta:idea"]),
    ("just guessed", [], ["meta:guessed"]),
    ("the colours", [], ["generic:colours"]),
    ("the background", [], ["generic:background"]),
    ("something dark", [], ["vague:dark"]),  # "something" is an NLTK stop-word
    ("i think the dark stripes", ["stripes"], ["meta:think", "vague:dark"]),
    ("the handle of the white cup", ["white", "cup", "handle"], []),  # the head ("handle") goes last
    ("looks like sharp teeth", ["sharp", "teeth"], ["meta:looks"]),
    ("eye shape", ["eye"], ["generic:shape"]),
    ("black wheel rim", ["black", "wheel", "rim"], []),
])
def test_content_words_by_hand(text: str, content: list[str], dropped: list[str]) -> None:
    assert content_words(text, STOP) == (content, dropped)


def test_class_name_words_of_the_play_are_removed() -> None:
    removed = name_words(["tiger cat"])
    assert removed == {"tiger", "cat", "tigers", "cats"}
    assert content_words("a tiger with stripes", STOP, removed=removed) == (["stripes"], [])


def test_every_class_name_of_the_study_is_removed() -> None:
    assert clean_description("the moped wheels and a daisy", CLASSES).text == "the wheels and a"


def test_non_visual_list_has_three_categories_and_no_concept_words() -> None:
    from convlens.crowd.players import CONCEPTS

    non_visual = load_non_visual_words()
    assert set(non_visual.values()) == {"meta", "generic", "vague"}
    assert not {w for c in CONCEPTS for w in c.words} & set(non_visual)


def test_held_out_fillers_are_dropped_and_visual_descriptions_kept() -> None:
    """The held-out list was written apart from the word list; the numbers are the ones BENCHMARKS.md reports."""
    dropped: dict[str, list[bool]] = {"filler": [], "visual": []}
    for line in HELD_OUT.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            kind, text = line.split("\t")
            dropped[kind].append(not content_words(clean_description(text, CLASSES).text or "", STOP)[0])
    assert len(dropped["filler"]) == len(dropped["visual"]) == 40
    assert sum(dropped["visual"]) == 0 and sum(dropped["filler"]) >= 30


# ----------------------------------------------------------------------------------------------- spelling
def _osa(a: str, b: str) -> int:
    """Optimal string alignment distance, the textbook dynamic programme (independent of rapidfuzz)."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def test_misspellings_merge_into_their_frequent_form() -> None:
    counts = {"whiskers": 9, "whiskrs": 2, "petals": 5, "petlas": 1, "handlebar": 4, "hanldebar": 1, "cup": 7,
              "cap": 1, "wheel": 3, "stripes": 2, "stirpes": 2, "tgier": 1, "moepd": 1, "diasy": 1, "esprseso": 1}
    fixes = spelling_fixes(counts, name_words(CLASSES))
    merged = {w: f.target for w, f in fixes.items() if f.target}
    names = {w: f.matched for w, f in fixes.items() if not f.target}
    assert merged == {"whiskrs": "whiskers", "petlas": "petals", "hanldebar": "handlebar", "stirpes": "stripes"}
    assert names == {"tgier": "tiger", "moepd": "moped", "diasy": "daisy", "esprseso": "espresso"}
    assert "cap" not in fixes  # a real word is never changed
    for word, fix in fixes.items():
        other = fix.target or fix.matched
        assert fix.similarity == pytest.approx(1 - _osa(word, other) / max(len(word), len(other)), abs=1e-6)
    assert "whiskrs" in fixes["whiskrs"].describe() and "misspelt class name" in fixes["tgier"].describe()


def test_spelling_threshold_and_frequency_rules() -> None:
    # one slip in a 4-letter word: similarity 0.75, merged at 0.75, not at 0.8
    assert spelling_fixes({"tail": 5, "tial": 1}, min_similarity=0.75)["tial"].target == "tail"
    assert spelling_fixes({"tail": 5, "tial": 1}, min_similarity=0.8) == {}
    # two unknown spellings used equally often: neither is the frequent form
    assert spelling_fixes({"blorf": 1, "blorg": 1}) == {}
    # a slip of a slip follows on to the frequent form
    fixes = spelling_fixes({"handlebar": 9, "handlbar": 3, "hndlbar": 1})
    assert fixes["handlbar"].target == fixes["hndlbar"].target == "handlebar"
    assert spelling_fixes({"tail": 5, "tial": 1}, min_similarity=1.0) == {}


# ------------------------------------------------------------------------------------------- concept word
def test_the_concept_word_is_the_head_not_the_closest_word() -> None:
    """The issue's cases: "a green eye", "eyes staring", "eye shape" (content "eye") -> eye."""
    texts = ["green eye", "eyes staring", "eye"]
    assert concept_word(texts, [1, 1, 1], STOP) == ("eye", 1.0)  # heads: eye 2, staring 1


def test_a_modifier_shared_by_synonyms_does_not_win() -> None:
    # heads: steamy, mist, steam one each; uses: rising 3; the tie goes to the lemma more plays of the class use
    texts = ["rising steamy", "rising mist", "rising steam"]
    word, share = concept_word(texts, [1, 1, 1], STOP, class_plays={"steam": 9, "mist": 2, "steamy": 1, "rise": 12})
    assert word == "steam" and share == pytest.approx(1 / 3)


def test_the_concept_word_takes_the_most_frequent_form_and_ties_go_to_the_embedding() -> None:
    assert concept_word(["wheels", "wheel", "wheels"], [2, 1, 1], STOP)[0] == "wheels"
    # "red sky" x1, "blue sea" x1: heads, uses and class plays all tie -> the authors' embedding score decides
    scores = {"sky": 0.2, "sea": 0.9}
    word, _ = concept_word(["red sky", "blue sea"], [1, 1], STOP, tie_break=lambda ws: [scores[w] for w in ws])
    assert word == "sea"
    assert concept_word(["red sky", "blue sea"], [1, 1], STOP)[0] == "sky"  # no tie-break: first seen
    assert concept_word([], [], STOP) == ("", 0.0)


def test_a_wrong_guess_label_is_a_word_of_its_description() -> None:
    labels = {"whisker": "whiskers", "ear": "ears"}
    class_plays = {"whisker": 30, "ear": 12, "fur": 3}
    study_plays = Counter({"wheel": 50, "fur": 8, "colour": 2})
    forms = {"wheel": "wheels", "fur": "fur"}
    assert own_word(["long", "whisker"], labels, class_plays, study_plays, forms) == (
        "whiskers", "a label of the guessed class")
    assert own_word(["wheels"], labels, class_plays, study_plays, forms) == (
        "wheels", "not a label of the guessed class")
    assert own_word(["wheel", "fur"], labels, class_plays, study_plays, forms)[0] == "fur"  # used by the class
    assert own_word([], labels, class_plays, study_plays, forms) == ("", "")
    for content in (["eye"], ["wheels", "rim"], ["cup"]):
        label, _ = own_word(content, labels, class_plays, study_plays, forms)
        assert lemmatize_en(label) in {lemmatize_en(w) for w in content}


# ------------------------------------------------------------------------------------ cluster-count search
def test_the_cluster_count_search_is_bounded_and_equals_sklearn_on_its_range() -> None:
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    x = np.random.default_rng(4).standard_normal((14, 5))
    assignment, silhouettes, rule = choose_text_clusters(x, max_k=5)
    assert list(silhouettes) == [2, 3, 4, 5] and rule == "silhouette over k = 2..5 (bounded; n - 1 = 13)"
    partitions = {k: AgglomerativeClustering(n_clusters=k, metric="cosine", linkage="complete").fit_predict(x)
                  for k in range(2, 6)}
    assert silhouettes == pytest.approx({k: silhouette_score(x, p) for k, p in partitions.items()}, abs=1e-10)
    best = max(silhouettes, key=lambda k: (silhouettes[k], -k))
    assert adjusted_rand_score(partitions[best], assignment) == 1.0
    with pytest.raises(ValueError, match="max_k"):
        choose_text_clusters(x, max_k=1)


# ------------------------------------------------------------------------------------ the rules end to end
def test_pipeline_drops_fillers_merges_slips_and_removes_misspelt_class_names(tmp_path: Path) -> None:
    import json

    from convlens.labels.pipeline import LabelSettings, run_labels
    from labels_helpers import ToyEmbedder, make_play, make_round, write_export

    cat, moped = make_round("C", 0, 0, "tiger cat", n_layers=1), make_round("M", 0, 0, "moped", n_layers=1)
    texts = ["whiskers", "long whiskers", "whiskrs", "the tgier whiskers", "no idea", "the colours",
             "the moped's whiskers"]
    plays = [make_play(f"c{i}", cat, "win", 1, text) for i, text in enumerate(texts)]
    plays += [make_play("m1", moped, "win", 0, "wheels"), make_play("m2", moped, "win", 0, "the tiger cat wheels"),
              make_play("m3", moped, "lose", 2, "the eye of the tigre", guessed="tiger cat")]
    study = {"study_id": "t", "classes": ["tiger cat", "moped"]}
    embedder = ToyEmbedder({"whiskers": [1, 0, 0], "wheels": [0, 1, 0], "long": [0.2, 0, 1]})
    result = run_labels(write_export(tmp_path / "e", [cat, moped], plays, study), tmp_path / "labels", embedder,
                        settings=LabelSettings(n_bootstrap=10))
    audit = {row.play_id: row for row in result.audit}
    assert {audit[f"c{i}"].label for i in (0, 1, 2, 3, 6)} == {"whiskers"}
    assert audit["c2"].content == "whiskers" and "spelling 'whiskrs' -> 'whiskers'" in audit["c2"].text_rules
    assert audit["c3"].content == "whiskers" and "misspelt class name 'tgier'" in audit["c3"].text_rules
    assert audit["c6"].content == "whiskers"  # another class's name is removed too
    for play_id, word in (("c4", "meta:idea"), ("c5", "generic:colours")):
        assert audit[play_id].status == "stats_only" and audit[play_id].label == ""
        assert audit[play_id].reason == f"description not used: names no visual content: non-visual {word}"
    assert audit["m2"].content == "wheels"
    # the wrong guess keeps a word of its own: "eye" (the misspelt "tigre" goes as a class name)
    assert (audit["m3"].status, audit["m3"].label, audit["m3"].content) == ("wrong_guess_labelled", "eye", "eye")
    cat_cluster = next(c for c in result.clusters if c.class_name == "tiger cat")
    assert list(cat_cluster.scores) == ["whiskers"] and cat_cluster.scores["whiskers"].frequency == 5
    assert all("eye" not in call and "the eye of the tigre" not in call for call in embedder.calls)
    rules = json.loads((tmp_path / "labels" / "labels.json").read_text())["text_rules"]
    assert rules["spelling"]["merged"] == {"whiskrs": "whiskers"}
    assert rules["spelling"]["misspelt_class_names"] == {"tgier": "tiger", "tigre": "tiger"}
