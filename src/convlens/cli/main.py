"""The ``convlens`` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from convlens.cli.common import CliError
from convlens.cli.evaluate import evaluate as evaluate_command
from convlens.cli.explain import ExplainConfig, run_explain
from convlens.cli.study import serve as serve_command
from convlens.cli.study import study_app

app = typer.Typer(
    name="convlens",
    help="Explain CNN image classifiers: where they look, what each layer sees.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

# Demo settings: chosen so the whole demo runs in about two minutes on 2 CPU cores (shown on the page).
DEMO_METHODS = ("gradcam", "gradcampp", "layercam", "scorecam", "rise", "ig", "sise", "adasise", "advise")
DEMO_OVERRIDES = {"rise": {"n_masks": 1000}, "ig": {"steps": 32}}


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log chosen layers and steps.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


@app.command()
def explain(
    inputs: Annotated[list[str], typer.Argument(help="Image files and/or folders.", show_default=False)],
    model: Annotated[str, typer.Option(help="Model name (see `convlens models`).")] = "efficientnet_lite0",
    weights: Annotated[str | None, typer.Option(help="Local state_dict (.pt/.pth), loaded weights-only.")] = None,
    method: Annotated[str, typer.Option(help="Comma-separated methods (see `convlens methods`).")] = "gradcam",
    target: Annotated[str, typer.Option(help="auto (predicted), a class id, or a class name.")] = "auto",
    layers: Annotated[str | None, typer.Option(help="blocks | last | comma-separated module names.")] = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/explain"),
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    batch_size: Annotated[int, typer.Option(help="Masked inputs per forward pass.")] = 32,
    param: Annotated[
        list[str] | None, typer.Option(help="Method parameter KEY=VALUE or METHOD.KEY=VALUE (repeatable).")
    ] = None,
    per_block: Annotated[bool, typer.Option("--per-block", help="Show each layer's/block's map.")] = False,
    resume: Annotated[bool, typer.Option(help="Skip images already explained with the same settings.")] = True,
) -> None:
    """Explain images: overlays, .npy maps, results JSON and index.html with all maps side by side."""
    config = ExplainConfig(
        inputs=inputs, model=model, weights=weights, methods=method.split(","), target=target, layers=layers,
        out=out, device=device, batch_size=batch_size, params=param or [], per_block=per_block, resume=resume,
    )
    try:
        code = run_explain(config, console)
    except CliError as exc:
        _fail(str(exc))
    raise typer.Exit(code=code)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/demo"),
    batch_size: Annotated[int, typer.Option(help="Masked inputs per forward pass.")] = 32,
) -> None:
    """Explain scikit-image's `chelsea` with the offline EfficientNet-Lite0 and every available method."""
    import skimage.data
    from PIL import Image

    from convlens.methods.registry import METHODS

    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    image_path = inputs / "chelsea.png"
    if not image_path.exists():
        Image.fromarray(skimage.data.chelsea()).save(image_path)
    methods = [m for m in DEMO_METHODS if m in METHODS] + ["inv"]  # INV: layer-by-layer page, linked
    config = ExplainConfig(
        inputs=[str(image_path)], methods=methods, out=out, batch_size=batch_size, per_block=True,
        title="convlens demo — chelsea, EfficientNet-Lite0", method_overrides=DEMO_OVERRIDES,
    )
    try:
        run_explain(config, console)
    except CliError as exc:
        _fail(str(exc))
    typer.echo(f"Open {out / 'index.html'} (overlays and .npy maps in {out / 'chelsea'}/)")


@app.command()
def models() -> None:
    """List the models that load offline."""
    from convlens.models import available_models

    table = Table("name", "weights")
    for name in available_models():
        table.add_row(name, "pretrained (bundled)" if name == "efficientnet_lite0" else "random init or --weights PATH")
    table.add_row("<any torchvision classifier>", "random init or --weights PATH")
    table.add_row("timm:<name>", "random init or --weights PATH")
    Console().print(table)


@app.command()
def methods() -> None:
    """List the explanation methods."""
    from convlens.methods.registry import METHODS, get_method

    table = Table("name", "paper", "default score")
    for name in METHODS:
        cls = get_method(name)
        table.add_row(name, cls.paper, cls.default_score)
    table.add_row("inv", "Bianchi et al., INV, IJCAI-24 (layer-wise cluster maps; own page)", "logit")
    Console().print(table)


app.command(name="evaluate")(evaluate_command)
app.add_typer(study_app, name="study")
app.command(name="serve")(serve_command)

if __name__ == "__main__":
    app()
