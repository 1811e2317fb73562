"""From players' words to concept labels: a study export in, labels per INV cluster, their scores, merged
groups, agreement and an audit trail out; then global explanations (how labels rise or fade with depth).

Entry points: :func:`run_labels` (``convlens labels``), :func:`read_labels` (a labels folder back),
:func:`global_explanations` (trends per class; ``convlens global`` adds its pages). Modules: ``export``
(reading a study export), ``gold`` (the gold-accuracy filter), ``text`` (cleaning, content words),
``spelling`` (misspellings merged, misspelt class names removed), ``embedders``, ``labelling`` (text clusters
and concept words per class), ``scores``, ``agreement``, ``records``, ``pipeline``, ``files`` (the labels
folder), ``trends``. Names are imported on first use.
"""

from __future__ import annotations

from convlens.core.lazy import lazy_exports

_EXPORTS = {
    "run_labels": "convlens.labels.pipeline",
    "LabelSettings": "convlens.labels.records",
    "LabelsResult": "convlens.labels.records",
    "AuditRow": "convlens.labels.records",
    "read_labels": "convlens.labels.files",
    "LabelsFolder": "convlens.labels.files",
    "read_export": "convlens.labels.export",
    "load_embedder": "convlens.labels.embedders",
    "global_explanations": "convlens.labels.trends",
    "ClassTrends": "convlens.labels.trends",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
