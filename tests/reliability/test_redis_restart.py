"""Our own Redis (no persistence) killed mid-distill and started again on the same port: every message
it held is gone, the worker must reconnect, and the job row still drives the job to one success."""

from __future__ import annotations

import time

import pytest
import redis
import torch

from app.config import Settings
from app.queue import DISTILL_QUEUE, enqueue_stage, make_celery_client
from tests.reliability.stack import stack
from tests.reliability.test_worker_sigkill import CONFIG, inputs  # noqa: F401  (the module-scoped fixture)
from tests.support.processes import wait_until

pytestmark = pytest.mark.e2e
torch.set_num_threads(1)


def test_a_redis_restart_mid_distill_still_ends_in_one_success(tmp_path, inputs):  # noqa: F811
    with stack(tmp_path) as s:
        teacher, dataset = s.upload_inputs(inputs)
        s.start_worker("worker-a")
        job_id = s.submit(teacher, dataset, {**CONFIG, "epochs": 5})

        s.wait_for_epoch(job_id, 1)
        assert s.job(job_id)["status"] == "distilling"
        s.redis.stop()  # SIGKILL, no persistence: the unacked delivery and every queue are lost
        time.sleep(3)
        s.redis.start()

        job = s.wait_finished(job_id, 50)
        assert job["status"] == "succeeded", (job, s.log("worker-a")[-3000:])
        time.sleep(2)  # a second completion, if one were coming, would show by now (reaper every 1 s)
        events = s.events(job_id)
        done = [e for e in events if e["kind"] == "status" and e["data"].get("to") == "succeeded"]
        assert len(done) == 1, [e["kind"] for e in events]
        kinds = [e["kind"] for e in events]
        assert "worker_lost" not in kinds and "attempt_failed" not in kinds, kinds  # the stage ran on, once
        assert [e for e in events if e["kind"] == "status" and e["data"].get("to") == "failed"] == []
        names = [a["name"] for a in s.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]]
        assert "student.safetensors" in names and len(names) == len(set(names)), names
        assert s.http.get(f"/v1/jobs/{job_id}/artifacts/student.safetensors").status_code == 200
        assert s.workers[0].poll() is None, "the worker must survive the broker outage"

        # The same worker consumes from the restarted broker: a late duplicate of the stage is taken off the
        # queue (it reconnected, not just finished in flight) and is a no-op (still one completion).
        enqueue_stage(make_celery_client(Settings(broker_url=s.redis.url)), "distill", job_id)
        queue = redis.Redis.from_url(s.redis.url)
        wait_until(
            lambda: queue.llen(DISTILL_QUEUE) == 0 and not queue.hlen("unacked"), 20, "the queue to drain"
        )
        time.sleep(1)
        events = s.events(job_id)
        assert len([e for e in events if e["kind"] == "status" and e["data"].get("to") == "succeeded"]) == 1
        assert [e["kind"] for e in events] == kinds


def test_a_job_submitted_while_redis_is_down_is_accepted_and_runs_once_it_is_back(tmp_path, inputs):  # noqa: F811
    """The row is committed before the enqueue; a broker that is down makes the enqueue fail after commit,
    which the API logs and answers 201 for (the job exists). The reaper re-sends a queued job nobody took."""
    with stack(tmp_path) as s:
        teacher, dataset = s.upload_inputs(inputs)
        s.redis.stop()
        started = time.monotonic()
        job_id = s.submit(teacher, dataset, {**CONFIG, "epochs": 2})  # asserts 201
        assert time.monotonic() - started < 10, "the broker outage must not hang the request"
        assert s.job(job_id)["status"] == "queued"

        s.redis.start()  # empty: the message never reached it
        assert redis.Redis.from_url(s.redis.url).dbsize() == 0
        s.start_worker("worker-a")  # its reaper re-sends the stale queued job (stale after 4 s here)
        job = s.wait_finished(job_id, 60)
        assert job["status"] == "succeeded", (job, s.log("worker-a")[-3000:])
        time.sleep(2)  # a second run, if the re-send and a late original both arrived, would show by now
        events = s.events(job_id)
        statuses = [e["data"]["to"] for e in events if e["kind"] == "status"]
        assert statuses == ["queued", "soft_labeling", "distilling", "evaluating", "exporting", "succeeded"]
        kinds = [e["kind"] for e in events]
        assert "worker_lost" not in kinds and "attempt_failed" not in kinds, kinds
