"""One job's soft-label stage split into shard tasks over two real `distill worker` processes (own Redis, own
PostgreSQL database, short leases): the stored shards and manifest equal one unsplit run's, byte for byte; a
duplicate delivery of a shard task is a no-op; a cancel stops both workers' stage children within seconds;
a worker SIGKILLed mid-shard loses only that shard's attempt, which the other worker resumes, and the job
succeeds once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.config import Settings
from app.queue import SOFT_LABEL_QUEUE, TASK_SOFT_LABEL, TASK_SOFT_LABEL_SHARD, make_celery_client
from tests.reliability.stack import FIXED_JOB, Stack, stack
from tests.support.api import artifact_names
from tests.support.data import write_inputs
from tests.support.processes import kill_group, stage_children, wait_until
from worker.distill.shard_plan import part_name

pytestmark = pytest.mark.e2e
torch.set_num_threads(1)

TASK_ROWS = 400  # the workers split a stage past this many rows, into tasks of whole shards of about as many


class SlowTeacher(torch.nn.Module):
    """8 features -> 3 classes through `depth` tanh layers of one 64x64 weight: a third of a microsecond per
    row and layer on one thread here, so a test chooses how long a shard takes."""

    def __init__(self, depth: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.depth = depth
        self.inp = torch.nn.Linear(8, 64)
        self.w = torch.nn.Parameter(torch.randn(64, 64) / 8)
        self.head = torch.nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for _ in range(self.depth):
            h = torch.tanh(h @ self.w)
        return self.head(h)


def inputs(folder: Path, rows: int, depth: int, seed: int) -> tuple[Path, Path]:
    """A teacher and `rows` rows of its own (each test its own seed: no job reuses another's soft labels)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 8)).astype(np.float32)
    return write_inputs(folder, SlowTeacher(depth, seed).eval(), x, rng.integers(0, 3, rows))


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("sharded"), soft_label_task_rows=TASK_ROWS) as s:
        s.start_worker("worker-a")
        s.start_worker("worker-b")
        yield s


def submit(s: Stack, folder: Path, rows: int, depth: int, seed: int, **config: Any) -> str:
    teacher, dataset = s.upload_inputs(inputs(folder, rows, depth, seed))
    return s.submit(teacher, dataset, {**FIXED_JOB, "epochs": 1, "shard_size": 100, **config})


def kinds(s: Stack, job_id: str, kind: str) -> list[dict[str, Any]]:
    return [e["data"] for e in s.events(job_id) if e["kind"] == kind]


def handed_on(s: Stack, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """Until the soft-label stage is done (the manifest recorded, the job waiting for or in distillation)."""

    def done() -> dict[str, Any] | None:
        job = s.job(job_id)
        assert job["status"] not in ("failed", "cancelled"), job
        return job if "soft_labels_manifest.json" in artifact_names(s.http, job_id) else None

    return wait_until(done, timeout, f"job {job_id}'s soft labels", 0.2)


def stored_soft_labels(s: Stack, job_id: str) -> dict[str, bytes]:
    """The job's mirrored `soft_labels/`: what the distill stage on any machine pulls."""
    root = next((s.tmp / "objects").rglob(f"jobs/{job_id}/soft_labels"))
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_run(s: Stack, job_id: str, folder: Path, work: Path) -> dict[str, bytes]:
    """The stage run whole, once, on the job's inputs and config, in this process at one thread (as a
    single worker's stage child runs it): the soft-label files it writes."""
    from worker.distill.config import DistillConfig
    from worker.distill.pipeline import preflight, prepare_inputs, soft_label

    prepare_inputs(work, teachers=[folder / "teacher.pt"], dataset=folder / "train.npz")
    config = DistillConfig.from_dict(s.job(job_id)["config"])
    preflight(work, config)
    soft_label(work, config)
    return {p.name: p.read_bytes() for p in sorted((work / "soft_labels").iterdir())}


def worker_of(s: Stack, worker_id: str) -> str:
    """Which of the stack's workers (by process id) a lease holder's id names."""
    pid = int(worker_id.split(":")[1])
    return next(f"worker-{n}" for n, proc in zip("ab", s.workers, strict=False) if proc.pid == pid)


def test_a_stage_split_over_two_workers_stores_what_one_run_stores(two_workers, tmp_path):
    s = two_workers
    job_id = submit(s, tmp_path / "in", rows=440, depth=20, seed=1)  # 396 + 44 rows: a task for each
    handed_on(s, job_id)
    s.http.post(f"/v1/jobs/{job_id}/cancel")  # the distillation after it is not what this test is about

    planned = kinds(s, job_id, "shards_planned")
    assert [p["shards"] for p in planned] == [2], planned
    done_by = {d["shard"]: worker_of(s, d["worker_id"]) for d in kinds(s, job_id, "shard_done")}
    assert sorted(done_by) == [0, 1] and set(done_by.values()) == {"worker-a", "worker-b"}, done_by
    assert stored_soft_labels(s, job_id) == one_run(s, job_id, tmp_path / "in", tmp_path / "one")


def test_duplicate_deliveries_of_shard_tasks_are_no_ops(two_workers, tmp_path):
    s = two_workers
    celery = make_celery_client(Settings(broker_url=s.redis.url))

    def resend_everything() -> None:
        celery.send_task(TASK_SOFT_LABEL, args=[job_id], queue=SOFT_LABEL_QUEUE)
        for number in range(2):
            celery.send_task(TASK_SOFT_LABEL_SHARD, args=[job_id, number], queue=SOFT_LABEL_QUEUE)

    job_id = submit(s, tmp_path / "in", rows=440, depth=20, seed=2)  # 396 + 44 rows: 2 shard tasks
    wait_until(lambda: kinds(s, job_id, "shards_planned"), 60, "the split", 0.1)
    resend_everything()  # each shard's task now twice in the queue, and the stage's own task again
    handed_on(s, job_id)
    resend_everything()  # and again once the stage is over
    wait_until(lambda: s.job(job_id)["status"] != "soft_labeling", 30, "distillation to start", 0.2)
    time.sleep(1)  # time for the late duplicates to be consumed
    s.http.post(f"/v1/jobs/{job_id}/cancel")

    assert len(kinds(s, job_id, "shard_started")) == 2 and len(kinds(s, job_id, "shard_done")) == 2
    assert not kinds(s, job_id, "resumed") and not kinds(s, job_id, "attempt_failed")
    moves = [(e["from"], e["to"]) for e in kinds(s, job_id, "status")]
    assert moves.count(("soft_labeling", "distilling")) == 1, moves


def test_cancel_stops_the_stage_children_of_both_workers_within_seconds(two_workers, tmp_path):
    s = two_workers
    # 720 training rows in two tasks of 400 and 320 rows, each a few seconds of teacher
    job_id = submit(s, tmp_path / "in", rows=800, depth=40000, seed=3, shard_size=200)

    def both_labelling() -> list[Any] | None:
        children = [stage_children(proc.pid) for proc in s.workers]
        running = len(s.job(job_id)["metrics"].get("shards", {}).get("held_by", {})) == 2
        return [c[0] for c in children] if running and all(children) else None

    children = wait_until(both_labelling, 60, "both workers labelling a shard", 0.1)
    time.sleep(1.0)
    cancelled_at = time.monotonic()
    assert s.http.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    wait_until(lambda: not any(c.is_alive() for c in children), 10, "both stage children to stop", 0.05)
    assert time.monotonic() - cancelled_at < 10
    time.sleep(1.5)  # the third task, delivered after the cancel, starts nothing
    assert not any(stage_children(proc.pid) for proc in s.workers)
    assert s.job(job_id)["status"] == "cancelled"
    assert "soft_labels_manifest.json" not in artifact_names(s.http, job_id)


def test_a_worker_killed_mid_shard_loses_only_that_shard_which_the_other_resumes(two_workers, tmp_path):
    s = two_workers
    # 396 + 44 rows in shards of 50: a task of 8 shards, each a few tenths of a second, and one of 1
    job_id = submit(s, tmp_path / "in", rows=440, depth=5000, seed=4, shard_size=50)

    def mid_way_through_shard_0() -> str | None:
        """The worker holding the long shard, once its part file vouches for a first shard file of it."""
        holder = s.job(job_id)["metrics"].get("shards", {}).get("held_by", {}).get("0")
        name = None if holder is None else worker_of(s, holder)
        done = (
            name is not None and (s.scratch(name, job_id) / "soft_labels" / part_name("train", 0)).is_file()
        )
        return name if done else None

    victim = wait_until(mid_way_through_shard_0, 60, "a worker mid-way through shard 0", 0.05)
    survivor = "worker-b" if victim == "worker-a" else "worker-a"
    kill_group(s.workers["ab".index(victim[-1])])  # SIGKILL: no hand-back; only the shard's lease tells
    job = s.wait_finished(job_id, 90)
    assert job["status"] == "succeeded", (job, s.log(survivor)[-3000:])

    lost = kinds(s, job_id, "worker_lost")
    assert [(d["shard"], worker_of(s, d["worker_id"])) for d in lost] == [(0, victim)], lost
    resumed = kinds(s, job_id, "resumed")
    assert [(d.get("shard"), worker_of(s, d["worker_id"])) for d in resumed] == [(0, survivor)], resumed
    assert sorted(d["shard"] for d in kinds(s, job_id, "shard_done")) == [0, 1]
    assert [d["to"] for d in kinds(s, job_id, "status")].count("succeeded") == 1
    assert stored_soft_labels(s, job_id) == one_run(s, job_id, tmp_path / "in", tmp_path / "one")
