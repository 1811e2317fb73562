"""``labels`` and ``global`` end to end on small hand-written exports (CSV files written by the test), with
a toy embedder whose every similarity is known; every play is accounted for in the audit trail."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from convlens.labels.export import ExportError
from convlens.labels.files import read_labels
from convlens.labels.pipeline import LabelSettings, run_labels
from convlens.reports.global_report import build_global
from labels_helpers import ToyEmbedder, make_play, make_round, write_export

TABLE = {
    "canopy": [1, 0, 0, 0], "strings": [0, 1, 0, 0], "ropes": [0, 0.9, 0.1, 0], "dimples": [0, 0, 1, 0],
    "white": [0, 0, 0.3, 0.1], "the": [0, 0, 0, 0.1], "and": [0, 0, 0, 0.1],
}
P, G = "parachute", "golf ball"


def _study(tmp_path: Path) -> Path:
    r = {
        "p00": make_round("P", 0, 0, P, weight=30, n_layers=2), "p01": make_round("P", 0, 1, P, weight=10, n_layers=2),
        "p10": make_round("P", 1, 0, P, weight=25, n_layers=2), "g00": make_round("G", 0, 0, G, weight=40, n_layers=2),
        "gold": {**make_round("P", 0, 9, P, n_layers=2, gold=True), "cluster_id": ""},
    }
    plays = [
        make_play("p1", r["p00"], "win", 1, "the canopy"),
        make_play("p2", r["p00"], "win", 3, "Canopy!"),
        make_play("p3", r["p00"], "lose", 0, "strings", guessed=G),
        make_play("p4", r["p00"], "resign", 2),
        make_play("p5", r["p00"], "win", 2),
        make_play("p6", r["p01"], "win", 0, "canopy"),
        make_play("p7", r["p01"], "win", 5, "strings and ropes"),
        make_play("p8", r["p10"], "win", 4, "strings"),
        make_play("p9", r["p10"], "win", 1, "ali rosse", language="it"),
        make_play("p10", r["p10"], "win", 1, "x" * 2000),
        make_play("p11", r["p10"], "win", 1, "🪂 <b>Parachute</b>"),
        make_play("p12", r["p10"], "abandoned", 3),
        make_play("g1", r["g00"], "win", 0, "dimples"),
        make_play("g2", r["g00"], "win", 1, "white dimples"),
        make_play("g3", r["g00"], "lose", 2, "canopy", guessed=P),
        make_play("q1", r["gold"], "win", 5, "canopy"),
        {**make_play("bad", r["g00"], "win", 0, "dimples"), "outcome": "???"},
    ]
    return write_export(tmp_path / "export", list(r.values()), plays, {"study_id": "s1", "classes": [P, G]})


@pytest.fixture
def labelled(tmp_path: Path):
    export = _study(tmp_path)
    result = run_labels(export, tmp_path / "labels", ToyEmbedder(TABLE), settings=LabelSettings(n_bootstrap=200))
    return result, tmp_path / "labels"


def _audit(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "audit.csv").open(newline="", encoding="utf-8") as handle:
        return {row["play_id"]: row for row in csv.DictReader(handle)}


def test_every_play_is_in_the_audit_with_its_fate(labelled) -> None:
    _, folder = labelled
    audit = _audit(folder)
    assert len(audit) == 17  # nothing dropped
    status = {k: v["status"] for k, v in audit.items()}
    assert [status[k] for k in ("p1", "p2", "p6", "p7", "p8", "g1", "g2")] == ["labelled"] * 7
    assert status["g3"] == "wrong_guess_labelled"
    assert status["p4"] == status["p5"] == "stats_only"
    # counted in wins/losses/level, so "stats_only", with why the description was not used
    unused = {k: audit[k]["reason"] for k in ("p9", "p10", "p11")}
    assert unused["p9"].startswith("description not used: language 'it' and no translator")
    assert unused["p10"].startswith("description not used: too long: 2000 characters")
    assert unused["p11"] == "description not used: nothing but the class name"
    assert all(status[k] == "stats_only" for k in unused)
    reasons = {k: audit[k]["reason"] for k in ("p12", "q1", "bad")}
    assert reasons["p12"].startswith("abandoned")
    assert reasons["q1"].startswith("gold round")
    assert reasons["bad"].startswith("invalid row: unknown outcome")
    assert all(status[k] == "excluded" for k in reasons)
    assert audit["p2"]["cleaned"] == "canopy!" and audit["p2"]["label"] == "canopy"
    assert audit["p7"]["representative"] == "strings" and audit["p7"]["label_score"] == "0.5"


def test_wrong_guess_is_labelled_with_a_word_of_its_own_description(labelled) -> None:
    """p3 "strings" (guessed golf ball, whose players said "dimples"): its label is its own word, never a
    word of the guessed class it does not contain; it scores 1/4 in its (parachute) cluster."""
    result, folder = labelled
    row = _audit(folder)["p3"]
    assert (row["status"], row["label"], row["content"]) == ("wrong_guess_labelled", "strings", "strings")
    assert row["reason"].startswith("wrong guess: labelled with a word of its description (not a label of the "
                                    "guessed class 'golf ball')")
    p00 = next(c for c in result.clusters if c.cluster_id == "P:L0:0")
    assert p00.scores["strings"].score == pytest.approx(0.25) and p00.losses == 1
    g3 = _audit(folder)["g3"]  # "canopy", guessed parachute, whose players said "canopy": a label of that class
    assert g3["label"] == "canopy" and "(a label of the guessed class 'parachute')" in g3["reason"]


@pytest.mark.parametrize(("text", "label"), [
    ("ropes", "ropes"),                  # not a golf-ball word: its own word
    ("white dimple", "dimples"),         # dimple is a golf-ball label: written as golf ball's players do
    ("ropes and dimple", "dimples"),     # a label of the guessed class comes first
    ("canopy ropes", "ropes"),           # neither a label: the last word (head of the phrase)
    ("golf ball", ""),                   # nothing but the class name: not used
    ("the tench ropes", "ropes"),        # every class name of the study is removed, not only the guessed one
])
def test_wrong_guess_label_rule_by_hand(tmp_path: Path, text: str, label: str) -> None:
    t, g = make_round("T", 0, 0, "tench", n_layers=1), make_round("G", 0, 0, G, n_layers=1)
    plays = [make_play("g1", g, "win", 0, "dimples"), make_play("g2", g, "win", 0, "white dimples"),
             make_play("t1", t, "lose", 0, text, guessed=G)]
    result = run_labels(write_export(tmp_path / "e", [t, g], plays), embedder=ToyEmbedder(TABLE),
                        settings=LabelSettings(n_bootstrap=10))
    row = next(a for a in result.audit if a.play_id == "t1")
    assert row.label == label and "tench" not in row.content and "golf" not in row.content
    assert row.status == ("wrong_guess_labelled" if label else "stats_only")
    if label:
        assert label in row.content or label.rstrip("s") in row.content
    tench = next(c for c in result.clusters if c.class_name == "tench")
    assert tench.losses == 1 and list(tench.scores) == ([label] if label else [])


def test_labels_scores_and_merges_by_hand(labelled) -> None:
    result, folder = labelled
    assert [c.label for c in result.labellings[P].clusters] == ["canopy", "strings"]
    assert [c.label for c in result.labellings[G].clusters] == ["dimples", "dimples"]  # n = 2: one cluster each
    clusters = {c.cluster_id: c for c in result.clusters}
    p00 = clusters["P:L0:0"]
    # canopy: 2 right guesses at levels 1 and 3 -> 2 * (1 - 0.2) = 1.6; the wrong guess "strings" (guessed golf
    # ball) at level 0 keeps its own word: 1 * (1 - 0) / 4
    assert {k: s.score for k, s in p00.scores.items()} == {"canopy": pytest.approx(1.6), "strings": 0.25}
    assert (p00.wins, p00.losses, p00.resigns, p00.level) == (3, 1, 1, 3)  # ceil((1+3+0+2+5)/5) = ceil(2.2)
    assert clusters["G:L0:0"].scores["canopy"].score == pytest.approx(0.8 / 4)  # parachute's own text "canopy"
    assert clusters["G:L0:0"].scores["dimples"].score == pytest.approx(2 * 0.95)
    (group,) = [g for g in result.groups if g.group_id == "P:L0:g0"]
    assert [c.cluster_id for c in group.members] == ["P:L0:0", "P:L0:1"] and group.shared_labels == ["canopy"]
    # strength: canopy (30*1.6 + 10*1.0)/40; strings (30*0.25 + 10*0.5)/40
    assert group.strengths == [("canopy", pytest.approx(1.45)), ("strings", pytest.approx(0.3125))]
    tables = read_labels(folder)
    assert {r["group_id"] for r in tables.groups if r["merge"] == "full"} == {"P:L0:f0", "P:L1:f0", "G:L0:f0"}


def test_agreement_by_hand(labelled) -> None:
    result, _ = labelled
    (row,) = [a for a in result.agreement if a.scope == "class" and a.class_name == P]
    # units: P:L0:0 [canopy, canopy], P:L0:1 [canopy, strings], P:L1:0 [strings] (not pairable)
    # D_e = (16 - 10) / 12 = 1/2; D_o = 2/4 * 0 + 2/4 * 1 = 1/2 -> alpha = 0
    assert row.alpha == pytest.approx(0.0) and row.n_units == 2 and row.constant_label == "canopy"


def test_manifest_records_embedder_settings_and_counts(labelled) -> None:
    _, folder = labelled
    manifest = json.loads((folder / "labels.json").read_text())
    assert manifest["embedder"]["name"] == "toy" and manifest["translator"] is None
    assert manifest["settings"]["wrong_rule"] == "authors" and manifest["stop_words"]["count"] == 192
    assert manifest["counts"]["plays"] == 17 and manifest["counts"]["status"]["excluded"] == 3
    assert manifest["counts"]["description_not_used"] == {"language 'it' and no translator (pass one to translate)": 1,
                                                          "too long": 1, "nothing but the class name": 1}
    assert manifest["settings"]["max_text_clusters"] == 40 and manifest["settings"]["min_gold_accuracy"] is None
    rules = manifest["text_rules"]
    assert rules["spelling"] == {"min_similarity": 0.75, "merged": {}, "misspelt_class_names": {}}
    assert rules["gold_filter"]["gold_information"] is False and "no gold information" in rules["gold_filter"]["note"]
    assert manifest["classes"][G]["rule"].startswith("one cluster per distinct description")


def test_global_by_hand_without_inv_runs(labelled, tmp_path: Path) -> None:
    _, folder = labelled
    result = build_global(folder, tmp_path / "global", n_bootstrap=100)
    trends = {t.label: t for t in result.classes[P].trends}
    # canopy: depth 0 mean (1.6 + 1.0) / 2 = 1.3, depth 1 none -> 0: slope -1.3;
    # strings: depth 0 (0.25 + 0.5) / 2 = 0.375, depth 1 0.6: +0.225
    assert trends["canopy"].means == pytest.approx([1.3, 0.0]) and trends["canopy"].slope == pytest.approx(-1.3)
    assert trends["strings"].slope == pytest.approx(0.225)
    page = (tmp_path / "global" / "parachute" / "index.html").read_text()
    assert "map not available" in page and "not tested" in page and "used by the model (TCAV)" in page
    # the overview ranks by evidence: canopy 1.6 + 1.0 = 2.6 of 2.6 + 1.35 -> 66 %, strings 34 %, canopy first
    top = page.split("Top concepts (ranked by evidence)")[1].split("</table>")[0]
    assert top.index(">canopy<") < top.index(">strings<") and "66 %" in top and "34 %" in top
    assert page.index("Top concepts") < page.index("Concepts along the depth")
    index = (tmp_path / "global" / "index.html").read_text()
    assert "<b>canopy</b> 66 %" in index and "<b>strings</b> 34 %" in index
    assert any("INV run 'run' not found" in n for n in result.notes)
    with (tmp_path / "global" / "slopes.csv").open() as handle:
        rows = {(r["class"], r["label"]): r for r in csv.DictReader(handle)}
    assert float(rows[(P, "canopy")]["slope"]) == pytest.approx(-1.3)
    # one image per class: no interval, so the overview falls back to the slope's sign, by total score
    assert rows[(P, "canopy")]["rank_falling"] == "1" and rows[(P, "canopy")]["rank_evidence"] == "1"
    assert float(rows[(P, "canopy")]["share"]) == pytest.approx(2.6 / 3.95)


def test_tcav_verdicts_fill_the_slot(labelled, tmp_path: Path) -> None:
    _, folder = labelled
    (folder / "tcav.csv").write_text("class,label,layer,significant,direction,p_value,effect_size\n"
                                     "parachute,canopy,L0,true,positive,0.001,1.2\nparachute,strings,L0,false,,0.4,0.1\n")
    build_global(folder, tmp_path / "global", n_bootstrap=20)
    page = (tmp_path / "global" / "parachute" / "index.html").read_text()
    assert "yes: L0 (direction=positive, p_value=0.001, effect_size=1.2)" in page
    assert "no evidence at this power (1 layer tested)" in page  # never "no": the test may miss small effects


def test_html_escapes_study_text(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    r = make_round("E", 0, 0, evil)
    export = write_export(tmp_path / "export", [r], [make_play("e1", r, "win", 0, "red wings"),
                                                     make_play("e2", r, "win", 0, "red wings")])
    run_labels(export, tmp_path / "labels", ToyEmbedder(TABLE), settings=LabelSettings(n_bootstrap=10))
    build_global(tmp_path / "labels", tmp_path / "global", n_bootstrap=10)
    pages = [p.read_text() for p in (tmp_path / "global").rglob("*.html")]
    assert len(pages) == 2 and all("<script>" not in p for p in pages)
    assert any("&lt;script&gt;alert(1)&lt;/script&gt;" in p for p in pages)


def test_bad_exports_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no plays"):
        run_labels(write_export(tmp_path / "empty", [], []), embedder=ToyEmbedder(TABLE))
    with pytest.raises(ExportError, match="not a study export"):
        run_labels(tmp_path, embedder=ToyEmbedder(TABLE))
    broken = tmp_path / "broken"
    write_export(broken, [], [])
    (broken / "plays.csv").write_text("play_id,outcome\np1,win\n")
    with pytest.raises(ExportError, match="missing column"):
        run_labels(broken, embedder=ToyEmbedder(TABLE))


def test_class_without_correct_guesses_and_a_single_description(tmp_path: Path) -> None:
    a, b = make_round("A", 0, 0, "tench", n_layers=1), make_round("B", 0, 0, "church", n_layers=1)
    plays = [make_play("a1", a, "lose", 0, "dimples", guessed="church"),  # tench: no correct guess at all
             make_play("b1", b, "win", 2, "white dimples")]               # church: one description
    result = run_labels(write_export(tmp_path / "e", [a, b], plays), embedder=ToyEmbedder(TABLE),
                        settings=LabelSettings(n_bootstrap=10))
    assert "tench" not in result.labellings and result.labellings["church"].k == 1
    audit = {row.play_id: row for row in result.audit}
    # church's one description "white dimples" is labelled "dimples" (a tie of one play each: the last word);
    # the tench cluster's wrong guess "dimples" keeps its own word, a label of the guessed class
    assert audit["b1"].label == "dimples"
    assert audit["a1"].status == "wrong_guess_labelled" and audit["a1"].label == "dimples"
    tench = next(c for c in result.clusters if c.class_name == "tench")
    assert tench.scores["dimples"].score == pytest.approx(0.25) and tench.best_labels == ["dimples"]


def test_translator_hook(tmp_path: Path) -> None:
    class Dictionary:
        name = "test-dictionary"

        def translate(self, texts, source, context=None):
            assert source == "it" and context == "parachute"
            return [{"la vela": "the canopy"}[t] for t in texts]

    r = make_round("P", 0, 0, "parachute", n_layers=1)
    plays = [make_play("1", r, "win", 0, "la vela", language="it"), make_play("2", r, "win", 0, "canopy")]
    result = run_labels(write_export(tmp_path / "e", [r], plays), embedder=ToyEmbedder(TABLE),
                        translator=Dictionary(), settings=LabelSettings(n_bootstrap=10))
    row = next(a for a in result.audit if a.play_id == "1")
    assert (row.translated, row.cleaned, row.label) == ("the canopy", "the canopy", "canopy")
    assert result.translator == "test-dictionary"


@pytest.mark.slow
def test_global_report_draws_maps_from_a_real_inv_run(tmp_path: Path) -> None:
    """INV on the tiny CNN for two images; the study export names its clusters; maps and links appear."""
    import torch
    from PIL import Image

    from conftest import make_tiny_cnn
    from convlens.inv import INV
    from convlens.inv.report import save_with_page

    model = make_tiny_cnn()
    rounds, plays = [], []
    for n in range(2):
        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            explanation = INV(model, embedding="pca").explain(x, image_id=f"{n:016x}{0:048x}")
        picture = Image.fromarray((np.random.default_rng(n).random((32, 32, 3)) * 255).astype(np.uint8))
        save_with_page(explanation, tmp_path / "run" / f"img{n}" / "inv", picture)
        for depth, layer in enumerate(explanation.layers):
            for cluster in layer.clusters:
                rr = make_round(explanation.image_id[:16], depth, cluster.index, "tench", cluster.weight,
                                len(explanation.layers), cluster_id=cluster.id, layer=layer.name)
                rounds.append(rr)
                plays += [make_play(f"{rr['round_id']}-{k}", rr, "win", k, word)
                          for k, word in enumerate(["canopy", "strings"])]
    study = {"study_id": "s", "classes": ["tench"], "inv_runs": [{"name": "run", "path": str(tmp_path / "run")}]}
    export = write_export(tmp_path / "export", rounds, plays, study)
    run_labels(export, tmp_path / "labels", ToyEmbedder(TABLE), settings=LabelSettings(n_bootstrap=10))
    result = build_global(tmp_path / "labels", tmp_path / "global", n_bootstrap=10)
    page = (tmp_path / "global" / "tench" / "index.html").read_text()
    maps = list((tmp_path / "global" / "tench" / "maps").glob("*.png"))
    assert result.notes == [] and len(maps) >= 2 and "map not available" not in page
    assert page.count("<h3>Image") == 2  # distinct 16-digit image ids: the two images stay apart
    assert page.count('href="../../run/img0/inv/index.html"') >= 1
    assert Image.open(maps[0]).size == (32, 32)


def test_jsonl_export_reads_like_csv(tmp_path: Path) -> None:
    """The study's --format jsonl (typed values, null for empty) gives the same labels as its CSV."""
    export = _study(tmp_path)
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    (jsonl / "study.json").write_text((export / "study.json").read_text())
    for table in ("rounds", "plays"):
        with (export / f"{table}.csv").open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        typed = [{k: (None if v == "" else {"true": True, "false": False}.get(v, v)) for k, v in row.items()}
                 for row in rows]
        for row in typed:
            for key in ("level", "layer_depth", "n_layers"):
                if isinstance(row.get(key), str) and row[key].isdigit():
                    row[key] = int(row[key])
        (jsonl / f"{table}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in typed))
    settings = LabelSettings(n_bootstrap=10)
    from_csv = run_labels(export, embedder=ToyEmbedder(TABLE), settings=settings)
    from_jsonl = run_labels(jsonl, embedder=ToyEmbedder(TABLE), settings=settings)
    assert [(a.play_id, a.status, a.label, a.reason) for a in from_csv.audit] == [
        (a.play_id, a.status, a.label, a.reason) for a in from_jsonl.audit]
