"""PostgreSQL unreachable while the API runs (a proxy of our own cut in front of the shared server, which
is never touched): every request is a 503 problem+json, never a 500, and the same app serves again once the
database is back, with no restart."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from tests.reliability.proxy import TcpProxy
from tests.reliability.stack import api_settings
from tests.support.data import npz_bytes
from tests.support.processes import RedisServer, wait_until
from tests.support.services import api_client, postgres_database

pytestmark = pytest.mark.e2e


def requests(http: TestClient, file_id: str, dataset: bytes) -> dict[str, Any]:
    """One of each kind the API serves: lists, a read by id, a miss, a write, the readiness probe."""
    return {
        "list": http.get("/v1/jobs"),
        "get": http.get(f"/v1/files/{file_id}"),
        "missing": http.get("/v1/jobs/job_missing/events"),
        "upload": http.post("/v1/files", data={"purpose": "dataset"}, files={"file": ("d.npz", dataset)}),
        "ready": http.get("/readyz"),
    }


def test_the_api_answers_503_while_postgres_is_unreachable_and_recovers_without_a_restart(tmp_path):
    dataset = npz_bytes(x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.int64))
    with RedisServer(tmp_path / "redis") as redis:
        with postgres_database("distill_rel") as direct, TcpProxy("127.0.0.1", 5432) as proxy:
            url = (
                make_url(direct).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
            )
            with api_client(api_settings(tmp_path, url, redis.url)) as http:
                r = http.post("/v1/files", data={"purpose": "dataset"}, files={"file": ("d.npz", dataset)})
                assert r.status_code == 201, r.text
                file_id = r.json()["id"]
                assert http.get("/healthz").status_code == 200

                proxy.down()
                for _ in range(2):  # a pooled connection cut under it, then fresh connects refused
                    for name, resp in requests(http, file_id, dataset).items():
                        assert resp.status_code == 503, (name, resp.status_code, resp.text)
                        if name != "ready":  # readiness answers its own JSON: which check failed
                            assert resp.headers["content-type"].startswith("application/problem+json"), name
                            assert resp.json()["code"] == "database_unavailable", (name, resp.text)
                            assert "Retry-After" in resp.headers, name
                assert http.get("/healthz").status_code == 200  # liveness: do not restart me

                proxy.up()
                time.sleep(0.5)

                def recovered() -> bool:
                    got = requests(http, file_id, dataset)
                    assert all(r.status_code in (200, 201, 404, 503) for r in got.values()), got
                    return (
                        got["list"].status_code == 200
                        and got["upload"].status_code == 201
                        and (got["ready"].status_code == 200)
                    )

                wait_until(recovered, 10, "the API to serve again", every=0.5)
                got = requests(http, file_id, dataset)
                assert {k: r.status_code for k, r in got.items()} == {
                    "list": 200,
                    "get": 200,
                    "missing": 404,
                    "upload": 201,
                    "ready": 200,
                }
                assert len(http.get("/v1/files").json()["data"]) >= 2
