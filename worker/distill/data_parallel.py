"""Data-parallel training over the processes of one host: torch.distributed, launched from the stage child.

`train_data_parallel(procs, ...)` is train() on `procs` processes. The calling process is rank 0 and keeps all
that talks to the outside: checkpoints, progress, `stop`. torch.multiprocessing spawns ranks 1..N-1, fresh
interpreters that get the student as bytes and the data through shared memory, train replicas in lockstep
(replicas.py) and write nothing. They meet on loopback through a TCPStore that rank 0 opens on port 0 (the
kernel picks a free port), which is all a sandboxed stage child's own network namespace offers; the store and
the group listen on loopback alone wherever they run.

    CUDA   one process per GPU (never more processes than GPUs), NCCL. BatchNorm becomes SyncBatchNorm:
           statistics over the whole global batch, as one process computes them.
    CPU    N processes over gloo, the CPU's threads split between them. BatchNorm keeps batch statistics
           per process, over its shard (SyncBatchNorm is CUDA-only); its running averages are rank 0's,
           broadcast to the others before each step.

Every rank takes every N-th row of the one-process global batch, so a student without BatchNorm or dropout
(an `mlp`) trains as on one process, up to floating-point summation order: tests/distill/test_data_parallel.py
measures how close. A stop reaches every rank within seconds (replicas.StopPoll). A rank that fails ends the
others: rank 0's error is raised, naming the other rank's own error when one reported one (rank 0 often sees
no more than a lost connection then).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from worker.distill.config import DistillConfig
from worker.distill.errors import DistillError
from worker.distill.losses import LossFn
from worker.distill.replicas import SINGLE, Replicas
from worker.distill.train import Stopped, TensorData, TrainResult, train

LOOPBACK = "127.0.0.1"
RENDEZVOUS_TIMEOUT = timedelta(minutes=2)  # each spawned rank imports torch first: slow on a loaded host
FAILURE_GRACE_S = 10.0  # after rank 0 fails: how long the others get to end, or to report their own error


class ReplicaFailed(RuntimeError):
    """Rank 0 failed and another rank reported an error of its own: the message names both, since either may
    be the cause (a rank that dies leaves the others with nothing but a closed connection)."""

    def __init__(self, rank0: BaseException, other: Exception) -> None:
        rank = getattr(other, "error_index", 0) + 1  # torch numbers the spawned processes from 0
        super().__init__(f"{_last_line(rank0)} (rank 0); {_last_line(other)} (rank {rank})")
        self.add_note(str(other))  # the other rank's traceback, for the log


@dataclass(frozen=True)
class _Group:
    """How the processes of one run meet, and what each runs on: all a spawned rank needs to join."""

    world: int
    port: int  # rank 0's TCPStore on LOOPBACK
    cuda: bool
    threads: int  # torch threads per process

    @property
    def backend(self) -> str:
        return "nccl" if self.cuda else "gloo"

    def device(self, rank: int) -> torch.device:
        return torch.device("cuda", rank) if self.cuda else torch.device("cpu")


@dataclass(frozen=True)
class _Run:
    """train()'s arguments that every rank shares (pickled to the spawned ones; tensors in shared memory)."""

    train_data: TensorData
    val_data: TensorData | None
    loss_fn: str | LossFn | None
    config: DistillConfig
    ckpt_dir: Path | None
    epochs: int | None
    lr: float | None

    def train(
        self,
        student: nn.Module,
        device: torch.device | None,
        replicas: Replicas,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        return train(
            student, self.train_data, self.val_data, self.loss_fn, self.config,
            ckpt_dir=self.ckpt_dir, on_epoch=on_epoch, epochs=self.epochs, lr=self.lr, device=device,
            stop=stop, replicas=replicas,
        )  # fmt: skip


def processes_for(procs: int) -> int:
    """How many processes a run asked to use `procs` gets here: on CUDA, at most one per GPU."""
    return min(procs, torch.cuda.device_count()) if torch.cuda.is_available() else max(1, procs)


def train_data_parallel(
    procs: int,
    student: nn.Module,
    train_data: TensorData,
    val_data: TensorData | None,
    loss_fn: str | LossFn | None,
    config: DistillConfig,
    *,
    ckpt_dir: Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """train() over `procs` processes of this host (`processes_for`), with train()'s arguments and result.

    Rank 0 (this process) writes the checkpoints and calls `on_epoch` and `stop`; a resumed run needs as many
    processes as the one that wrote them. With one process this is train() itself and nothing is spawned.
    """
    run = _Run(train_data, val_data, loss_fn, config, ckpt_dir, epochs, lr)
    world = processes_for(procs)
    if world == 1:
        return run.train(student, None, SINGLE, on_epoch, stop)
    # Loopback only: the sandbox has nothing else, and unsandboxed the group must not listen on the host's
    # addresses (a TCPStore of its own binds every address; gloo takes the one its hostname resolves to).
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = "lo"
    listener = socket.create_server((LOOPBACK, 0))
    port, fd = listener.getsockname()[1], listener.detach()  # the store owns the socket from here
    store = dist.TCPStore(
        LOOPBACK, port, world, is_master=True, wait_for_workers=False, timeout=RENDEZVOUS_TIMEOUT,
        master_listen_fd=fd,
    )  # fmt: skip
    threads = torch.get_num_threads()
    cuda = torch.cuda.is_available()
    group = _Group(world, port, cuda, threads if cuda else max(1, threads // world))
    # forkserver: a clean process (no CUDA, no threads) that imports torch once and forks each rank, so the
    # stage's later runs (fine-tuning, baseline) start their ranks in milliseconds rather than seconds.
    mp.set_forkserver_preload([__name__])
    others: mp.ProcessContext = mp.start_processes(  # type: ignore[no-untyped-call]
        _replica, (group, _portable(student), run), world - 1, join=False, start_method="forkserver"
    )
    torch.set_num_threads(group.threads)
    try:
        with _joined(group, 0, store) as replicas:
            model = _for_devices(student, group)
            result = run.train(model, group.device(0), replicas, on_epoch, stop)
    except BaseException as exc:
        failure = _reap(others, FAILURE_GRACE_S)
        # A DistillError (bad data, settings) is every rank's alike; a Stopped run has no failure.
        if failure is None or isinstance(exc, DistillError) or not isinstance(exc, Exception):
            raise
        raise ReplicaFailed(exc, failure) from exc
    finally:
        torch.set_num_threads(threads)
    while not others.join():  # raises what another rank raised after rank 0 finished
        pass
    if model is not student:
        student.load_state_dict(model.state_dict())
    return result


def _replica(index: int, group: _Group, student: tuple[bool, bytes], run: _Run) -> None:
    """One spawned rank (torch.multiprocessing numbers them from 0: rank index + 1)."""
    rank = index + 1
    torch.set_num_threads(group.threads)
    store = dist.TCPStore(LOOPBACK, group.port, group.world, is_master=False, timeout=RENDEZVOUS_TIMEOUT)
    with _joined(group, rank, store) as replicas:
        model = _for_devices(_unpacked(*student), group)
        try:
            run.train(model, group.device(rank), replicas)
        except Stopped:
            pass  # rank 0 stopped at the same step and reports it


@contextlib.contextmanager
def _joined(group: _Group, rank: int, store: dist.Store) -> Iterator[Replicas]:
    if group.cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(group.backend, store=store, rank=rank, world_size=group.world)
    try:
        # NCCL's collectives take CUDA tensors only: small CPU-side agreements get a gloo group beside it.
        control = dist.new_group(backend="gloo") if group.cuda else dist.group.WORLD
        yield Replicas(rank, group.world, control)
    finally:
        dist.destroy_process_group()


def _for_devices(student: nn.Module, group: _Group) -> nn.Module:
    """On GPUs, a copy with SyncBatchNorm for BatchNorm (the caller's module keeps its classes, for export);
    on CPU the module itself."""
    if not group.cuda or isinstance(student, torch.jit.ScriptModule):
        return student
    copied = copy.deepcopy(student)
    synced: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(copied)  # type: ignore[no-untyped-call]
    return synced


def _portable(student: nn.Module) -> tuple[bool, bytes]:
    """The student for the spawned ranks as (scripted?, bytes): each unpacks its own weights. Through shared
    memory it would be one set of weights that every process updates."""
    buffer = io.BytesIO()
    scripted = isinstance(student, torch.jit.ScriptModule)
    if scripted:  # a TorchScript student init: TorchScript modules do not pickle
        torch.jit.save(student, buffer)
    else:
        torch.save(student, buffer)
    return scripted, buffer.getvalue()


def _unpacked(scripted: bool, data: bytes) -> nn.Module:
    if scripted:
        loaded: nn.Module = torch.jit.load(io.BytesIO(data))
        return loaded
    # Rank 0's own module, pickled a moment ago in this sandbox: not a file from outside.
    module: nn.Module = torch.load(io.BytesIO(data), weights_only=False)
    return module


def _reap(others: mp.ProcessContext, grace: float) -> Exception | None:
    """After rank 0 failed: the other ranks get `grace` seconds to end (their next collective fails with the
    lost connection), then are killed. Returns the failure one of them reported, if any."""
    deadline = time.monotonic() + grace
    try:
        while not others.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                break
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as failure:
        return failure
    for process in others.processes:
        if process.is_alive():
            process.kill()
        process.join()
    return None


def _last_line(exc: BaseException) -> str:
    """An error in one line: `Type: message` (the other ranks' come as a traceback in the message)."""
    lines = str(exc).strip().splitlines()
    if isinstance(exc, mp.ProcessRaisedException) and lines:
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
