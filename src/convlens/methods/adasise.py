"""Ada-SISE: Adaptive Semantic Input Sampling (Sudhakar, Sattarzadeh et al., ICASSP 2021, arXiv 2102.07799).

SISE with a per-layer, data-driven feature-map selection threshold instead of the fixed ``mu``.

**The mechanism is inferred**: the paper body was not available; the abstract says the method
"adaptively selects the most critical features" and runs "up to 30 %" faster than SISE. Two independent
public re-implementations agree on this rule, which convlens follows::

    alpha = spatial mean of dPsi/dA^(l)                 (SISE Eq. 6)
    P     = {k : alpha_k > 0}                           (SISE's mu = 0 set, Eq. 7)
    a_k   = alpha_k / max(alpha)       for k in P       (in (0, 1])
    tau_l = Otsu({a_k : k in P})                        (256-bin histogram over [min a, max a],
                                                         = skimage.filters.threshold_otsu)
    keep  = {k in P : a_k > tau_l}

Choices where the re-implementations differ: the histogram spans the values' own range with 256 bins
(one of them quantises ``a_k * 255`` to uint8 first) and the comparison is strict, ``>`` (one uses
``>=``), as in SISE's Eq. 7. This is SISE with an adaptive ``mu_l = tau_l`` per block.
Every other phase — the layers, Omega, the
masked-forward scoring (SISE Eqs. 9-12) and the fusion cascade — is SISE's (:mod:`convlens.methods.sise`),
including its options (``fusion``, ``baseline``, ``fast``). Degenerate layers: if the positive
``a_k`` are all equal (e.g. a single positive channel) they are all kept; the arg-max channel is always
kept. A layer without positive gradient keeps nothing. The per-block ``tau_l`` are reported in
``extras["relative_threshold"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from convlens.core.params import MethodParams, ParamError, param
from convlens.methods.sise import SISE, SISECascadeParams
from convlens.numerics.otsu import otsu_threshold

__all__ = ["AdaSISE", "AdaSISEParams", "adaptive_threshold"]

SELECTION = "otsu over normalised positive mean gradients"  # recorded in params() as "selection"


@dataclass(frozen=True)
class AdaSISEParams(SISECascadeParams):
    """Ada-SISE's knobs: SISE's cascade options and the bins of the per-block Otsu threshold (no ``mu``)."""

    method = "adasise"
    otsu_bins: int = param(256, "histogram bins of the per-block Otsu threshold", ge=2)


def adaptive_threshold(alpha: torch.Tensor, bins: int = 256) -> tuple[torch.Tensor, float | None]:
    """Ada-SISE's selection (inferred, see the module docstring): Otsu's threshold over the normalised
    positive mean gradients of one layer.

    Args:
        alpha: (N,) spatial mean gradients of the layer's channels.
        bins: histogram bins of Otsu's method.

    Returns:
        the kept channel indices and ``tau_l`` (relative to ``max alpha``; None when no alpha is > 0).
    """
    positive = torch.nonzero(alpha > 0)[:, 0]
    if positive.numel() == 0:
        return positive, None
    relative = alpha[positive] / alpha[positive].max()
    if bool((relative == relative[0]).all()):
        return positive, 0.0  # nothing to separate: keep them all, like mu = 0
    tau = otsu_threshold(relative, bins=bins)
    keep = relative > tau
    keep[int(relative.argmax())] = True
    return positive[keep], float(tau)


class AdaSISE(SISE):
    """Ada-SISE (ICASSP-21): SISE whose Eq. 7 threshold is chosen per block by Otsu's method on the
    normalised positive mean gradients (mechanism inferred — see the module docstring).

    Takes SISE's arguments except ``mu`` (replaced by the adaptive threshold), plus ``otsu_bins``
    (:class:`AdaSISEParams`).
    """

    name: ClassVar[str] = "adasise"
    paper: ClassVar[str] = "Sudhakar, Sattarzadeh et al., Ada-SISE, ICASSP 2021 (selection rule inferred)"
    Params: ClassVar[type[MethodParams]] = AdaSISEParams
    config: AdaSISEParams  # type: ignore[assignment]  # SISE's parameters without mu

    def __init__(self, model: Any, **kwargs: Any) -> None:
        if "mu" in kwargs:
            raise ParamError(
                "Ada-SISE chooses its threshold per block (Otsu) and takes no mu; use SISE for a fixed mu "
                "(on the command line: --param sise.mu=VALUE)"
            )
        super().__init__(model, **kwargs)

    def params(self) -> dict[str, Any]:
        """SISE's record without ``mu``, then ``selection`` (the rule, as text) and ``otsu_bins``."""
        recorded = super().params()
        otsu_bins = recorded.pop("otsu_bins")
        return recorded | {"selection": SELECTION, "otsu_bins": otsu_bins}

    def select_channels(self, alpha: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        """Per-block adaptive threshold ``tau_l`` (see :func:`adaptive_threshold`)."""
        return adaptive_threshold(alpha, self.config.otsu_bins)
