"""The ``convlens`` command line.

Importing this module is light (typer, rich): the commands that need torch, the model code or the label
pipeline (explain, evaluate, labels, global, tcav) are imported only when named (:class:`_LazyCommands`), so
``convlens study serve`` and ``convlens study export`` never load torch — nor do the server's worker
processes, which import this module again when they start.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from convlens.cli.common import DEFAULT_BATCH_SIZE, ReadableHelpGroup, fail, readable_metavars
from convlens.cli.study import serve as serve_command
from convlens.cli.study import study_app

if TYPE_CHECKING:
    from convlens.runners.explain_methods import ExplainerSpec

# name -> (module, function): registered when the command is used (or for --help)
LAZY_COMMANDS = {
    "explain": ("convlens.cli.explain", "explain"),
    "evaluate": ("convlens.cli.evaluate", "evaluate"),
    "labels": ("convlens.cli.labels", "labels_command"),
    "global": ("convlens.cli.labels", "global_command"),
    "tcav": ("convlens.cli.tcav", "tcav_command"),
}
ORDER = ("explain", "demo", "models", "methods", "evaluate", "study", "serve", "labels", "global", "tcav")


class _LazyCommands(ReadableHelpGroup):
    """The root group (readable help texts) whose heavy commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = [*super().list_commands(ctx), *(n for n in LAZY_COMMANDS if n not in self.commands)]
        return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS and name not in self.commands:
            module, function = LAZY_COMMANDS[name]
            single = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
            single.command(name=name)(getattr(importlib.import_module(module), function))
            command = typer.main.get_command(single)
            readable_metavars(command)
            self.add_command(command, name)
        return super().get_command(ctx, name)


app = typer.Typer(
    name="convlens",
    cls=_LazyCommands,
    help="Explain CNN image classifiers: where they look, what each layer sees.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Demo settings: chosen so the whole demo runs in about two minutes on 2 CPU cores (shown on the page).
DEMO_METHODS = ("gradcam", "gradcampp", "layercam", "scorecam", "rise", "ig", "sise", "adasise", "advise", "inv")
DEMO_OVERRIDES = {"rise": {"n_masks": 1000}, "ig": {"steps": 32}}


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log chosen layers and steps.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/demo"),
    batch_size: Annotated[int, typer.Option(help="Masked inputs per forward pass.")] = DEFAULT_BATCH_SIZE,
) -> None:
    """Explain scikit-image's `chelsea` with the offline EfficientNet-Lite0 and every available method."""
    import skimage.data
    from PIL import Image

    from convlens.cli.explain import console, execute
    from convlens.runners.explain import ExplainConfig
    from convlens.runners.explain_methods import explainer_names

    image_path = out / "inputs" / "chelsea.png"
    if not image_path.is_file():
        try:
            image_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(skimage.data.chelsea()).save(image_path)
        except OSError as exc:
            fail(console, f"--out {out}: cannot write there ({exc.strerror or exc})")
    config = ExplainConfig(
        inputs=[str(image_path)], methods=[m for m in DEMO_METHODS if m in explainer_names()], out=out,
        batch_size=batch_size, per_block=True, title="convlens demo — chelsea, EfficientNet-Lite0",
        method_overrides=DEMO_OVERRIDES,
    )
    result = execute(config)
    folder = out / result.records[0]["dir"] if result.records else out
    typer.echo(f"Open {out / 'index.html'} (overlays and .npy maps in {folder}/)")


@app.command()
def models() -> None:
    """List the models that load offline."""
    from convlens.models import available_models

    names = available_models()
    table = _listing("name", "weights", names=names)
    for name in names:
        weights = "pretrained (bundled)" if name == "efficientnet_lite0" else "random init or --weights PATH"
        table.add_row(escape(name), weights)
    table.add_row("<any torchvision classifier>", "random init or --weights PATH")
    table.add_row("timm:<name>", "random init or --weights PATH")
    Console().print(table)


def _listing(*headers: str, names: list[str], title: str | None = None) -> Table:
    """A table whose first column holds names a user types: never cut or split, whatever the terminal width
    (the other columns fold their text instead of cutting it)."""
    table = Table(title=title)
    table.add_column(headers[0], no_wrap=True, min_width=max(map(len, names), default=0))
    for header in headers[1:]:
        table.add_column(header, overflow="fold")
    return table


@app.command()
def methods(
    names: Annotated[
        list[str] | None, typer.Argument(help="Show these methods' parameters.", show_default=False)
    ] = None,
) -> None:
    """List the explanation methods; with names, their parameters (types, defaults, ranges)."""
    from convlens.cli.explain import console
    from convlens.methods.registry import LAYER_EXPLAINERS
    from convlens.runners.explain_methods import explainer_names, get_explainer_spec

    if not names:
        kinds = {"saliency": ("Saliency methods: one map per image; Python: convlens.create(NAME, model)", [])}
        kinds["concept"] = ("Layer explainers: per layer, clusters of feature maps; Python: "
                            + ", ".join(LAYER_EXPLAINERS.values()), [])
        for name in explainer_names():
            spec = get_explainer_spec(name)
            kinds[spec.kind][1].append((name, spec))
        for title, rows in kinds.values():
            table = _listing("name", "paper", "default score", "parameters (--param METHOD.KEY=VALUE)",
                             names=[name for name, _ in rows], title=title)
            for name, spec in rows:
                table.add_row(name, escape(spec.cls.paper), spec.cls.default_score, escape(", ".join(spec.knobs)))
            Console().print(table)
        return
    for name in names:
        try:
            spec = get_explainer_spec(name)
        except ValueError as exc:
            fail(console, str(exc))
        Console().print(_parameter_table(spec))


def _parameter_table(spec: ExplainerSpec) -> Table:
    items = spec.describe()
    table = _listing("parameter", "type", "default", "range", "meaning", names=[*(i.name for i in items), "batch_size"],
                     title=f"{spec.name} — {escape(spec.cls.paper)}")
    for item in items:
        table.add_row(item.name, escape(item.type), escape(repr(item.default)), item.range, escape(item.doc))
    table.add_row("score", "'logit' | 'softmax' | 'sigmoid'", repr(spec.cls.default_score), "", "differentiated score")
    default_layers = escape(repr(getattr(spec.cls, "default_layers", None)))
    table.add_row("layers", "str", default_layers, "", "layer spec (--layers)")
    if spec.kind == "saliency":
        table.add_row("batch_size", "int", "--batch-size", ">= 1", "masked inputs per forward pass")
    return table


app.add_typer(study_app, name="study")
app.command(name="serve", help="Alias of `convlens study serve` (kept so that scripts keep working).")(serve_command)

if __name__ == "__main__":
    app()
