"""PostgreSQL unreachable under a running worker (a proxy of our own between the worker and the shared
server, cut for 8 s mid-distill, shorter than the lease): the stage computes on, the writes that waited
(every epoch's record, the stage changes) go out in order once the database is back, and the job succeeds
once, with no attempt lost."""

from __future__ import annotations

import time

import pytest
import torch
from sqlalchemy.engine import make_url

from tests.reliability.proxy import TcpProxy
from tests.reliability.stack import FIXED_JOB, blob_job_inputs, stack
from tests.support.processes import wait_until

pytestmark = pytest.mark.e2e
torch.set_num_threads(1)

EPOCHS = 16
CONFIG = {**FIXED_JOB, "epochs": EPOCHS, "batch_size": 16}
OUTAGE_S = 8.0


def test_a_postgres_outage_under_a_running_worker_loses_no_write_and_no_attempt(tmp_path):
    teacher_path, dataset_path = blob_job_inputs(tmp_path, rows=2000, seed=5)
    with stack(tmp_path) as s, TcpProxy("127.0.0.1", make_url(s.database_url).port or 5432) as proxy:
        proxied = make_url(s.database_url).set(host="127.0.0.1", port=proxy.port)
        s.worker_database_url = proxied.render_as_string(hide_password=False)
        s.worker_settings["worker_lease_s"] = 30  # the outage is shorter than the lease
        teacher, dataset = s.upload_inputs((teacher_path, dataset_path))
        s.start_worker("worker")
        job_id = s.submit(teacher, dataset, CONFIG)

        def epochs() -> list[int]:
            return [e["data"]["epoch"] for e in s.events(job_id) if e["kind"] == "epoch"]

        wait_until(lambda: len(epochs()) >= 2, 90, "a second distill epoch")
        proxy.down()  # the worker's connections are cut and new ones refused; the API still reads directly
        cut_at_epoch = len(epochs())
        time.sleep(OUTAGE_S)
        during = s.job(job_id)
        assert during["status"] == "distilling", during
        assert len(epochs()) == cut_at_epoch  # nothing reached the database meanwhile
        proxy.up()

        job = s.wait_finished(job_id, 120)
        log = s.log("worker")
        assert job["status"] == "succeeded", (job, log[-3000:])
        assert "database unreachable" in log and "database back after" in log, log[-3000:]
        kinds = [e["kind"] for e in s.events(job_id)]
        assert "worker_lost" not in kinds and "attempt_failed" not in kinds and "resumed" not in kinds, kinds
        # Every epoch's record, the ones trained during the outage included, once and in order.
        assert epochs() == list(range(1, EPOCHS + 1)), epochs()
        statuses = [e["data"]["to"] for e in s.events(job_id) if e["kind"] == "status"]
        assert statuses == ["queued", "soft_labeling", "distilling", "evaluating", "exporting", "succeeded"]
        assert s.http.get(f"/v1/jobs/{job_id}/artifacts/student.safetensors").status_code == 200
