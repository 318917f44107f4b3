"""A dataset registered from an `s3://bucket/prefix/` of WebDataset shards, on the production stack: listed
and checksummed at registration, fetched shard by shard by the worker (its sandboxed child has no network),
streamed into the job; a shard replaced after registration fails the next job instead of training on other
data than was registered."""

from __future__ import annotations

import tarfile
from pathlib import Path

import boto3
import pytest

from app.config import Settings
from tests.distill.test_streaming import add, bars, png, write_teacher
from tests.support import api
from tests.support.processes import child_env
from tests.support.services import api_client

pytestmark = pytest.mark.e2e

CUSTOMER = "customer-shards"


def shard(path: Path, first: int, rows: int) -> bytes:
    x, y = bars(rows, seed=first)
    with tarfile.open(path, "w") as tar:
        for i, (pixels, label) in enumerate(zip(x, y, strict=True)):
            add(tar, f"{first + i:06d}.png", png(pixels))
            add(tar, f"{first + i:06d}.cls", str(int(label)).encode())
    return path.read_bytes()


def test_a_job_streams_a_dataset_registered_from_an_s3_prefix(
    tmp_path: Path, stack_env: dict[str, str], s3_endpoint: str, start_worker
) -> None:
    env = stack_env
    customer = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="e2e",
        aws_secret_access_key="e2e-secret",
    )  # fmt: skip
    customer.create_bucket(Bucket=CUSTOMER)
    sizes = []
    for number, first in enumerate((0, 60)):
        body = shard(tmp_path / f"s{number}.tar", first, 60)
        customer.put_object(Bucket=CUSTOMER, Key=f"cats/train/shard-{number:06d}.tar", Body=body)
        sizes.append(len(body))
    customer.put_object(Bucket=CUSTOMER, Key="cats/train/README.txt", Body=b"not a shard")
    worker = start_worker(child_env(**env))

    settings = Settings(**{k.removeprefix("DISTILL_").lower(): v for k, v in env.items()})
    with api_client(settings, tenant="e2e-shards") as http:
        registered = http.post(
            "/v1/files/register", json={"uri": f"s3://{CUSTOMER}/cats/train/", "purpose": "dataset"}
        )
        assert registered.status_code == 201, registered.text
        dataset = registered.json()
        assert dataset["shards"] == 2 and dataset["size"] == sum(sizes) and dataset["filename"] == "train"
        for body, code in (
            ({"uri": f"s3://{CUSTOMER}/cats/nothing-here/", "purpose": "dataset"}, "object_not_found"),
            ({"uri": f"s3://{CUSTOMER}/cats/train/", "purpose": "teacher"}, "validation_error"),
        ):
            api.assert_problem(http.post("/v1/files/register", json=body), 422, code)

        teacher = api.upload(http, "teacher", write_teacher(tmp_path / "teacher.pt"))
        config = api.fixed_config(2, export_formats=("safetensors",), batch_size=16, lr=0.01)
        body = {**api.job_body(teacher["id"], dataset["id"]), "student": "cnn:channels=4"}
        body["config"] = {**config, "preprocess": {"scale": 1 / 255}, "streaming": "auto"}
        job = api.wait_for_job(http, api.post_job(http, body)["id"], timeout=180, every=0.5)
        assert job["status"] == "succeeded", job
        report = http.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
        # Labelled and split like any dataset (the teacher is untrained: the plumbing is what is checked)
        assert report["evaluated_on"] == "val"
        assert set(report["soft_labels"]["teacher_accuracy"]) == {"train", "val"}
        assert report["student"]["accuracy"] is not None and report["student"]["agreement"] is not None

        # The customer replaces a shard: the registered version is gone, and the next job says so.
        replaced = shard(tmp_path / "new.tar", 0, 5)
        customer.put_object(Bucket=CUSTOMER, Key="cats/train/shard-000001.tar", Body=replaced)
        failed = api.wait_for_job(http, api.post_job(http, body)["id"], timeout=120, every=0.5)
        assert failed["status"] == "failed" and failed["error"]["code"] == "input_changed", failed
    assert worker.poll() is None
