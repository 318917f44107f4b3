"""Requests to the distill API that tests in several folders make, over any client with httpx's interface
(FastAPI's TestClient in-process, httpx.Client to a real server): upload inputs, submit a job, read it, wait
for it, and check a problem+json answer. Each asserts the status it expects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.support.processes import wait_until

FINISHED = ("succeeded", "failed", "cancelled")
# What an upload can be: a file on disk, or (file name, bytes) as a user's client would send it.
Upload = Path | tuple[str, bytes]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def fixed_config(
    epochs: int | None = None, *, export_formats: tuple[str, ...] = ("torchscript",), **more: Any
) -> dict[str, Any]:
    """A job config with nothing to search (method, T and alpha fixed) and no baseline run, so its epochs
    are all it does; `more` adds or overrides fields (batch size, lr, shard size)."""
    fixed = {"method": "hinton", "temperature": 2.0, "alpha": 0.5, "baseline": False}
    config = {**fixed, "export_formats": list(export_formats), **more}
    return config if epochs is None else {"epochs": epochs, **config}


# A job for the served embedded service on 2 shared cores: fixed method, T and alpha, a few epochs.
FAST_CONFIG = fixed_config(4, batch_size=32, lr=0.01)


def tiny_job(epochs: int = 2, **config: Any) -> dict[str, Any]:
    """The student and config of a job small enough to run in-process in a test: an 8-unit MLP, fixed."""
    return {"student": "mlp:hidden=8", "config": fixed_config(epochs, **config)}


def upload(
    http: httpx.Client,
    purpose: str,
    content: Upload | bytes = b"payload",
    filename: str = "blob.bin",
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """POST /v1/files (201); the file as the API shows it. A Path or a (name, bytes) pair brings its name."""
    if isinstance(content, Path):
        filename, content = content.name, content.read_bytes()
    elif isinstance(content, tuple):
        filename, content = content
    files = {"file": (filename, content, "application/octet-stream")}
    r = http.post("/v1/files", headers=headers, data={"purpose": purpose}, files=files)
    assert r.status_code == 201, r.text
    return r.json()


def upload_inputs(
    http: httpx.Client, teacher: Upload, dataset: Upload, headers: dict[str, str] | None = None
) -> tuple[str, str]:
    """Upload a teacher and a dataset; their ids."""
    return upload(http, "teacher", teacher, headers=headers)["id"], upload(
        http, "dataset", dataset, headers=headers
    )["id"]


def inputs(http: httpx.Client, headers: dict[str, str] | None = None) -> tuple[str, str]:
    """Placeholder teacher and dataset bytes, for tests that never run the job: their ids."""
    return upload_inputs(http, ("teacher.pt", b"teacher-bytes"), ("data.npz", b"dataset-bytes"), headers)


def job_body(teacher_id: str, dataset_id: str, **extra: Any) -> dict[str, Any]:
    """A POST /v1/jobs body: a 32-unit MLP student for two epochs unless `extra` says otherwise."""
    return {
        "teacher_file_ids": [teacher_id],
        "dataset_file_id": dataset_id,
        "student": "mlp:hidden=32",
        "config": {"epochs": 2},
        **extra,
    }


def post_job(
    http: httpx.Client, body: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """POST /v1/jobs (201); the job as the API shows it."""
    r = http.post("/v1/jobs", json=body, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def create_job(
    http: httpx.Client, teacher_id: str, dataset_id: str, headers: dict[str, str] | None = None, **fields: Any
) -> str:
    """A job on uploaded files, `fields` as in `job_body`; its id."""
    return post_job(http, job_body(teacher_id, dataset_id, **fields), headers)["id"]


def submit(
    http: httpx.Client, teacher: Upload, dataset: Upload, headers: dict[str, str] | None = None, **fields: Any
) -> str:
    """Upload a teacher and a dataset and submit a job on them, `fields` as in `job_body`; its id."""
    return create_job(http, *upload_inputs(http, teacher, dataset, headers), headers=headers, **fields)


def get_job(http: httpx.Client, job_id: str) -> dict[str, Any]:
    return http.get(f"/v1/jobs/{job_id}").json()


def events(http: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return http.get(f"/v1/jobs/{job_id}/events").json()["data"]


def artifact_names(http: httpx.Client, job_id: str) -> set[str]:
    return {a["name"] for a in http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}


def wait_for_job(
    http: httpx.Client, job_id: str, timeout: float, every: float = 0.25, seen: list[str] | None = None
) -> dict[str, Any]:
    """Polls the job until it has finished (succeeded, failed, cancelled) and returns it; `seen`, when
    given, collects each status it showed, in order."""

    def finished() -> dict[str, Any] | None:
        job = get_job(http, job_id)
        if seen is not None and (not seen or seen[-1] != job["status"]):
            seen.append(job["status"])
        return job if job["status"] in FINISHED else None

    return wait_until(finished, timeout, f"job {job_id} to finish", every=every)


def wait_for_epoch(http: httpx.Client, job_id: str, epoch: int, timeout: float = 60) -> None:
    """Until the job has recorded an `epoch` event numbered `epoch` or more."""

    def reached() -> bool:
        return any(
            e["kind"] == "epoch" and (e["data"].get("epoch") or 0) >= epoch for e in events(http, job_id)
        )

    wait_until(reached, timeout, f"job {job_id} to reach epoch {epoch}")


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    """`response` is a problem+json answer with this status and code; its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["code"] == code, body
    assert {"type", "title", "detail"} <= set(body)
    return body
