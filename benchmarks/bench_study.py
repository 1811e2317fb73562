"""Deep Reveal study server: start-up, memory, CPU per submission with its image requests, throughput vs the
bare rate of durable inserts, a SIGKILL in the middle of the load, the export of 600 k events, and a
profile of one play — in one run.

1. start-up: ``convlens study serve`` (the console script) until ``/healthz`` answers, and the resident
   memory of each process (goals: healthy <= 1.5 s, <= 150 MB per worker), 1 and 2 workers;
2. load: 50 concurrent simulated players x 100 submissions (httpx + asyncio; each submission is one start /
   reveal / guess / describe / skip / resign, i.e. one committed event), every new image fetched as a browser
   does; server CPU per submission (goal <= 2 ms, the whole play with its image requests), throughput,
   p50/p95 latency, lost or duplicated submissions; and the bare rate: one writer inserting one row per
   durable transaction into the same database with the same settings (SQLite; PostgreSQL when installed,
   with 1 and 2 workers);
3. fault run: the same load, the server SIGKILLed after half of the submissions were acknowledged,
   restarted, unanswered requests retried with their request ids (goal: nothing lost, nothing twice);
4. export: a study database with 600 k events (synthesised with bulk inserts), ``convlens study export`` as
   a process (goal <= 20 s) and in process, CSV and JSON Lines;
5. profile of one play (start, two reveals, guess, description, four images) driven in process through raw
   ASGI messages (no HTTP client in the profile): CPU by component.

Client and server share the machine's cores (and other developers' jobs): the load average is reported.

Usage: python benchmarks/bench_study.py [--players 50] [--submissions 100] [--events 600000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

from _sections import machine_line, markdown_table, write_section

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from convlens.study.batch.create import CreateOptions, create_study
from study.conftest import CLASSES, write_inv_run
from study.helpers import LiveServer, PostgresCluster, free_port, lost_and_duplicated, run_load

CONVLENS = str(Path(sys.executable).with_name("convlens"))
NOTE = (
    "Reading: the simulated players have no think time, so all of them queue on one durable writer and the "
    "latency is mostly waiting (p50 ≈ players / throughput, Little's law); a person needs seconds per action, "
    "so this load stands for hundreds of simultaneous players. The CPU column is the server's CPU (all its "
    "processes) per acknowledged submission, its image requests and the players' registrations included; the "
    "client's runs on the same 2 cores. 50 players without think time keep the server saturated, 10 leave it "
    "idle part of the time; on this shared machine the figures move by about 20 % from run to run. Where a "
    "durable commit is slow (a busy disk) the server keeps up with a "
    "good share of the bare rate; where it is fast, the bare writer, which does nothing else, runs thousands of "
    "commits per second and the server is bound by its CPU per submission."
)


def bare_insert_rate(url: str, count: int) -> float:
    """Durable single-row transactions per second on the server's engine settings."""
    from sqlalchemy import text

    from convlens.study.store.db import make_engine

    engine = make_engine(url, pool_size=1)
    ident = "INTEGER PRIMARY KEY" if url.startswith("sqlite") else "BIGSERIAL PRIMARY KEY"
    with engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE IF NOT EXISTS bench_inserts (id {ident}, payload TEXT)"))
    start = time.perf_counter()
    for i in range(count):
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO bench_inserts (payload) VALUES (:p)"), {"p": f"row {i}"})
    rate = count / (time.perf_counter() - start)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE bench_inserts"))
    engine.dispose()
    return rate


def _processes(pid: int) -> list[Any]:
    import psutil

    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (uvicorn's worker processes)."""
    return sum(sum(process.cpu_times()[:2]) for process in _processes(pid))


def start_up(study: Path, workers: int) -> dict[str, Any]:
    """Seconds from launching the console script to a healthy /healthz, and the memory of each process."""
    import httpx

    port = free_port()
    command = [CONVLENS, "study", "serve", str(study), "--port", str(port), "--workers", str(workers),
               "--log-level", "warning"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            time.sleep(0.01)
        healthy = time.perf_counter() - start
        time.sleep(0.5)  # every worker up
        memory = sorted((p.memory_info().rss / 2**20, " ".join(p.cmdline()[1:3])) for p in _processes(process.pid))
        torch = any("torch" in Path(f"/proc/{p.pid}/maps").read_text() for p in _processes(process.pid))
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=60)
    return {"healthy_s": healthy, "rss_mb": [round(m, 1) for m, _ in memory], "torch_loaded": torch}


def load_run(study: Path, db: str | None, url: str, players: int, submissions: int, workers: int) -> dict[str, Any]:
    server = LiveServer(study, db, workers=workers).start()
    try:
        server_cpu, client_cpu = _cpu_seconds(server.process.pid), time.process_time()
        result, _, _ = asyncio.run(run_load(server.url, players, submissions, CLASSES, images=True))
        server_cpu, client_cpu = _cpu_seconds(server.process.pid) - server_cpu, time.process_time() - client_cpu
    finally:
        server.kill()
    lost, duplicated, _ = lost_and_duplicated(url, result)
    acknowledged = max(1, len(result.acknowledged))
    return {"acknowledged": len(result.acknowledged), "images": result.images, "failures": len(result.failures),
            "lost": len(lost), "duplicated": len(duplicated), "throughput": len(result.acknowledged) / result.elapsed,
            "p50_ms": 1000 * result.percentile(50), "p95_ms": 1000 * result.percentile(95),
            "server_cpu_ms": 1000 * server_cpu / acknowledged, "client_cpu_ms": 1000 * client_cpu / acknowledged}


def fault_run(study: Path, db: str | None, url: str, players: int, submissions: int) -> dict[str, Any]:
    import httpx

    server = LiveServer(study, db).start()

    async def load_then_kill() -> tuple:
        result, tasks, clients = await run_load(server.url, players, 10**6, CLASSES,
                                                stop_after=players * submissions // 2)
        server.kill()
        await asyncio.gather(*tasks)
        return result, clients

    async def retry(result: Any, clients: dict) -> list[int]:
        statuses = []
        for index, (path, body) in list(result.pending.items()):
            old = clients[index]
            async with httpx.AsyncClient(base_url=server.url, cookies=old.cookies, headers=dict(old.headers),
                                         timeout=60) as client:
                statuses.append((await client.post(path, json=body)).status_code)
            result.acknowledged.append(("retry", body["request_id"], index))
        return statuses

    try:
        result, clients = asyncio.run(load_then_kill())
        before = len(result.acknowledged)
        lost_at_kill, dup_at_kill, _ = lost_and_duplicated(url, result)
        server.start()
        statuses = asyncio.run(retry(result, clients))
    finally:
        server.kill()
    lost, duplicated, _ = lost_and_duplicated(url, result)
    return {"acknowledged_before_kill": before, "lost_after_restart": len(lost) + len(lost_at_kill),
            "duplicated": len(duplicated) + len(dup_at_kill), "retried": len(statuses),
            "retried_ok": sum(s == 200 for s in statuses)}


def make_study(root: Path, runs: Path, name: str) -> Path:
    """Long games for the load: every round for every player (no per-image rule), slots for everyone."""
    study = root / name
    create_study(study, [runs], CreateOptions(classes=CLASSES, gold=2, plays_per_round=10_000,
                                              rounds_per_player=10_000, one_round_per_image=False))
    return study


def backends() -> list[tuple[str, Any]]:
    """(label, cluster or None); PostgreSQL left out with a note if it cannot start."""
    found: list[tuple[str, Any]] = [("SQLite (WAL, synchronous=FULL)", None)]
    try:
        found.append(("PostgreSQL 15 (fsync, synchronous_commit on)", PostgresCluster.start_or_skip()))
    except BaseException as exc:  # pytest.skip raises a BaseException subclass outside pytest
        print(f"PostgreSQL unavailable: {exc}")
    return found


def synthesise_events(study: Path, events: int) -> dict[str, int]:
    """Fill the study's SQLite database with plays of six events each (start, 3 reveals, guess, describe) from
    participants of 10 plays, by bulk inserts (what the server would have written, without serving it)."""
    import random

    from sqlalchemy import insert

    from convlens.study.game.opening import open_runtime
    from convlens.study.store.db import Event, Participant, Play, utcnow

    runtime, engine = open_runtime(study, None, migrate=True)
    rounds = sorted(runtime.rounds)
    rng = random.Random(0)
    plays, people = events // 6, events // 60
    now = utcnow()
    with engine.begin() as connection:
        connection.execute(insert(Participant), [
            {"id": i + 1, "public_id": f"{i:016x}", "token_hash": f"{i:064x}", "nickname": f"=player {i}",
             "prolific_pid": f"pid{i:08d}", "consent_version": "1", "created_at": now, "score": 0, "plays": 10,
             "wins": 5, "gold_plays": 1, "gold_correct": 1, "quota": 10, "completed_at": now} for i in range(people)])
        for first in range(0, plays, 20_000):
            batch = range(first, min(plays, first + 20_000))
            connection.execute(insert(Play), [
                {"id": p + 1, "public_id": f"{p:024x}", "participant_id": p // 10 + 1,
                 "round_id": rounds[p % len(rounds)], "position": p % 10 + 1, "state": "win", "level": 3,
                 "guessed_class": CLASSES[0], "correct": True,
                 "score": 70, "description": f"stripes and {rng.choice(['ears', 'fur', '-wheels'])} {p}",
                 "language": "en", "description_screen": "level", "started_at": now, "ended_at": now + timedelta(
                     seconds=30)} for p in batch])
            rows = []
            for p in batch:
                for k, kind in enumerate(("start", "reveal", "reveal", "reveal", "guess", "describe")):
                    rows.append({"id": 6 * p + k + 1, "play_id": p + 1, "participant_id": p // 10 + 1,
                                 "round_id": rounds[p % len(rounds)], "type": kind, "level": min(k, 3),
                                 "screen": "level", "guessed_class": CLASSES[0] if kind == "guess" else None,
                                 "text": f"stripes and ears {p}" if kind == "describe" else None,
                                 "language": "en" if kind == "describe" else None, "request_id": str(uuid.uuid4()),
                                 "created_at": now})
            connection.execute(insert(Event), rows)
    engine.dispose()
    return {"participants": people, "plays": plays, "events": 6 * plays}


def export_run(study: Path, root: Path) -> list[list[str]]:
    from convlens.study.batch.export import export_study
    from convlens.study.game.opening import open_runtime

    rows = []
    for fmt in ("csv", "jsonl"):
        out = root / f"export-{fmt}"
        start = time.perf_counter()
        subprocess.run([CONVLENS, "study", "export", str(study), "--format", fmt, "--out", str(out)], check=True,
                       capture_output=True, timeout=3600)
        whole = time.perf_counter() - start
        shutil.rmtree(out)
        runtime, engine = open_runtime(study, None, migrate=False)
        start = time.perf_counter()
        export_study(engine, runtime.config, out, fmt)
        inside = time.perf_counter() - start
        engine.dispose()
        size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
        rows.append([fmt, f"{whole:.1f}", f"{inside:.1f}", f"{size:.0f}"])
        shutil.rmtree(out)
    return rows


COMPONENTS = (("sqlalchemy", "SQLAlchemy (ORM and Core: statements, unit of work, results)"),
              ("sqlite3", "sqlite3 (the C library: statements, commits)"),
              ("fastapi", "FastAPI (routing, request bodies, pydantic validation, JSON)"),
              ("pydantic", "FastAPI (routing, request bodies, pydantic validation, JSON)"),
              ("starlette", "Starlette (requests, responses, cookies, thread pool)"),
              ("anyio", "Starlette (requests, responses, cookies, thread pool)"),
              ("asgi_csrf", "CSRF (asgi-csrf, itsdangerous)"), ("itsdangerous", "CSRF (asgi-csrf, itsdangerous)"),
              ("limits", "rate limits (limits, convlens throttle)"),
              ("throttle", "rate limits (limits, convlens throttle)"),
              ("convlens", "convlens game logic, views, security headers, body limit"))


def _component(file: str, name: str) -> str:
    if "sqlite3" in name or "sqlite3" in file:
        return "sqlite3 (the C library: statements, commits)"
    for key, label in COMPONENTS:
        if f"/{key}/" in file or f"site-packages/{key}" in file or file.endswith(f"/{key}.py"):
            return label
    return "Python itself (stdlib, builtins, event loop)"


@contextlib.contextmanager
def _inline_threadpool() -> Any:
    """Run the synchronous endpoints and database calls on the event loop's thread (profiling only)."""
    import fastapi.routing
    import starlette.concurrency

    import convlens.study.web.pages
    import convlens.study.web.throttle

    async def inline(function: Any, /, *args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    modules = (fastapi.routing, starlette.concurrency, convlens.study.web.pages, convlens.study.web.throttle)
    saved = [module.run_in_threadpool for module in modules]
    for module in modules:
        module.run_in_threadpool = inline
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.run_in_threadpool = original


def profile_play(study: Path, plays: int) -> tuple[float, list[list[str]]]:
    """CPU per submission of whole plays driven in process through raw ASGI messages, and its profile."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _asgi import Browser
    from study.conftest import make_app

    app = make_app(study)

    async def run() -> tuple[float, int, cProfile.Profile]:
        browsers = [Browser(app) for _ in range(4)]
        for browser in browsers:
            await browser.join()
            await browser.play(CLASSES)

        async def one(i: int) -> int:
            done = await browsers[i % 4].play(CLASSES)
            if not done:  # that participant's quota is finished: a new one takes the place
                browsers[i % 4] = Browser(app)
                await browsers[i % 4].join()
                done = await browsers[i % 4].play(CLASSES)
            return done

        profiler = cProfile.Profile(time.process_time)
        start, submissions = time.process_time(), 0
        for i in range(plays):
            submissions += await one(i)
        cpu = (time.process_time() - start) / submissions
        with _inline_threadpool():  # cProfile sees one thread: run the endpoints there for the profile
            profiler.enable()
            for i in range(plays):
                await one(i)
            profiler.disable()
        return cpu, submissions, profiler

    cpu, _, profiler = asyncio.run(run())
    app.state.engine.dispose()
    totals: dict[str, float] = defaultdict(float)
    for (file, _, name), (_, _, own, _, _) in pstats.Stats(profiler).stats.items():
        totals[_component(file, name)] += own
    whole = sum(totals.values())
    ordered = sorted(totals.items(), key=lambda kv: -kv[1])
    rows = [[label, f"{100 * seconds / whole:.0f} %"] for label, seconds in ordered]
    return cpu, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--players", type=int, default=50)
    parser.add_argument("--submissions", type=int, default=100)
    parser.add_argument("--inserts", type=int, default=2000)
    parser.add_argument("--events", type=int, default=600_000)
    parser.add_argument("--quick", action="store_true", help="10 players x 20 submissions, 300 inserts, 60 k events")
    args = parser.parse_args()
    if args.quick:
        args.players, args.submissions, args.inserts, args.events = 10, 20, 300, 60_000
    load_before = os.getloadavg()
    rows, faults, starts, raw = [], [], [], {}
    with tempfile.TemporaryDirectory(prefix="bench-study-", dir=Path(__file__).parent) as tmp:
        root = Path(tmp)
        runs = write_inv_run(root / "inv", count=15)
        for workers in (1, 2):
            study = make_study(root, runs, f"start{workers}")
            for moment in ("first start (creates the database)", "restart"):
                found = start_up(study, workers)
                raw[f"start-up x{workers} {moment}"] = found
                memory = " / ".join(f"{m:.0f}" for m in found["rss_mb"])
                starts.append([workers, moment, f"{found['healthy_s']:.2f}", memory,
                               "yes" if found["torch_loaded"] else "no"])
        cpu, profile = profile_play(make_study(root, runs, "profile"), 200 if not args.quick else 50)
        raw["profile_cpu_ms"] = 1000 * cpu
        for label, cluster in backends():
            runs_of = [(1, args.players)] + ([(1, 10)] if args.players > 10 else [])
            runs_of += [] if cluster is None else [(2, args.players)]
            for workers, players in runs_of:
                study = make_study(root, runs, f"s{len(raw)}")
                db = None if cluster is None else cluster.new_database()
                url = db or f"sqlite:///{study / 'study.sqlite'}"
                LiveServer(study, db).start().kill()  # migrate and load the rounds before measuring
                bare = bare_insert_rate(url, args.inserts)
                load = load_run(study, db, url, players, args.submissions, workers)
                raw[f"{label} x{workers} {players} players"] = {"bare_inserts_per_s": bare, **load}
                rows.append([label, workers, players, f"{load['server_cpu_ms']:.2f} / {load['client_cpu_ms']:.2f}",
                             f"{load['images'] / max(1, load['acknowledged']):.2f}", f"{bare:.0f}",
                             f"{load['throughput']:.0f}", f"{load['throughput'] / bare:.2f}", f"{load['p50_ms']:.1f}",
                             f"{load['p95_ms']:.1f}", f"{load['acknowledged']}",
                             f"{load['lost']} / {load['duplicated']}"])
            fault_study = make_study(root, runs, f"f{len(faults)}")
            db = None if cluster is None else cluster.new_database()
            fault = fault_run(fault_study, db, db or f"sqlite:///{fault_study / 'study.sqlite'}", args.players,
                              args.submissions)
            raw[f"{label} fault"] = fault
            faults.append([label, fault["acknowledged_before_kill"], f"{fault['lost_after_restart']}",
                           f"{fault['duplicated']}", f"{fault['retried_ok']}/{fault['retried']}"])
            if cluster is not None:
                cluster.stop()
        export_study_dir = make_study(root, runs, "export")
        counts = synthesise_events(export_study_dir, args.events)
        exports = export_run(export_study_dir, root)
        raw["export"] = {"counts": counts, "rows": exports}
    load_after = os.getloadavg()
    print(json.dumps(raw, indent=2))
    body = "\n".join([
        "## Deep Reveal study server (`benchmarks/bench_study.py`)",
        "",
        machine_line() + f" · load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}",
        "",
        "### Start-up and memory (`convlens study serve`, SQLite)",
        "",
        "From launching the console script to the first healthy `/healthz` (goal <= 1.5 s), and the resident "
        "memory of each process after start (goal <= 150 MB per worker; with 2 workers: the parent, "
        "multiprocessing's resource tracker and the workers). The first start of a study creates its database "
        "(the newest schema at once); a restart finds the schema current; neither loads Alembic.",
        "",
        markdown_table(["workers", "start", "healthy after (s)", "resident MB per process", "torch loaded"], starts),
        "",
        "### Load: CPU per submission with its image requests, throughput, durability",
        "",
        f"{args.players} (and 10) concurrent simulated players x {args.submissions} submissions each (httpx + "
        "asyncio on the same machine as the server; every new image fetched as a browser does; each player "
        "registers first, which plans its quota), one server on loopback; every "
        "submission is one committed event. CPU: server (all processes) / client, milliseconds per "
        "acknowledged submission (goal: server <= 2 ms). *Bare* = one writer inserting one row per durable "
        "transaction into the same database with the same settings, measured just before the load.",
        "",
        markdown_table(["database", "workers", "players", "CPU ms / submission (server / client)",
                        "images / submission",
                        "bare inserts/s", "server submissions/s", "server / bare", "p50 ms", "p95 ms",
                        "acknowledged", "lost / duplicated"], rows),
        "",
        NOTE,
        "",
        f"Fault run: the same load, SIGKILL after {args.players * args.submissions // 2} acknowledged "
        "submissions, restart on the same database, each player's unanswered request retried with its "
        "request id:",
        "",
        markdown_table(["database", "acknowledged before the kill", "missing after restart", "duplicated",
                        "retries answered 200"], faults),
        "",
        f"### Export of {counts['events']:,} events ({counts['plays']:,} plays, {counts['participants']:,} "
        "participants; SQLite)",
        "",
        "`convlens study export` as a process (import, snapshot, every table, manifest with SHA-256; goal "
        "<= 20 s) and `export_study` in process.",
        "",
        markdown_table(["format", "command (s)", "in process (s)", "MB written"], exports),
        "",
        "### Where the time goes: a profile of one play",
        "",
        f"Whole plays (start, two reveals, guess, description; four image requests) driven in process through "
        f"raw ASGI messages, no HTTP client and no HTTP parsing: {1000 * raw['profile_cpu_ms'] / 1000:.2f} ms of CPU "
        "per submission. Share of the profiled CPU by component (own time of the functions, cProfile with a "
        "CPU clock):",
        "",
        markdown_table(["component", "share"], profile),
    ])
    write_section("study", body)


if __name__ == "__main__":
    main()
