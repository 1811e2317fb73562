"""Fixtures of the Deep Reveal tests: INV runs from a tiny CNN, study folders, API players, a real
uvicorn server in its own process, and a throw-away PostgreSQL cluster (skipped with a message if
PostgreSQL is not installed: ``bash scripts/install_system_deps.sh`` installs it)."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # tests/: `study.*` and the tiny CNN, any import mode
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.helpers import PostgresCluster

CLASSES = ["cat", "coffee", "astronaut", "rocket", "horse"]
TINY_LAYERS = ["block1.2", "block2.2", "block3.1"]
IMAGES = ("chelsea", "coffee", "astronaut", "rocket", "horse")
CSRF_META = re.compile(r'name="csrf-token" content="([^"]*)"')


def write_inv_run(out: Path, count: int = 3, size: int = 96) -> Path:
    """``convlens explain --method inv``-shaped folder: <stem>/inv/{inv.json, input.png, ...} per image.

    A tiny CNN (tests/conftest.py) explained at its three conv layers; image i is scikit-image's
    ``IMAGES[i % 5]`` rotated by ``(i // 5) x 90`` degrees, explained for class ``i % 5``.
    """
    import skimage.data
    import torch
    from PIL import Image

    from conftest import make_tiny_cnn
    from convlens.inv import INV

    model = make_tiny_cnn(width=8)
    for i in range(count):
        name, turns = IMAGES[i % len(IMAGES)], i // len(IMAGES)
        pixels = np.asarray(getattr(skimage.data, name)())
        if pixels.ndim == 2:  # the horse silhouette: boolean, one channel
            pixels = np.repeat((pixels.astype(np.uint8) * 255)[..., None], 3, axis=2)
        pixels = np.rot90(pixels[..., :3], turns)
        image = Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB").resize((size, size),
                                                                                  Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            explanation = INV(model, layers=TINY_LAYERS, class_names=CLASSES).explain(
                x, target=i % len(CLASSES), image_id=hashlib.sha256(buffer.getvalue()).hexdigest())
        explanation.save(out / f"{name}{turns or ''}" / "inv", image=image)
    return out


@pytest.fixture(scope="session")
def inv_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_inv_run(tmp_path_factory.mktemp("inv") / "run")


@pytest.fixture(scope="session")
def study_template(inv_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from convlens.study.batch.create import CreateOptions, create_study

    target = tmp_path_factory.mktemp("template") / "study"
    create_study(target, [inv_run], CreateOptions(classes=CLASSES, gold=1, plays_per_round=2, rounds_per_player=50,
                                                  completion_code="DONE42"))
    return target


@pytest.fixture
def study_dir(study_template: Path, tmp_path: Path) -> Path:
    target = tmp_path / "study"
    shutil.copytree(study_template, target)
    return target


def make_app(study_dir: Path, db: str | None = None, **kwargs: Any) -> Any:
    from convlens.study.web.app import create_app

    kwargs.setdefault("rate_limit_ip", "100000/minute")
    kwargs.setdefault("rate_limit_participant", "100000/minute")
    kwargs.setdefault("rate_limit_consent", "100000/minute")
    return create_app(study_dir, db, **kwargs)


@pytest.fixture
def app(study_dir: Path) -> Iterator[Any]:
    application = make_app(study_dir)
    yield application
    application.state.engine.dispose()


class ApiPlayer:
    """One participant driving the JSON API through a TestClient (own cookie jar)."""

    def __init__(self, app: Any, nickname: str | None = None, query: str = "") -> None:
        from fastapi.testclient import TestClient

        self.client = TestClient(app)
        page = self.client.get("/" + query)
        assert page.status_code == 200, page.text
        self.csrf = CSRF_META.search(page.text).group(1)
        hidden = dict(re.findall(r'name="(prolific_pid|study_id|session_id)" value="([^"]*)"', page.text))
        form = {"csrftoken": self.csrf, "consent": "yes", "consent_version": "1", **hidden}
        if nickname is not None:
            form["nickname"] = nickname
        response = self.client.post("/consent", data=form, follow_redirects=False)
        assert response.status_code == 303, response.text

    def post(self, path: str, request_id: str | None = None, **body: Any) -> Any:
        body["request_id"] = request_id or str(uuid.uuid4())
        return self.client.post(path, json=body, headers={"x-csrftoken": self.csrf})

    def next(self) -> dict[str, Any]:
        response = self.post("/api/next")
        assert response.status_code == 200, response.text
        return response.json()

    def act(self, play: str, action: str, **body: Any) -> Any:
        return self.post(f"/api/plays/{play}/{action}", **body)


@pytest.fixture
def player(app: Any) -> ApiPlayer:
    return ApiPlayer(app)


def true_class(app: Any, play_public_id: str) -> str:
    """The answer of a play, read on the server side (the browser never gets it before the end)."""
    from sqlalchemy import select

    from convlens.study.store.db import Play

    runtime = app.state.runtime
    with runtime.reader.begin() as session:
        round_id = session.scalar(select(Play.round_id).where(Play.public_id == play_public_id))
    return runtime.rounds[round_id].true_class


@pytest.fixture(scope="session")
def postgres(socket_dir: Path) -> Iterator[PostgresCluster]:
    cluster = PostgresCluster.start_or_skip(socket_dir)
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_url(postgres: PostgresCluster) -> str:
    return postgres.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, study_dir: Path) -> str:
    """Database URL for tests that run on both backends."""
    if request.param == "sqlite":
        return f"sqlite:///{study_dir / 'study.sqlite'}"
    return request.getfixturevalue("postgres").new_database()


