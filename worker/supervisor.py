"""Runs the core's stages in a sandboxed child process and watches it from the task.

Why a child: user models are loaded and run only there, so a crash, an out-of-memory kill or hostile code
costs one attempt, never the worker. The child is a fresh interpreter inside bubblewrap (worker/sandbox.py:
it sees the system, the interpreter and the project's packages read-only, and writes only the job's scratch
folder), with an environment holding no credentials and no network. It talks back with JSON only
(worker/stage_child.py): the parent never unpickles anything the child, and so a user's model, wrote.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from worker.distill.errors import DistillError
from worker.sandbox import Sandbox, SandboxUnavailable
from worker.stage_child import BOOTSTRAP, HEADER

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
PROBE_TIMEOUT_S = 60.0


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
    """The parent stopped the child on purpose (`reason`: e.g. "cancelled", "timeout", "shutdown").
    `exitcode`: 0 when the child ended through its own stop hook, negative for a signal (as Popen's)."""

    def __init__(self, reason: str, exitcode: int | None = None) -> None:
        super().__init__(f"stage stopped: {reason}")
        self.reason, self.exitcode = reason, exitcode


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k in SAFE_ENV_NAMES or k.startswith(SAFE_ENV_PREFIXES)}


def run_steps(
    steps: Sequence[tuple[str, Step]],
    work: Path,
    config: dict[str, Any],
    *,
    sandbox: Sandbox,
    on_message: Callable[[dict[str, Any]], None],
    should_stop: StopReason,
    stop_check_interval: float = 1.0,
    stop_grace: float = 5.0,
) -> dict[str, Any]:
    """Run `steps` in order in one sandboxed child process; return `{step name: result}`.

    `on_message` gets `{"type": "stage", "name", "sandbox", "network_isolated"}` when a step starts and
    `{"type": "progress", "event"}` for each progress event. `should_stop()` is asked about once per
    `stop_check_interval`; a reason stops the child ("stop" on its stdin, which it turns into a SIGTERM to
    itself; SIGKILL after `stop_grace`) and raises StageStopped. Raises DistillError as the child raised it,
    StageError for any other exception there, StageCrashed when the child dies silently, SandboxUnavailable
    when the sandbox cannot start (never run unconfined instead).
    """
    work = Path(work)
    child = _Child.start(steps, work, config, sandbox)
    results: dict[str, Any] = {}
    next_check = 0.0
    try:
        while True:
            if time.monotonic() >= next_check:
                reason = should_stop()
                if reason:
                    child.stop(stop_grace)
                    raise StageStopped(reason, child.exitcode())
                next_check = time.monotonic() + stop_check_interval
            msg = child.receive(min(0.2, stop_check_interval))
            if msg is None:
                continue
            if msg is _EOF:
                break
            kind = msg.get("type")
            if kind == "stage":
                # The parent says how the child is confined: the child could claim anything.
                on_message({**msg, "sandbox": sandbox.mode, "network_isolated": _isolated(sandbox, msg)})
            elif kind == "progress":
                on_message(msg)
            elif kind == "result":
                results[msg["name"]] = msg.get("value")
            elif kind == "done":
                child.wait(stop_grace)
                return results
            elif kind == "error":
                child.wait(stop_grace)
                raise DistillError(str(msg["message"]), code=str(msg["code"]), field=msg.get("field"))
            elif kind == "exception":
                child.wait(stop_grace)
                raise StageError(str(msg["code"]), str(msg["message"]), str(msg.get("traceback", "")))
        child.wait(stop_grace)
        if sandbox.confined and child.exitcode() == 1 and not child.spoke:
            raise SandboxUnavailable(f"the sandbox did not start a stage (exit status {child.exitcode()})")
        raise _crash(child.exitcode())
    finally:
        child.close(stop_grace)


def check_sandbox(sandbox: Sandbox) -> None:
    """Start a sandboxed child that imports the project and runs nothing; SandboxUnavailable if it cannot."""
    if not sandbox.confined:
        return
    with tempfile.TemporaryDirectory(prefix="distill-sandbox-check-") as folder:
        started = time.monotonic()
        try:
            run_steps(
                [],
                Path(folder),
                {},
                sandbox=sandbox,
                on_message=lambda _: None,
                should_stop=lambda: "timeout" if time.monotonic() - started > PROBE_TIMEOUT_S else None,
            )
        except (StageCrashed, StageError, StageStopped) as exc:
            raise SandboxUnavailable(f"bubblewrap could not run a stage child: {exc}") from exc


def _isolated(sandbox: Sandbox, msg: dict[str, Any]) -> bool:
    return True if sandbox.confined else bool(msg.get("network_isolated"))


def _step_ref(step: Step) -> str:
    return f"{step.__module__}:{step.__qualname__}"


_EOF: dict[str, Any] = {}


class _Child:
    """One stage child process: its control stdin, its message pipe and how to end it."""

    def __init__(self, proc: subprocess.Popen[bytes], messages: int, info: int | None) -> None:
        self.proc, self.messages, self.info = proc, messages, info
        self.buffer = b""
        self.spoke = False
        self.closed = False

    @classmethod
    def start(
        cls, steps: Sequence[tuple[str, Step]], work: Path, config: dict[str, Any], sandbox: Sandbox
    ) -> _Child:
        read_end, write_end = os.pipe()
        info_read, info_write = os.pipe() if sandbox.confined else (None, None)
        try:
            argv = sandbox.command([sys.executable, "-I", "-c", BOOTSTRAP], work, info_fd=info_write)
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                pass_fds=(write_end,) if info_write is None else (write_end, info_write),
                env=child_env(os.environ),
                cwd=work,
                close_fds=True,
            )
        except BaseException:
            for fd in (read_end, info_read):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            os.close(write_end)  # the child holds its copy: its death reads as EOF here
            if info_write is not None:
                os.close(info_write)
        boot = {
            "steps": [[name, _step_ref(step)] for name, step in steps],
            "work": str(work),
            "config": config,
            "fd": write_end,
            "path": [os.path.abspath(p) for p in sys.path if p],
            "isolate_network": not sandbox.confined,
            "procs": sandbox.procs,
        }
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(boot).encode() + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child is already gone: its exit status tells why
        os.set_blocking(read_end, False)
        return cls(proc, read_end, info_read)

    def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next whole message, None if none came within `timeout`, `_EOF` when the child closed."""
        message = self._take()
        if message is not None:
            return message
        if self.closed:
            return _EOF
        ready, _, _ = select.select([self.messages], [], [], timeout)
        if not ready:
            return None
        try:
            chunk = os.read(self.messages, 1 << 16)
        except BlockingIOError:
            return None
        if not chunk:
            self.closed = True
        self.buffer += chunk
        return self._take() or (_EOF if self.closed else None)

    def _take(self) -> dict[str, Any] | None:
        if len(self.buffer) < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(self.buffer)
        if size > MAX_MESSAGE_BYTES:
            # A child that frames a message this big is broken or hostile; stop listening to it.
            self.buffer, self.closed = b"", True
            self.proc.kill()
            return _EOF
        if len(self.buffer) < HEADER.size + size:
            return None
        body = self.buffer[HEADER.size : HEADER.size + size]
        self.buffer = self.buffer[HEADER.size + size :]
        self.spoke = True
        try:
            message = json.loads(body)
        except ValueError:
            return None
        return message if isinstance(message, dict) else None

    def stop(self, grace: float) -> None:
        """Ask the child to end ("stop" -> its own SIGTERM), then SIGKILL after `grace`. Meanwhile its
        messages are read and dropped: a child blocked writing to a full pipe could never reach its stop
        check and would always be killed."""
        self._tell("stop")
        deadline = time.monotonic() + grace
        while self.proc.poll() is None and time.monotonic() < deadline:
            if self.receive(0.05) is _EOF:
                break
            self.buffer = b""
        self.wait(max(0.0, deadline - time.monotonic()))

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # The sandbox's init first, while bwrap (its parent) lives and so its pid cannot be reused.
            init = self._sandbox_init()
            if init is not None:
                _kill_namespace(init)
            self.proc.kill()
            code = self.proc.wait()
            if init is not None:
                _wait_gone(init)
            return code

    def _sandbox_init(self) -> int | None:
        """The host pid of the sandbox's init (bwrap's `--info-fd`), read once; None when unconfined."""
        if self.info is None:
            return None
        try:
            raw = os.read(self.info, 4096)
            pid = json.loads(raw).get("child-pid")
        except (OSError, ValueError, AttributeError):
            return None
        return pid if isinstance(pid, int) and pid > 1 else None

    def close(self, grace: float) -> None:
        if self.proc.poll() is None:
            self.stop(grace)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        os.close(self.messages)
        if self.info is not None:
            os.close(self.info)

    def _tell(self, word: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(word.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def exitcode(self) -> int | None:
        """As Popen's returncode: negative for a signal. bwrap reports a child killed by signal N as 128 + N
        (and is itself never the one signalled, but when we SIGKILL it)."""
        code = self.proc.returncode
        if self.info is not None and code is not None and code > 128:
            return 128 - code
        return code


def _kill_namespace(init: int) -> None:
    """SIGKILL the sandbox's init: the kernel kills every process of a PID namespace whose init dies.
    (--die-with-parent gets there too, but asynchronously.)"""
    try:
        os.kill(init, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_gone(init: int, timeout: float = 5.0) -> None:
    """Until the init is gone or a zombie: its exit completes only after every process of its namespace
    has died, so a stopped stage is really stopped when this returns."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{init}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)


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
