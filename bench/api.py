"""HTTP API under load: the polling read against a hello-world app, and a burst of idempotent submissions.

    python -m bench.api              # 2 uvicorn workers per app, 32 clients, 10 s per target, 500 POSTs
    python -m bench.api --strict     # exit 1 when a target is missed

Both apps run as `uvicorn --workers 2 --no-access-log` on 127.0.0.1, in this run, loaded by wrk (Debian
`wrk`; a Lua script adds the key and reports exact percentiles). The API runs with production settings
against its own PostgreSQL database (`distill_bench`, migrated, dropped at the end), local object storage
in a temp folder, and a Celery broker on Redis db 13 that nobody consumes (flushed at the end).
The measured time per target is split into rounds run hello, api, api, hello, ...: the machine is shared,
so drift hits both alike. Targets:
  read    `GET /v1/jobs/{id}` throughput >= 40% of hello-world's, and its p99 <= 2x hello-world's p99;
  submit  500 distinct Idempotency-Keys, each POSTed twice at once (1000 requests in flight; any answer
          other than 200/201 is retried on the same key) create exactly 500 job rows and 500 broker messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import redis
from sqlalchemy import create_engine

from app.db import migrate
from app.db.session import Database, session_scope
from app.tenants import service as tenants

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"
DB_NAME = "distill_bench"
BROKER = "redis://127.0.0.1:6379/13"
HOST = "127.0.0.1"

WRK_LUA = """
wrk.headers["Authorization"] = "%s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests":%%d,"duration_us":%%d,"socket_errors":%%d,"status_errors":%%d,'
    .. '"p50_us":%%d,"p99_us":%%d}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(99)))
end
"""


# ---- setup ---------------------------------------------------------------------------------------------


def _admin() -> psycopg.Connection:
    return psycopg.connect(PG.replace("+psycopg", "") + "/test", autocommit=True)


def create_database() -> str:
    """A fresh migrated database with one tenant; returns its URL."""
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    url = f"{PG}/{DB_NAME}"
    migrate.upgrade(url)
    return url


def create_key(url: str) -> str:
    db = Database(create_engine(url, pool_size=1))
    try:
        with session_scope(db) as session:
            return tenants.create_key(session, "bench")
    finally:
        db.dispose()


def drop_database() -> None:
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@contextmanager
def uvicorn(target: str, workers: int, env: dict[str, str], log: Path, *, factory: bool) -> Iterator[str]:
    """Serve `target` until the block ends; yields the base URL once `/healthz` answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", target, "--host", HOST, "--port", str(port),
           "--workers", str(workers), "--no-access-log", "--log-level", "warning"]
    if factory:
        cmd.append("--factory")
    with log.open("wb") as out:
        # Its own process group, so the workers go down with the supervisor.
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://{HOST}:{port}"
    try:
        _wait_ready(base, proc, log)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{base} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{base} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def seed(base: str, headers: dict[str, str]) -> dict[str, object]:
    """Upload a teacher and a dataset through the API; the returned job body refers to them."""
    ids = {}
    for purpose in ("teacher", "dataset"):
        r = httpx.post(f"{base}/v1/files", params={"purpose": purpose, "filename": f"{purpose}.bin"},
                       content=secrets.token_bytes(4096), headers=headers, timeout=30)
        r.raise_for_status()
        ids[purpose] = r.json()["id"]
    return {"teacher_file_ids": [ids["teacher"]], "dataset_file_id": ids["dataset"]}


# ---- the read path -------------------------------------------------------------------------------------


def wrk(url: str, auth: str, seconds: float, connections: int, folder: Path) -> dict[str, float]:
    script = folder / "bench.lua"
    script.write_text(WRK_LUA % auth)
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + 30, check=True,
    ).stdout
    result = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def read_benchmark(targets: dict[str, str], auth: str, seconds: float, connections: int, rounds: int,
                   folder: Path) -> dict[str, list[dict[str, float]]]:
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    order = list(targets)
    for i in range(rounds):
        for name in order if i % 2 == 0 else order[::-1]:
            runs[name].append(wrk(targets[name], auth, seconds / rounds, connections, folder))
    return runs


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    requests = sum(r["requests"] for r in runs)
    return {
        "requests": requests,
        "rps": requests / sum(r["duration_us"] / 1e6 for r in runs),
        "p50_ms": sum(r["p50_us"] for r in runs) / len(runs) / 1000,
        "p99_ms": sum(r["p99_us"] for r in runs) / len(runs) / 1000,
        "errors": sum(r["socket_errors"] + r["status_errors"] for r in runs),
    }


# ---- the submission burst ------------------------------------------------------------------------------


async def _submit(client: httpx.AsyncClient, body: dict, key: str, attempts: Counter) -> int:
    for attempt in range(20):
        attempts["sent"] += 1
        try:
            r = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        except httpx.TransportError:
            attempts["transport_error"] += 1
        else:
            if r.status_code in (200, 201):
                return r.status_code
            attempts[f"http_{r.status_code}"] += 1
        await asyncio.sleep(0.05 * 2 ** min(attempt, 5))
    raise RuntimeError(f"key {key} never succeeded: {attempts}")


async def burst(base: str, auth: str, body: dict, jobs: int, copies: int, timeout: float
                ) -> tuple[Counter, Counter, float]:
    """Every key sent `copies` times at once. Connections are spread over small clients: one httpx pool
    of 1000 connections spends more CPU on its own bookkeeping than the server spends answering."""
    attempts: Counter = Counter()
    clients = [httpx.AsyncClient(base_url=base, headers={"Authorization": auth}, timeout=60,
                                 limits=httpx.Limits(max_connections=50, max_keepalive_connections=50))
               for _ in range(max(1, jobs * copies // 50))]
    start = time.perf_counter()
    try:
        requests = [_submit(clients[i % len(clients)], body, f"bench-{n:04d}", attempts)
                    for i, (n, _) in enumerate((n, c) for n in range(jobs) for c in range(copies))]
        statuses = await asyncio.wait_for(asyncio.gather(*requests), timeout)
    except TimeoutError:
        statuses = []
        attempts["unfinished_after_timeout"] += 1
    finally:
        elapsed = time.perf_counter() - start
        for client in clients:
            await client.aclose()
    return Counter(statuses), attempts, elapsed


def count_jobs(prefix: str) -> int:
    with psycopg.connect(PG.replace("+psycopg", "") + f"/{DB_NAME}") as conn:
        return conn.execute("SELECT count(*) FROM jobs WHERE idempotency_key LIKE %s", (prefix + "%",)
                            ).fetchone()[0]


# ---- report --------------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, float]]], statuses: Counter,
           attempts: Counter, burst_s: float, rows: int, messages: int) -> bool:
    hello_s, api_s = summarise(runs["hello"]), summarise(runs["api"])
    print(f"GET at {args.connections} clients, {args.workers} uvicorn workers each, "
          f"{args.seconds:g} s per target in {args.rounds} rounds")
    print(f"{'target':<28}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'requests':>10}{'errors':>8}")
    for name, s in (("hello-world GET /hello", hello_s), ("api GET /v1/jobs/{id}", api_s)):
        print(f"{name:<28}{s['rps']:>10.0f}{s['p50_ms']:>10.2f}{s['p99_ms']:>10.2f}"
              f"{s['requests']:>10.0f}{s['errors']:>8.0f}")
    for name in runs:
        print(f"  rounds {name}: " + ", ".join(f"{r['rps']:.0f} req/s p99 {r['p99_us'] / 1000:.1f} ms"
                                             for r in runs[name]))
    throughput = api_s["rps"] / hello_s["rps"]
    p99 = api_s["p99_ms"] / hello_s["p99_ms"]
    checks = {
        f"throughput api/hello {throughput:6.1%}  (>= 40%)": throughput >= 0.40,
        f"p99 api/hello        {p99:6.2f}x (<= 2x)": p99 <= 2.0,
        f"no errors in the GET runs ({api_s['errors'] + hello_s['errors']:.0f})":
            api_s["errors"] + hello_s["errors"] == 0,
        f"{args.posts} keys x {args.copies} concurrent POSTs -> {rows} job rows (== {args.posts})":
            rows == args.posts,
        f"broker messages {messages} (== {args.posts})": messages == args.posts,
        f"the burst finished within {args.burst_timeout:g} s ({burst_s:.0f} s)":
            not attempts["unfinished_after_timeout"],
    }
    retried = {k: v for k, v in attempts.items() if k not in ("sent", "unfinished_after_timeout")}
    # A retry after a lost answer may find its own first attempt's job (200, not 201): the rows are the test.
    print(f"POST burst: {attempts['sent']} requests in {burst_s:.1f} s; final answers 201 x {statuses[201]}, "
          f"200 x {statuses[200]}; answers retried: {retried or 'none'}")
    for line, ok in checks.items():
        print(f"{verdict(ok)}  {line}")
    return all(checks.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds per target (all rounds)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--posts", type=int, default=500)
    parser.add_argument("--copies", type=int, default=2, help="concurrent sends of each idempotency key")
    parser.add_argument("--burst-timeout", type=float, default=240,
                        help="seconds before the POST burst counts as stuck")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (path printed)")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")

    folder = Path(tempfile.mkdtemp(prefix="distill-bench-api-"))
    broker = redis.Redis.from_url(BROKER)
    try:
        url = create_database()
        key = create_key(url)
        auth = f"Bearer {key}"
        env = {
            "DISTILL_ENVIRONMENT": "production",
            "DISTILL_DATABASE_URL": url,
            "DISTILL_BROKER_URL": BROKER,
            "DISTILL_DATA_DIR": str(folder / "data"),
            "DISTILL_STORAGE_PATH": str(folder / "objects"),
            "DISTILL_WEBHOOK_SECRET": secrets.token_hex(32),
            # The burst is one tenant's 500 queued jobs; the per-tenant caps would answer 429 by design.
            "DISTILL_MAX_ACTIVE_JOBS_PER_TENANT": str(10 * args.posts),
            "DISTILL_MAX_QUEUED_JOBS_PER_TENANT": str(10 * args.posts),
        }
        with (uvicorn("app.main:create_app", args.workers, env, folder / "api.log", factory=True) as api,
              uvicorn("bench.api_hello:app", args.workers, {}, folder / "hello.log", factory=False) as hello):
            headers = {"Authorization": auth}
            body = seed(api, headers)
            r = httpx.post(f"{api}/v1/jobs", json=body, headers=headers, timeout=30)
            r.raise_for_status()
            job_id = r.json()["id"]
            check = httpx.get(f"{api}/v1/jobs/{job_id}", headers=headers, timeout=30)
            assert check.status_code == 200 and check.json()["id"] == job_id, check.text
            targets = {"hello": f"{hello}/hello", "api": f"{api}/v1/jobs/{job_id}"}
            runs = read_benchmark(targets, auth, args.seconds, args.connections, args.rounds, folder)
            broker.flushdb()  # count only the burst's messages
            statuses, attempts, burst_s = asyncio.run(
                burst(api, auth, body, args.posts, args.copies, args.burst_timeout)
            )
        rows = count_jobs("bench-")
        messages = broker.llen("soft_label")
    finally:
        broker.flushdb()
        broker.close()
        drop_database()
        if args.keep_logs:
            print(f"logs: {folder}/api.log {folder}/hello.log")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    passed = report(args, runs, statuses, attempts, burst_s, rows, messages)
    print("overall:", verdict(passed))
    return 1 if args.strict and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
