"""Artifact downloads: streamed with Content-Length and a strong ETag, byte ranges (206/416), 304."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient

from app.db.session import Database, session_scope
from app.jobs import lifecycle
from app.storage import LocalStorage, keys
from tests.app.conftest import Tenant
from tests.support.api import assert_problem, inputs, job_body

CONTENT = bytes(range(256)) * 40  # 10240 bytes


@pytest.fixture
def artifact_url(client: TestClient, alice: Tenant, db: Database, storage: LocalStorage) -> str:
    teacher, dataset = inputs(client, alice.headers)
    job = client.post("/v1/jobs", headers=alice.headers, json=job_body(teacher, dataset)).json()
    with session_scope(db) as session:
        tenant_id = lifecycle.get_job_for_worker(session, job["id"]).tenant_id  # type: ignore[union-attr]
        key = keys.artifact_key(tenant_id, job["id"], "student.onnx")
        size, sha = storage.put_stream(key, iter([CONTENT]))
        lifecycle.add_artifact(session, job["id"], "student.onnx", key, size, sha, "application/octet-stream")
    return f"/v1/jobs/{job['id']}/artifacts/student.onnx"


def test_full_download_has_length_etag_and_the_bytes(
    client: TestClient, alice: Tenant, artifact_url: str
) -> None:
    response = client.get(artifact_url, headers=alice.headers)
    assert response.status_code == 200 and response.content == CONTENT
    assert response.headers["content-length"] == str(len(CONTENT))
    assert response.headers["etag"] == f'"{hashlib.sha256(CONTENT).hexdigest()}"'
    assert response.headers["accept-ranges"] == "bytes"
    assert "student.onnx" in response.headers["content-disposition"]
    again = client.get(artifact_url, headers={**alice.headers, "If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-99", 0, 100),
        ("bytes=10000-", 10000, 10240),
        ("bytes=-40", 10200, 10240),
        ("bytes=10200-99999", 10200, 10240),
        ("bytes=5-5", 5, 6),
    ],
)
def test_byte_ranges_are_206_with_content_range(
    client: TestClient, alice: Tenant, artifact_url: str, header: str, start: int, end: int
) -> None:
    response = client.get(artifact_url, headers={**alice.headers, "Range": header})
    assert response.status_code == 206, response.text
    assert response.content == CONTENT[start:end]
    assert response.headers["content-length"] == str(end - start)
    assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{len(CONTENT)}"


def test_unsatisfiable_and_ignored_ranges(client: TestClient, alice: Tenant, artifact_url: str) -> None:
    outside = client.get(artifact_url, headers={**alice.headers, "Range": "bytes=20000-"})
    assert_problem(outside, 416, "range_not_satisfiable")
    assert outside.headers["content-range"] == f"bytes */{len(CONTENT)}"
    backwards = client.get(artifact_url, headers={**alice.headers, "Range": "bytes=50-10"})
    assert backwards.status_code == 416
    for ignored in ("bytes=0-1,5-6", "items=0-1", "bytes=abc"):  # RFC 9110: may be ignored -> whole object
        response = client.get(artifact_url, headers={**alice.headers, "Range": ignored})
        assert response.status_code == 200 and response.content == CONTENT
    stale = client.get(artifact_url, headers={**alice.headers, "Range": "bytes=0-9", "If-Range": '"old"'})
    assert stale.status_code == 200 and len(stale.content) == len(CONTENT)


HUGE = "9" * 4301  # past Python's int-string limit: int() of it raises


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        (f"bytes=0-{HUGE}", 0, 10240),  # answered as bytes=0-9999999999 is: to the end
        (f"bytes=10200-{HUGE}", 10200, 10240),
        (f"bytes=-{HUGE}", 0, 10240),  # a suffix longer than the object is all of it
        (f"bytes={'0' * 5000}5-{'0' * 5000}9", 5, 10),  # leading zeros keep a number small
    ],
    ids=["huge-last", "start-huge-last", "huge-suffix", "zero-padded"],
)
def test_ranges_with_thousands_of_digits_are_206(
    client: TestClient, alice: Tenant, artifact_url: str, header: str, start: int, end: int
) -> None:
    response = client.get(artifact_url, headers={**alice.headers, "Range": header})
    assert response.status_code == 206, response.text
    assert response.content == CONTENT[start:end]
    assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{len(CONTENT)}"


@pytest.mark.parametrize(
    "header",
    [f"bytes={HUGE}-", f"bytes={HUGE}-{HUGE}", f"bytes={HUGE}-5", "bytes=99999999999999999999-"],
    ids=["huge-start", "huge-both", "huge-start-small-last", "twenty-digit-start"],
)
def test_starts_past_any_object_are_416(
    client: TestClient, alice: Tenant, artifact_url: str, header: str
) -> None:
    response = client.get(artifact_url, headers={**alice.headers, "Range": header})
    assert_problem(response, 416, "range_not_satisfiable")


def test_missing_artifacts_and_other_tenants(
    client: TestClient, alice: Tenant, bob: Tenant, artifact_url: str
) -> None:
    assert_problem(
        client.get(artifact_url.replace("student.onnx", "student.pt"), headers=alice.headers),
        404,
        "artifact_not_found",
    )
    theirs = client.get(artifact_url, headers=bob.headers)
    assert_problem(theirs, 404, "job_not_found")
