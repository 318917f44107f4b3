"""The stage child's side of worker/supervisor.py: runs inside the sandbox, talks to the parent in JSON.

Started as `python -I -c BOOTSTRAP` (isolated: no PYTHON* variables, no current folder on sys.path). Its
first stdin line says what to run; later lines are control words ("stop": the parent wants it to end, as a
SIGTERM would; EOF means the parent is gone). Messages go back on one inherited pipe as 4-byte big-endian
lengths, each followed by a JSON object: the child (and so a user's model) can never make the parent
unpickle anything. Its stdout and stderr are the worker's, for logs only.
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.distill.errors import DistillError

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
HEADER = struct.Struct(">I")
# Read by the interpreter before anything of ours is importable: sys.path comes from the first stdin line.
BOOTSTRAP = (
    "import json, sys; boot = json.loads(sys.stdin.readline()); sys.path[:0] = boot['path']; "
    "import worker.stage_child as child; child.main(boot)"
)


def resolve_step(ref: str) -> Callable[..., Any]:
    """`module:qualname` -> the function. Refs are written by the parent from its own step lists, never from
    a job's config."""
    module_name, _, qualname = ref.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    step: Callable[..., Any] = target
    return step


_granted = {"procs": 1}


def granted_procs() -> int:
    """Processes this stage child may train on, data-parallel: the worker's `--procs` (its Sandbox says, on
    the boot line). 1 outside a stage child."""
    return _granted["procs"]


def main(boot: dict[str, Any]) -> None:
    _granted["procs"] = max(1, int(boot.get("procs", 1)))
    out = os.fdopen(boot["fd"], "wb", buffering=0)
    lock = threading.Lock()

    def send(msg: dict[str, Any]) -> None:
        body = json.dumps(msg, default=str).encode()
        with lock:
            out.write(HEADER.pack(len(body)) + body)

    # The control thread keeps stdin to itself: sys.stdin becomes None. A process forked while that thread is
    # blocked reading it (a DataLoader's worker) would otherwise deadlock in multiprocessing's bootstrap,
    # which closes sys.stdin and so waits for the read lock the thread holds, forever.
    control, sys.stdin = sys.stdin, None
    threading.Thread(target=_listen_for_stop, args=(control,), name="stage-control", daemon=True).start()
    isolated = _isolate_network() if boot.get("isolate_network") else False
    try:
        for name, ref in boot["steps"]:
            step = resolve_step(ref)
            send({"type": "stage", "name": name, "network_isolated": isolated})
            value = step(Path(boot["work"]), boot["config"], lambda e: send({"type": "progress", "event": e}))
            send({"type": "result", "name": name, "value": value})
        send({"type": "done"})
    except _errors() as exc:
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
        out.close()


def _errors() -> type[DistillError]:
    from worker.distill.errors import DistillError

    return DistillError


def _listen_for_stop(control: Any) -> None:
    """ "stop" or EOF on stdin -> SIGTERM to ourselves: a step's own handler (checkpoint and end) runs as if
    the parent had signalled us, and without one the default action ends the process."""
    for line in control:
        if line.strip() == "stop":
            break
    os.kill(os.getpid(), signal.SIGTERM)


def _isolate_network() -> bool:
    """Unconfined mode only (bwrap gives the child its own network namespace): a new, empty network
    namespace where Linux allows it, so a user's model cannot reach the DB, broker or cloud metadata."""
    libc = ctypes.CDLL(None, use_errno=True)
    isolated = libc.unshare(CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0
    if isolated:
        try:
            _loopback_up()
        except OSError:
            pass  # isolated all the same; only a data-parallel stage fails, at its rendezvous
    return isolated


def _loopback_up() -> None:
    """A new network namespace starts with its loopback down (bwrap brings its own up): data-parallel ranks
    meet on 127.0.0.1, which reaches nothing but this namespace."""
    with socket.socket() as sock:
        request = struct.pack("16sh", b"lo", 0)
        (flags,) = struct.unpack_from("h", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request), 16)
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))
