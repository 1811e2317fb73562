"""``convlens explain``: the command line of :mod:`convlens.runners.explain`.

Exit codes: 0 every image explained; 1 some images skipped (listed); 2 bad input (one message, nothing
written); 130 interrupted (Ctrl-C: finished images are kept, a rerun resumes). ``--engine ray`` spreads the
images over a Ray actor pool (:mod:`convlens.cli.engines`, :mod:`convlens.runners.ray_engine`). Every
user-supplied string (paths, names, messages quoting them) is printed verbatim, never as rich markup.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from convlens.cli.common import CliError, fail, old_spelling
from convlens.cli.engines import (
    AddressOption,
    EngineChoice,
    EngineOption,
    GpusOption,
    ThreadsOption,
    WorkersOption,
    engine_session,
    ray_options,
)
from convlens.core.params import ParamError
from convlens.runners.explain import (
    ExplainConfig,
    ExplainEngine,
    ExplainError,
    ExplainResult,
    embedded_explain_engine,
    execute_explain,
    prepare_explain,
)
from convlens.runners.explain_methods import parse_method_params
from convlens.runners.ray_engine import RayEngineError  # no Ray import: Ray loads only for --engine ray

__all__ = ["DEFAULT_BATCH_SIZE", "explain", "parse_params", "run_command"]

console = Console(stderr=True)

# Every command's --batch-size (masked inputs per forward pass) defaults to the library's (Explainer, ExplainConfig,
# EvaluationConfig): the CLI and Python give the same maps for the same call.
DEFAULT_BATCH_SIZE = 64
DEFAULT_METHOD = "gradcam"


class _RichProgress:
    """Progress bars for images and masked forwards; skipped inputs and waits printed as plain text."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.images = progress.add_task("images", total=None)
        self.masked = progress.add_task("masked forwards", total=None)

    def start(self, images: int) -> None:
        self.progress.update(self.images, total=images)

    def image_done(self) -> None:
        self.progress.advance(self.images)

    def forwards(self, count: int) -> None:
        self.progress.advance(self.masked, count)

    def skipped(self, message: str) -> None:
        self.progress.console.print(f"[yellow]skipped[/] {escape(message)}", soft_wrap=True)

    def waiting(self, out: Path) -> None:
        self.progress.console.print(f"waiting: another convlens run is writing to {escape(str(out))} ...",
                                    soft_wrap=True)


def run_command(
    config: ExplainConfig, output: Console | None = None, engine: ExplainEngine = embedded_explain_engine
) -> ExplainResult:
    """Run ``config`` with progress bars on ``output``; ExplainError / OSError / KeyboardInterrupt propagate."""
    output = output or console
    plan = prepare_explain(config)  # every check first: a bad input shows no progress bar
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=output, transient=False) as progress:
        result = execute_explain(plan, _RichProgress(progress), engine)
    page = escape(str(result.out / "index.html"))
    output.print(f"[green]wrote[/] {page} ({len(result.records)} image(s), {len(result.skipped)} skipped)",
                 soft_wrap=True)
    return result


def execute(config: ExplainConfig, choice: EngineChoice | None = None) -> ExplainResult:
    """:func:`run_command` with the command line's error handling: exits 2 (bad input) or 130 (Ctrl-C).

    ``choice``: the engine (default: this process)."""
    choice = choice or EngineChoice(None, config.device)
    try:
        with engine_session(choice):
            return run_command(config, engine=_engine(choice))
    except (ExplainError, CliError, RayEngineError) as exc:
        fail(console, str(exc))
    except OSError as exc:
        fail(console, f"cannot write the results: {exc}")
    except KeyboardInterrupt:
        console.print("interrupted: finished images are kept; run the same command again to resume")
        raise typer.Exit(code=130) from None
    raise AssertionError("unreachable")


def explain(
    inputs: Annotated[list[str], typer.Argument(help="Image files and/or folders.", show_default=False)],
    model: Annotated[str, typer.Option(help="Model name (see `convlens models`).")] = "efficientnet_lite0",
    weights: Annotated[str | None, typer.Option(help="Local state_dict (.pt/.pth), loaded weights-only.")] = None,
    methods: Annotated[str | None, typer.Option(
        help="Comma-separated methods (see `convlens methods`).", show_default=DEFAULT_METHOD)] = None,
    target: Annotated[str, typer.Option(
        help="predicted (the model's top class), a class id, or a class name.")] = "predicted",
    layers: Annotated[
        str | None, typer.Option(help="blocks | last | comma-separated module names (INV: also tail | depth | convs).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/explain"),
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    batch_size: Annotated[int, typer.Option(help="Masked inputs per forward pass.")] = DEFAULT_BATCH_SIZE,
    param: Annotated[list[str] | None, typer.Option(
        metavar="[METHOD.]KEY=VALUE", help="A method parameter; KEY=VALUE sets it for every selected method that "
                                           "has it (repeatable).")] = None,
    per_block: Annotated[bool, typer.Option("--per-block", help="Show each layer's/block's map.")] = False,
    resume: Annotated[bool, typer.Option(help="Skip images already explained with the same settings.")] = True,
    engine: EngineOption = "embedded",
    workers: WorkersOption = None,
    gpus_per_worker: GpusOption = None,
    threads_per_worker: ThreadsOption = 1,
    ray_address: AddressOption = None,
    method: Annotated[str | None, typer.Option("--method", hidden=True, help="Old spelling of --methods.")] = None,
) -> None:
    """Explain images: overlays, .npy maps, results JSON and index.html with all maps side by side."""
    try:
        choice = ray_options(engine, workers, gpus_per_worker, threads_per_worker, ray_address, device)
    except CliError as exc:
        fail(console, str(exc))
    chosen = old_spelling(console, "--methods", methods, "--method", method, DEFAULT_METHOD)
    config = ExplainConfig(
        inputs=inputs, model=model, weights=weights, methods=chosen.split(","), target=target, layers=layers,
        out=out, device=choice.driver_device, batch_size=batch_size, params=param or [], per_block=per_block,
        resume=resume,
    )
    raise typer.Exit(code=execute(config, choice).exit_code)


def _engine(choice: EngineChoice) -> ExplainEngine:
    if choice.ray is None:
        return embedded_explain_engine
    from convlens.runners.ray_engine import RayExplainEngine

    return RayExplainEngine(choice.ray)


def parse_params(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--param`` items -> per-method checked values (see :func:`~convlens.runners.explain_methods.
    parse_method_params`); CliError for bad input. Used by ``convlens evaluate`` too."""
    try:
        return parse_method_params(items, list(methods))
    except (ParamError, ValueError) as exc:
        raise CliError(str(exc)) from exc
