"""Files API: streamed multipart and raw uploads, the size cap (with and without Content-Length), malformed
bodies, listing, deletion and tenant scoping."""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from app.config import Settings
from app.db.session import Database
from app.main import create_app
from app.queue import CeleryEnqueuer
from app.storage import LocalStorage
from tests.app.conftest import Tenant
from tests.support.api import assert_problem, upload

MIB = 1024 * 1024


def stored_objects(storage: LocalStorage) -> list[Path]:
    """Everything under the object folder, temporary part files included."""
    return [p for p in storage.root.rglob("*") if p.is_file()]


def test_multipart_upload_streams_into_storage_with_size_and_sha256(
    client: TestClient, alice: Tenant, storage: LocalStorage
) -> None:
    content = bytes(range(256)) * 1000  # 256 kB minus a little: under the 256 KiB cap
    body = upload(client, "teacher", content, "../../etc/teacher.pt", alice.headers)
    assert body["id"].startswith("file_")
    assert body["size"] == len(content) and body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["filename"] == "teacher.pt" and body["purpose"] == "teacher"
    [path] = stored_objects(storage)
    assert path.read_bytes() == content
    assert client.get(f"/v1/files/{body['id']}", headers=alice.headers).json() == body


def test_purpose_after_the_file_part_and_raw_body_uploads(client: TestClient, alice: Tenant) -> None:
    boundary = "b0undary"
    raw = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.csv"\r\n\r\n'
        "a,b\n1,2\n\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\ndataset\r\n--{boundary}--\r\n'
    ).encode()
    response = client.post(
        "/v1/files",
        headers={**alice.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=raw,
    )
    assert response.status_code == 201, response.text
    assert response.json()["purpose"] == "dataset" and response.json()["size"] == len(b"a,b\n1,2\n")

    response = client.post(
        "/v1/files?purpose=student_init&filename=init.safetensors",
        content=b"weights",
        headers={**alice.headers, "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["filename"] == "init.safetensors"
    assert response.json()["sha256"] == hashlib.sha256(b"weights").hexdigest()


def test_bad_purpose_names_the_field_and_stores_nothing(
    client: TestClient, alice: Tenant, storage: LocalStorage
) -> None:
    response = client.post(
        "/v1/files", headers=alice.headers, data={"purpose": "weights"}, files={"file": ("x", b"abc")}
    )
    body = assert_problem(response, 422, "validation_error")
    assert body["errors"][0]["field"] == "purpose"
    response = client.post("/v1/files", headers=alice.headers, content=b"abc")  # raw body, no purpose
    assert assert_problem(response, 422, "validation_error")["errors"][0]["field"] == "purpose"
    assert stored_objects(storage) == []


def test_upload_over_the_cap_is_413_and_leaves_nothing(
    client: TestClient, alice: Tenant, storage: LocalStorage
) -> None:
    too_big = b"x" * (256 * 1024 + 1)
    response = client.post(
        "/v1/files", headers=alice.headers, data={"purpose": "dataset"}, files={"file": ("big.bin", too_big)}
    )
    assert_problem(response, 413, "file_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the cap must trip while streaming
        for _ in range(40):
            yield b"y" * 8192

    response = client.post("/v1/files?purpose=dataset", headers=alice.headers, content=chunked())
    assert_problem(response, 413, "file_too_large")

    boundary = "cap"

    def chunked_multipart() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\ndataset\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n'
        ).encode()
        yield from chunked()
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/v1/files",
        content=chunked_multipart(),
        headers={**alice.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert_problem(response, 413, "file_too_large")
    assert stored_objects(storage) == []
    assert client.get("/v1/files", headers=alice.headers).json()["data"] == []


def test_a_content_length_of_thousands_of_digits_is_413_not_500(
    client: TestClient, alice: Tenant, storage: LocalStorage
) -> None:
    huge = {**alice.headers, "Content-Length": "9" * 4301}  # past Python's int-string limit
    response = client.post("/v1/files?purpose=dataset", headers=huge, content=b"abc")
    assert_problem(response, 413, "file_too_large")
    assert stored_objects(storage) == []


def test_malformed_multipart_is_400_and_leaves_nothing(
    client: TestClient, alice: Tenant, storage: LocalStorage
) -> None:
    multipart = {**alice.headers, "Content-Type": "multipart/form-data; boundary=zz"}
    truncated = b'--zz\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\npartial data'
    assert_problem(
        client.post("/v1/files?purpose=teacher", headers=multipart, content=truncated),
        400,
        "malformed_multipart",
    )
    garbage = b"this is not multipart at all"
    assert_problem(
        client.post("/v1/files?purpose=teacher", headers=multipart, content=garbage),
        400,
        "malformed_multipart",
    )
    no_boundary = {**alice.headers, "Content-Type": "multipart/form-data"}
    assert_problem(
        client.post("/v1/files", headers=no_boundary, content=b"--x--"), 400, "malformed_multipart"
    )
    no_file = client.post(
        "/v1/files", headers=alice.headers, data={"purpose": "teacher"}, files={"other": b"x"}
    )
    assert_problem(no_file, 400, "malformed_multipart")
    assert stored_objects(storage) == []


def test_list_pages_filters_and_delete_removes_the_object(
    client: TestClient, alice: Tenant, storage: LocalStorage
) -> None:
    ids = [upload(client, "dataset", f"d{i}".encode(), headers=alice.headers)["id"] for i in range(3)]
    teacher = upload(client, "teacher", headers=alice.headers)["id"]
    page = client.get("/v1/files?limit=2", headers=alice.headers).json()
    assert [f["id"] for f in page["data"]] == [teacher, ids[2]]
    rest = client.get(f"/v1/files?limit=2&cursor={page['next_cursor']}", headers=alice.headers).json()
    assert [f["id"] for f in rest["data"]] == [ids[1], ids[0]] and rest["next_cursor"] is None
    datasets = client.get("/v1/files?purpose=dataset", headers=alice.headers).json()["data"]
    assert {f["id"] for f in datasets} == set(ids)

    assert client.delete(f"/v1/files/{ids[0]}", headers=alice.headers).status_code == 204
    assert len(stored_objects(storage)) == 3
    assert_problem(client.get(f"/v1/files/{ids[0]}", headers=alice.headers), 404, "file_not_found")
    assert_problem(client.delete(f"/v1/files/{ids[0]}", headers=alice.headers), 404, "file_not_found")


def test_files_are_invisible_to_other_tenants(client: TestClient, alice: Tenant, bob: Tenant) -> None:
    mine = upload(client, "teacher", headers=alice.headers)["id"]
    missing = assert_problem(
        client.get("/v1/files/file_doesnotexist", headers=bob.headers), 404, "file_not_found"
    )
    other = assert_problem(client.get(f"/v1/files/{mine}", headers=bob.headers), 404, "file_not_found")
    assert other == missing
    assert_problem(client.delete(f"/v1/files/{mine}", headers=bob.headers), 404, "file_not_found")
    assert client.get("/v1/files", headers=bob.headers).json()["data"] == []
    assert client.get(f"/v1/files/{mine}", headers=alice.headers).status_code == 200


def test_register_needs_the_s3_backend(client: TestClient, alice: Tenant) -> None:
    response = client.post(
        "/v1/files/register", headers=alice.headers, json={"uri": "s3://bucket/key.npz", "purpose": "dataset"}
    )
    assert_problem(response, 400, "s3_not_configured")


def test_a_large_chunked_upload_keeps_memory_flat(
    settings: Settings, db: Database, storage: LocalStorage, alice: Tenant, enqueuer: CeleryEnqueuer
) -> None:
    """32 MiB streamed through the ASGI app (not the TestClient, which buffers bodies): the bytes reach the
    store while traced memory stays a small fraction of the file."""
    settings.max_upload_bytes = 64 * MIB
    app = create_app(settings, db=db, storage=storage, enqueue=enqueuer)
    chunk = bytes(range(256)) * 1024  # 256 KiB
    boundary = "flat"

    async def body() -> AsyncIterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\ndataset\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'
        ).encode()
        for _ in range(128):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    async def send() -> httpx.Response:
        headers = {**alice.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/v1/files", headers=headers, content=body())

    tracemalloc.start()
    try:
        response = asyncio.run(send())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 201, response.text
    assert response.json()["size"] == 128 * len(chunk)
    assert response.json()["sha256"] == hashlib.sha256(chunk * 128).hexdigest()
    assert peak < 8 * MIB, f"peak traced memory {peak / MIB:.1f} MiB for a 32 MiB upload"
