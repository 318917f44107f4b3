"""A real `distill worker` process SIGKILLed mid-distillation: the reaper of a second worker sees the
expired lease, the job resumes from the mirrored epoch checkpoint and ends with the same weights as an
uninterrupted run of the same job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_safetensors

from tests.reliability.stack import FIXED_JOB, blob_job_inputs, stack
from tests.support.processes import kill_group

pytestmark = pytest.mark.e2e
torch.set_num_threads(1)

CONFIG = {**FIXED_JOB, "epochs": 8, "batch_size": 16}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return blob_job_inputs(tmp_path_factory.mktemp("inputs"), rows=2000, seed=3)


def weights(http, job_id: str) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    r = http.get(f"/v1/jobs/{job_id}/artifacts/student.safetensors")
    assert r.status_code == 200, r.text
    return load_safetensors(r.content)


def test_a_sigkilled_worker_mid_distill_resumes_to_the_same_weights(tmp_path, inputs):
    with stack(tmp_path) as s:
        teacher, dataset = s.upload_inputs(inputs)
        first = s.start_worker("worker-a")
        job_id = s.submit(teacher, dataset, CONFIG)

        s.wait_for_epoch(job_id, 3)
        kill_group(first)  # SIGKILL: no hand-back, no release; only the lease tells
        assert s.job(job_id)["status"] == "distilling"

        s.start_worker("worker-b")
        job = s.wait_finished(job_id, 60)
        assert job["status"] == "succeeded", (job, s.log("worker-b")[-3000:])
        kinds = [e["kind"] for e in s.events(job_id)]
        assert kinds.count("worker_lost") == 1 and kinds.count("resumed") == 1, kinds
        events = s.events(job_id)
        after = [e for e in events if e["seq"] > next(x["seq"] for x in events if x["kind"] == "resumed")]
        first_epoch = next(e["data"]["epoch"] for e in after if e["kind"] == "epoch")
        assert first_epoch > 1  # picked up from the mirrored checkpoint, not trained again from scratch

        reference = s.submit(teacher, dataset, CONFIG)  # the same job, never interrupted
        assert s.wait_finished(reference, 60)["status"] == "succeeded"
        got, want = weights(s.http, job_id), weights(s.http, reference)
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
