"""Dataset-scale runs on Ray: ``convlens explain`` and ``convlens evaluate`` with ``--engine ray``.

The images (explain: each file's name and bytes; evaluate: the pending
:class:`~convlens.runners.evaluate_item.WorkItem` s) become a Ray dataset, one block per image, and
``Dataset.map_batches`` runs a callable class (:mod:`convlens.runners.ray_workers`) on an actor pool:
each actor deserialises the run's model once (shipped through the object store: no weights file or
network download is needed on the workers), sets its torch threads and device, and explains the batches
it is handed. Results stream back to the driver in completion order and go into the same resumable store
as the embedded engine's (records written atomically as they arrive), so the tables and reports are the
same whichever engine ran, a killed driver resumes without recomputing finished images, and a lost
worker node only costs the images it held (Ray Data restarts its actors elsewhere and retries them;
the driver keeps the first result of each image and checks that every image came back).

Ray is an optional extra (``pip install 'convlens[ray]'``): nothing imports this module unless
``--engine ray`` is asked for, and Ray itself is imported only when a run starts.

Cluster use: every node needs the same Python environment (convlens, torch; e.g. one container image).
``convlens explain`` ships the image bytes, so only the driver reads the input files (it holds one window
of 256 images' bytes at a time); ``convlens evaluate`` loads images on the workers from the
dataset's paths, so the data must be at the same path on every node (a shared file system) — or be
``synthetic``. The run's output folder is written by the driver alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "RayEngineError",
    "RayEvaluateEngine",
    "RayExplainEngine",
    "RayOptions",
    "RaySession",
    "pool_size",
    "ray_session",
    "require_ray",
]

logger = logging.getLogger("convlens.ray")

INSTALL_HINT = "pip install 'convlens[ray]'"
# what a gRPC client sends first (RFC 9113 section 3.4): the preface and an empty SETTINGS frame
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP2_SETTINGS = 0x4
HTTP2_EMPTY_SETTINGS = bytes([0, 0, 0, HTTP2_SETTINGS, 0, 0, 0, 0, 0])


class RayEngineError(ValueError):
    """``--engine ray`` cannot run as asked (Ray missing, no cluster at the address, bad options)."""


@dataclass(frozen=True)
class RayOptions:
    """How a run uses Ray.

    Args:
        address: ``None`` starts a local Ray for the run (stopped at its end); ``"auto"`` joins the cluster
            this machine belongs to; ``"ray://host:10001"`` a remote one through Ray Client; ``host:port``
            a cluster's head node.
        workers: actors in the pool (``None``: as many as the cluster's CPUs, or GPUs, allow).
        gpus_per_worker: GPUs reserved per actor (fractions share a GPU); > 0 runs the workers on CUDA.
        threads_per_worker: CPUs reserved per actor, and its torch intra-op threads.
        images_per_call: images per ``map_batches`` call (1: finest load balance and retry granularity).
        connect_timeout: seconds to wait for a cluster at ``address`` to answer before giving up (Ray itself
            retries for minutes when nothing is there).
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    images_per_call: int = 1
    connect_timeout: float = 15.0

    @property
    def device(self) -> str:
        """Where the workers run the model."""
        return "cuda" if self.gpus_per_worker > 0 else "cpu"

    def check(self) -> None:
        """One clear :class:`RayEngineError` for an impossible setting."""
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise RayEngineError(f"--workers must be >= 1, got {self.workers}")
        if not (math.isfinite(self.gpus_per_worker) and self.gpus_per_worker >= 0):
            raise RayEngineError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise RayEngineError(f"--gpus-per-worker above 1 must be whole GPUs, got {self.gpus_per_worker}")
        if self.threads_per_worker < 1:
            raise RayEngineError(f"--threads-per-worker must be >= 1, got {self.threads_per_worker}")
        if self.images_per_call < 1:
            raise RayEngineError(f"images per call must be >= 1, got {self.images_per_call}")
        if self.address is not None and not self.address.strip():
            raise RayEngineError("--ray-address is empty: give auto, ray://HOST:PORT or HOST:PORT")
        if not (math.isfinite(self.connect_timeout) and self.connect_timeout > 0):
            raise RayEngineError(f"connect timeout must be > 0 seconds, got {self.connect_timeout}")


def require_ray() -> ModuleType:
    """The ``ray`` module, or a :class:`RayEngineError` saying how to install it."""
    try:
        import ray
        import ray.data  # Ray Data is the part the engine uses
    except ImportError as exc:
        raise RayEngineError(f"--engine ray needs Ray with Ray Data, which is not installed: {INSTALL_HINT}") from exc
    return ray


@dataclass
class RaySession:
    """The Ray this run uses: whether the run started it (a local Ray), and the cluster's resources."""

    started: bool
    resources: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[RaySession]:
    """Join the cluster at ``options.address``, start a local Ray (no address), or reuse the Ray this
    process already runs; what was started or joined here is shut down at the end.

    A local Ray is the run's own (``address="local"``), whatever other Ray runs on the machine or
    ``RAY_ADDRESS`` says, and its daemons are followed by a :class:`~convlens.core.processes.ProcessWatchdog`,
    so none outlives a driver killed with SIGKILL. An address where no Ray answers within
    ``options.connect_timeout`` seconds gives one :class:`RayEngineError` instead of Ray's minutes of retries.
    """
    options.check()
    ray = require_ray()
    started = connected = False
    with contextlib.ExitStack() as stack:
        if not ray.is_initialized():
            quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
            if options.address is None:
                from convlens.core.processes import ProcessWatchdog

                short = _short_temp_dir()
                if short is not None:  # removed last: after the watchdog has stopped Ray's daemons
                    quiet["_temp_dir"] = short
                    stack.callback(shutil.rmtree, short, ignore_errors=True)
                watchdog = stack.enter_context(ProcessWatchdog())
                if short is not None:
                    watchdog.remove_after(short)  # also if this driver is killed
                ray.init(address="local", num_cpus=_local_cpus(options), include_dashboard=False, **quiet)
                started = True
                watchdog.scan()  # the daemons ray.init started: followed from now on
            else:
                _probe_address(options.address, options.connect_timeout)
                try:
                    ray.init(address=options.address, **quiet)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise RayEngineError(
                        f"--ray-address {options.address}: no Ray cluster could be joined ({exc}); start one with "
                        "`ray start --head`, or leave --ray-address out to start a local Ray for the run"
                    ) from exc
                connected = True
        try:
            _quiet_ray_data()
            session = RaySession(started, dict(ray.cluster_resources()))
            _check_gpus(options, session)
            yield session
        finally:
            if started or connected:
                ray.shutdown()


def _resolved_address(address: str) -> str | None:
    """``HOST:PORT`` that ``address`` stands for (``auto``: the cluster this machine belongs to, as Ray
    finds it), or None where there is nothing to check beforehand."""
    address = address.strip()
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            return canonicalize_bootstrap_address(address)
        except Exception:  # Ray's own lookup: ray.init reports what it finds
            return None
    return address.split("://", 1)[1] if "://" in address else address


def _probe_address(address: str, timeout: float) -> None:
    """Fail fast where no Ray can answer: the host must accept a TCP connection on the port and speak HTTP/2
    there (Ray's GCS and Ray Client are gRPC servers: they answer the HTTP/2 connection preface with a
    SETTINGS frame, RFC 9113 section 3.4), each within ``timeout`` seconds. With TLS (``RAY_USE_TLS``) only
    the TCP connection is checked."""
    import socket

    target = _resolved_address(address)
    if target is None:
        return
    host, sep, port_text = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RayEngineError(f"--ray-address {address}: expected auto, ray://HOST:PORT or HOST:PORT")
    hint = "start one with `ray start --head`, or leave --ray-address out to start a local Ray for the run"
    try:
        connection = socket.create_connection((host, int(port_text)), timeout=timeout)
    except TimeoutError:
        raise RayEngineError(f"--ray-address {address}: no answer within {timeout:g} s; {hint}") from None
    except OSError as exc:
        raise RayEngineError(f"--ray-address {address}: no Ray cluster there ({exc.strerror or exc}); {hint}") from None
    with connection:
        if os.environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true"):
            return
        try:
            connection.sendall(HTTP2_PREFACE + HTTP2_EMPTY_SETTINGS)
            header = b""
            while len(header) < 9 and (chunk := connection.recv(9 - len(header))):
                header += chunk
        except OSError:  # a timeout, or the connection reset
            header = b""
    if len(header) < 9 or header[3] != HTTP2_SETTINGS:
        raise RayEngineError(f"--ray-address {address}: something answers there, but not Ray (no gRPC answer "
                             f"within {timeout:g} s); {hint}")


RAY_SOCKET_TAIL = len("/ray/session_2026-12-08_00-30-48_776853_4194304/sockets/plasma_store")
"""Ray's longest socket path below its temporary folder (an AF_UNIX path has at most 107 bytes)."""


def _short_temp_dir() -> str | None:
    """A fresh short folder under /tmp for a local Ray whose sockets would not fit under the temporary folder
    (Ray uses ``RAY_TMPDIR``, else ``TMPDIR``: a long TMPDIR made ``ray.init`` fail); None when they fit."""
    base = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    if len(os.fsencode(base)) + RAY_SOCKET_TAIL <= 107 or not os.access("/tmp", os.W_OK | os.X_OK):
        return None
    return tempfile.mkdtemp(prefix="convlens-ray-", dir="/tmp")


def _local_cpus(options: RayOptions) -> int:
    wanted = (options.workers or 1) * options.threads_per_worker
    return max(os.cpu_count() or 1, wanted)


def _quiet_ray_data() -> None:
    """No progress bars or per-dataset log lines on the command line's stderr (the CLI draws its own)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


def _check_gpus(options: RayOptions, session: RaySession) -> None:
    gpus = session.resources.get("GPU", 0.0)
    if options.gpus_per_worker <= 0 or gpus >= options.gpus_per_worker:
        return
    message = f"--gpus-per-worker {options.gpus_per_worker}: the Ray cluster has {gpus:g} GPU(s)"
    if session.started:
        raise RayEngineError(message + " (no CUDA GPU on this machine)")
    logger.warning("%s; the workers wait until an autoscaler adds GPU nodes", message)


def pool_size(options: RayOptions, resources: dict[str, float]) -> int:
    """Actors in the pool: ``--workers``, else as many as the cluster's GPUs (or CPUs) hold at once."""
    if options.workers is not None:
        return options.workers
    if options.gpus_per_worker > 0:
        return max(1, int(resources.get("GPU", 0.0) // options.gpus_per_worker))
    return max(1, int(resources.get("CPU", 1.0) // options.threads_per_worker))


def stream_results(
    payloads: Sequence[bytes], worker: type, constructor_args: tuple[Any, ...], options: RayOptions,
    session: RaySession,
) -> Iterator[tuple[int, bytes]]:
    """``(position, pickled result)`` for every payload, in completion order, each position once.

    One block per payload; an actor pool of :func:`pool_size` actors (shrinking to one if nodes are lost)
    runs ``worker(*constructor_args)`` on batches of ``options.images_per_call`` rows.
    """
    import ray.data

    size = pool_size(options, session.resources)
    rows = [{"position": position, "payload": payload} for position, payload in enumerate(payloads)]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    mapped = dataset.map_batches(
        worker,
        fn_constructor_args=constructor_args,
        batch_size=options.images_per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size, initial_size=size),
        num_cpus=options.threads_per_worker,
        num_gpus=options.gpus_per_worker or None,
    )
    seen: set[int] = set()
    for batch in mapped.iter_batches(batch_size=None, batch_format="numpy"):
        for position, result in zip(batch["position"], batch["result"], strict=True):
            if int(position) not in seen:  # a block retried after a lost node may come back twice
                seen.add(int(position))
                yield int(position), result
    if len(seen) != len(rows):
        missing = len(rows) - len(seen)
        raise RayEngineError(f"{missing} image(s) came back from no Ray worker; run the same command again to do them")


class RayEvaluateEngine:
    """An evaluation engine (see :func:`convlens.runners.evaluate.run_evaluation`) on a Ray actor pool.

    The evaluator is shipped to every actor once (its settings, dataset and model); each actor evaluates
    the :class:`~convlens.runners.evaluate_item.WorkItem` s it is handed and returns the
    :class:`~convlens.runners.evaluate_item.ItemResult` s, which the driver stores as they arrive.
    ``session`` holds the last run's :class:`RaySession` (resources).
    """

    def __init__(self, options: RayOptions | None = None) -> None:
        self.options = options or RayOptions()
        self.options.check()
        self.session: RaySession | None = None

    def __call__(self, evaluator: Any, items: Iterable[Any]) -> Iterator[Any]:
        from convlens.runners.ray_workers import EvaluateWorker

        pending = list(items)
        if not pending:
            return
        with ray_session(self.options) as session:
            self.session = session
            args = (evaluator.__getstate__(), self.options.device, self.options.threads_per_worker)
            payloads = [pickle.dumps(item) for item in pending]
            for _, result in stream_results(payloads, EvaluateWorker, args, self.options, session):
                yield pickle.loads(result)


class RayExplainEngine:
    """A ``convlens explain`` engine (:data:`convlens.runners.explain.ExplainEngine`) on a Ray actor pool.

    Each image's bytes go to a worker, which explains it into a private folder and returns the folder's
    files; the driver's job writes them into the run's (atomic) image folder and fixes the record's
    ``image`` / ``source`` to the driver's path, so the folder equals the embedded engine's. The images are
    streamed in windows of ``window`` paths (one Ray dataset each): the driver and the object store hold
    one window's image bytes at a time, not every pending image's.
    """

    WINDOW = 256

    def __init__(self, options: RayOptions | None = None, window: int = WINDOW) -> None:
        if window < 1:
            raise RayEngineError(f"images per window must be >= 1, got {window}")
        self.options = options or RayOptions()
        self.options.check()
        self.window = window
        self.session: RaySession | None = None

    def __call__(self, plan: Any, settings: Any, paths: Sequence[Path], progress: Any) -> Iterator[tuple[int, Any]]:
        from convlens.runners.ray_workers import ExplainState, ExplainWorker

        if not paths:
            return
        state = ExplainState(plan.loaded, plan.explainers, settings)
        plan.config.device = self.options.device  # the report names the workers' device, not the driver's
        with ray_session(self.options) as session:
            self.session = session
            args = (state, self.options.device, self.options.threads_per_worker)
            for first in range(0, len(paths), self.window):  # only one window's image bytes at a time
                window = paths[first : first + self.window]
                payloads = [pickle.dumps((path.name, path.read_bytes())) for path in window]
                for position, result in stream_results(payloads, ExplainWorker, args, self.options, session):
                    yield first + position, _ImageWriter(pickle.loads(result), paths[first + position], progress)


class _ImageWriter:
    """The driver's job for one image a worker explained: its files into the fresh folder, its record."""

    def __init__(self, outcome: Any, path: Path, progress: Any) -> None:
        self.outcome = outcome
        self.path = path
        self.progress = progress

    def __call__(self, folder: Path) -> dict[str, Any]:
        import json

        from convlens.models.images import ImageLoadError
        from convlens.runners.explain_image import IMAGE_RECORD

        outcome = self.outcome
        if outcome.record is None:
            raise ImageLoadError(str(outcome.error).replace(str(outcome.worker_path), str(self.path)))
        for relative, data in outcome.files.items():
            parts = Path(relative).parts
            if not parts or Path(relative).is_absolute() or ".." in parts:
                raise RayEngineError(f"a worker returned the file name {relative!r} for {self.path}: refused")
            target = folder.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        record = outcome.record | {"image": str(self.path), "source": str(self.path.resolve())}
        (folder / IMAGE_RECORD).write_text(json.dumps(record, indent=2))
        self.progress.forwards(outcome.masked_forwards)
        return record
