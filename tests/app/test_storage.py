"""The storage contract, run against both backends: the local folder and S3 (moto's server on a free local
port, reached through the same boto3 code path as MinIO). Then the API on the S3 backend."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db.session import Database, session_scope
from app.jobs import lifecycle
from app.main import create_app
from app.queue import CeleryEnqueuer
from app.storage import LocalStorage, Storage, keys
from app.storage.exceptions import ObjectNotFound, ObjectTooLarge
from app.storage.s3 import S3Storage, make_client
from app.tenants import service as tenants
from tests.app.conftest import Tenant
from tests.support.api import assert_problem, job_body, upload
from tests.support.services import moto_s3

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint: str) -> S3Storage:
    client = make_client(s3_endpoint, "us-east-1", "testing", "testing")
    bucket = f"distill-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return S3Storage(client, bucket, part_bytes=5 * MIB)  # S3's smallest part, to exercise multipart


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "objects")
    return request.getfixturevalue("s3")


def leftovers(storage: Storage) -> list[str]:
    if isinstance(storage, LocalStorage):
        return [str(p) for p in storage.root.rglob("*") if p.is_file()]
    assert isinstance(storage, S3Storage)
    objects = storage.client.list_objects_v2(Bucket=storage.bucket).get("Contents", [])
    uploads = storage.client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", [])
    return [o["Key"] for o in objects] + [u["Key"] for u in uploads]


def test_put_stream_read_ranges_and_delete(backend: Storage, tmp_path: Path) -> None:
    data = bytes(range(256)) * (23 * 1024)  # 5.75 MiB: two parts on S3
    size, sha = backend.put_stream("a/b/obj", (data[i : i + MIB] for i in range(0, len(data), MIB)))
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    assert backend.exists("a/b/obj") and backend.size("a/b/obj") == len(data)
    assert b"".join(backend.open_read("a/b/obj")) == data
    assert b"".join(backend.open_read("a/b/obj", 100, 5000)) == data[100:5000]
    assert b"".join(backend.open_read("a/b/obj", len(data) - 3)) == data[-3:]
    backend.download_to("a/b/obj", tmp_path / "copy" / "obj")
    assert (tmp_path / "copy" / "obj").read_bytes() == data
    (tmp_path / "up").write_bytes(b"uploaded")
    assert backend.upload_from(tmp_path / "up", "c") == (8, hashlib.sha256(b"uploaded").hexdigest())
    backend.delete("a/b/obj")
    backend.delete("a/b/obj")  # deleting twice is fine
    assert not backend.exists("a/b/obj")
    with pytest.raises(ObjectNotFound):
        backend.size("a/b/obj")
    with pytest.raises(ObjectNotFound):
        backend.open_read("missing")
    backend.ping()


def test_size_cap_aborts_and_leaves_nothing(backend: Storage) -> None:
    chunks = (b"z" * MIB for _ in range(7))  # passes the 6 MiB cap after a 5 MiB part was sent
    with pytest.raises(ObjectTooLarge):
        backend.put_stream("big", chunks, max_bytes=6 * MIB)
    assert leftovers(backend) == []

    def failing() -> Iterator[bytes]:
        yield b"x" * MIB
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        backend.put_stream("broken", failing())
    assert leftovers(backend) == []


def test_local_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "objects")
    for key in ("../outside", "/etc/passwd", "a/../../outside"):
        with pytest.raises(ValueError):
            storage.put_stream(key, iter([b"x"]))
    with pytest.raises(ValueError):
        keys.job_work_key("ten_1", "job_1", "../other-job/out/student.pt")


def test_presigned_get_serves_one_object(s3: S3Storage) -> None:
    s3.put_stream("k", iter([b"presigned bytes"]))
    url = s3.presigned_get("k", 60)
    assert httpx.get(url).content == b"presigned bytes"
    assert "X-Amz-Expires=60" in url


@pytest.fixture
def s3_client(
    s3: S3Storage, db: Database, pg_url: str, tmp_path: Path, enqueuer: CeleryEnqueuer
) -> TestClient:
    settings = Settings(
        environment="test",
        database_url=pg_url,
        storage_backend="s3",
        s3_bucket=s3.bucket,
        s3_presign_downloads=True,
        max_upload_bytes=8 * MIB,
        key_cache_ttl_s=0,
    )
    return TestClient(create_app(settings, db=db, storage=s3, enqueue=enqueuer))


def test_api_on_s3_upload_register_and_presigned_download(
    s3_client: TestClient, s3: S3Storage, alice: Tenant, bob: Tenant, db: Database
) -> None:
    tenant_id = _tenant_of(db, alice)
    teacher = upload(s3_client, "teacher", b"T" * (6 * MIB), "teacher.onnx", alice.headers)
    assert s3.size(keys.file_key(tenant_id, teacher["id"])) == 6 * MIB  # streamed as a multipart upload

    other = s3.with_bucket(f"customer-{uuid.uuid4().hex[:8]}")
    s3.client.create_bucket(Bucket=other.bucket)
    other.put_stream("data/train.npz", iter([b"dataset"]))
    response = s3_client.post(
        "/v1/files/register",
        headers=alice.headers,
        json={"uri": f"s3://{other.bucket}/data/train.npz", "purpose": "dataset"},
    )
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["size"] == 7 and dataset["filename"] == "train.npz"
    missing = s3_client.post(
        "/v1/files/register",
        headers=alice.headers,
        json={"uri": f"s3://{other.bucket}/nope", "purpose": "dataset"},
    )
    assert assert_problem(missing, 422, "object_not_found")["errors"][0]["field"] == "uri"
    own = s3_client.post(
        "/v1/files/register",
        headers=alice.headers,
        json={"uri": f"s3://{s3.bucket}/tenants/x/files/y", "purpose": "dataset"},
    )
    assert_problem(own, 422, "validation_error")  # never a way into another tenant's uploads
    bad = s3_client.post(
        "/v1/files/register", headers=alice.headers, json={"uri": "http://x/y", "purpose": "dataset"}
    )
    assert_problem(bad, 422, "validation_error")

    # deleting a registered file leaves the customer's object alone
    assert s3_client.delete(f"/v1/files/{dataset['id']}", headers=alice.headers).status_code == 204
    assert other.exists("data/train.npz")

    dataset = s3_client.post(
        "/v1/files/register",
        headers=alice.headers,
        json={"uri": f"s3://{other.bucket}/data/train.npz", "purpose": "dataset"},
    ).json()
    job = s3_client.post(
        "/v1/jobs", headers=alice.headers, json=job_body(teacher["id"], dataset["id"])
    ).json()
    with session_scope(db) as session:
        key = keys.artifact_key(tenant_id, job["id"], "student.pt")
        size, sha = s3.put_stream(key, iter([b"torchscript"]))
        lifecycle.add_artifact(session, job["id"], "student.pt", key, size, sha, "application/octet-stream")
    url = f"/v1/jobs/{job['id']}/artifacts/student.pt"
    redirect = s3_client.get(url, headers=alice.headers, follow_redirects=False)
    assert redirect.status_code == 307
    assert httpx.get(redirect.headers["location"]).content == b"torchscript"
    assert s3_client.get(url, headers=bob.headers, follow_redirects=False).status_code == 404


def _tenant_of(db: Database, tenant: Tenant) -> str:
    with session_scope(db) as session:
        return tenants.authenticate(session, tenant.key)
