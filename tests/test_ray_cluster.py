"""``--engine ray`` on a local multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head without CPUs and two
one-CPU worker nodes, shared by the module): the evaluation tables and the explain folders equal the embedded
engine's; a worker node killed in the middle of a run costs nothing (every image stored exactly once, the same
tables); a driver killed with SIGKILL is resumed by the next run without recomputing a finished image.

Skipped with a message when Ray is not installed or cannot start here."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from convlens.data.synthetic import SyntheticShapes
from convlens.models.synthetic import load_synthetic_model
from convlens.runners.evaluate import EvaluationConfig, run_evaluation
from convlens.runners.explain import ExplainConfig, ExplainPlan, execute_explain
from convlens.runners.explain_methods import build_explainers
from convlens.runners.ray_engine import RayEvaluateEngine, RayExplainEngine, RayOptions

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'convlens[ray]'")

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")]

IMAGES = 12
METHODS = ["gradcam", "rise", "sise"]
METRICS = ["ebpg", "bbox", "drop", "increase"]
RISE_MASKS = 400  # ~0.4 s per image on one thread: a run lasts long enough to be interrupted
# a lost node is declared dead after ~3 s instead of Ray's default ~15 s (3 s period x 5 misses)
FAST_FAILURE_DETECTION = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def cluster(socket_dir: Path) -> Iterator[Any]:
    """A head node without CPUs (no actor runs beside the driver) and two worker nodes with one CPU each.

    Ray keeps its sockets under RAY_TMPDIR (else TMPDIR): a short folder, whatever the user's TMPDIR."""
    import logging

    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", str(socket_dir))  # the driver subprocess of a test inherits it
        try:
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_FAILURE_DETECTION})
            for _ in range(2):
                cluster.add_node(num_cpus=1)
            ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
            cluster.wait_for_nodes(timeout=600)
        except Exception as exc:  # pragma: no cover - depends on the machine
            pytest.skip(f"Ray cannot start a local cluster here: {exc}")
        yield cluster
        ray.shutdown()
        cluster.shutdown()


def _config(out: Path) -> EvaluationConfig:
    return EvaluationConfig(
        model="synthetic-vgg", methods=METHODS, data="synthetic", limit=IMAGES, metrics=METRICS, out=out,
        method_params={"rise": {"n_masks": RISE_MASKS}}, n_samples=2,
    )


@pytest.fixture(scope="module")
def embedded_tables(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ...]:
    """The tables of the embedded engine (this process, one torch thread like each Ray worker)."""
    out = tmp_path_factory.mktemp("embedded")
    run_evaluation(_config(out))
    return _tables(out)


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _tables(out: Path) -> tuple[Any, ...]:
    """per_image.csv, summary.csv and summary.md without the wall-clock column (the only one that may differ)."""
    per_image = [{k: v for k, v in row.items() if k != "seconds"} for row in _csv(out / "per_image.csv")]
    summary = [row for row in _csv(out / "summary.csv") if row["metric"] != "seconds"]
    table = [line.split(" | ") for line in (out / "summary.md").read_text().splitlines() if line.startswith("|")]
    column = next(i for i, cell in enumerate(table[0]) if cell.startswith("seconds"))
    markdown = [[cell for i, cell in enumerate(row) if i != column] for row in table]
    return per_image, summary, markdown


def _once_each(out: Path) -> None:
    """Every (image, method, explained class) has exactly one row, and every image one record per method."""
    rows = _csv(out / "per_image.csv")
    keys = [(row["index"], row["method"], row["target"]) for row in rows]
    assert len(keys) == len(set(keys))
    assert {(row["index"], row["method"]) for row in rows} == {(str(i), m) for i in range(IMAGES) for m in METHODS}
    for method in METHODS:
        assert len(list((out / "records" / method).glob("*.json"))) == IMAGES


def test_evaluate_tables_equal_whichever_engine_ran(cluster: Any, embedded_tables: tuple[Any, ...],
                                                    tmp_path: Path) -> None:
    out = tmp_path / "ray"
    engine = RayEvaluateEngine(RayOptions(workers=2))
    run_evaluation(_config(out), engine=engine)
    assert _tables(out) == embedded_tables
    _once_each(out)
    assert engine.session is not None and engine.session.resources["CPU"] == 2  # the cluster's two worker CPUs


def test_a_worker_node_killed_mid_run_costs_nothing(cluster: Any, embedded_tables: tuple[Any, ...],
                                                    tmp_path: Path) -> None:
    """One of the two worker nodes (each holding one actor) dies after the second image is stored: Ray Data
    restarts its actor's work on the other node, and every image is stored exactly once."""
    stored: list[str] = []
    victim = next(iter(cluster.worker_nodes))

    def progress(done: int, total: int, image_id: str) -> None:
        stored.append(image_id)
        if len(stored) == 2:
            cluster.remove_node(victim, allow_graceful=False)

    out = tmp_path / "ray"
    try:
        run_evaluation(_config(out), progress=progress, engine=RayEvaluateEngine(RayOptions(workers=2)))
    finally:
        if victim in cluster.worker_nodes:  # the run failed before the kill
            cluster.remove_node(victim, allow_graceful=False)
        cluster.add_node(num_cpus=1)  # two worker nodes again for the other tests
        cluster.wait_for_nodes(timeout=600)

    assert len(stored) == IMAGES and len(set(stored)) == IMAGES
    assert _tables(out) == embedded_tables
    _once_each(out)


def test_a_killed_driver_resumes_without_recomputing(cluster: Any, embedded_tables: tuple[Any, ...],
                                                     tmp_path: Path) -> None:
    """`convlens evaluate --engine ray --ray-address ...` in a subprocess, killed with SIGKILL once three images
    are stored; the same command again (here, in-process) computes only what is missing: every record written
    before the kill is untouched (same inode and modification time), and the tables equal the embedded ones."""
    out = tmp_path / "run"
    args = ["evaluate", "--model", "synthetic-vgg", "--data", "synthetic", "--limit", str(IMAGES),
            "--methods", ",".join(METHODS), "--metrics", ",".join(METRICS), "--param", f"rise.n_masks={RISE_MASKS}",
            "--samples", "2", "--no-progress", "--engine", "ray", "--workers", "2",
            "--ray-address", cluster.address, "--out", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "convlens.cli.main", *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = out / "records" / METHODS[-1]
    deadline = time.monotonic() + 900  # a hang guard only: the loop ends with the third image or the driver
    while driver.poll() is None and time.monotonic() < deadline and len(list(last.glob("*.json"))) < 3:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    output = driver.communicate()[0].decode(errors="replace")
    assert driver.returncode == -signal.SIGKILL, f"the driver ended before it was killed:\n{output}"
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "records").rglob("*.json")}
    finished = len(list(last.glob("*.json")))
    assert 3 <= finished < IMAGES, f"{finished} images finished before the kill"
    resumed = CliRunner().invoke(_cli(), args)
    assert resumed.exit_code == 0, resumed.output
    assert f"{IMAGES} images" in resumed.output
    for path, identity in before.items():
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == identity, f"{path} was computed again"
    assert _tables(out) == embedded_tables
    _once_each(out)


def _cli() -> Any:
    from convlens.cli.main import app

    return app


def test_explain_folders_equal_whichever_engine_ran(cluster: Any, tmp_path: Path) -> None:
    """The same plan through both engines: the same folders with byte-equal maps and overlays, records equal but
    for timings (naming the driver's paths), the same results.json, a corrupt image skipped with the same message."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    data = SyntheticShapes(size=4, seed=5, split="test")
    paths = []
    for i in range(4):
        paths.append(inputs / f"im{i % 2}.png" if i < 2 else inputs / "sub" / f"im{i % 2}.png")  # name clashes
        paths[-1].parent.mkdir(exist_ok=True)
        data.load(i).image.save(paths[-1])
    (inputs / "broken.png").write_bytes(b"\x89PNG but not really")
    paths.insert(2, inputs / "broken.png")
    loaded = load_synthetic_model("synthetic-vgg")
    explainers = build_explainers(loaded, ["gradcam", "rise"], {"rise": {"n_masks": 64}}, None, 32)
    results = {}
    for name, engine in (("embedded", None), ("ray", RayExplainEngine(RayOptions(workers=2)))):
        config = ExplainConfig(inputs=[str(inputs)], model="synthetic-vgg", methods=["gradcam", "rise"],
                               out=tmp_path / name)
        plan = ExplainPlan(config, loaded, explainers, None, paths, "0123456789abcdef")
        results[name] = execute_explain(plan) if engine is None else execute_explain(plan, engine=engine)
    embedded, distributed = results["embedded"], results["ray"]
    assert [r["dir"] for r in distributed.records] == [r["dir"] for r in embedded.records] == [
        "im0", "im1", "im0-" + _hex(paths[3]), "im1-" + _hex(paths[4])]
    assert distributed.skipped == embedded.skipped and len(embedded.skipped) == 1
    assert _strip(json.loads((tmp_path / "ray" / "results.json").read_text())) == _strip(
        json.loads((tmp_path / "embedded" / "results.json").read_text()))
    for record in embedded.records:
        _same_folder(tmp_path / "embedded" / record["dir"], tmp_path / "ray" / record["dir"])


def _hex(path: Path) -> str:
    import hashlib

    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]


def _same_folder(expected: Path, actual: Path) -> None:
    names = sorted(p.relative_to(expected).as_posix() for p in expected.rglob("*"))
    assert sorted(p.relative_to(actual).as_posix() for p in actual.rglob("*")) == names
    for name in names:
        a, b = expected / name, actual / name
        if a.suffix == ".json":
            assert _strip(json.loads(b.read_text())) == _strip(json.loads(a.read_text())), name
        elif a.suffix == ".npy":
            np.testing.assert_array_equal(np.load(b), np.load(a))
        else:
            assert b.read_bytes() == a.read_bytes(), name


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in ("timings", "seconds")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value
