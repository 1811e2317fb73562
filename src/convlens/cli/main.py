"""The ``convlens`` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from convlens.cli.common import ReadableHelpGroup, fail
from convlens.cli.evaluate import evaluate as evaluate_command
from convlens.cli.explain import DEFAULT_BATCH_SIZE, console, execute, explain
from convlens.cli.labels import global_command, labels_command
from convlens.cli.study import serve as serve_command
from convlens.cli.study import study_app
from convlens.cli.tcav import tcav_command
from convlens.runners.explain import ExplainConfig
from convlens.runners.explain_methods import ExplainerSpec

app = typer.Typer(
    name="convlens",
    cls=ReadableHelpGroup,
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


app.command()(explain)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/demo"),
    batch_size: Annotated[int, typer.Option(help="Masked inputs per forward pass.")] = DEFAULT_BATCH_SIZE,
) -> None:
    """Explain scikit-image's `chelsea` with the offline EfficientNet-Lite0 and every available method."""
    import skimage.data
    from PIL import Image

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


app.command(name="evaluate")(evaluate_command)
app.add_typer(study_app, name="study")
app.command(name="serve")(serve_command)
app.command(name="labels")(labels_command)
app.command(name="global")(global_command)
app.command(name="tcav")(tcav_command)

if __name__ == "__main__":
    app()
