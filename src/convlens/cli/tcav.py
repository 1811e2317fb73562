"""``convlens tcav LABELS_DIR --out DIR``: the command line of :func:`convlens.tcav.study.run_study_tcav`
(are the crowd's concepts concepts the model uses? Kim et al. 2018). Exit codes: 0 done; 2 bad input (one
line, nothing written)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from convlens.cli.common import fail, split_list
from convlens.tcav.study import StudyTcavResult, TcavSettings, run_tcav

__all__ = ["tcav_command"]

console = Console(stderr=True)


def _summary(result: StudyTcavResult) -> None:
    report, concepts, csv_path, placed = result.report, result.concepts, result.csv_path, result.placed
    significant = [t for t in report.tests if t.significant]
    typer.echo(f"{len(report.tests)} tests ({len({(t.class_name, t.concept) for t in report.tests})} concepts x "
               f"{len({t.layer for t in report.tests})} layers), {len(significant)} significant after Holm")
    for t in significant:
        typer.echo(f"  {t.class_name} / {t.concept} @ {t.layer}: {t.verdict}, p = {t.p_holm:.3g}, "
                   f"z = {t.comparison.effect_size:+.3g}")
    for s in concepts.skipped:
        typer.echo(f"  skipped {s.class_name} / {s.label or '(class)'}: {s.reason}")
    typer.echo(f"wrote {csv_path} and {csv_path.with_name('tcav.json')}")
    if placed:
        typer.echo(placed)


def tcav_command(
    labels_dir: Annotated[Path, typer.Argument(help="Output folder of `convlens labels`.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder (tcav.csv, tcav.json, CAV cache).")] = Path("out/tcav"),
    layers: Annotated[str | None, typer.Option(
        help="Comma-separated module names, blocks or last (default: the INV runs' layers).")] = None,
    random_runs: Annotated[int, typer.Option(help="Random sets per concept (N; warning below 10).")] = 20,
    alpha: Annotated[float, typer.Option(help="Family-wise level per class (Holm).")] = 0.05,
    statistic: Annotated[str, typer.Option(help="magnitude | sign_count: the statistic that decides.")] = "magnitude",
    sizes: Annotated[str, typer.Option(help="Common concept sizes (comma-separated).")] = "10,20,40",
    classes: Annotated[str | None, typer.Option(help="Comma-separated classes to test (default: all).")] = None,
    model: Annotated[str | None, typer.Option(help="Model name (default: the one the INV runs record).")] = None,
    weights: Annotated[str | None, typer.Option(help="Local state_dict the INV runs were made with.")] = None,
    inv_root: Annotated[Path | None, typer.Option(help="Folder holding the INV runs, if they moved.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of concept sampling, random sets and CAV training.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward/backward pass.")] = 64,
    place: Annotated[bool, typer.Option("--place/--no-place", help="Copy tcav.csv into LABELS_DIR.")] = True,
    random_pool: Annotated[str, typer.Option(
        help="class: random regions of the concept's class (what the label adds) | study: of every class.")] = "class",
) -> None:
    """TCAV: is each crowd concept of a class used by the model for that class? (per layer, Holm, effect sizes)"""
    try:
        size_list = tuple(int(v) for v in split_list(sizes) or [])
    except ValueError:
        fail(console, f"--sizes {sizes!r}: expected comma-separated integers")
    settings = TcavSettings(labels_dir=labels_dir, out=out, layers=split_list(layers), random_runs=random_runs,
                            alpha=alpha, statistic=statistic, sizes=size_list, classes=split_list(classes), model=model,
                            weights=weights, inv_root=inv_root, device=device, seed=seed, batch_size=batch_size,
                            place=place, random_pool=random_pool)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            result = run_tcav(settings)
    except ValueError as exc:
        fail(console, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except OSError as exc:
        fail(console, f"cannot write the results: {exc.strerror or exc}")
    for warning in caught:
        if "random runs" in str(warning.message):
            console.print(f"warning: {warning.message}", markup=False, soft_wrap=True)
    _summary(result)
