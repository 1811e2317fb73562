"""Scoped thread limits: loops of small operations run on one thread, whatever the process's default.

torch's intra-op pool (OpenMP) and the BLAS pools split every operation over all their threads and meet at
a barrier when it ends. On cores other processes keep busy one of those threads is often descheduled, and
an operation of a few microseconds waits a scheduler time slice for it: a loop of thousands of small
operations (ADVISE's KDE, the AVX terms, SISE's block thresholds) ran ~25x slower on torch's default
threads than on one (``BENCHMARKS.md``, section ``load``). Large batched forwards still gain from their
threads, so the choice is made per operation size: small-operation sections are wrapped in
:func:`limit_threads`, the batched forwards run on the caller's threads.

Rules of :func:`limit_threads`:

* it only lowers: the body runs on ``min(current, threads)`` torch threads, so a caller's lower limit
  (``torch.set_num_threads(1)``, a Ray actor's ``--threads-per-worker``) always wins;
* it restores: on exit torch's thread count is what the entry saw, so nested limits unwind in order;
* ``blas=True`` also limits numpy's and scipy's BLAS (threadpoolctl), restored the same way;
* torch's thread count is per OS thread once used: enter the limit from the thread that runs the work.

Maps are unchanged beyond float rounding with and without the limits (``tests/test_threads.py``);
:func:`thread_limits_enabled` switches every limit off within its body, for benchmarks and those tests.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["limit_threads", "thread_limits_enabled", "thread_limits_on"]

_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("convlens_thread_limits", default=True)
_blas_lock = threading.Lock()
_blas_controller: tuple[int, Any] | None = None  # (modules loaded when scanned, threadpoolctl's BLAS controller)


def thread_limits_on() -> bool:
    """Whether :func:`limit_threads` limits anything in the current context (on unless switched off)."""
    return _enabled.get()


@contextlib.contextmanager
def thread_limits_enabled(enabled: bool) -> Iterator[None]:
    """Switch :func:`limit_threads` on or off within the body (this context only: a new thread starts on)."""
    token = _enabled.set(bool(enabled))
    try:
        yield
    finally:
        _enabled.reset(token)


def _blas() -> Any:
    """threadpoolctl's controller of the loaded BLAS libraries, scanned again when modules were imported since
    (scanning takes milliseconds, a cached controller's limit microseconds)."""
    global _blas_controller
    from threadpoolctl import ThreadpoolController

    with _blas_lock:
        loaded = len(sys.modules)
        if _blas_controller is None or _blas_controller[0] != loaded:
            _blas_controller = (loaded, ThreadpoolController().select(user_api="blas"))
        return _blas_controller[1]


@contextlib.contextmanager
def limit_threads(threads: int = 1, *, blas: bool = False, required: bool = False) -> Iterator[None]:
    """At most ``threads`` torch intra-op threads in the body (and BLAS threads with ``blas=True``), restored after.

    Usable as a context manager or a decorator (``@limit_threads()``). Never raises a lower count set by the
    caller. A speed limit is a no-op where :func:`thread_limits_enabled` switched the limits off; a limit a
    result depends on (``required=True``: INV clusters on one thread so that its results do not depend on
    ``n_jobs``) always holds.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    if not (required or _enabled.get()):
        yield
        return
    previous = torch.get_num_threads()
    if threads < previous:
        torch.set_num_threads(threads)
    lowered: list[tuple[Any, int]] = []
    try:
        if blas:
            for library in _blas().lib_controllers:
                count = library.num_threads  # read now: an outer limit may have lowered it
                if count > threads:
                    library.set_num_threads(threads)
                    lowered.append((library, count))
        yield
    finally:
        for library, count in reversed(lowered):
            library.set_num_threads(count)
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
