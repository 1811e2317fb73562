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

STATISTIC_HELP = ("The statistic the verdict tests: magnitude (default) = the mean, over the class's images, of "
                  "the directional derivative of the class logit along the unit CAV (how much moving the layer "
                  "towards the concept raises the class score); sign_count = Kim et al.'s TCAV score, the share of "
                  "images whose class logit rises along the CAV (saturates at 0 and 1). Both are written.")
POOL_HELP = ("Where the random sets come from: study = every labelled region of the study (default; Kim et al.'s "
             "random counterexamples) | class = the class's labelled regions | class-others = the class's labelled "
             "regions without the concept's own.")


def _summary(result: StudyTcavResult) -> None:
    report, concepts, csv_path = result.report, result.concepts, result.csv_path
    tests = report.tests
    used = [t for t in tests if t.significant]
    untestable = [t for t in tests if t.untestable]
    typer.echo(f"{len(tests)} tests ({len({(t.class_name, t.concept) for t in tests})} concepts x "
               f"{len({t.layer for t in tests})} layers), statistic tested: {report.statistic}; "
               f"{len(used)} used after Holm, {len(tests) - len(used) - len(untestable)} no evidence at this power"
               + (f", {len(untestable)} cannot test" if untestable else ""))
    for t in used:
        notes = [note for note, flag in (("earlier layer: no known answer", t.layer_role != "last"),
                                         ("CAV at chance: doubtful", t.cav_at_chance)) if flag]
        typer.echo(f"  {t.class_name} / {t.concept} @ {t.layer}: {t.verdict}, p = {t.p_holm:.3g}, "
                   f"z = {t.comparison.effect_size:+.3g}" + (f" [{'; '.join(notes)}]" if notes else ""))
    if tests:
        bound = max(t.detectable_effect for t in tests)
        typer.echo(f"  no evidence at this power is not 'not used': effects below |z| = {bound:.2g} null SDs can be "
                   "missed; verdicts at earlier layers have no known answer")
    for t in untestable:
        typer.echo(f"  {t.class_name} / {t.concept} @ {t.layer}: {t.verdict}")
    for s in concepts.skipped:
        typer.echo(f"  skipped {s.class_name} / {s.label or '(class)'}: {s.reason}")
    typer.echo(f"wrote {csv_path} and {csv_path.with_name('tcav.json')}")
    if result.placed and result.place_refused:
        console.print(f"warning: {result.placed}", markup=False, soft_wrap=True)
    elif result.placed:
        typer.echo(result.placed)


def tcav_command(
    labels_dir: Annotated[Path, typer.Argument(help="Output folder of `convlens labels`.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder (tcav.csv, tcav.json, CAV cache).")] = Path("out/tcav"),
    layers: Annotated[str | None, typer.Option(
        help="Comma-separated module names, blocks or last (default: the INV runs' layers).")] = None,
    random_runs: Annotated[int, typer.Option(help="Random sets per concept (N; warning below 10).")] = 20,
    alpha: Annotated[float, typer.Option(help="Family-wise level per class (Holm).")] = 0.05,
    statistic: Annotated[str, typer.Option(help=STATISTIC_HELP)] = "magnitude",
    sizes: Annotated[str, typer.Option(help="Common concept sizes (comma-separated).")] = "10,20,40",
    classes: Annotated[str | None, typer.Option(help="Comma-separated classes to test (default: all).")] = None,
    model: Annotated[str | None, typer.Option(help="Model name (default: the one the INV runs record).")] = None,
    weights: Annotated[str | None, typer.Option(help="Local state_dict the INV runs were made with.")] = None,
    inv_root: Annotated[Path | None, typer.Option(help="Folder holding the INV runs, if they moved.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N (model and CAV solver).")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the concept sampling and the random sets (the CAV solver is "
                                           "deterministic).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward/backward pass.")] = 64,
    place: Annotated[bool, typer.Option("--place/--no-place", help="Copy tcav.csv into LABELS_DIR (never over a "
                                                                   "tcav.csv convlens did not put there).")] = True,
    random_pool: Annotated[str, typer.Option(help=POOL_HELP)] = "study",
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
        if any(text in str(warning.message) for text in ("random runs", "CAV cache file")):
            console.print(f"warning: {warning.message}", markup=False, soft_wrap=True)
    _summary(result)
