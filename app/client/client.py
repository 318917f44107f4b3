"""`Client(base_url, api_key)`: the typed Python client for the distill API.

    from app.client import Client
    with Client("http://127.0.0.1:8000", api_key) as c:
        teacher = c.upload("teacher.onnx", "teacher")
        data = c.upload("train.npz", "dataset")
        job = c.create_job(teacher=teacher.id, dataset=data.id, config={"epochs": 5})
        job = c.wait(job.id)                     # raises JobFailed / JobCancelled
        c.download(job.id, "student.pt", "student.pt")
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from app.client.download import download_artifact
from app.client.errors import JobCancelled, JobFailed, NotFound, WaitTimeout
from app.client.models import Artifact, Event, FileInfo, Job, JobPage
from app.client.progress import ProgressPrinter
from app.client.transport import Transport

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
EVENT_PAGE = 1000  # the API's largest page of events


class Client:
    def __init__(self, base_url: str, api_key: str, *, timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
                 max_retries: int = 5, backoff_s: float = 0.5, http: httpx.Client | None = None) -> None:
        """`http` replaces the connection pool, e.g. with an in-process `fastapi.testclient.TestClient`."""
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}", "User-Agent": "distill-client"}
        self._http = http or httpx.Client(base_url=self.base_url, timeout=timeout)
        self._http.headers.update(headers)
        self._t = Transport(self._http, max_retries=max_retries, backoff_s=backoff_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json(self, method: str, path: str, *, idempotent: bool, **kwargs: Any) -> Any:
        return self._t.request(method, path, idempotent=idempotent, **kwargs).json()

    # files
    def upload(self, path: str | Path, purpose: str, *, filename: str | None = None) -> FileInfo:
        """Streams a local file to `POST /v1/files`; `purpose` is teacher, dataset or student_init."""
        path = Path(path)
        name = filename or path.name

        def body() -> dict[str, Any]:  # reopened on every attempt so a retry sends the whole file again
            return {"files": {"file": (name, path.open("rb"), "application/octet-stream")}}

        # A dropped connection may have stored the file already; only a refused one is retried.
        data = self._json("POST", "/v1/files", idempotent=False, data={"purpose": purpose}, build=body)
        return FileInfo.from_dict(data)

    def get_file(self, file_id: str) -> FileInfo:
        return FileInfo.from_dict(self._json("GET", f"/v1/files/{file_id}", idempotent=True))

    # jobs
    def create_job(self, *, teacher: list[str] | str, dataset: str, student: str | None = None,
                   config: dict[str, Any] | None = None, validation: str | None = None,
                   student_init: str | None = None, metadata: dict[str, Any] | None = None,
                   webhook_url: str | None = None, idempotency_key: str | None = None,
                   task: str = "classification") -> Job:
        """Submits a job (`task`: classification, or causal_lm for a language model; `student` unset: the
        task's default). Every retry reuses one Idempotency-Key, so a retried submit never makes two jobs."""
        body = {
            "task": task,
            "teacher_file_ids": [teacher] if isinstance(teacher, str) else list(teacher),
            "dataset_file_id": dataset, "validation_file_id": validation, "student": student,
            "student_init_file_id": student_init, "config": config or {}, "metadata": metadata or {},
            "webhook_url": webhook_url,
        }
        headers = {"Idempotency-Key": idempotency_key or f"cli-{uuid.uuid4()}"}
        return Job.from_dict(self._json("POST", "/v1/jobs", idempotent=True, json=body, headers=headers))

    def get_job(self, job_id: str) -> Job:
        return Job.from_dict(self._json("GET", f"/v1/jobs/{job_id}", idempotent=True))

    def list_jobs(self, *, status: str | None = None, limit: int | None = None,
                  cursor: str | None = None) -> JobPage:
        given = {"status": status, "limit": limit, "cursor": cursor}
        params = {k: v for k, v in given.items() if v is not None}
        data = self._json("GET", "/v1/jobs", idempotent=True, params=params)
        return JobPage([Job.from_dict(j) for j in data["data"]], data.get("next_cursor"))

    def iter_jobs(self, *, status: str | None = None, page_size: int = 50) -> Iterator[Job]:
        cursor = None
        while True:
            page = self.list_jobs(status=status, limit=page_size, cursor=cursor)
            yield from page.data
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def events(self, job_id: str, *, after: int | None = None) -> list[Event]:
        """Every event after sequence number `after` (all when None), in order, across pages."""
        out: list[Event] = []
        while True:
            params = {"limit": EVENT_PAGE, **({"after": after} if after is not None else {})}
            page = self._json("GET", f"/v1/jobs/{job_id}/events", idempotent=True, params=params)["data"]
            out.extend(Event.from_dict(e) for e in page)
            if len(page) < EVENT_PAGE:
                return out
            after = out[-1].seq

    def follow(self, job_id: str, *, poll_s: float = 1.0) -> Iterator[Event]:
        """Yields events as they are written until the job is finished and every event is out."""
        after = None
        while True:
            batch = self.events(job_id, after=after)
            yield from batch
            if batch:
                after = batch[-1].seq
                continue
            if self.get_job(job_id).done and not self.events(job_id, after=after):
                return
            time.sleep(poll_s)

    def cancel(self, job_id: str) -> Job:
        return Job.from_dict(self._json("POST", f"/v1/jobs/{job_id}/cancel", idempotent=True))

    def wait(self, job_id: str, *, progress: bool = True, poll_s: float = 1.0, timeout_s: float | None = None,
             on_update: Callable[[Job], None] | None = None) -> Job:
        """Polls until the job ends; returns it on success, raises `JobFailed`/`JobCancelled` otherwise."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        printer = ProgressPrinter(job_id) if progress else None
        try:
            while True:
                job = self.get_job(job_id)
                if printer:
                    printer.update(job)
                if on_update:
                    on_update(job)
                if job.done:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise WaitTimeout(f"job {job_id} still {job.status} after {timeout_s} s")
                time.sleep(poll_s)
        finally:
            if printer:
                printer.close()
        if job.status == "failed":
            raise JobFailed(job)
        if job.status == "cancelled":
            raise JobCancelled(job)
        return job

    # artifacts
    def artifacts(self, job_id: str) -> list[Artifact]:
        data = self._json("GET", f"/v1/jobs/{job_id}/artifacts", idempotent=True)
        return [Artifact.from_dict(a) for a in data["data"]]

    def download(self, job_id: str, name: str, path: str | Path) -> Path:
        """Streams one artifact to `path`; resumes a partial `path.part` with Range; checks sha256."""
        expected = next((a for a in self.artifacts(job_id) if a.name == name), None)
        if expected is None:
            raise NotFound(404, "artifact_not_found", "Not found", f"job {job_id} has no artifact {name!r}")
        return download_artifact(self._t, f"/v1/jobs/{job_id}/artifacts/{name}", Path(path), expected)
