"""Deep Reveal study server under load: throughput and latency vs the bare rate of durable inserts.

For SQLite (file, WAL, synchronous=FULL) and PostgreSQL (a throw-away cluster, fsync on, synchronous
commit), in one run:

1. bare durable inserts: one writer, one row per committed transaction, into the same database with the
   same engine settings as the server — the rate the storage allows for one acknowledged write;
2. the real server (``python -m convlens.study.web.server``, uvicorn, loopback) under 50 concurrent
   simulated players x 100 submissions (httpx + asyncio: each submission is one start / reveal / guess /
   describe / resign, i.e. one committed event); throughput, p50/p95 latency, and the database checked
   for lost or duplicated submissions; ratio server / bare (goal >= 0.5);
3. the fault run: the same load, the server SIGKILLed after half of the submissions were acknowledged,
   restarted, unanswered requests retried with their request ids; acknowledged submissions missing or
   duplicated after the restart (goal 0).

Client and server share the machine's cores (and other developers' jobs): the load average is reported.

Usage: python benchmarks/bench_study.py [--players 50] [--submissions 100] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _sections import machine_line, markdown_table, write_section

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from convlens.study.batch.create import CreateOptions, create_study
from study.conftest import CLASSES, write_inv_run
from study.helpers import LiveServer, PostgresCluster, lost_and_duplicated, run_load

NOTE = (
    "Reading: the simulated players have no think time, so all of them queue on one durable writer and the "
    "latency is mostly waiting (p50 ≈ players / throughput, Little's law); a person needs seconds per action, "
    "so this load stands for hundreds of simultaneous players. The ratio depends on the disk: where a durable "
    "commit is slow (a busy disk: a few ms per fsync) the server keeps up with a good share of the bare rate; "
    "where it is fast (well under a millisecond) the bare writer, which does nothing else, runs thousands of "
    "commits per second, and the server is bound by its CPU per submission (HTTP, CSRF and rate-limit "
    "middleware, request validation, the session and round checks, the ORM transaction), paid on the same 2 "
    "cores as the load generator's (the CPU column: CPU milliseconds per acknowledged submission)."
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (uvicorn's worker processes)."""
    import psutil

    processes = [psutil.Process(pid)]
    processes += processes[0].children(recursive=True)
    return sum(sum(process.cpu_times()[:2]) for process in processes)


def load_run(study: Path, db: str | None, url: str, players: int, submissions: int, workers: int) -> dict[str, Any]:
    server = LiveServer(study, db, workers=workers).start()
    try:
        server_cpu, client_cpu = _cpu_seconds(server.process.pid), time.process_time()
        result, _, _ = asyncio.run(run_load(server.url, players, submissions, CLASSES))
        server_cpu, client_cpu = _cpu_seconds(server.process.pid) - server_cpu, time.process_time() - client_cpu
    finally:
        server.kill()
    lost, duplicated, _ = lost_and_duplicated(url, result)
    acknowledged = max(1, len(result.acknowledged))
    return {"acknowledged": len(result.acknowledged), "failures": len(result.failures), "lost": len(lost),
            "duplicated": len(duplicated), "throughput": len(result.acknowledged) / result.elapsed,
            "p50_ms": 1000 * result.percentile(50), "p95_ms": 1000 * result.percentile(95),
            "server_cpu_ms": 1000 * server_cpu / acknowledged, "client_cpu_ms": 1000 * client_cpu / acknowledged}


def fault_run(study: Path, db: str | None, url: str, players: int, submissions: int) -> dict[str, Any]:
    server = LiveServer(study, db).start()

    async def load_then_kill() -> tuple:
        result, tasks, clients = await run_load(server.url, players, 10**6, CLASSES,
                                                stop_after=players * submissions // 2)
        server.kill()
        await asyncio.gather(*tasks)
        return result, clients

    import httpx

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--players", type=int, default=50)
    parser.add_argument("--submissions", type=int, default=100)
    parser.add_argument("--inserts", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="10 players x 20 submissions, 300 inserts")
    args = parser.parse_args()
    if args.quick:
        args.players, args.submissions, args.inserts = 10, 20, 300
    load_before = os.getloadavg()
    rows, faults, raw = [], [], {}
    with tempfile.TemporaryDirectory(prefix="bench-study-", dir=Path(__file__).parent) as tmp:
        root = Path(tmp)
        runs = write_inv_run(root / "inv", count=15)
        for label, cluster in backends():
            for workers in ((1,) if cluster is None else (1, 2)):
                study = make_study(root, runs, f"s{len(raw)}")
                db = None if cluster is None else cluster.new_database()
                url = db or f"sqlite:///{study / 'study.sqlite'}"
                LiveServer(study, db).start().kill()  # migrate and load the rounds before measuring
                bare = bare_insert_rate(url, args.inserts)
                load = load_run(study, db, url, args.players, args.submissions, workers)
                raw[f"{label} x{workers}"] = {"bare_inserts_per_s": bare, **load}
                rows.append([label, workers, f"{bare:.0f}", f"{load['throughput']:.0f}",
                             f"{load['throughput'] / bare:.2f}", f"{load['p50_ms']:.1f}", f"{load['p95_ms']:.1f}",
                             f"{load['server_cpu_ms']:.1f} / {load['client_cpu_ms']:.1f}", f"{load['acknowledged']}",
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
    load_after = os.getloadavg()
    print(json.dumps(raw, indent=2))
    body = "\n".join([
        "## Deep Reveal study server (`benchmarks/bench_study.py`)",
        "",
        machine_line() + f" · load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}",
        "",
        f"{args.players} concurrent simulated players x {args.submissions} submissions (httpx + asyncio on "
        "the same machine as the server), one uvicorn server on loopback; every submission is one "
        "committed event. *Bare* = one writer inserting one row per durable transaction into the same "
        "database with the same settings, measured just before the load.",
        "",
        markdown_table(["database", "workers", "bare inserts/s", "server submissions/s", "server / bare",
                        "p50 ms", "p95 ms", "CPU ms / submission (server / client)", "acknowledged",
                        "lost / duplicated"], rows),
        "",
        NOTE,
        "",
        f"Fault run: the same load, SIGKILL after {args.players * args.submissions // 2} acknowledged "
        "submissions, restart on the same database, each player's unanswered request retried with its "
        "request id:",
        "",
        markdown_table(["database", "acknowledged before the kill", "missing after restart", "duplicated",
                        "retries answered 200"], faults),
    ])
    write_section("study", body)


if __name__ == "__main__":
    main()
