"""``labels``: a study export in, concept labels, scores, merged groups, agreement and an audit trail out.

:func:`run_labels` is the library entry point behind ``convlens labels`` (a benchmark calls it on an
export folder). For every play it decides, and records in the audit trail, what the play is used for:

* ``labelled``: a correct guess with a usable description; it feeds its class's text clustering
  (:func:`convlens.labels.labelling.label_class`) and gets that class's label;
* ``wrong_guess_labelled``: a wrong guess with a usable description; used only in the scores of its
  cluster (divided by 4). Its label is a word of its own description (:func:`convlens.labels.labelling.own_word`),
  written as the guessed class's label when that class's players used the same word (the authors cluster
  a wrong guess with the descriptions of the class the player *guessed*, ``LabelAnalysis.ipynb``, so
  its label comes from that class's vocabulary); a label is never a word the description lacks;
* ``stats_only``: a guess without a description, a resign, or a guess whose description cannot be used
  (non-English without a translator, empty or over-long text, only symbols or only class names, or
  naming no visual content: the reason reads ``description not used: ...``): counted in
  wins/losses/resigns and the cluster level only;
* ``unlabelled``: a description whose text cluster has no representative word (only stop-words); still
  counted in wins/losses and the level;
* ``excluded``: gold rounds, abandoned plays, rows that do not parse, unknown rounds, and the plays of
  participants who failed the gold check (``LabelSettings.min_gold_accuracy``): not counted at all.

What happens to a description's words, in order (each step in the audit row's ``cleaned``, ``content``
and ``text_rules``): HTML, symbols and case removed; every class name of the study removed, and the
single words of the play's own classes; stop-words and non-visual words (:func:`~convlens.labels.text.content_words`)
set aside; misspellings merged into their frequent form and misspelt class names removed
(:mod:`convlens.labels.spelling`); a description left without a word is not used. Correct guesses'
content texts are clustered per class and labelled with each cluster's concept word
(:mod:`convlens.labels.labelling`).

Then :mod:`convlens.labels.scores` (scores, statistics, best labels, merges) and
:mod:`convlens.labels.agreement`; :mod:`convlens.labels.files` writes the results.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from convlens.labels.agreement import agreement_table
from convlens.labels.embedders import Embedder, load_embedder
from convlens.labels.export import ExportError, Play, StudyExport, is_export, read_export
from convlens.labels.files import write_labels
from convlens.labels.gold import GoldFilter, gold_filter
from convlens.labels.labelling import ClassLabelling, label_class, lemmatize_en, own_word
from convlens.labels.records import (
    EXCLUDED,
    LABELLED,
    STATS,
    UNLABELLED,
    UNUSED,
    WRONG,
    AuditRow,
    LabelSettings,
    LabelsResult,
)
from convlens.labels.scores import (
    ClusterStats,
    LabelVote,
    full_merge,
    merge_clusters,
    score_labels,
)
from convlens.labels.spelling import spelling_fixes
from convlens.labels.text import (
    Translator,
    clean_description,
    content_words,
    english_share,
    is_english_tag,
    load_non_visual_words,
    load_stop_words,
    name_words,
    words,
)

__all__ = ["AuditRow", "LabelSettings", "LabelsResult", "run_labels"]


def _audit_row(play: Play) -> AuditRow:
    return AuditRow(
        play.play_id, play.participant_id, play.round_id, play.cluster_id, play.image_id, play.layer,
        play.layer_depth, play.true_class, play.outcome, play.level, play.guessed_class, play.correct,
        play.language, play.description,
    )


def _triage(export: StudyExport, gold: GoldFilter | None = None) -> tuple[list[AuditRow], list[tuple[AuditRow, Play]]]:
    """One audit row per play; returns the rows and the (row, play) pairs that enter cluster statistics."""
    dropped = gold.dropped if gold is not None else {}
    rows = [AuditRow(play_id=r.raw.get("play_id", f"row {r.row_number}"), description=r.raw.get("description", ""),
                     reason=r.reason, true_class=r.raw.get("true_class", ""), cluster_id=r.raw.get("cluster_id", ""))
            for r in export.invalid]
    counted = []
    for play in export.plays:
        row = _audit_row(play)
        rows.append(row)
        if play.participant_id in dropped:
            row.reason = dropped[play.participant_id]
        elif play.gold:
            row.reason = "gold round (attention check, not a cluster)"
        elif play.round_id not in export.rounds:
            row.reason = f"unknown round {play.round_id!r} (not in rounds)"
        elif play.outcome == "abandoned":
            row.reason = "abandoned: neither a guess nor a resign, not counted"
        else:
            counted.append((row, play))
            row.status = STATS
            if play.outcome == "resign":
                unused = "; its description is not used" if play.description.strip() else ""
                row.reason = f"resign (counted as level 5){unused}"
            elif not play.description.strip():
                row.reason = "no description (counted in wins/losses)"
            else:
                row.status, row.vocabulary_class = "", play.guessed_class  # a text to clean
    return rows, counted


def _translate(rows: Sequence[AuditRow], translator: Translator | None) -> None:
    """English text for every pending row; non-English rows without a translator count in the
    statistics only (their description is not used)."""
    pending: dict[tuple[str, str], list[AuditRow]] = defaultdict(list)
    for row in rows:
        if row.status == "" and not is_english_tag(row.language):
            if translator is None:
                row.status = STATS
                row.reason = f"{UNUSED}language {row.language!r} and no translator (pass one to translate)"
            else:
                pending[(row.language, row.vocabulary_class)].append(row)
    for (language, context), group in pending.items():
        texts = translator.translate([r.description for r in group], source=language, context=context)  # type: ignore[union-attr]
        if len(texts) != len(group):
            raise ValueError(f"translator {translator.name!r} returned {len(texts)} texts for {len(group)}")  # type: ignore[union-attr]
        for row, text in zip(group, texts, strict=True):
            row.translated = str(text)


def _clean(rows: Sequence[AuditRow], classes: Sequence[str], aliases: Mapping[str, Sequence[str]],
           max_chars: int) -> None:
    """Clean every pending row (every class name of the study removed) and set aside its non-visual words.
    Descriptions repeat: each distinct text is cleaned once."""
    every_name = [name for c in dict.fromkeys([*classes, *aliases]) for name in (c, *aliases.get(c, ()))]
    stop_words, non_visual = load_stop_words(), load_non_visual_words()
    cleaned: dict[str, Any] = {}
    shares: dict[str, float] = {}
    removed: dict[tuple[str, ...], frozenset[str]] = {}
    for row in rows:
        if row.status != "":
            continue
        raw = row.translated or row.description
        if raw not in cleaned:
            cleaned[raw] = clean_description(raw, every_name, max_chars)
        result = cleaned[raw]
        if result.text is None:
            row.status, row.reason = STATS, UNUSED + (result.reason or "unusable text")
            continue
        row.cleaned = result.text
        own = tuple(n for c in dict.fromkeys([row.true_class, row.vocabulary_class]) for n in (c, *aliases.get(c, ())))
        if own not in removed:
            removed[own] = name_words(own)
        content, dropped = content_words(result.text, stop_words, non_visual, removed[own])
        row.content = " ".join(content)
        row.text_rules = "; ".join(f"non-visual {d}" for d in dropped)
        if not row.translated and len(words(result.text)) >= 3:
            if result.text not in shares:
                shares[result.text] = english_share(result.text)
            if shares[result.text] < 0.5:
                row.note = (f"tagged {row.language or 'en'} but only {shares[result.text]:.0%} of its words are "
                            "known English words")


def _fix_spelling(rows: Sequence[AuditRow], every_name: Sequence[str], min_similarity: float) -> dict[str, Any]:
    """Merge misspellings study-wide, remove misspelt class names; a row left without words names no visual
    content. Returns the fixes."""
    pending = [row for row in rows if row.status == ""]
    counts: Counter[str] = Counter()
    for row in pending:
        counts.update(set(row.content.split()))
    fixes = spelling_fixes(counts, name_words(every_name), min_similarity=min_similarity)
    non_visual = load_non_visual_words()
    for row in pending:
        kept, notes = [], [row.text_rules] if row.text_rules else []
        for word in row.content.split():
            fix = fixes.get(word)
            if fix is not None:
                notes.append(fix.describe())
                word = fix.target
            if word and word in non_visual:
                notes.append(f"non-visual {non_visual[word]}:{word}")
            elif word:
                kept.append(word)
        row.content, row.text_rules = " ".join(kept), "; ".join(notes)
        if not kept:
            row.status = STATS
            row.reason = UNUSED + "names no visual content: " + (row.text_rules or "only stop-words")
    return fixes


def _label_classes(rows: Sequence[AuditRow], embedder: Embedder, max_k: int) -> dict[str, ClassLabelling]:
    stop_words = load_stop_words()
    texts: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row.status == "" and row.correct:
            texts[row.vocabulary_class].append(row.content)
    distinct = list(dict.fromkeys(t for found in texts.values() for t in found))
    if distinct:
        embedder.encode(distinct)  # one batch for the study; label_class reads the embedder's cache
    return {name: label_class(name, found, embedder, stop_words, max_k=max_k) for name, found in texts.items()}


def _study_vocabulary(rows: Sequence[AuditRow]) -> tuple[dict[str, int], dict[str, str]]:
    """lemma -> plays using it, and lemma -> its most frequent written form, over every usable description."""
    plays: Counter[str] = Counter()
    forms: dict[str, Counter[str]] = defaultdict(Counter)
    for row in rows:
        if row.status == "":
            for word in set(row.content.split()):
                forms[lemmatize_en(word)][word] += 1
            plays.update({lemmatize_en(w) for w in row.content.split()})
    return dict(plays), {lemma: found.most_common(1)[0][0] for lemma, found in forms.items()}


def _assign_labels(rows: Sequence[AuditRow], labellings: Mapping[str, ClassLabelling]) -> None:
    study_plays, study_forms = _study_vocabulary(rows)
    for row in rows:
        if row.status != "":
            continue
        labelling = labellings.get(row.vocabulary_class)
        if row.correct and labelling is not None:
            row.text_cluster, _ = labelling.label_of(row.content)
            cluster = labelling.clusters[row.text_cluster]
            row.representative, row.label = cluster.representative, cluster.label
            row.status = LABELLED if row.label else UNLABELLED
            if not row.label:
                row.reason = f"text cluster {row.text_cluster} has only stop-words: no representative word"
            continue
        labels = labelling.labels_by_lemma if labelling is not None else {}
        class_plays = labelling.lemma_plays if labelling is not None else {}
        row.label, why = own_word(row.content.split(), labels, class_plays, study_plays, study_forms)
        row.representative = row.label
        row.status = WRONG
        row.reason = (f"wrong guess: labelled with a word of its description ({why} "
                      f"{row.vocabulary_class!r}), used only in scores (/4)")


def _cluster_stats(
    export: StudyExport, counted: Sequence[tuple[AuditRow, Play]], wrong_rule: str
) -> list[ClusterStats]:
    stats: dict[str, ClusterStats] = {}
    for r in export.rounds.values():
        if r.gold or not r.cluster_id:
            continue
        stats[r.round_id] = ClusterStats(
            r.cluster_id, r.true_class, r.image_id, r.layer, r.layer_depth, r.n_layers, r.cluster_weight or 0.0,
            r.fmap_count or 0, r.image_name, r.cluster_index, r.inv_run,
        )
    votes: dict[str, list[LabelVote]] = defaultdict(list)
    for row, play in counted:
        cluster = stats.get(play.round_id)
        if cluster is None:
            row.status, row.reason = EXCLUDED, "round is a gold round or has no INV cluster"
            continue
        if play.outcome == "resign":
            cluster.resigns += 1
            continue
        cluster.guess_levels.append(play.level)
        cluster.wins += play.outcome == "win"
        cluster.losses += play.outcome == "lose"
        if row.status in (LABELLED, WRONG):
            votes[play.round_id].append(LabelVote(play.cluster_id, row.label, play.level, bool(play.correct)))
    for round_id, cluster in stats.items():
        cluster.scores = score_labels(votes.get(round_id, []), wrong_rule)  # type: ignore[arg-type]
    for row, play in counted:
        cluster = stats.get(play.round_id)
        if cluster is not None and row.label in cluster.scores and row.status in (LABELLED, WRONG):
            row.label_score = cluster.scores[row.label].score
    return list(stats.values())


def _agreement_units(rows: Sequence[AuditRow], clusters: Sequence[ClusterStats]) -> dict[str, dict[str, list[str]]]:
    units: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for cluster in clusters:
        units[cluster.class_name].setdefault(cluster.cluster_id, [])
    for row in rows:
        if row.status == LABELLED:
            units[row.true_class].setdefault(row.cluster_id, []).append(row.label)
    return {name: found for name, found in units.items() if any(found.values())}


def _label_export(
    export: StudyExport, embedder: Embedder, translator: Translator | None, settings: LabelSettings,
    gold: GoldFilter | None = None,
) -> LabelsResult:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    rows, counted = _triage(export, gold)
    _translate(rows, translator)
    classes = export.classes
    _clean(rows, classes, settings.class_aliases, settings.max_chars)
    every_name = [n for c in dict.fromkeys([*classes, *settings.class_aliases])
                  for n in (c, *settings.class_aliases.get(c, ()))]
    fixes = _fix_spelling(rows, every_name, settings.spelling_similarity)
    timings["clean"] = time.perf_counter() - start
    labellings = _label_classes(rows, embedder, settings.max_text_clusters)
    _assign_labels(rows, labellings)
    timings["label"] = time.perf_counter() - start - timings["clean"]
    clusters = _cluster_stats(export, counted, settings.wrong_rule)
    groups, full_groups = merge_clusters(clusters), full_merge(clusters)
    agreement = agreement_table(_agreement_units(rows, clusters), settings.n_bootstrap, settings.seed)
    timings["total"] = time.perf_counter() - start
    return LabelsResult(export, embedder.describe(), settings, getattr(translator, "name", None), rows, labellings,
                        clusters, groups, full_groups, agreement, timings=timings, spelling=fixes, gold=gold)


def run_labels(
    export_dir: str | Path,
    out: str | Path | None = None,
    embedder: Embedder | None = None,
    translator: Translator | None = None,
    settings: LabelSettings | None = None,
    inv_base: str | Path | None = None,
) -> LabelsResult:
    """Label a study export folder; write the results into ``out`` if given.

    ``embedder`` defaults to :func:`~convlens.labels.embedders.load_embedder` ``("auto")``;
    ``inv_base`` is the folder relative INV run paths of ``study.json`` are taken against (default: the
    export folder). Raises :class:`~convlens.labels.export.ExportError` for input that is not a
    usable export (missing files or columns, no plays at all).
    """
    settings = settings or LabelSettings()
    export_dir = Path(export_dir)
    if not export_dir.is_dir() or not is_export(export_dir):
        raise ExportError(f"{export_dir}: not a study export folder (no plays.csv or plays.jsonl)")
    export = read_export(export_dir)
    if not export.plays and not export.invalid:
        raise ExportError(f"{export_dir}: the export has no plays: nothing to label")
    gold = gold_filter(export_dir, settings.min_gold_accuracy, settings.min_gold_plays)
    result = _label_export(export, embedder or load_embedder("auto"), translator, settings, gold)
    result.source = export_dir.resolve()
    result.inv_runs = export.inv_runs(Path(inv_base) if inv_base is not None else None)
    if out is not None:
        write_labels(result, out)
    return result
