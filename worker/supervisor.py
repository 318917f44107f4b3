"""Runs the core's stages in a spawned child process and watches it from the task.

Why a child: user models are loaded and run only there, so a crash, an out-of-memory kill or hostile code
costs one attempt, never the worker; the child starts from a fresh interpreter (spawn, not fork) with an
environment holding no credentials and, where Linux lets us, no network. The child talks back with JSON
only: the parent never unpickles anything the child (and so a user's model) could have written.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from worker.distill.errors import DistillError

# step(work, config, on_progress) -> a JSON-able result; must be a module-level function (spawn imports it).
Step = Callable[[Path, dict[str, Any], Callable[[dict[str, Any]], None]], Any]
StopReason = Callable[[], str | None]

# Only what a Python/PyTorch process needs to run; everything else (DISTILL_*, AWS_*, tokens) stays behind.
SAFE_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "USER",
        "LOGNAME",
        "PYTHONHASHSEED",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
    }
)
SAFE_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "OMP_", "MKL_", "OPENBLAS_", "PYTORCH_")
MAX_MESSAGE_BYTES = 1 << 20
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
_ENVIRON_LOCK = threading.Lock()


class StageCrashed(Exception):
    """The child died without reporting (signal, hard exit): one attempt is lost; the job may be retried."""

    def __init__(self, code: str, message: str, exitcode: int | None) -> None:
        super().__init__(message)
        self.code, self.message, self.exitcode = code, message, exitcode


class StageError(Exception):
    """The child raised something that is not a DistillError: a bug or a model that breaks at run time."""

    def __init__(self, code: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.detail = code, message, detail


class StageStopped(Exception):
    """The parent stopped the child on purpose (`reason`: e.g. "cancelled", "timeout", "shutdown")."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"stage stopped: {reason}")
        self.reason = reason


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k in SAFE_ENV_NAMES or k.startswith(SAFE_ENV_PREFIXES)}


@contextlib.contextmanager
def _scrubbed_environ() -> Iterator[None]:
    """multiprocessing has no `env=` argument and spawn execs with the process environment, so the
    environment is swapped for the instant of the fork+exec. Held under a lock; workers run one task a
    process, and nothing else in a worker reads credentials from the environment after startup."""
    with _ENVIRON_LOCK:
        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update(child_env(saved))
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)


def run_steps(
    steps: Sequence[tuple[str, Step]],
    work: Path,
    config: dict[str, Any],
    *,
    on_message: Callable[[dict[str, Any]], None],
    should_stop: StopReason,
    stop_check_interval: float = 1.0,
    stop_grace: float = 5.0,
    isolate_network: bool = True,
) -> dict[str, Any]:
    """Run `steps` in order in one child process; return `{step name: result}`.

    `on_message` gets `{"type": "stage", "name"}` when a step starts and `{"type": "progress", "event"}`
    for each progress event. `should_stop()` is asked about once per `stop_check_interval`; a reason stops
    the child (SIGTERM, then SIGKILL after `stop_grace`) and raises StageStopped. Raises DistillError as the
    child raised it, StageError for any other exception there, StageCrashed when the child dies silently.
    """
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child_main,
        name="distill-stage",
        daemon=True,
        args=(sender, list(steps), str(work), config, isolate_network),
    )
    with _scrubbed_environ():
        proc.start()
    sender.close()  # so that the child's death reads as EOF here
    results: dict[str, Any] = {}
    next_check = 0.0
    try:
        while True:
            if time.monotonic() >= next_check:
                reason = should_stop()
                if reason:
                    _stop(proc, stop_grace, receiver)
                    raise StageStopped(reason)
                next_check = time.monotonic() + stop_check_interval
            if not receiver.poll(min(0.2, stop_check_interval)):
                continue
            try:
                msg = json.loads(receiver.recv_bytes(MAX_MESSAGE_BYTES))
            except (EOFError, OSError):
                break
            kind = msg.get("type")
            if kind in ("stage", "progress"):
                on_message(msg)
            elif kind == "result":
                results[msg["name"]] = msg.get("value")
            elif kind == "done":
                proc.join(stop_grace)
                return results
            elif kind == "error":
                proc.join(stop_grace)
                raise DistillError(msg["message"], code=msg["code"], field=msg.get("field"))
            elif kind == "exception":
                proc.join(stop_grace)
                raise StageError(msg["code"], msg["message"], msg.get("traceback", ""))
        proc.join(stop_grace)
        raise _crash(proc.exitcode)
    finally:
        receiver.close()
        if proc.is_alive():
            _stop(proc, stop_grace)


def _crash(exitcode: int | None) -> StageCrashed:
    if exitcode is not None and exitcode < 0:
        sig = signal.Signals(-exitcode).name
        if -exitcode == signal.SIGKILL:
            return StageCrashed(
                "stage_killed",
                "the stage process was killed (SIGKILL), most often by the "
                "kernel's out-of-memory killer: try a smaller batch_size or student",
                exitcode,
            )
        return StageCrashed("stage_crashed", f"the stage process died from signal {sig}", exitcode)
    return StageCrashed(
        "stage_crashed", f"the stage process exited with status {exitcode} without a result", exitcode
    )


def _stop(proc: multiprocessing.process.BaseProcess, grace: float, receiver: Any = None) -> None:
    """SIGTERM, then SIGKILL after `grace`. Meanwhile the child's messages are read and dropped: a child
    blocked writing to a full pipe could never reach its stop check and would always be killed."""
    proc.terminate()
    deadline = time.monotonic() + grace
    while receiver is not None and proc.is_alive() and time.monotonic() < deadline:
        try:
            if receiver.poll(0.05):
                receiver.recv_bytes(MAX_MESSAGE_BYTES)
        except (EOFError, OSError):
            break
    proc.join(max(0.0, deadline - time.monotonic()))
    if proc.is_alive():
        proc.kill()
        proc.join()


def _isolate_network() -> bool:
    """A new, empty network namespace (loopback down): a user's model cannot reach the DB, broker or cloud
    metadata. Needs root or unprivileged user namespaces; without either the child runs as before."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.unshare(CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0


def _child_main(
    conn: Any, steps: list[tuple[str, Step]], work: str, config: dict[str, Any], isolate_network: bool
) -> None:
    def send(msg: dict[str, Any]) -> None:
        conn.send_bytes(json.dumps(msg, default=str).encode())

    isolated = _isolate_network() if isolate_network else False
    try:
        for name, step in steps:
            send({"type": "stage", "name": name, "network_isolated": isolated})
            value = step(Path(work), config, lambda event: send({"type": "progress", "event": event}))
            send({"type": "result", "name": name, "value": value})
        send({"type": "done"})
    except DistillError as exc:
        send({"type": "error", **exc.to_dict()})
    except MemoryError:
        send(
            {
                "type": "exception",
                "code": "out_of_memory",
                "message": "the stage ran out of memory: try a smaller batch_size or student",
            }
        )
    except Exception as exc:  # anything else is reported, with its traceback, as one failed stage
        send(
            {
                "type": "exception",
                "code": "stage_error",
                "message": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        )
    finally:
        conn.close()
