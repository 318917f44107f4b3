"""A real `distill worker` process asked to stop (SIGTERM, as `docker stop` or a spot notice would) in the
middle of distillation: the stage checkpoints through the train loop's stop hook within the grace time,
the job is handed back (no failure, no `worker_lost`), and a second worker resumes it from that checkpoint."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from tests.reliability.stack import FIXED_JOB, blob_job_inputs, stack

pytestmark = pytest.mark.e2e
torch.set_num_threads(1)

# 40 epochs: long enough that the stop lands mid-training on a fast CPU (8 epochs ran out in 2.6 s).
CONFIG = {**FIXED_JOB, "epochs": 40, "batch_size": 16}
GRACE_S = 15  # what an orchestrator would allow before its SIGKILL


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return blob_job_inputs(tmp_path_factory.mktemp("inputs"), rows=1000, seed=5)


def test_sigterm_mid_distill_checkpoints_hands_back_and_resumes(tmp_path, inputs):
    with stack(tmp_path) as s:
        teacher, dataset = s.upload_inputs(inputs)
        first = s.start_worker("worker-a")
        job_id = s.submit(teacher, dataset, CONFIG)

        s.wait_for_epoch(job_id, 2)
        asked = time.monotonic()
        first.send_signal(signal.SIGTERM)  # the worker process only, as `docker stop` does
        first.wait(GRACE_S)  # raises if the worker does not stop within the grace time
        assert time.monotonic() - asked < GRACE_S
        log_a = s.log("worker-a")
        job = s.job(job_id)
        assert job["status"] == "distilling", (job, log_a[-3000:])
        assert "stopped (shutdown)" in log_a, log_a[-3000:]
        last_epoch_a = max(e["data"]["epoch"] for e in s.events(job_id) if e["kind"] == "epoch")

        s.start_worker("worker-b")
        job = s.wait_finished(job_id, 60)
        assert job["status"] == "succeeded", (job, s.log("worker-b")[-3000:])
        events = s.events(job_id)
        kinds = [e["kind"] for e in events]
        assert "worker_lost" not in kinds and "attempt_failed" not in kinds, kinds
        assert kinds.count("resumed") == 1, kinds
        resumed = next(e["seq"] for e in events if e["kind"] == "resumed")
        first_epoch_b = next(
            e["data"]["epoch"] for e in events if e["seq"] > resumed and e["kind"] == "epoch"
        )
        # Resumed from the checkpoint written at the stop, not trained again from epoch 1.
        assert first_epoch_b > 1 and first_epoch_b >= last_epoch_a, (first_epoch_b, last_epoch_a)
