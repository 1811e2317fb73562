"""``convlens explain``: maps for images or folders, written as overlays, .npy, JSON and an HTML page.

Everything the user typed is validated before anything is written (model, methods, parameters,
target, layers, explicitly named files); each image's outputs are written to a temporary directory
and renamed into place, so an interrupted or failing run never leaves half-written results. In a
folder run, unreadable files are listed and skipped; a rerun skips images already done with the same
settings (``--no-resume`` recomputes).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import inspect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import convlens
from convlens.cli.common import CliError, parse_literal
from convlens.cli.inv import build_inv, explain_inv, split_inv_request
from convlens.core.engine import report_progress
from convlens.core.explanation import atomic_directory
from convlens.core.layers import resolve_layers
from convlens.core.maps import minmax_normalize
from convlens.core.targets import class_id_from_name
from convlens.methods.base import Explainer
from convlens.methods.registry import get_method
from convlens.models import LoadedModel, load
from convlens.models.images import ImageLoadError, load_image
from convlens.reports.html import render_explain_report
from convlens.reports.overlay import overlay_map

__all__ = ["CliError", "ExplainConfig", "collect_inputs", "parse_params", "run_explain"]


@dataclass
class ExplainConfig:
    inputs: Sequence[str]
    model: str = "efficientnet_lite0"
    weights: str | None = None
    methods: Sequence[str] = ("gradcam",)
    target: str = "auto"
    layers: str | None = None
    out: Path = Path("out/explain")
    device: str = "cpu"
    batch_size: int = 32
    params: Sequence[str] = ()
    per_block: bool = False
    resume: bool = True
    title: str = "convlens explain"
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


def _accepted_params(cls: type[Explainer]) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "model")}
    return names - {"args", "kwargs"}


def parse_params(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["rise.n_masks=1000", "batch_size=16"]`` -> per-method keyword arguments (validated)."""
    classes = {m: get_method(m) for m in methods}
    per_method: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in items:
        if "=" not in item:
            raise CliError(f"--param {item!r}: expected KEY=VALUE or METHOD.KEY=VALUE")
        key, value = item.split("=", 1)
        scope, _, name = key.rpartition(".")
        targets = [scope] if scope else list(methods)
        if scope and scope not in classes:
            raise CliError(f"--param {item!r}: method {scope!r} is not among --method {','.join(methods)}")
        accepted_by = [m for m in targets if name in _accepted_params(classes[m])]
        if not accepted_by:
            raise CliError(f"--param {item!r}: no selected method accepts {name!r}")
        for m in accepted_by:
            per_method[m][name] = parse_literal(value)
    return per_method


def collect_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """(explicit files, files found in folders). Missing explicit paths are a user error."""
    explicit: list[Path] = []
    from_dirs: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            from_dirs.extend(found)
        elif path.is_file():
            explicit.append(path)
        else:
            raise CliError(f"{raw}: no such file or directory")
    if not explicit and not from_dirs:
        raise CliError("no input images found")
    return explicit, from_dirs


def _safe_stem(path: Path, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:60] or "image"
    candidate, i = stem, 2
    while candidate in used:
        candidate, i = f"{stem}_{i}", i + 1
    used.add(candidate)
    return candidate


def _config_hash(config: ExplainConfig, per_method: dict[str, dict[str, Any]]) -> str:
    key = json.dumps(
        [config.model, config.weights, list(config.methods), config.target, config.layers, per_method],
        sort_keys=True, default=str,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _load_model(config: ExplainConfig) -> LoadedModel:
    try:
        loaded = load(config.model, weights=config.weights)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    if config.device != "cpu":
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise CliError("--device cuda: no CUDA device is available on this machine")
        loaded.to(config.device)
    return loaded


def _resolve_target(config: ExplainConfig, loaded: LoadedModel) -> int | None:
    if config.target in ("auto", "", None):
        return None
    try:
        target = class_id_from_name(config.target, loaded.class_names)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    n = loaded.num_classes
    if not 0 <= target < n:
        raise CliError(f"--target {config.target}: out of range, {loaded.name} has {n} classes (0..{n - 1})")
    return target


def _build_methods(
    config: ExplainConfig, loaded: LoadedModel, per_method: dict[str, dict[str, Any]]
) -> dict[str, Explainer]:
    layer_spec: Any = None
    if config.layers:
        parts = [p.strip() for p in config.layers.split(",") if p.strip()]
        layer_spec = parts[0] if len(parts) == 1 else parts
        try:
            resolve_layers(loaded.module, layer_spec, (3, loaded.preprocessing.size, loaded.preprocessing.size))
        except ValueError as exc:
            raise CliError(f"--layers: {exc}") from exc
    explainers: dict[str, Explainer] = {}
    for name in config.methods:
        cls = get_method(name)
        kwargs: dict[str, Any] = {"batch_size": config.batch_size} | per_method.get(name, {})
        if layer_spec is not None and cls.uses_layers and "layers" in _accepted_params(cls):
            kwargs.setdefault("layers", layer_spec)
        try:
            explainers[name] = cls(loaded, **kwargs)
        except (TypeError, ValueError) as exc:
            raise CliError(f"{name}: {exc}") from exc
    return explainers


def _top5(logits: torch.Tensor, class_names: list[str]) -> list[dict[str, Any]]:
    probs = torch.softmax(logits.float(), dim=-1)
    values, ids = probs.topk(min(5, probs.numel()))
    return [
        {"id": int(i), "name": class_names[int(i)] if int(i) < len(class_names) else str(int(i)), "prob": float(v)}
        for v, i in zip(values.tolist(), ids.tolist(), strict=True)
    ]


def _save_blocks(explanation: Any, display: Any, directory: Path, method: str) -> list[dict[str, str]]:
    blocks = []
    for i, (name, layer_map) in enumerate(explanation.layer_maps.items()):
        file = f"{method}_block{i}.png"
        normalized = minmax_normalize(layer_map[0].float()).cpu().numpy()
        overlay_map(display, normalized).save(directory / file)
        blocks.append({"name": name, "file": file})
    return blocks


def explain_one(
    path: Path, loaded: LoadedModel, explainers: dict[str, Explainer], target: int | None, directory: Path,
    config_hash: str,
    inv: Any = None,
) -> dict[str, Any]:
    """Explain one image into ``directory`` (a fresh temp dir); return the per-image record."""
    image = load_image(path)
    display = loaded.preprocessing.display(image)
    x = loaded.preprocessing(image)[None].to(next(loaded.module.parameters()).device)
    display.save(directory / "input.png")
    with torch.inference_mode():
        logits = loaded.module.eval()(x)[0]
    results = []
    for name, explainer in explainers.items():
        explanation = explainer.explain(x, targets=target)
        files = explanation.save(directory, image=display, class_names=loaded.class_names, stem=name)
        record = explanation.summary(0, loaded.class_names) | {"files": files}
        record["block_images"] = _save_blocks(explanation, display, directory, name) if explanation.layer_maps else []
        results.append(record)
    if inv is not None:  # INV: per-layer cluster maps and their own page (convlens.cli.inv)
        results.append(explain_inv(inv, path, display, x, directory, target, loaded.class_names))
    record = {
        "image": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "top5": _top5(logits, loaded.class_names),
        "results": results,
        "config_hash": config_hash,
    }
    (directory / "result.json").write_text(json.dumps(record, indent=2))
    return record


def run_explain(config: ExplainConfig, console: Console | None = None) -> int:
    """Run ``convlens explain``; returns the exit code (0 ok, 1 nothing explained). Raises CliError."""
    console = console or Console(stderr=True)
    methods = [m.strip() for m in config.methods if m.strip()]
    methods, config.params, inv_kwargs = split_inv_request(methods, config.params)
    if not methods and inv_kwargs is None:
        raise CliError("--method: give at least one method")
    try:
        canonical = [get_method(m).name for m in methods]
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    config.methods = canonical
    if config.batch_size < 1:
        raise CliError("--batch-size must be >= 1")
    per_method = parse_params(config.params, canonical)
    for name, extra in config.method_overrides.items():
        per_method.setdefault(name, {}).update(extra)
    explicit, from_dirs = collect_inputs(config.inputs)
    for path in explicit:  # explicitly named files must all be usable: fail before writing anything
        try:
            load_image(path)
        except ImageLoadError as exc:
            raise CliError(str(exc)) from exc
    loaded = _load_model(config)
    target = _resolve_target(config, loaded)
    explainers = _build_methods(config, loaded, per_method)
    inv = build_inv(loaded, inv_kwargs, config.layers) if inv_kwargs is not None else None
    if inv is not None:
        per_method["inv"] = inv.params()
    config_hash = _config_hash(config, per_method)

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    items = [(p, _safe_stem(p, used)) for p in [*explicit, *from_dirs]]
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        images_task = progress.add_task("images", total=len(items))
        forwards_task = progress.add_task("masked forwards", total=None)
        with report_progress(lambda n: progress.advance(forwards_task, n)):
            for path, stem in items:
                done = out / stem / "result.json"
                if config.resume and done.is_file():
                    previous = json.loads(done.read_text())
                    if previous.get("config_hash") == config_hash and previous.get("image") == str(path):
                        previous["dir"] = stem
                        records.append(previous)
                        progress.advance(images_task)
                        continue
                try:
                    with atomic_directory(out / stem) as tmp:
                        record = explain_one(path, loaded, explainers, target, tmp, config_hash, inv)
                except ImageLoadError as exc:
                    skipped.append({"path": str(path), "error": str(exc)})
                    console.print(f"[yellow]skipped[/] {exc}")
                else:
                    record["dir"] = stem
                    records.append(record)
                progress.advance(images_task)

    context = {
        "title": config.title,
        "model_name": loaded.name,
        "model_source": loaded.source,
        "device": config.device,
        "version": convlens.__version__,
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": {name: json.dumps(e.params(), default=str) for name, e in explainers.items()}
        | ({"inv": json.dumps(inv.params(), default=str)} if inv is not None else {}),
        "skipped": skipped,
        "per_block": config.per_block,
        "images": [
            {"name": Path(r["image"]).name, "dir": r["dir"], "top5": r["top5"], "results": r["results"]}
            for r in records
        ],
    }
    render_explain_report(out / "index.html", context)
    summary = {"images": [r["dir"] for r in records], "skipped": skipped, "config_hash": config_hash}
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=_json_default))
    tmp.replace(out / "results.json")
    console.print(f"[green]wrote[/] {out / 'index.html'} ({len(records)} image(s), {len(skipped)} skipped)")
    return 0 if records else 1


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
