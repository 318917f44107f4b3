"""Object storage (an S3 server, moto, behind a proxy of our own) unreachable for a full minute while a
real worker distills: its uploads are retried with back-off and the job still succeeds, once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import torch
from fastapi.testclient import TestClient
from moto.server import ThreadedMotoServer

from app.config import Settings
from app.db import Database, session_scope
from app.main import create_app
from app.tenants import service as tenants
from tests.reliability.proxy import TcpProxy
from tests.reliability.stack import (
    RedisServer,
    Stack,
    free_port,
    kill_group,
    postgres_database,
    submit,
    upload,
    wait_until,
)
from tests.reliability.test_worker_sigkill import CONFIG, inputs  # noqa: F401  (the module-scoped fixture)

pytestmark = pytest.mark.e2e
torch.set_num_threads(1)
OUTAGE_S = 60.0  # the "unavailable for a minute"; the worker's retry budget is 120 s
S3 = {
    "s3_bucket": "distill",
    "s3_region": "us-east-1",
    "s3_access_key_id": "test",
    "s3_secret_access_key": "test",
}


class S3Stack(Stack):
    endpoint: str = ""

    def worker_env(self, name: str) -> dict[str, str]:
        env = super().worker_env(name)
        env.update(DISTILL_STORAGE_BACKEND="s3", DISTILL_S3_ENDPOINT_URL=self.endpoint)
        env.update({f"DISTILL_{k.upper()}": v for k, v in S3.items()})
        return env


@contextlib.contextmanager
def s3_stack(tmp: Path) -> Iterator[tuple[S3Stack, TcpProxy]]:
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    moto.start()
    redis = RedisServer(tmp / "redis")
    redis.start()
    try:
        with postgres_database() as url, TcpProxy("127.0.0.1", moto._port) as proxy:
            endpoint = f"http://127.0.0.1:{proxy.port}"
            boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name="us-east-1",
                aws_access_key_id="test",
                aws_secret_access_key="test",
            ).create_bucket(Bucket="distill")
            settings = Settings(
                data_dir=tmp / "api",
                database_url=url,
                broker_url=redis.url,
                storage_backend="s3",
                s3_endpoint_url=endpoint,
                **S3,
            )
            db = Database.from_settings(settings)
            with session_scope(db) as session:
                key = tenants.create_key(session, "acme")
            with TestClient(create_app(settings, db=db), headers={"Authorization": f"Bearer {key}"}) as http:
                s = S3Stack(tmp, url, redis, http)
                s.endpoint = endpoint
                try:
                    yield s, proxy
                finally:
                    for proc in s.workers:
                        kill_group(proc)
            db.dispose()
    finally:
        redis.stop()
        moto.stop()


def test_uploads_retry_through_a_minute_long_storage_outage_and_the_job_succeeds(tmp_path, inputs):  # noqa: F811
    with s3_stack(tmp_path) as (s, proxy):
        teacher, dataset = upload(s.http, "teacher", inputs[0]), upload(s.http, "dataset", inputs[1])
        s.start_worker("worker-a")
        job_id = submit(s.http, teacher, dataset, {**CONFIG, "epochs": 5})
        wait_until(lambda: any(e["kind"] == "epoch" for e in s.events(job_id)), 60, "the first distill epoch")

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
