"""The Ray engine without a Ray cluster: the default paths never import Ray, a missing Ray or a bad option is one
clear error that writes nothing, the pool size follows the cluster's resources, and the workers' per-image work
(run here, in-process) gives the same folders and results as the embedded engine. The cluster runs (equal tables,
a killed node, a killed driver) are in test_ray_cluster.py."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from convlens.data.synthetic import SyntheticShapes
from convlens.models.images import ImageLoadError
from convlens.models.synthetic import load_synthetic_model
from convlens.runners.evaluate import EvaluationConfig, build_evaluation
from convlens.runners.evaluate_item import WorkItem
from convlens.runners.explain_image import ImageSettings, explain_image
from convlens.runners.explain_methods import build_explainers
from convlens.runners.ray_engine import RayEngineError, RayOptions, _ImageWriter, pool_size, require_ray
from convlens.runners.ray_workers import EvaluateWorker, ExplainState, ExplainWorker, ImageOutcome

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cli() -> Any:
    from convlens.cli.main import app

    return app


def test_default_paths_do_not_import_ray() -> None:
    """The CLI, both runners and even the Ray engine module load without importing Ray (it is an extra)."""
    code = (
        "import sys\n"
        "import convlens.cli.main, convlens.runners.evaluate, convlens.runners.explain, convlens.runners.ray_engine\n"
        "import convlens.runners.ray_workers\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=900)


def test_missing_ray_is_one_clear_error_and_writes_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(RayEngineError, match=r"pip install 'convlens\[ray\]'"):
        require_ray()
    out = tmp_path / "eval"
    result = CliRunner().invoke(_cli(), ["evaluate", "--data", "synthetic", "--limit", "2", "--engine", "ray",
                                         "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "convlens[ray]" in result.output and not out.exists()
    image = tmp_path / "x.png"
    SyntheticShapes(size=1, seed=0).load(0).image.save(image)
    result = CliRunner().invoke(_cli(), ["explain", str(image), "--engine", "ray", "--out", str(tmp_path / "ex")])
    assert result.exit_code == 2 and "convlens[ray]" in result.output and not (tmp_path / "ex").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "2"], "--workers: only with --engine ray"),
        (["--ray-address", "auto"], "--ray-address: only with --engine ray"),
        (["--engine", "spark"], "choose embedded or ray"),
        (["--engine", "ray", "--workers", "0"], "--workers must be >= 1"),
        (["--engine", "ray", "--gpus-per-worker", "-1"], "--gpus-per-worker must be >= 0"),
        (["--engine", "ray", "--gpus-per-worker", "1.5"], "whole GPUs"),
        (["--engine", "ray", "--device", "cuda", "--gpus-per-worker", "0"], "give the workers GPUs"),
        (["--engine", "ray", "--device", "mps"], "use cpu or cuda"),
        (["--engine", "ray", "--threads-per-worker", "0"], "--threads-per-worker must be >= 1"),
        pytest.param(["--engine", "ray", "--gpus-per-worker", "1"], "no CUDA GPU for a local Ray",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    ],
)
def test_bad_engine_options_exit_2_and_write_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "eval"
    result = CliRunner().invoke(_cli(), ["evaluate", "--data", "synthetic", "--limit", "2", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and not out.exists()


def test_pool_size_follows_the_cluster_resources() -> None:
    resources = {"CPU": 16.0, "GPU": 4.0}
    assert pool_size(RayOptions(workers=3), resources) == 3
    assert pool_size(RayOptions(), resources) == 16
    assert pool_size(RayOptions(threads_per_worker=4), resources) == 4
    assert pool_size(RayOptions(threads_per_worker=5), resources) == 3  # 16 // 5
    assert pool_size(RayOptions(gpus_per_worker=1), resources) == 4
    assert pool_size(RayOptions(gpus_per_worker=0.5), resources) == 8
    assert pool_size(RayOptions(gpus_per_worker=1), {"CPU": 8.0}) == 1  # none yet: one actor waits for a GPU
    assert RayOptions(gpus_per_worker=0.25).device == "cuda" and RayOptions().device == "cpu"


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    data = SyntheticShapes(size=n, seed=3, split="test")
    paths = []
    for i in range(n):
        paths.append(folder / f"shape {i}.png")
        data.load(i).image.save(paths[-1])
    return paths


def _state(methods: list[str]) -> ExplainState:
    loaded = load_synthetic_model("synthetic-vgg")
    explainers = build_explainers(loaded, methods, {"rise": {"n_masks": 64}}, None, 32)
    return ExplainState(loaded, explainers, ImageSettings(None, "0123456789abcdef"))


def test_explain_worker_returns_the_embedded_folder(tmp_path: Path) -> None:
    """The worker explains the image's bytes in a private folder; the driver's writer rebuilds exactly the folder
    that explain_image writes in place (every file byte-equal but the timings, the record naming the driver's
    path), and an unusable image comes back as the embedded engine's error, naming the driver's path."""
    paths = _images(tmp_path / "in", 2)
    state = _state(["gradcam", "rise"])
    embedded = tmp_path / "embedded"
    embedded.mkdir()
    expected = explain_image(paths[0], state.loaded, state.explainers, state.settings, embedded)
    shipped = pickle.loads(pickle.dumps(state))  # what an actor receives
    worker = ExplainWorker(shipped, "cpu", 1)
    payload = pickle.dumps((paths[0].name, paths[0].read_bytes()))
    batch = worker({"position": np.array([7]), "payload": np.array([payload], dtype=object)})
    assert list(batch["position"]) == [7]
    outcome = pickle.loads(batch["result"][0])
    progress = _Forwards()
    folder = tmp_path / "ray"
    folder.mkdir()
    record = _ImageWriter(outcome, paths[0], progress)(folder)
    assert _without_timings(record) == _without_timings(expected)
    assert record["image"] == str(paths[0]) and record["source"] == str(paths[0].resolve())
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in embedded.iterdir())
    for path in embedded.iterdir():
        twin = folder / path.name
        if path.suffix == ".json":
            assert _without_timings(json.loads(twin.read_text())) == _without_timings(json.loads(path.read_text()))
        else:
            assert twin.read_bytes() == path.read_bytes(), path.name
    assert progress.total == 64  # the masked forwards the worker counted: RISE's 64 (Grad-CAM has none)
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError) as direct:
        explain_image(broken, state.loaded, state.explainers, state.settings, tmp_path)
    bad = pickle.loads(worker({"position": np.array([0]),
                               "payload": np.array([pickle.dumps((broken.name, broken.read_bytes()))], dtype=object)}
                              )["result"][0])
    with pytest.raises(ImageLoadError) as shipped_error:
        _ImageWriter(bad, broken, progress)(tmp_path / "unused")
    assert str(shipped_error.value) == str(direct.value)


def test_image_writer_refuses_paths_that_leave_the_folder(tmp_path: Path) -> None:
    for name in ("../escape.txt", "/etc/passwd", "a/../../b"):
        outcome = ImageOutcome({name: b"x"}, {"results": []})
        with pytest.raises(RayEngineError, match="refused"):
            _ImageWriter(outcome, tmp_path / "x.png", _Forwards())(tmp_path / "folder")
    assert not (tmp_path / "escape.txt").exists()


def test_evaluate_worker_equals_the_driver_evaluator(tmp_path: Path) -> None:
    """The actor rebuilds the evaluator from its pickle and returns the same records as the driver's."""
    config = EvaluationConfig(model="synthetic-vgg", methods=["gradcam", "sise"], data="synthetic", limit=2,
                              metrics=["ebpg", "drop"], out=tmp_path / "unused", n_samples=1)
    setup = build_evaluation(config)
    item = WorkItem(1, "0000001-x", setup.dataset.sample_ids()[1], ("gradcam", "sise"), keep_samples=True)
    expected = setup.evaluator(item)
    worker = EvaluateWorker(pickle.loads(pickle.dumps(setup.evaluator)), "cpu", 1)
    batch = worker({"position": np.array([0]), "payload": np.array([pickle.dumps(item)], dtype=object)})
    result = pickle.loads(batch["result"][0])
    assert result.item == item
    assert {m: _without_timings(r) for m, r in result.records.items()} == {
        m: _without_timings(r) for m, r in expected.records.items()
    }
    assert result.samples is not None and expected.samples is not None
    for method, maps in expected.samples.maps.items():
        np.testing.assert_array_equal(result.samples.maps[method], maps)
    assert torch.get_num_threads() == 1


class _Forwards:
    def __init__(self) -> None:
        self.total = 0

    def forwards(self, count: int) -> None:
        self.total += count


def _without_timings(value: Any) -> Any:
    """A JSON value without wall-clock entries (``timings``, ``seconds``), the only ones that differ between runs."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in ("timings", "seconds")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_explain_images_go_to_ray_one_window_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver reads and ships the image bytes of one window of paths per Ray dataset (not every pending
    image's at once), and every result comes back to its own path."""
    import contextlib

    from convlens.runners import ray_engine

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(bytes([i]) * (i + 1))
    windows: list[list[str]] = []

    def stream(payloads, worker, args, options, session):  # the cluster's part, in-process
        windows.append([pickle.loads(p)[0] for p in payloads])
        for position in reversed(range(len(payloads))):  # any completion order
            name, data = pickle.loads(payloads[position])
            yield position, pickle.dumps(ImageOutcome({"bytes.bin": data}, {"name": name}))

    @contextlib.contextmanager
    def session(options):
        yield ray_engine.RaySession(True, {"CPU": 1.0})

    monkeypatch.setattr(ray_engine, "stream_results", stream)
    monkeypatch.setattr(ray_engine, "ray_session", session)
    plan = type("Plan", (), {"loaded": None, "explainers": {}, "config": type("Config", (), {"device": "cpu"})()})()
    engine = ray_engine.RayExplainEngine(window=2)
    done = {position: job for position, job in engine(plan, None, paths, _Forwards())}
    assert windows == [["img0.png", "img1.png"], ["img2.png", "img3.png"], ["img4.png"]]
    assert sorted(done) == list(range(5))
    for position, job in done.items():
        folder = tmp_path / f"out{position}"
        folder.mkdir()
        assert job(folder)["name"] == paths[position].name
        assert (folder / "bytes.bin").read_bytes() == paths[position].read_bytes()
    with pytest.raises(RayEngineError, match="window"):
        ray_engine.RayExplainEngine(window=0)


def test_evaluate_worker_builds_the_explainers_and_metrics_once(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from convlens.runners.evaluate_item import ItemEvaluator

    config = EvaluationConfig(model="synthetic-vgg", methods=["gradcam"], data="synthetic", limit=1,
                              metrics=["drop"], out=tmp_path / "unused")
    setup = build_evaluation(config)
    state = pickle.loads(pickle.dumps(setup.evaluator.__getstate__()))  # what the engine ships to an actor
    builds: list[str] = []
    original = ItemEvaluator._build
    monkeypatch.setattr(ItemEvaluator, "_build", lambda self: (builds.append(self.config.device), original(self)))
    worker = EvaluateWorker(state, "cpu", 1)
    assert builds == ["cpu"] and worker.evaluator.explainers.keys() == {"gradcam"}
    item = WorkItem(0, "0000000-x", setup.dataset.sample_ids()[0], ("gradcam",))
    assert worker.evaluator(item).records["gradcam"]["targets"] == setup.evaluator(item).records["gradcam"]["targets"]


def test_a_local_ray_under_a_long_tmpdir_gets_a_short_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Ray puts its sockets under RAY_TMPDIR, else TMPDIR; an AF_UNIX path has at most 107 bytes. Under a long
    temporary folder a local Ray gets a fresh short one in /tmp (removed after the run); a short one is kept."""
    import tempfile

    from convlens.runners.ray_engine import RAY_SOCKET_TAIL, _short_temp_dir

    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    long = tmp_path / ("l" * max(1, 108 - RAY_SOCKET_TAIL - len(str(tmp_path))))
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    short = _short_temp_dir()
    assert short is not None and Path(short).parent == Path("/tmp") and Path(short).is_dir()
    assert len(short) + RAY_SOCKET_TAIL <= 107
    Path(short).rmdir()
    monkeypatch.setenv("RAY_TMPDIR", "/tmp")  # Ray's own variable wins, and fits
    assert _short_temp_dir() is None
    monkeypatch.delenv("RAY_TMPDIR")
    monkeypatch.setattr(tempfile, "tempdir", "/tmp")
    assert _short_temp_dir() is None
