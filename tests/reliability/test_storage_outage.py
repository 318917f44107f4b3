"""Object storage (an S3 server, moto, behind a proxy of our own) unreachable for a full minute while a
real worker distills: its uploads are retried with back-off and the job still succeeds, once."""

from __future__ import annotations

import time

import pytest
import torch

from tests.reliability.stack import proxied_s3, stack
from tests.reliability.test_worker_sigkill import CONFIG, inputs  # noqa: F401  (the module-scoped fixture)

pytestmark = pytest.mark.e2e
torch.set_num_threads(1)
OUTAGE_S = 60.0  # the "unavailable for a minute"; the worker's retry budget is 120 s


def test_uploads_retry_through_a_minute_long_storage_outage_and_the_job_succeeds(tmp_path, inputs):  # noqa: F811
    with proxied_s3() as (s3, proxy), stack(tmp_path, **s3) as s:
        teacher, dataset = s.upload_inputs(inputs)
        s.start_worker("worker-a")
        job_id = s.submit(teacher, dataset, {**CONFIG, "epochs": 5})
        s.wait_for_epoch(job_id, 1)

        proxy.down(listen=True)  # every request to the store is cut: checkpoint mirrors, then artifacts
        time.sleep(OUTAGE_S)
        tried = proxy.refused
        assert s.job(job_id)["status"] != "succeeded"  # its artifacts cannot have reached the store
        proxy.up()

        job = s.wait_finished(job_id, 45)
        log = s.log("worker-a")
        assert job["status"] == "succeeded", (job, log[-4000:])
        assert tried >= 2, "the worker never tried the store again during the outage"
        kinds = [e["kind"] for e in s.events(job_id)]
        succeeded = [
            e for e in s.events(job_id) if e["kind"] == "status" and e["data"].get("to") == "succeeded"
        ]
        assert len(succeeded) == 1, kinds
        # The outage is not the worker's death: its lease kept beating while uploads waited.
        assert "worker_lost" not in kinds and "attempt_failed" not in kinds, kinds
        r = s.http.get(f"/v1/jobs/{job_id}/artifacts/student.safetensors")
        assert r.status_code == 200 and len(r.content) > 0
