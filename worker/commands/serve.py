"""`distill serve` (API + worker, one command on a laptop) and `distill worker` (one process per GPU).

On the embedded default everything lives under ./.distill: the SQLite database, the object folder, the broker
file and, created on first start, a local API key. `serve` migrates the database itself, then runs uvicorn
and a Celery worker as child processes and stops both when either ends or on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

LOCAL_TENANT = "local"
KEY_FILE = "api_key"
STOP_GRACE_S = 30.0


def migrate() -> None:
    """`alembic upgrade head` on the configured database (idempotent)."""
    from app.config import get_settings
    from app.db import migrate as migrations

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.database_url)


def ensure_local_key() -> tuple[str, Path, bool]:
    """The local tenant's key from `<data_dir>/api_key`, creating it (file mode 0600) when absent or stale."""
    from app.config import get_settings
    from app.db import Database, session_scope
    from app.tenants import service as tenants
    from app.tenants.exceptions import Unauthorized

    settings = get_settings()
    path = settings.data_dir / KEY_FILE
    db = Database.from_settings(settings)
    try:
        if path.is_file():
            key = path.read_text().strip()
            try:
                with session_scope(db) as session:
                    tenants.authenticate(session, key)
                return key, path, False
            except Unauthorized:
                pass  # the database was reset: the stored key no longer exists
        with session_scope(db) as session:
            key = tenants.create_key(session, LOCAL_TENANT)
    finally:
        db.dispose()
    tmp = path.with_name(f".{KEY_FILE}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    os.replace(tmp, path)
    return key, path, True


def worker_argv(queues: str, concurrency: int, pool: str, loglevel: str) -> list[str]:
    from worker.celery_app import QUEUES

    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(names) - set(QUEUES))
    if not names or unknown:
        raise typer.BadParameter(
            f"unknown queue(s) {unknown}; known: {', '.join(QUEUES)}", param_hint="--queues"
        )
    # Gossip and mingle need broadcast, which the embedded broker lacks; no feature here depends on them.
    return [
        "worker",
        f"--queues={','.join(names)}",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
        f"--hostname=distill-{os.getpid()}@%h",
    ]


def worker(
    queues: Annotated[str, typer.Option(help="comma-separated: soft_label, distill")] = "soft_label,distill",
    concurrency: Annotated[int, typer.Option(min=1, help="tasks at once; keep 1 per GPU")] = 1,
    pool: Annotated[str, typer.Option(help="threads (default) or prefork; stages run in their own child")] = (
        "threads"
    ),
    loglevel: Annotated[str, typer.Option()] = "info",
    check_sandbox: Annotated[
        bool, typer.Option("--check-sandbox", help="only say whether user models can be sandboxed here")
    ] = False,
    procs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="processes a distill stage trains on, data-parallel: one per GPU, or CPU processes "
            "(default: DISTILL_WORKER_PROCS, else 1)",
        ),
    ] = None,
) -> None:
    """Run one Celery worker process. Production: one per GPU (CUDA_VISIBLE_DEVICES picks it), or one per
    host with `--procs` GPUs each distill stage trains on together."""
    if procs is not None:
        _set_procs(procs)
    ok = sandbox_ready()
    if check_sandbox or not ok:
        # Fail closed: a worker that cannot sandbox user models does not take jobs at all.
        raise typer.Exit(0 if ok else 1)
    from worker.celery_app import start_worker

    start_worker(worker_argv(queues, concurrency, pool, loglevel))


def _set_procs(procs: int) -> None:
    """`--procs` as the setting it stands for: the worker's settings (and so every task's context) read it
    from the environment, like the rest of them."""
    from app.config import get_settings

    os.environ["DISTILL_WORKER_PROCS"] = str(procs)
    get_settings.cache_clear()


def sandbox_ready() -> bool:
    """Start one sandboxed stage child; say how user models will be confined (stderr). False: they cannot."""
    from app.config import get_settings
    from worker.sandbox import SandboxUnavailable
    from worker.supervisor import check_sandbox
    from worker.tasks.context import sandbox_from

    sandbox = sandbox_from(get_settings())
    if not sandbox.confined:
        typer.echo(
            "sandbox: OFF (DISTILL_SANDBOX=off): user models run with this worker's files and user; "
            "unsafe with more than one tenant",
            err=True,
        )
        return True
    try:
        check_sandbox(sandbox)
    except SandboxUnavailable as exc:
        typer.echo(f"sandbox: UNAVAILABLE: {exc}", err=True)
        return False
    typer.echo("sandbox: bwrap (user models see only their job's folder, as uid 65534, no network)", err=True)
    return True


def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_only: Annotated[
        bool, typer.Option("--api-only", help="no worker (run `distill worker` elsewhere)")
    ] = False,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes")] = 1,
    queues: Annotated[str, typer.Option(help="queues of the embedded worker")] = "soft_label,distill",
    run_migrations: Annotated[
        bool, typer.Option("--migrate/--no-migrate", help="alembic upgrade head first")
    ] = True,
) -> None:
    """Start the API and a worker together (the embedded default needs no other server)."""
    from app.config import get_settings

    settings = get_settings()
    if run_migrations:
        migrate()
    if settings.environment == "development":
        _, path, created = ensure_local_key()
        typer.echo(f"API key {'created and stored' if created else 'stored'} in {path.resolve()}", err=True)
    commands = [
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
    ]
    if not api_only:
        commands.append([sys.executable, "-m", "worker.cli", "worker", "--queues", queues])
    typer.echo(
        f"distill API on http://{host}:{port} ({'API only' if api_only else 'API + worker'})", err=True
    )
    raise typer.Exit(_run_together(commands))


def _run_together(commands: list[list[str]]) -> int:
    """Run the commands as children; when one ends or we are told to stop, stop the rest; return a status."""
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    procs = [subprocess.Popen(cmd) for cmd in commands]
    try:
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # warm shutdown: the worker's running stage checkpoints
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # Asked to stop: a clean exit. A child that ended on its own took the service down with it: a failure.
    return 0 if stopping else 1


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("worker")(worker)
