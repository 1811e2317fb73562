"""Gaussian smoothing exactly as ssvkernel's ``fftkernel`` / ``fftkernelWin``, at a fraction of its FFT size.

The reference (Shimazaki & Shinomoto's ``ssvkernel``: ``ADVISEkernel.m``, ``adaptivekde``) smooths a signal
``x`` of length ``L`` with a Gaussian of ``sigma`` bins by a circular convolution of length
``n = 2^ceil(log2(L + 3 sigma))``: ``real(ifft(fft(x, n) .* exp(-0.5 (2 pi sigma f)^2)))``, first ``L``
values. For the wide windows of ssvkernel (up to the data range: ``sigma`` up to ~1e5 bins on a
1000-point grid) ``n`` reaches 2^18, and the reference pays ``M^2`` such transforms per sample vector.

The same numbers come from a kernel that is known in closed form. The inverse DFT of the sampled
Gaussian spectrum is, by Poisson summation, the ``n``-periodic sum of the Gaussian density

    kappa(d) = sum_p G(d + p n; sigma),   G(x; s) = exp(-x^2 / (2 s^2)) / (sqrt(2 pi) s),

up to the spectrum's tail beyond the Nyquist frequency, ``exp(-pi^2 sigma^2 / 2) < 1e-53`` for the
``sigma >= 5`` bins ssvkernel ever uses (its smallest bandwidth is ``5 dt``). The wrap-around of the
reference's circular convolution is the ``p = +-1, +-2`` terms (``n - L >= 3 sigma``, so ``|p| >= 3`` is
below ``exp(-40)`` of the peak). Since the signal is zero beyond ``L`` and only the first ``L`` outputs are kept, the
smoothing is the *linear* convolution of ``x`` with ``kappa`` on ``|d| < L``: one real FFT of length
``2^ceil(log2(2 L - 1))`` (128 for ADVISE's 49-point grids, 2048 for 1000 points), whatever ``sigma``.
Both computations round differently, by ~1e-16 of the largest value, as numpy's and torch's FFTs do.
"""

from __future__ import annotations

import math

import torch

__all__ = ["fft_length", "periodic_gaussian", "smooth"]

_DIRECT_WIDTH = 128  # up to this signal length and _DIRECT_SETS kernel sets: Toeplitz products
_DIRECT_SETS = 8
_PERIODS = 2  # wrap-around terms p = -2 .. 2 of the periodic kernel (|p| = 3 is below exp(-40) of the peak)


def fft_length(lengths: torch.Tensor, sigma_bins: torch.Tensor) -> torch.Tensor:
    """``2^ceil(log2(L + 3 sigma))``: the reference's zero-padded FFT length (per row ``L``, per kernel)."""
    return torch.pow(2.0, torch.ceil(torch.log2(lengths[:, None].to(sigma_bins.dtype) + 3.0 * sigma_bins))).long()


def periodic_gaussian(sigma_bins: torch.Tensor, periods: torch.Tensor, width: int) -> torch.Tensor:
    """``kappa(d) = sum_{|p| <= 2} G(d + p n; sigma)`` for ``d = -(width-1) .. width-1``.

    Args:
        sigma_bins: (R, Q) kernel widths in bins.
        periods: (R, Q) the period ``n`` of each kernel (the reference's FFT length).
        width: the longest signal; the result covers lags ``|d| < width``.

    Returns:
        (R, Q, 2 width - 1) kernel values, lag ``d`` at index ``d + width - 1``.
    """
    lags = torch.arange(-(width - 1), width, dtype=sigma_bins.dtype, device=sigma_bins.device)
    shifts = torch.arange(-_PERIODS, _PERIODS + 1, dtype=sigma_bins.dtype, device=sigma_bins.device)
    sigma = sigma_bins[..., None]
    offsets = lags[:, None] + shifts[None, :] * periods.to(sigma_bins.dtype)[..., None, None]  # (R, Q, D, P)
    density = offsets.div_(sigma[..., None]).square_().mul_(-0.5).exp_().sum(-1)
    return density / (math.sqrt(2.0 * math.pi) * sigma)


def smooth(signal: torch.Tensor, kernels: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """Every signal of a row convolved with each of the row's kernels (linear convolution, first ``width``).

    Args:
        signal: (R, S, width) signals, zero beyond each row's length.
        kernels: (U, Q, 2 width - 1) distinct kernel sets from :func:`periodic_gaussian`.
        index: (R,) the kernel set of each row.
        width: the signals' (padded) length.

    Returns:
        (R, Q, S, width): ``out[r, q, s, k] = sum_m signal[r, s, m] kernels[index[r], q, k - m]``.
        A few kernel sets (ADVISE's grids share one) and signals up to 128 points: one product with each
        set's Toeplitz matrices; otherwise a real FFT of length ``>= 2 width - 1``.
    """
    rows, count = signal.shape[:2]
    if kernels.shape[0] <= _DIRECT_SETS and width <= _DIRECT_WIDTH:
        out = signal.new_empty((rows, count, kernels.shape[1], width))
        # sum_m x[m] kappa(k - m) = sum_j x[width - 1 - j] H[k, j] with H[k, j] = kernel[k + j] (symmetric)
        flipped = signal.flip(-1)
        for kernel_set, hankel in enumerate(_hankel(kernels, width)):  # (Q, width, width)
            members = torch.nonzero(index == kernel_set).flatten()
            flat = flipped[members].reshape(-1, width) @ hankel.permute(1, 0, 2).reshape(width, -1)
            out[members] = flat.view(members.numel(), count, kernels.shape[1], width)
        return out.permute(0, 2, 1, 3)
    n = 1 << max(1, (2 * width - 2).bit_length())  # >= 2 width - 1: no wrap-around
    circular = signal.new_zeros((*kernels.shape[:2], n))
    circular[..., :width] = kernels[..., width - 1 :]  # lags 0 .. width-1
    circular[..., n - width + 1 :] = kernels[..., : width - 1]  # lags -(width-1) .. -1
    spectrum = torch.fft.rfft(circular, n=n)[index]  # (R, Q, F)
    signal_spectrum = torch.fft.rfft(signal, n=n)  # (R, S, F)
    return torch.fft.irfft(spectrum[:, :, None] * signal_spectrum[:, None], n=n)[..., :width]


def _hankel(kernels: torch.Tensor, width: int) -> torch.Tensor:
    """(R, Q, 2 width - 1) kernel values -> (R, Q, width, width) matrices ``H[k, j] = kernel[k + j]`` (copied once)."""
    kernels = kernels.contiguous()
    rows, count, _ = kernels.shape
    return kernels.as_strided((rows, count, width, width), (kernels.stride(0), kernels.stride(1), 1, 1)).contiguous()
