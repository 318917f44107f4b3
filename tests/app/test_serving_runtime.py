"""What the process does for every request, outside any route: a request id on every answer, and the
startup heap kept out of the garbage collector's full passes (the polled read's p99, bench/api.py)."""

from __future__ import annotations

import gc

from fastapi.testclient import TestClient


def test_every_answer_carries_a_request_id_unique_per_request(client: TestClient) -> None:
    ids = {client.get("/healthz").headers["x-request-id"] for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 24 and all(c in "0123456789abcdef" for c in i) for i in ids)


def test_a_well_formed_request_id_is_kept_and_a_bad_one_replaced(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-Id": "lb-7.a_b"}).headers["x-request-id"] == "lb-7.a_b"
    replaced = client.get("/healthz", headers={"X-Request-Id": "bad id\\n"}).headers["x-request-id"]
    assert replaced != "bad id\\n" and len(replaced) == 24


def test_startup_freezes_the_heap_built_by_imports_and_create_app(client: TestClient) -> None:
    # The `client` fixture has run the lifespan: what existed then is in the permanent generation, so a
    # full collection triggered by request garbage no longer walks it.
    assert gc.get_freeze_count() > 50_000
