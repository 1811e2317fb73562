"""``--engine embedded|ray`` and the Ray options shared by ``convlens explain`` and ``convlens evaluate``.

The embedded engine (this process) is the default and needs nothing; ``--engine ray`` needs the
``convlens[ray]`` extra, and Ray is imported only then. With Ray, ``--device`` is where the *workers* run
(``--device cuda`` alone reserves one GPU per worker; ``--gpus-per-worker G`` implies CUDA); the driver
only loads the model on its CPU to check the settings, so it needs no GPU itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from convlens.cli.common import CliError

__all__ = [
    "ENGINES",
    "AddressOption",
    "EngineChoice",
    "EngineOption",
    "GpusOption",
    "ThreadsOption",
    "WorkersOption",
    "engine_session",
    "ray_options",
]

ENGINES = ("embedded", "ray")

EngineOption = Annotated[
    str, typer.Option(help="embedded (this process) or ray (a Ray Data actor pool; `pip install 'convlens[ray]'`).")
]
WorkersOption = Annotated[
    int | None, typer.Option(help="Ray: actors in the pool [default: as many as the cluster's CPUs/GPUs allow].")
]
GpusOption = Annotated[
    float | None, typer.Option(help="Ray: GPUs per actor (0.5 shares a GPU); > 0 runs the workers on CUDA.")
]
ThreadsOption = Annotated[int, typer.Option(help="Ray: CPUs reserved per actor = its torch threads.")]
AddressOption = Annotated[
    str | None, typer.Option(help="Ray: auto | ray://HOST:10001 | HOST:PORT [default: a local Ray for the run].")
]


@dataclass
class EngineChoice:
    """The checked engine options: the Ray options (None for the embedded engine) and the driver's device."""

    ray: Any | None  # convlens.runners.ray_engine.RayOptions
    driver_device: str


def ray_options(
    engine: str, workers: int | None, gpus_per_worker: float | None, threads_per_worker: int,
    ray_address: str | None, device: str,
) -> EngineChoice:
    """Check the engine options together; CliError (exit 2) for a bad combination or a missing Ray."""
    if engine not in ENGINES:
        raise CliError(f"--engine {engine!r}: choose embedded or ray")
    if engine == "embedded":
        given = [name for name, value in (("--workers", workers), ("--gpus-per-worker", gpus_per_worker),
                                          ("--ray-address", ray_address)) if value is not None]
        if threads_per_worker != 1:
            given.append("--threads-per-worker")
        if given:
            raise CliError(f"{', '.join(given)}: only with --engine ray")
        return EngineChoice(None, device)
    from convlens.runners.ray_engine import RayEngineError, RayOptions, require_ray

    wants_cuda = device.strip().lower().startswith("cuda")
    if wants_cuda and gpus_per_worker == 0:
        raise CliError(f"--device {device} with --gpus-per-worker 0: give the workers GPUs (e.g. --gpus-per-worker 1)")
    if not wants_cuda and device.strip().lower() != "cpu":
        raise CliError(f"--device {device!r}: use cpu or cuda")
    gpus = gpus_per_worker if gpus_per_worker is not None else (1.0 if wants_cuda else 0.0)
    options = RayOptions(address=ray_address, workers=workers, gpus_per_worker=float(gpus),
                         threads_per_worker=threads_per_worker)
    try:
        options.check()
        require_ray()
    except RayEngineError as exc:
        raise CliError(str(exc)) from exc
    if options.gpus_per_worker > 0 and ray_address is None and not _local_cuda():
        raise CliError("--gpus-per-worker: this machine has no CUDA GPU for a local Ray; give --ray-address of a "
                       "cluster with GPU nodes")
    return EngineChoice(options, "cpu")


def _local_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def engine_session(choice: EngineChoice) -> Iterator[None]:
    """Join the Ray cluster named by ``--ray-address`` before anything is written (a wrong address is a user
    error that leaves no trace); a local Ray is started by the engine itself, only when there is work."""
    if choice.ray is None or choice.ray.address is None:
        yield
        return
    from convlens.runners.ray_engine import RayEngineError, ray_session

    try:
        session = ray_session(choice.ray)
        session.__enter__()
    except RayEngineError as exc:
        raise CliError(str(exc)) from exc
    try:
        yield
    finally:
        session.__exit__(None, None, None)
