"""Real child processes for the tests: a free port, the environment a child gets, starting one with its
output in a log file, stopping it (SIGTERM, then SIGKILL), waiting for a condition or a health URL, finding
the stage child a task in this process started, and a Redis server of the test's own."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port nothing listens on now (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: ours minus any DISTILL_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def distill(*args: str) -> list[str]:
    """The command line of `distill <args>`, run by this interpreter."""
    return [sys.executable, "-m", "worker.cli", *args]


def start(
    args: list[str], *, cwd: Path, env: dict[str, str], log: Path, new_session: bool = False
) -> subprocess.Popen[bytes]:
    """`args` in the background, stdout and stderr into `log`; `new_session` puts it in a process group of
    its own, so that `stop` and `kill_group` reach its children too."""
    with log.open("wb") as out:  # the child holds its own copy of the descriptor
        return subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=new_session
        )


def stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> int:
    """SIGTERM, then SIGKILL after `grace` seconds (to the whole group when the process leads one); the
    exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            proc.wait()
    return proc.returncode


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """`sig` to the process group `proc` leads (started with `new_session`), as losing the machine would."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(20)


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """`check()` every `every` seconds until it returns something true, which is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 60.0) -> None:
    """Until `url`/healthz answers 200; fails with the end of `log` if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"server exited early:\n{log.read_text()[-3000:]}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        assert time.monotonic() < deadline, f"server not up after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


@contextlib.contextmanager
def serving(
    args: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    port: int,
    log: Path,
    timeout: float = 60.0,
    new_session: bool = False,
) -> Iterator[subprocess.Popen[bytes]]:
    """A server process on `port`, yielded once /healthz answers; stopped with SIGTERM (40 s grace)."""
    proc = start(args, cwd=cwd, env=env, log=log, new_session=new_session)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", log, timeout)
        yield proc
    finally:
        stop(proc, grace=40)


@dataclass(frozen=True)
class StageProcess:
    """The interpreter that runs a stage, seen from the host (inside the sandbox its pid is 2)."""

    pid: int

    def is_alive(self) -> bool:
        try:
            return _stat(self.pid)[0] not in ("Z", "X")
        except OSError:
            return False


def _stat(pid: int) -> tuple[str, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])  # state, parent pid


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        pid = _stat(pid)[1]
        if pid == ancestor:
            return True
    return False


def stage_children(ancestor: int) -> list[StageProcess]:
    """The stage children running now under process `ancestor` (a worker): the Pythons worker.supervisor
    started, not the bwrap around them."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if (
                proc.name.isdigit()
                and b"worker.stage_child" in b" ".join(argv)
                and not argv[0].endswith(b"bwrap")
                and _descends_from(int(proc.name), ancestor)
            ):
                found.append(StageProcess(int(proc.name)))
        except OSError:
            continue
    return found


def stage_child(timeout: float = 60) -> StageProcess:
    """This test process's stage child: the Python started by worker.supervisor (not the bwrap around it)."""
    return wait_until(lambda: next(iter(stage_children(os.getpid())), None), timeout, "a stage process", 0.05)


def run_in_thread(fn: Callable[..., Any], *args: Any) -> threading.Thread:
    """`fn(*args)` in a daemon thread, started."""
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    return thread


class RedisServer:
    """`redis-server` on a free port, no persistence: a restart loses every message, the harshest case."""

    def __init__(self, folder: Path) -> None:
        self.port, self.folder = free_port(), folder
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        options = {
            "--port": self.port,
            "--bind": "127.0.0.1",
            "--save": "",
            "--appendonly": "no",
            "--dir": self.folder,
        }
        args = ["redis-server", *(str(part) for item in options.items() for part in item)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, 10, "redis-server to answer")

    def _answers(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
