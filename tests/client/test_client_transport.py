"""The client's network behaviour against a real HTTP server on loopback that misbehaves on purpose:
503s, refused connections, a connection dropped mid-download, problem+json errors, a wrong checksum."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from app.client import Client, ConnectionFailed, InvalidRequest, NotFound
from app.client.errors import ChecksumMismatch
from tests.support.processes import free_port

JOB = {"id": "job_1", "status": "queued", "stage": None, "progress": 0.0, "epoch": None, "metrics": {},
       "error": None, "config": {}, "metadata": {}, "created_at": "", "updated_at": "", "timestamps": {}}

Handler = Callable[[BaseHTTPRequestHandler, int], None]  # (request, how many times this route was hit)


class Server:
    """Routes `METHOD path` to a handler; records every request's headers."""

    def __init__(self, routes: dict[str, Handler], port: int = 0) -> None:
        self.routes, self.seen = routes, []  # type: ignore[var-annotated]
        server = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self) -> None:
                route = f"{self.command} {self.path.split('?')[0]}"
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                server.seen.append((route, dict(self.headers)))
                server.routes[route](self, sum(r == route for r, _ in server.seen))

            do_GET = do_POST = handle_one

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def __enter__(self) -> Server:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(h: BaseHTTPRequestHandler, status: int, body: object, headers: dict[str, str] | None = None,
          content_type: str = "application/json") -> None:
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    h.send_response(status)
    for k, v in {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}.items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data)


def problem(h: BaseHTTPRequestHandler, status: int, code: str, **extra: object) -> None:
    reply(h, status, {"type": "about:blank", "title": "x", "status": status, "detail": f"{code} detail",
                      "code": code, **extra}, content_type="application/problem+json")


@pytest.fixture
def client_for() -> Iterator[Callable[[str], Client]]:
    made: list[Client] = []

    def make(url: str) -> Client:
        made.append(Client(url, "k", backoff_s=0.05, max_retries=4))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_create_job_retries_503_reusing_one_idempotency_key(client_for: Callable[[str], Client]) -> None:
    def jobs(h: BaseHTTPRequestHandler, n: int) -> None:
        if n <= 2:
            problem(h, 503, "service_unavailable")
        else:
            reply(h, 201, JOB)

    with Server({"POST /v1/jobs": jobs}) as server:
        job = client_for(server.url).create_job(teacher="file_t", dataset="file_d")
    assert job.id == "job_1"
    keys = [headers["Idempotency-Key"] for route, headers in server.seen]
    assert len(keys) == 3 and len(set(keys)) == 1 and keys[0]


def test_refused_connection_is_retried_until_the_server_is_up(client_for: Callable[[str], Client]) -> None:
    port = free_port()
    server = Server({"GET /v1/jobs/job_1": lambda h, n: reply(h, 200, JOB)}, port=port)
    server.httpd.server_close()  # nobody listens on the port yet
    client = client_for(f"http://127.0.0.1:{port}")
    client._t.backoff_s = 0.4

    def start_late() -> None:
        time.sleep(0.5)
        server.__init__(server.routes, port=port)  # type: ignore[misc]
        server.__enter__()

    starter = threading.Thread(target=start_late)
    starter.start()
    try:
        assert client.get_job("job_1").status == "queued"
    finally:
        starter.join()
        server.__exit__()


def test_unreachable_server_gives_connection_failed(client_for: Callable[[str], Client]) -> None:
    with pytest.raises(ConnectionFailed) as err:
        client_for(f"http://127.0.0.1:{free_port()}").get_job("job_1")
    assert err.value.code == "connection_failed"


def test_upload_is_not_repeated_after_the_server_dropped_the_request(
        tmp_path: Path, client_for: Callable[[str], Client]) -> None:
    (tmp_path / "t.pt").write_bytes(b"model")

    def drop(h: BaseHTTPRequestHandler, n: int) -> None:
        h.close_connection = True
        h.connection.shutdown(2)  # the upload may have been stored: repeating it could store it twice

    with Server({"POST /v1/files": drop}) as server, pytest.raises(ConnectionFailed):
        client_for(server.url).upload(tmp_path / "t.pt", "teacher")
    assert len(server.seen) == 1


def test_problem_json_becomes_a_typed_error_with_its_code(client_for: Callable[[str], Client]) -> None:
    routes: dict[str, Handler] = {
        "GET /v1/jobs/nope": lambda h, n: problem(h, 404, "job_not_found"),
        "POST /v1/jobs": lambda h, n: problem(h, 422, "validation_error",
                                              errors=[{"field": "student", "message": "unknown student"}]),
    }
    with Server(routes) as server:
        client = client_for(server.url)
        with pytest.raises(NotFound) as missing:
            client.get_job("nope")
        with pytest.raises(InvalidRequest) as invalid:
            client.create_job(teacher="file_t", dataset="file_d", student="nope")
    assert (missing.value.code, missing.value.status) == ("job_not_found", 404)
    assert invalid.value.code == "validation_error" and invalid.value.errors[0]["field"] == "student"
    assert "student: unknown student" in str(invalid.value)


PAYLOAD = bytes(range(256)) * 400  # 100 KiB


def artifact_routes(sha256: str, drop_first: bool) -> dict[str, Handler]:
    listing = {"data": [{"name": "student.pt", "size": len(PAYLOAD), "sha256": sha256,
                         "content_type": "application/octet-stream"}]}

    def download(h: BaseHTTPRequestHandler, n: int) -> None:
        rng = h.headers.get("Range")
        if rng:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            body = PAYLOAD[start:]
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            body = PAYLOAD
            h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("ETag", '"v1"')
        h.end_headers()
        if drop_first and n == 1:  # half the bytes, then the connection dies
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        h.wfile.write(body)

    return {"GET /v1/jobs/job_1/artifacts": lambda h, n: reply(h, 200, listing),
            "GET /v1/jobs/job_1/artifacts/student.pt": download}


def test_download_resumes_with_range_after_a_dropped_connection(tmp_path: Path,
                                                                client_for: Callable[[str], Client]) -> None:
    with Server(artifact_routes(hashlib.sha256(PAYLOAD).hexdigest(), drop_first=True)) as server:
        path = client_for(server.url).download("job_1", "student.pt", tmp_path / "student.pt")
    assert path.read_bytes() == PAYLOAD
    gets = [h for r, h in server.seen if r.endswith("student.pt")]
    assert len(gets) == 2 and "Range" not in gets[0]
    assert gets[1]["Range"] == f"bytes={len(PAYLOAD) // 2}-" and gets[1]["If-Range"] == '"v1"'
    assert not (tmp_path / "student.pt.part").exists()


def test_download_with_a_wrong_checksum_raises_and_leaves_nothing(tmp_path: Path,
                                                                 client_for: Callable[[str], Client]) -> None:
    with Server(artifact_routes("0" * 64, drop_first=False)) as server, pytest.raises(ChecksumMismatch):
        client_for(server.url).download("job_1", "student.pt", tmp_path / "student.pt")
    assert list(tmp_path.iterdir()) == []
