"""The data dictionary of a study export: every column of every table (name, type, meaning, allowed values).

Types: ``string``, ``integer``, ``number``, ``boolean`` (CSV: ``true``/``false``), ``datetime`` (ISO 8601
UTC, ``Z`` suffix). A null is an empty CSV cell and ``null`` in JSON Lines. Participant text (descriptions,
nicknames, the Prolific, study and session ids from the URL; the columns marked *participant text*) is
exported as the participant gave it (bounded, control characters refused) in JSON Lines. In CSV every text
cell that a spreadsheet would run as a formula — it starts with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return — or that starts with a single quote gets one single quote in front (OWASP, "CSV
injection"): spreadsheets then show it as text. Drop that one leading quote to get the exact text back
(convlens's readers do: ``convlens.core.csv_cells.restore``). ``study.json``'s ``csv_cells`` says whether
this was done (``neutralised``) or not (``raw``: ``study export --raw-csv``).
"""

from __future__ import annotations

__all__ = ["DATA_DICTIONARY_VERSION", "PARTICIPANT_TEXT", "TABLES", "dictionary_markdown"]

DATA_DICTIONARY_VERSION = "2"
TEXT = " (participant text: neutralised in CSV, see above)"
PARTICIPANT_TEXT = {"plays": ("description",), "events": ("text",),
                    "participants": ("nickname", "prolific_pid", "study_id_param", "session_id_param")}

_LEVEL = "reveal level index 0..5 (2, 4.5, 8, 13, 20, 30 % of pixels; gold rounds 50..100 %)"


def _c(name: str, type_: str, meaning: str, allowed: str = "") -> dict[str, str]:
    return {"name": name, "type": type_, "meaning": meaning, "allowed": allowed}


_ROUND = [
    _c("round_id", "string", "round id (12 hex digits, stable for the same cluster)"),
    _c("cluster_id", "string", "INV cluster id <sha16>:<layer>:<index>", "null for gold rounds"),
]
_CLUSTER = [
    _c("image_id", "string", "first 16 hex digits of the SHA-256 of the image file"),
    _c("layer", "string", "explained module name", "null for gold rounds"),
    _c("layer_depth", "integer", "0-based position of the layer in its INV run (shallow -> deep)",
       "null for gold rounds"),
    _c("n_layers", "integer", "number of layers in that INV run"),
    _c("cluster_index", "integer", "cluster rank by weight within its layer (0 = heaviest)", "null for gold rounds"),
]

TABLES: dict[str, list[dict[str, str]]] = {
    "rounds": [
        *_ROUND,
        _CLUSTER[0],
        _c("image_name", "string", "image file stem in the INV run"),
        *_CLUSTER[1:],
        _c("cluster_weight", "number", "cluster weight, percent of the whole layer", "null for gold rounds"),
        _c("fmap_count", "integer", "number of feature maps in the cluster", "null for gold rounds"),
        _c("true_class", "string", "the INV target class (the answer)", "one of study.json classes"),
        _c("gold", "boolean", "attention-check round (known answer, high reveal)"),
        _c("inv_run", "string", "INV run folder name"),
    ],
    "plays": [
        _c("play_id", "string", "play id (24 hex digits)"),
        _c("participant_id", "string", "pseudonymous participant id (16 hex digits)"),
        _c("position", "integer", "position of the play in the participant's sequence (1 = first shown; an "
           "abandoned play keeps its position and its replacement comes at the end)"),
        *_ROUND,
        *_CLUSTER,
        _c("true_class", "string", "the round's answer"),
        _c("gold", "boolean", "attention-check round"),
        _c("outcome", "string", "how the play ended; abandoned = its lease ran out before a guess or resign "
           "(or it was still running at export)", "win | lose | resign | abandoned"),
        _c("level", "integer", _LEVEL + " at the guess or resign; for abandoned the highest level seen", "0..5"),
        _c("guessed_class", "string", "the class guessed", "empty unless win or lose"),
        _c("correct", "boolean", "guessed_class == true_class", "empty unless win or lose"),
        _c("description", "string", "free text: what made the player decide, asked after the guess" + TEXT,
           "null if none"),
        _c("language", "string", "BCP-47 tag the player chose for the description", "study.json languages"),
        _c("description_screen", "string", "what was on screen when the description was written: level = the "
           "last reveal level, answer hidden; answer = the full image and the true class (plays recorded before "
           "the describe-before-answer flow)", "level | answer; null if no description"),
        _c("score", "integer", "points of this play (see study.json scoring_rule)", "0..100"),
        _c("started_at", "datetime", "round assigned"),
        _c("ended_at", "datetime", "guess or resign", "null for abandoned"),
    ],
    "events": [
        _c("event_id", "integer", "append order (increasing)"),
        _c("play_id", "string", "play id"),
        _c("participant_id", "string", "pseudonymous participant id"),
        *_ROUND,
        _c("type", "string", "what happened (skip: no description for the guess; expire: the lease ran out, the "
           "server ended the play)", "start | reveal | guess | describe | skip | resign | expire"),
        _c("level", "integer", _LEVEL + " after the event", "0..5"),
        _c("screen", "string", "what the player had on screen: level = the play's reveal level, answer hidden; "
           "answer = the full image and the true class", "level | answer"),
        _c("guessed_class", "string", "the class guessed", "guess events only"),
        _c("text", "string", "the description" + TEXT, "describe events only"),
        _c("language", "string", "BCP-47 tag of the description", "describe events only"),
        _c("created_at", "datetime", "when the server committed the event"),
    ],
    "participants": [
        _c("participant_id", "string", "pseudonymous participant id (random, 16 hex digits)"),
        _c("nickname", "string", "optional nickname shown on the leaderboard" + TEXT, "null if none"),
        _c("prolific_pid", "string", "PROLIFIC_PID URL parameter at consent (one registration per id)" + TEXT,
           "null if absent"),
        _c("study_id_param", "string", "STUDY_ID URL parameter at consent" + TEXT, "null if absent"),
        _c("session_id_param", "string", "SESSION_ID URL parameter at consent" + TEXT, "null if absent"),
        _c("consent_version", "string", "consent text version agreed to"),
        _c("created_at", "datetime", "consent given"),
        _c("quota", "integer", "rounds the participant had to finish for the completion code (fixed at consent)",
           "null for participants registered before quotas (the study's quota applied)"),
        _c("plays", "integer", "finished plays (win, lose, resign)"),
        _c("completed", "boolean", "finished the quota: the only participants shown the completion code"),
        _c("completed_at", "datetime", "when the quota was finished", "null unless completed"),
        _c("wins", "integer", "correct guesses"),
        _c("gold_plays", "integer", "finished gold plays"),
        _c("gold_correct", "integer", "correct guesses on gold rounds"),
        _c("gold_accuracy", "number", "gold_correct / gold_plays: the attention check, to drop participants "
           "below a threshold the study sets", "0..1; null without a finished gold play"),
    ],
}


def dictionary_markdown() -> str:
    lines = [f"# Deep Reveal export — data dictionary v{DATA_DICTIONARY_VERSION}", "", __doc__.split("\n\n", 1)[1], ""]
    for table, columns in TABLES.items():
        lines += [f"## {table}", "", "| column | type | meaning | allowed |", "|---|---|---|---|"]
        lines += [f"| {c['name']} | {c['type']} | {c['meaning']} | {c['allowed']} |" for c in columns]
        lines.append("")
    return "\n".join(lines)
