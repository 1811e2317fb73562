"""``convlens explain`` resume keys and progress: new weights at the same path are recomputed (the weights'
SHA-256 is in the fingerprint, not only their path), and an unreadable input still counts as done, so the
progress ends at N of N."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import convlens.runners.explain as explain_runner
from convlens.models import register_model
from convlens.models.zoo import unregister_model
from convlens.runners.explain import ExplainConfig, run_explain
from test_explain_safety import TINY, _image, explain, tiny_model


@pytest.fixture(autouse=True, scope="module")
def _tiny_registered():
    register_model(TINY, tiny_model)
    yield
    unregister_model(TINY)


def _save_weights(path: Path, seed: int) -> None:
    state = tiny_model().module.state_dict()
    generator = torch.Generator().manual_seed(seed)
    torch.save({k: torch.randn(v.shape, generator=generator) for k, v in state.items()}, path)


def test_new_weights_at_the_same_path_are_recomputed(tmp_path: Path) -> None:
    image, out, weights = _image(tmp_path / "a.png"), tmp_path / "o", tmp_path / "w.pt"
    _save_weights(weights, seed=1)
    assert explain(image, "--out", out, "--weights", weights)[0] == 0
    first = np.load(out / "a" / "gradcam.npy")
    stamp = (out / "a" / "result.json").stat().st_mtime_ns
    assert explain(image, "--out", out, "--weights", weights)[0] == 0  # same bytes: resumed
    assert (out / "a" / "result.json").stat().st_mtime_ns == stamp
    _save_weights(weights, seed=2)  # retrained, saved over the same file
    assert explain(image, "--out", out, "--weights", weights)[0] == 0
    assert explain(image, "--out", tmp_path / "fresh", "--weights", weights)[0] == 0
    again = np.load(out / "a" / "gradcam.npy")
    assert not np.array_equal(again, first)
    assert again.tobytes() == np.load(tmp_path / "fresh" / "a" / "gradcam.npy").tobytes()


def test_an_unreadable_input_still_ends_the_progress_at_n_of_n(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "in"
    for i in range(3):
        _image(folder / f"img{i}.png", i)
    original = explain_runner.file_digest

    def unreadable(path: Path) -> str:
        if path.name == "img1.png":
            raise PermissionError(13, "Permission denied")
        return original(path)

    monkeypatch.setattr(explain_runner, "file_digest", unreadable)
    events: list[str] = []

    class Progress:
        def start(self, images: int) -> None:
            events.append(f"start {images}")

        def image_done(self) -> None:
            events.append("done")

        def forwards(self, count: int) -> None: ...

        def skipped(self, message: str) -> None:
            events.append("skipped")

        def waiting(self, out: Path) -> None: ...

    result = run_explain(ExplainConfig([str(folder)], model=TINY, out=tmp_path / "o"), Progress())
    assert result.exit_code == 1 and [s["path"] for s in result.skipped] == [str(folder / "img1.png")]
    assert events[0] == "start 3" and events.count("done") == 3 and events.count("skipped") == 1
