"""Dataset-level evaluation: explain every image with every method, score every metric, resume after a kill.

:func:`run_evaluation` takes an :class:`EvaluationConfig` and runs four separate pieces:

1. **build** (:func:`build_evaluation`, :mod:`~convlens.runners.evaluate_setup`) — settings checked,
   dataset opened, model loaded, explainers and metrics built into an
   :class:`~convlens.runners.evaluate_item.ItemEvaluator`; nothing is written, so a user error leaves
   no trace;
2. **store** (:class:`~convlens.runners.store.ResultsStore`) — the output folder is locked, its
   settings compared, the temporaries of a killed run removed; one JSON record per (method, image),
   written atomically, so a rerun with the same settings skips what is done;
3. **loop** (:func:`evaluate_items`) — an *engine* maps the evaluator over the pending
   :class:`~convlens.runners.evaluate_item.WorkItem` s and yields
   :class:`~convlens.runners.evaluate_item.ItemResult` s, which are stored as they arrive (any order);
   the default engine is :func:`embedded_engine` (this process, one image after the other);
4. **report** (:func:`~convlens.runners.evaluate_outputs.write_outputs`) — tables and HTML from the
   store's records only.

Metrics are judged through one contract, ``metric.evaluate(MetricContext) -> MetricValue``
(:mod:`convlens.metrics.context`): this module does not know metric families.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from convlens.data.base import ImageDataset
from convlens.models.zoo import LoadedModel
from convlens.runners.evaluate_item import ItemEvaluator, ItemResult, WorkItem
from convlens.runners.evaluate_outputs import (
    OUTPUT_FILES,
    OUTPUT_FOLDERS,
    EvaluationResult,
    summarise,
    summary_markdown,
    write_outputs,
    write_samples,
)
from convlens.runners.evaluate_setup import (
    PRESETS,
    EvaluationConfig,
    EvaluationError,
    align_labels,
    build_dataset,
    check_config,
    check_dataset,
    load_evaluation_model,
    load_model_for,
    prepare_model,
    weights_digest,
)
from convlens.runners.store import OutputFolderError, ResultsStore, record_key

__all__ = [
    "PRESETS",
    "Engine",
    "EvaluationConfig",
    "EvaluationError",
    "EvaluationResult",
    "EvaluationSetup",
    "build_dataset",
    "build_evaluation",
    "embedded_engine",
    "evaluate_items",
    "load_evaluation_model",
    "open_store",
    "pending_items",
    "run_evaluation",
    "summarise",
    "summary_markdown",
]

logger = logging.getLogger("convlens.evaluate")

Engine = Callable[[ItemEvaluator, Iterable[WorkItem]], Iterator[ItemResult]]
Progress = Callable[[int, int, str], None]


@dataclass
class EvaluationSetup:
    """A built run: settings, dataset (labels aligned with the model), model, the per-image evaluator and
    the SHA-256 of the ``--weights`` file (part of the settings: retrained weights at the same path are
    another run)."""

    config: EvaluationConfig
    dataset: ImageDataset
    loaded: LoadedModel
    evaluator: ItemEvaluator
    weights_sha256: str | None = None


def build_evaluation(config: EvaluationConfig, model: LoadedModel | None = None) -> EvaluationSetup:
    """Check the settings, open the data, load the model, build explainers and metrics; writes nothing."""
    device = check_config(config)
    weights_sha256 = weights_digest(config.weights)
    dataset = build_dataset(config)
    check_dataset(config, dataset)
    loaded = model or load_model_for(config, dataset)
    if config.targets == "label":
        dataset = align_labels(dataset, loaded)
    prepare_model(loaded, dataset, device)
    return EvaluationSetup(config, dataset, loaded, ItemEvaluator(config, dataset, loaded), weights_sha256)


def open_store(setup: EvaluationSetup, on_wait: Callable[[], None] | None = None) -> ResultsStore:
    """The run's store (locked; settings checked), cleared of what a killed earlier run left half-written."""
    config = setup.config
    settings = config.settings(setup.dataset, setup.weights_sha256)
    try:
        store = ResultsStore(config.out, settings, overwrite=config.overwrite, on_wait=on_wait)
    except OutputFolderError as exc:
        raise EvaluationError(str(exc)) from exc
    except OSError as exc:
        raise EvaluationError(f"--out {config.out}: cannot write there ({exc.strerror or exc})") from exc
    removed = store.remove_stale_temporaries(OUTPUT_FILES, OUTPUT_FOLDERS)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run", len(removed))
    return store


def pending_items(setup: EvaluationSetup, store: ResultsStore) -> tuple[list[WorkItem], int]:
    """The images still to do (each with its missing methods) and the number of images in the run."""
    config = setup.config
    ids = setup.dataset.sample_ids()
    n_total = min(len(ids), config.limit) if config.limit else len(ids)
    items = []
    for index in range(n_total):
        key = record_key(index, ids[index])
        if store.is_bad(key):
            continue
        missing = tuple(m for m in config.methods if not store.has(m, key))
        if missing:
            items.append(WorkItem(index, key, ids[index], missing, index < config.n_samples))
    return items, n_total


def embedded_engine(evaluator: ItemEvaluator, items: Iterable[WorkItem]) -> Iterator[ItemResult]:
    """This process, one image after the other (lazily: a consumer that stops stops the work)."""
    for item in items:
        yield evaluator(item)


def store_result(store: ResultsStore, result: ItemResult, samples_dir: Path) -> None:
    """Write one image's outcome: overlays first, then the records that mark it done."""
    item = result.item
    if result.bad_reason is not None:
        store.mark_bad(item.key, item.sample_id, result.bad_reason)
        logger.warning("skipping %s: %s", item.sample_id, result.bad_reason)
        return
    if result.samples is not None:
        write_samples(samples_dir, item.key, result.samples)
    for method, record in result.records.items():
        store.put(method, item.key, record)


def evaluate_items(
    engine: Engine, evaluator: ItemEvaluator, items: list[WorkItem], store: ResultsStore, samples_dir: Path,
    on_done: Callable[[WorkItem], None] | None = None, stop_after: int | None = None,
) -> bool:
    """Store every result the engine yields; True when stopped early (``stop_after`` images)."""
    if stop_after is not None and stop_after < len(items):
        items = items[:stop_after]
        interrupted = True
    else:
        interrupted = False
    for result in engine(evaluator, items):
        store_result(store, result, samples_dir)
        if on_done is not None:
            on_done(result.item)
    return interrupted


def run_evaluation(
    config: EvaluationConfig,
    model: LoadedModel | None = None,
    progress: Progress | None = None,
    show_progress: bool = False,
    stop_after: int | None = None,
    engine: Engine = embedded_engine,
) -> EvaluationResult:
    """Run (or resume) an evaluation; returns the summary and the written files.

    Args:
        config: the settings.
        model: an already loaded model to use instead of loading ``config.model`` by name (its name is
            still what the settings record).
        progress: called as ``progress(done, total, image_id)`` after each image.
        show_progress: draw a Rich progress bar with ETA on stderr.
        stop_after: process at most this many new images, then stop as if interrupted (tests, batches).
        engine: maps the per-image evaluator over the pending images (default: this process).
    """
    setup = build_evaluation(config, model)
    with open_store(setup, on_wait=_waiting_message(config.out)) as store:
        items, n_total = pending_items(setup, store)
        done_before = n_total - len(items)
        counter = {"done": done_before}
        with _progress_bar(show_progress, n_total, done_before) as advance:

            def on_done(item: WorkItem) -> None:
                counter["done"] += 1
                advance(item.sample_id)
                if progress is not None:
                    progress(counter["done"], n_total, item.sample_id)

            interrupted = evaluate_items(
                engine, setup.evaluator, items, store, Path(config.out) / "samples", on_done, stop_after
            )
        return write_outputs(config, store, setup.loaded, interrupted)


def _waiting_message(out: Path) -> Callable[[], None]:
    def warn() -> None:
        logger.warning("another run is writing into %s: waiting for it to finish", out)

    return warn


@contextmanager
def _progress_bar(show: bool, total: int, completed: int) -> Iterator[Callable[[str], None]]:
    """``advance(image_id)`` for a Rich progress bar with ETA on stderr (a no-op when not shown)."""
    if not show:
        yield lambda _image_id: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]evaluate[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        TextColumn("{task.description}", markup=False),  # image ids are user text, never markup
        transient=False, console=Console(stderr=True),
    )
    bar.start()
    task = bar.add_task("", total=total, completed=completed)
    try:
        yield lambda image_id: bar.update(task, advance=1, description=image_id[-40:])
    finally:
        bar.stop()
