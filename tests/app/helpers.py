"""Small request helpers shared by the API tests."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient


def upload(
    client: TestClient,
    headers: dict[str, str],
    purpose: str,
    content: bytes = b"payload",
    filename: str = "blob.bin",
) -> dict[str, Any]:
    response = client.post(
        "/v1/files",
        headers=headers,
        data={"purpose": purpose},
        files={"file": (filename, content, "application/octet-stream")},
    )
    assert response.status_code == 201, response.text
    return response.json()


def job_body(teacher_id: str, dataset_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "teacher_file_ids": [teacher_id],
        "dataset_file_id": dataset_id,
        "student": "mlp:hidden=32",
        "config": {"epochs": 2},
        **extra,
    }


def inputs(client: TestClient, headers: dict[str, str]) -> tuple[str, str]:
    teacher = upload(client, headers, "teacher", b"teacher-bytes", "teacher.pt")
    dataset = upload(client, headers, "dataset", b"dataset-bytes", "data.npz")
    return teacher["id"], dataset["id"]


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["code"] == code, body
    assert {"type", "title", "detail"} <= set(body)
    return body
