"""One process's view of a data-parallel training run: what train() asks of torch.distributed.

`Replicas` is one process's view of the run: its rank, how many processes there are, and the few collective
operations the train loop uses. `SINGLE` is a process alone: every operation is the identity and nothing is
communicated, so train()'s default path behaves as it always did. data_parallel.py starts the processes and
joins them into a group; this module only uses the group.

How a global batch is shared, so that N processes take the very step one process would:

    the epoch's permutation        drawn from the same seeded generator on every rank
    global batch b                 rows perm[b * batch_size : (b + 1) * batch_size], as for one process
    rank r's shard                 every N-th row of it from the r-th (sizes differ by at most one row)
    rank r's loss                  scaled by N * rows_r / rows_b: DistributedDataParallel averages gradients
                                   over the N ranks, and that average is then the gradient of the batch mean

The losses are means over rows, so that is the one-process gradient up to floating-point summation order.
Not so for what a shard computes over its own rows only: BatchNorm's batch statistics on CPU (SyncBatchNorm
is CUDA-only; data_parallel.py converts to it on GPUs), DIST's intra-class term (correlations down the batch),
and dropout masks (each rank draws its own). The logged parts are combined by rows as well, which is exact
for the loss and the means over rows, and near for `ce`, a mean over the labelled rows of each shard.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Replicas:
    rank: int = 0
    world: int = 1
    # The group for small agreements on CPU tensors (stop, metrics, random states): the default group when
    # that is gloo; a gloo group beside NCCL, whose collectives take CUDA tensors only.
    control: Any = None

    @property
    def parallel(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        """Whether this process writes checkpoints and reports progress: rank 0 only."""
        return self.rank == 0

    def wrap(self, student: nn.Module, device: torch.device) -> nn.Module:
        """The module a training step calls: `student` under DistributedDataParallel, or itself alone.
        Wrapping broadcasts rank 0's weights and buffers, so every replica starts from rank 0's state."""
        if not self.parallel:
            return student
        return DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)

    def shard(self, batch: Tensor) -> tuple[Tensor, float]:
        """This process's rows of a global batch (row indices), and the factor on its loss (see above)."""
        if not self.parallel:
            return batch, 1.0
        mine = batch[self.rank :: self.world]
        return mine, self.world * len(mine) / len(batch)

    def total(self, values: Tensor) -> Tensor:
        """`values` summed over the processes (a CPU copy then; `values` itself alone)."""
        if not self.parallel:
            return values
        summed = values.detach().cpu().clone()
        dist.all_reduce(summed, group=self.control)
        return summed

    def from_rank0(self, values: list[int]) -> list[int]:
        """Rank 0's `values` on every process."""
        if not self.parallel:
            return values
        shared = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(shared, src=0, group=self.control)
        return [int(v) for v in shared.tolist()]

    def gather(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """Every process's `state` on rank 0, in rank order; [] on the others. Alone: [state]."""
        if not self.parallel:
            return [state]
        states: list[Any] | None = [None] * self.world if self.writes else None
        dist.gather_object(state, states, dst=0, group=self.control)
        return list(states or [])


SINGLE = Replicas()


class StopPoll:
    """When train() asks `stop()`: about every `seconds` (the service's hook may query a database).

    One process goes by its clock. Processes must stop at the same step, or the ones still training would wait
    forever for the others in the next gradient exchange; so rank 0 asks at steps agreed in advance and
    broadcasts the answer together with the number of steps until the next poll, sized from its own step time
    to fall about `seconds` later. Costs one tiny broadcast per poll instead of one per step.
    """

    def __init__(self, stop: Callable[[], bool] | None, replicas: Replicas, seconds: float) -> None:
        self.stop, self.replicas, self.seconds = stop, replicas, seconds
        self.last = time.perf_counter()
        self.steps, self.steps_to_poll = 0, 1

    def after_step(self) -> bool:
        """Called after every training step, on every process: True when the run is to stop now."""
        if not self.replicas.parallel:
            if self.stop is None or time.perf_counter() - self.last <= self.seconds:
                return False
            self.last = time.perf_counter()
            return self.stop()
        self.steps += 1
        if self.steps < self.steps_to_poll:
            return False
        elapsed = max(time.perf_counter() - self.last, 1e-6)
        upcoming = max(1, min(1_000_000, int(self.steps * self.seconds / elapsed)))
        stopping, self.steps_to_poll = self.replicas.from_rank0([int(self._asked()), upcoming])
        self.last, self.steps = time.perf_counter(), 0
        return bool(stopping)

    def now(self) -> bool:
        """An unconditional poll (at an epoch's end), on every process."""
        self.last = time.perf_counter()
        return bool(self.replicas.from_rank0([int(self._asked())])[0])

    def _asked(self) -> bool:
        return self.stop is not None and self.stop()
