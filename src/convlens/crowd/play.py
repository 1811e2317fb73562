"""The simulated crowd plays a study through its real web API, the way a browser does.

Each simulated participant has its own HTTP client and cookie jar: it opens the consent page, reads the
CSRF token from the page's ``<meta name="csrf-token">`` and the form's hidden fields, consents (form
POST with ``csrftoken``), then sends every action as JSON with the ``X-CSRFToken`` header and a
request id — ``POST /api/next``, ``/reveal``, ``/guess``, ``/describe``, ``/resign`` — and fetches each new
round's level-0 image from the opaque ``/img/<token>`` URL. Nothing is written to the database directly.

The server never tells the browser which round it plays. The simulator stands for people who see
*their* round, so it must know which round each play holds: :class:`RoundOracle` reads the round of the
play id the server answered from the study database (read-only; the same database the server writes),
and checks that the level-0 image the server sent is that round's ``level0.png``. Recognising the round by
its picture alone is not enough: in deep layers several rounds of one image can share a byte-identical
level-0 image (``study create`` says so), and taking the first match described 8 % of plays with another
round's concept. The run counts the plays whose picture is shared (players cannot tell those rounds
apart either). Its planted concept and the players' behaviour come from :mod:`convlens.crowd.players`.

Determinism: participants join in order; ``concurrent`` of them are in the middle of the game at once
and a seeded generator picks which one sends the next request, one request at a time, so the server sees
the same sequence of requests in every run with the same seed. Request ids are drawn from seeded
generators too. The server's own randomness that matters — the assignment — is seeded by (study seed,
participant number, play number) (:mod:`convlens.study.game.assignment`); its session tokens, play ids and
image tokens are random but change nothing in the game. The same seed therefore gives the same plays,
on a uvicorn server (:func:`served`, :func:`url_clients`) or in process (:func:`asgi_clients`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from convlens.crowd.players import CrowdPlan, PlayerModel, seeded
from convlens.study.store.config import load_rounds

__all__ = ["CrowdRun", "RoundOracle", "SimulatedPlay", "asgi_clients", "run_crowd", "served", "simulate",
           "url_clients"]

CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]*)"')
HIDDEN = re.compile(r'<input type="hidden" name="([A-Za-z_]+)" value="([^"]*)">')
RETRIES = 5
STALL = 20
UNLIMITED = "1000000/minute"
ClientFactory = Callable[[], Any]


class SimulationError(RuntimeError):
    """The server refused or failed a request the simulated participant had to make."""


@dataclass
class SimulatedPlay:
    """What one simulated participant did in one round (the simulator's own log)."""

    participant: int
    round_id: str | None
    outcome: str
    level: int
    guessed_class: str | None = None
    description: str | None = None
    kind: str = ""
    concept: str = ""  # the concept the description names (the simulator's truth; "" for off-topic or none)


@dataclass
class CrowdRun:
    """Result of :func:`run_crowd`: the plays in the order they started, and the traffic it took."""

    plays: list[SimulatedPlay] = field(default_factory=list)
    participants: int = 0
    requests: int = 0
    seconds: float = 0.0
    unknown_images: int = 0
    shared_images: int = 0  # plays whose level-0 picture another round shares (players cannot tell them apart)
    started: dict[str, int] = field(default_factory=dict)  # round id -> plays started (the server's assigned)
    last_progress: int = -1  # the last participant who started a play of a non-gold round

    def summary(self) -> dict[str, Any]:
        outcomes: dict[str, int] = {}
        for play in self.plays:
            outcomes[play.outcome] = outcomes.get(play.outcome, 0) + 1
        return {"participants": self.participants, "plays": len(self.plays), "requests": self.requests,
                "seconds": round(self.seconds, 3), "outcomes": outcomes, "unknown_images": self.unknown_images,
                "shared_images": self.shared_images,
                "described": sum(p.description is not None for p in self.plays)}

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "plays": [asdict(p) for p in self.plays]}


class RoundOracle:
    """The round of each play: read from the study database by the play's public id, checked against the
    SHA-256 of the level-0 image the server sent (rounds with the same picture share a hash)."""

    def __init__(self, study_dir: str | Path, db: str | None = None) -> None:
        root = Path(study_dir)
        self.root, self.db = root, db
        self.rounds = {r.round_id: r for r in load_rounds(root)}
        self.digest: dict[str, str] = {}
        self.by_hash: dict[str, list[str]] = {}
        for round_id in sorted(self.rounds):
            digest = hashlib.sha256((root / "images" / round_id / "level0.png").read_bytes()).hexdigest()
            self.digest[round_id] = digest
            self.by_hash.setdefault(digest, []).append(round_id)
        self._engine: Any = None

    def shared(self, round_id: str) -> bool:
        """True when another round has the same level-0 picture."""
        return len(self.by_hash.get(self.digest.get(round_id, ""), [])) > 1

    def round_of(self, play_id: str) -> str | None:
        """The round the server assigned to the play ``play_id`` (None when the database has no such play)."""
        from sqlalchemy import select

        from convlens.study.game.opening import database_url
        from convlens.study.store.db import Play, make_engine

        if self._engine is None:
            self._engine = make_engine(database_url(self.root, self.db), pool_size=1)
        with self._engine.connect() as connection:
            return connection.execute(select(Play.round_id).where(Play.public_id == play_id)).scalar_one_or_none()

    def identify(self, play_id: str, png: bytes) -> str:
        """The play's round; a play the database does not know, or whose picture is not its round's, is an error."""
        round_id = self.round_of(play_id)
        if round_id is None or round_id not in self.rounds:
            raise SimulationError(f"play {play_id} is not in the study database {self.db or self.root}: pass the "
                                  "server's database (--db)")
        if hashlib.sha256(png).hexdigest() != self.digest[round_id]:
            raise SimulationError(f"play {play_id}: the server sent a level-0 image that is not round {round_id}'s")
        return round_id

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


class SimulatedParticipant:
    """One participant's HTTP session and its state in the game."""

    def __init__(self, index: int, client: Any, model: PlayerModel, oracle: RoundOracle, run: CrowdRun,
                 seed: int) -> None:
        self.index, self.client, self.model, self.oracle, self.run = index, client, model, oracle, run
        self.ids = seeded(seed, "request-ids", index)
        self.view: dict[str, Any] = {}
        self.play: SimulatedPlay | None = None
        self.wants_description = False

    async def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request, retried with the same body (and request id) on a lost answer or a 5xx/429."""
        for attempt in range(RETRIES):
            self.run.requests += 1
            try:
                response = await self.client.request(method, path, **kwargs)
            except Exception as exc:  # transport errors: retried, then reported
                if attempt == RETRIES - 1:
                    raise SimulationError(f"participant {self.index}: {method} {path}: {exc!r}") from exc
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            if response.status_code < 500 and response.status_code != 429:
                return response
            await asyncio.sleep(0.05 * (attempt + 1))
        raise SimulationError(f"participant {self.index}: {method} {path}: {response.status_code} "
                              f"{response.text[:200]}")

    async def _post(self, path: str, **body: Any) -> dict[str, Any]:
        body["request_id"] = str(uuid.UUID(int=self.ids.getrandbits(128), version=4))
        response = await self._send("POST", path, json=body)
        if response.status_code != 200:
            raise SimulationError(f"participant {self.index}: POST {path}: {response.status_code} "
                                  f"{response.text[:200]}")
        return response.json()

    async def join(self) -> None:
        page = await self._send("GET", "/")
        found = CSRF_META.search(page.text)
        if page.status_code != 200 or found is None:
            raise SimulationError(f"consent page: {page.status_code}, no CSRF token")
        form = {**dict(HIDDEN.findall(page.text)), "csrftoken": found.group(1), "consent": "yes",
                "nickname": f"sim-{self.index}"}
        response = await self._send("POST", "/consent", data=form)
        if response.status_code not in (200, 303):
            raise SimulationError(f"consent refused: {response.status_code} {response.text[:200]}")
        self.client.headers["x-csrftoken"] = found.group(1)

    async def _new_play(self) -> bool:
        view = await self._post("/api/next")
        if view.get("done"):
            return False
        image = await self._send("GET", view["image"])
        round_id = self.oracle.identify(view["play"], image.content) if image.status_code == 200 else None
        self.run.unknown_images += round_id is None
        if round_id is not None:
            self.run.shared_images += self.oracle.shared(round_id)
            self.run.started[round_id] = self.run.started.get(round_id, 0) + 1
            if not self.oracle.rounds[round_id].gold:
                self.run.last_progress = max(self.run.last_progress, self.index)
        self.model.start(self.model.plan.rounds.get(round_id or ""), round_id or view["play"])
        self.play = SimulatedPlay(self.index, round_id, "active", 0)
        self.run.plays.append(self.play)
        self.view = view
        return True

    async def step(self, may_start: bool) -> bool:
        """Send the next request; False once the participant is finished (or may not start a new play)."""
        if not self.view or (self.view.get("state") != "active" and not self.wants_description):
            return may_start and await self._new_play()
        play, view = self.play, self.view
        assert play is not None
        if self.wants_description:
            text, play.kind = self.model.description(play.guessed_class or "", play.outcome == "win")
            play.concept = self.model.last_concept
            self.wants_description = False
            if text is not None:
                play.description = text
                self.view = await self._post(f"/api/plays/{view['play']}/describe", text=text, language="en")
            return True
        spec = self.oracle.rounds.get(play.round_id or "")
        action, guessed = self.model.act(view["level"], view["levels"], spec.true_class if spec else None)
        if action == "reveal":
            self.view = await self._post(f"/api/plays/{view['play']}/reveal", level=view["level"] + 1)
        elif action == "resign":
            self.view = await self._post(f"/api/plays/{view['play']}/resign")
        else:
            self.view = await self._post(f"/api/plays/{view['play']}/guess",
                                         class_name=guessed or self.model.plan.classes[0])
            self.wants_description = True
        play.level, play.outcome = self.view["level"], self.view["state"]
        play.guessed_class = self.view.get("guessed_class")
        return True


class _Enrolment:
    """Whether another participant should join: a fixed number, or (``participants=None``) as many as it
    takes for every non-gold round to start its ``plays_per_round`` plays — with one round per image per
    participant (the server's default) each participant plays at most one round of each image, so filling
    the rounds takes about ``rounds x plays_per_round / images`` participants. Stops early if
    :data:`STALL` participants in a row started no round that still needed plays."""

    def __init__(self, study_dir: str | Path, oracle: RoundOracle, participants: int | None) -> None:
        from convlens.study.store.config import load_study

        self.participants = participants
        self.cap = load_study(study_dir).plays_per_round if participants is None else 0
        self.normal = [r for r, spec in oracle.rounds.items() if not spec.gold]

    def more(self, joined: int, run: CrowdRun) -> bool:
        if self.participants is not None:
            return joined < self.participants
        if joined - run.last_progress > STALL:
            return False
        return any(run.started.get(r, 0) < self.cap for r in self.normal)


async def run_crowd(clients: ClientFactory, study_dir: str | Path, plan: CrowdPlan, participants: int | None,
                    concurrent: int = 4, budget: int | None = None, db: str | None = None) -> CrowdRun:
    """Up to ``participants`` simulated participants (None: until every round started its plays per round, see
    :class:`_Enrolment`) play until the server says they are done, or until ``budget`` plays have started
    (plays in progress are finished). ``clients()`` makes one ``httpx.AsyncClient`` per participant; ``db`` is
    the server's database URL (default: STUDY_DIR's SQLite file), read to know each play's round."""
    oracle = RoundOracle(study_dir, db)
    enrolment = _Enrolment(study_dir, oracle, participants)
    run = CrowdRun()
    order = seeded(plan.seed, "interleaving")
    active: list[SimulatedParticipant] = []
    joined = 0
    start = time.perf_counter()
    try:
        while True:
            under_budget = budget is None or len(run.plays) < budget
            while len(active) < concurrent and under_budget and enrolment.more(joined, run):
                player = SimulatedParticipant(joined, clients(), PlayerModel(plan, joined), oracle, run, plan.seed)
                await player.join()
                active.append(player)
                joined += 1
            if not active:
                break
            player = active[order.randrange(len(active))]
            if not await player.step(budget is None or len(run.plays) < budget):
                active.remove(player)
                await player.client.aclose()
    finally:
        for player in active:
            await player.client.aclose()
        oracle.close()
    run.participants, run.seconds = joined, time.perf_counter() - start
    return run


def url_clients(base_url: str) -> ClientFactory:
    """Clients of a running server (e.g. ``convlens serve`` or :func:`served`)."""
    import httpx

    return lambda: httpx.AsyncClient(base_url=base_url, timeout=60)


def asgi_clients(app: Any) -> ClientFactory:
    """Clients that call an in-process app (:func:`convlens.study.web.app.create_app`) through httpx's ASGI
    transport: the same requests, no sockets (faster; no uvicorn)."""
    import httpx

    transport = httpx.ASGITransport(app=app)
    return lambda: httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def served(study_dir: str | Path, db: str | None = None, log: Path | None = None,
           timeout: float = 600.0) -> Iterator[str]:
    """``python -m convlens.study.web.server`` on a free loopback port (rate limits lifted) for the duration;
    yields its URL and stops it with SIGTERM (SIGKILL after 30 s). A watchdog stops it too if this process
    is killed (:class:`~convlens.core.processes.ProcessWatchdog`)."""
    from convlens.core.processes import ProcessWatchdog

    port = _free_port()
    command = [sys.executable, "-m", "convlens.study.web.server", str(study_dir), "--port", str(port),
               "--rate-limit-ip", UNLIMITED, "--rate-limit-participant", UNLIMITED, "--rate-limit-consent", UNLIMITED,
               "--log-level", "warning"]
    if db:
        command += ["--db", db]
    url = f"http://127.0.0.1:{port}"
    with ProcessWatchdog() as watchdog:
        with (log.open("a") if log else contextlib.nullcontext(subprocess.DEVNULL)) as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        watchdog.adopt(process.pid)
        yield from _serving(process, url, log, timeout)


def _serving(process: subprocess.Popen[bytes], url: str, log: Path | None, timeout: float) -> Iterator[str]:
    """Wait for the server's /healthz, yield its URL, stop it (SIGTERM; SIGKILL after 30 s)."""
    import httpx

    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise SimulationError(f"the study server exited with {process.returncode}"
                                      + (f"; see {log}" if log else ""))
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SimulationError(f"the study server did not answer /healthz within {timeout:.0f} s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def simulate(study_dir: str | Path, plan: CrowdPlan, participants: int | None, *, url: str | None = None,
             app: Any = None, concurrent: int = 4, budget: int | None = None, db: str | None = None) -> CrowdRun:
    """Synchronous entry point: play the server at ``url``, the in-process ``app``, or (neither given) a
    server started for the run with :func:`served`."""
    if url is not None:
        return asyncio.run(run_crowd(url_clients(url), study_dir, plan, participants, concurrent, budget, db))
    if app is not None:
        return asyncio.run(run_crowd(asgi_clients(app), study_dir, plan, participants, concurrent, budget, db))
    with served(study_dir, db) as base:
        return asyncio.run(run_crowd(url_clients(base), study_dir, plan, participants, concurrent, budget, db))
