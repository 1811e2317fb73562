"""TCAV with real statistics (Kim et al., ICML 2018), on Captum's concept pieces: does the model use a concept
for a class?

On your own concept tensors: :class:`ConceptSet` / :class:`RandomSets` (``concept_sets``), CAVs and their
cache (``cav``; trained by the batched L2-SVM of ``solver``), :class:`TCAVRunner` (``runner``: scores, the
random-vs-random null, tests) and the statistics (``stats``). On a Deep Reveal study: :func:`run_study_tcav`
(``study``) builds concept sets from the study's own revealed regions (``study_regions``, ``study_concepts``)
and writes its output folder.
Names are imported on first use.
"""

from __future__ import annotations

from convlens.core.lazy import lazy_exports

_EXPORTS = {
    "ConceptSet": "convlens.tcav.concept_sets",
    "LinearSVM": "convlens.tcav.solver",
    "RandomSets": "convlens.tcav.concept_sets",
    "TCAVRunner": "convlens.tcav.runner",
    "TCAVReport": "convlens.tcav.runner",
    "TCAVTest": "convlens.tcav.runner",
    "TcavSettings": "convlens.tcav.study",
    "run_study_tcav": "convlens.tcav.study",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
