"""The filesystem sandbox around every stage child: bubblewrap (`bwrap`, Flatpak's sandbox).

A user's model is code (TorchScript runs operators, ONNX may carry custom ops), so the child that loads it
sees almost nothing of the machine. In a new mount namespace it gets, read-only: the system (/usr and the
/lib links, a short allow-list of /etc), the interpreter's prefixes (stdlib and site-packages) and the
project's own package folders, never the repository root (the editable install keeps `./.distill`, with the
key file, the database and the object folder, beside them). Read-write: the job's scratch folder and nothing
else; its `inputs/` is bound read-only on top, and /tmp is a folder inside it (on disk: archives are
extracted there); the sandbox's own root is remounted read-only. New user, PID, IPC, UTS, cgroup and
network namespaces; uid/gid 65534 with every capability dropped even when the worker runs as root;
`--die-with-parent` so it never outlives the worker.

`mode="off"` runs the same child without bwrap: for one trusted user on a machine without user namespaces,
never for more than one tenant (docs/reliability.md, "User code").
"""

from __future__ import annotations

import os
import shutil
import site
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

NOBODY = 65534
SANDBOX_TMP = ".tmp"  # /tmp inside the sandbox: a folder of the job's scratch folder
# /etc is allow-listed, never bound whole: it holds shadow, ssh host keys, TLS private keys, app configs.
ETC_ALLOWED = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "localtime",
    "timezone",
    "nsswitch.conf",
    "passwd",
    "group",
    "host.conf",
    "hosts",
    "mime.types",
    "os-release",
)
SYSTEM_TOP = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
GPU_DEVICES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")


class SandboxUnavailable(Exception):
    """The sandbox cannot start on this machine; user models must not run unconfined."""


@dataclass(frozen=True)
class Sandbox:
    """How stage children are confined, and what they are given. `extra_ro`: more read-only folders (tests
    bind their own steps). `procs`: processes a stage child may train on, data-parallel (the worker's
    `--procs`), as it is given the machine's GPUs; they share its namespaces and talk over its loopback."""

    mode: Literal["bwrap", "off"] = "bwrap"
    bwrap: str = "bwrap"
    extra_ro: tuple[Path, ...] = field(default_factory=tuple)
    procs: int = 1

    @property
    def confined(self) -> bool:
        return self.mode == "bwrap"

    def command(self, argv: Sequence[str], work: Path, *, info_fd: int | None = None) -> list[str]:
        """`argv` wrapped so that it runs confined to `work` (unchanged when the mode is off). bwrap writes
        `{"child-pid": N, ...}` to `info_fd`: N is the sandbox's init, whose death ends everything in it."""
        if not self.confined:
            return list(argv)
        binary = shutil.which(self.bwrap)
        if binary is None:
            raise SandboxUnavailable(
                f"bubblewrap ({self.bwrap!r}) is not installed; install the `bubblewrap` package, or set "
                "DISTILL_SANDBOX=off on a single-user machine (unsafe with more than one tenant)"
            )
        info = [] if info_fd is None else ["--info-fd", str(info_fd)]
        return [binary, *self._arguments(work.resolve()), *info, "--", *argv]

    def _arguments(self, work: Path) -> list[str]:
        args = [
            "--unshare-all",  # user, ipc, pid, net, uts, cgroup
            "--unshare-user",
            "--uid",
            str(NOBODY),
            "--gid",
            str(NOBODY),
            "--cap-drop",
            "ALL",
            "--die-with-parent",
            "--new-session",  # no TIOCSTI into the worker's terminal
            "--hostname",
            "sandbox",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
        ]
        args += _system_mounts()
        # CPU topology only (no other /sys): BLAS, OpenMP and onnxruntime size their thread pools from it.
        if Path("/sys/devices/system/cpu").is_dir():
            args += ["--ro-bind", "/sys/devices/system/cpu", "/sys/devices/system/cpu"]
        # /tmp first: the work folder itself often lives under the host's /tmp, and a later bind wins.
        tmp = work / SANDBOX_TMP
        tmp.mkdir(parents=True, exist_ok=True)
        args += ["--bind", str(tmp), "/tmp"]
        for path in _readonly_paths(self.extra_ro):
            args += ["--ro-bind", str(path), str(path)]
        args += ["--bind", str(work), str(work)]
        if (work / "inputs").is_dir():
            args += ["--ro-bind", str(work / "inputs"), str(work / "inputs")]
        # The worker's home does not exist in here; libraries that keep caches or ids there get /tmp.
        args += ["--chdir", str(work), "--setenv", "HOME", "/tmp"]
        args += _gpu_mounts()
        # The sandbox's own root (a tmpfs holding the mount points) read-only too: the work folder, its /tmp
        # and a private /dev/shm (DataLoader workers share tensors there) are the only writable places.
        return args + ["--remount-ro", "/"]


def _system_mounts() -> list[str]:
    args: list[str] = []
    for top in SYSTEM_TOP:
        path = Path("/") / top
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    for name in ETC_ALLOWED:
        if (Path("/etc") / name).exists():
            args += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    return args


def _readonly_paths(extra: Sequence[Path]) -> list[Path]:
    """The interpreter's prefixes and site-packages, the project's package folders, and `extra`; nested
    duplicates dropped (binding a folder and then its parent would hide the first bind)."""
    import app
    import worker

    candidates = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix), Path(sys.base_exec_prefix)}
    candidates |= {Path(p) for p in site.getsitepackages()}
    user_site = site.getusersitepackages()
    if isinstance(user_site, str):
        candidates.add(Path(user_site))
    candidates |= {Path(app.__file__).parent, Path(worker.__file__).parent, *extra}
    existing = {p.resolve() for p in candidates if p.exists()}
    # The interpreter itself may be a link out of the prefix (venvs, pyenv shims): bind where it points.
    existing.add(Path(os.path.realpath(sys.executable)).parent)
    return sorted(p for p in existing if not any(p != q and p.is_relative_to(q) for q in existing))


def _gpu_mounts() -> list[str]:
    """CUDA needs its device nodes and /sys; bound only where an NVIDIA device exists."""
    dev = Path("/dev")
    nodes = sorted(dev.glob("nvidia[0-9]*")) + [dev / name for name in GPU_DEVICES]
    present = [n for n in nodes if n.exists()]
    if not present:
        return []
    args: list[str] = []
    for node in present:
        args += ["--dev-bind", str(node), str(node)]
    return args + ["--ro-bind", "/sys", "/sys"]
