"""A real `distill worker` SIGKILLed mid-soft-labelling: another worker takes the stage over and the soft
labels (every shard's sha256 in the manifest) equal those of an uninterrupted run of the same job."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.reliability.stack import FIXED_JOB, stack
from tests.support.data import write_inputs
from tests.support.processes import kill_group, wait_until

pytestmark = pytest.mark.e2e
torch.set_num_threads(1)

CONFIG = {**FIXED_JOB, "epochs": 1, "shard_size": 300}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A teacher wide enough that labelling 4500 rows takes a few seconds: time to kill mid-stage."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1.0, (4500, 8)).astype(np.float32)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(
        torch.nn.Linear(8, 768),
        torch.nn.ReLU(),
        torch.nn.Linear(768, 768),
        torch.nn.ReLU(),
        torch.nn.Linear(768, 3),
    ).eval()
    y = teacher(torch.from_numpy(x)).argmax(-1).detach().numpy()
    return write_inputs(folder, teacher, x, y.astype(np.int64))


def shards(http, job_id: str) -> dict:  # type: ignore[no-untyped-def]
    r = http.get(f"/v1/jobs/{job_id}/artifacts/soft_labels_manifest.json")
    assert r.status_code == 200, r.text
    return json.loads(r.content)["splits"]


def test_a_sigkilled_worker_mid_soft_labelling_gives_the_same_logits(tmp_path, inputs):
    with stack(tmp_path) as s:
        teacher, dataset = s.upload_inputs(inputs)
        first = s.start_worker("worker-a")
        job_id = s.submit(teacher, dataset, CONFIG)
        folder = s.scratch("worker-a", job_id) / "soft_labels"
        wait_until(lambda: len(list(folder.glob("train-*.npz"))) >= 3, 60, "three finished shards", 0.02)
        kill_group(first)
        assert s.job(job_id)["status"] == "soft_labeling"
        assert not (folder / "manifest.json").is_file() or not json.loads(
            (folder / "manifest.json").read_text()
        )["splits"].get("train", {}).get("complete")

        s.start_worker("worker-b")
        job = s.wait_finished(job_id, 60)
        assert job["status"] == "succeeded", (job, s.log("worker-b")[-3000:])
        kinds = [e["kind"] for e in s.events(job_id)]
        assert kinds.count("worker_lost") == 1 and kinds.count("resumed") == 1, kinds

        reference = s.submit(teacher, dataset, CONFIG)
        assert s.wait_finished(reference, 60)["status"] == "succeeded"
        got, want = shards(s.http, job_id), shards(s.http, reference)
        assert got == want and len(want["train"]["shards"]) > 3
