"""Webhooks: a receiver on loopback gets each status change once, signed with the tenant's secret, after
retries when it answers with an error; every attempt shows in the job's events."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.webhooks.dispatcher import get_dispatcher
from app.webhooks.signing import verify
from tests.client.receiver import Receiver
from tests.support.services import Local, local_app

PIPELINE = ["queued", "soft_labeling", "distilling", "evaluating", "exporting", "succeeded"]


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    with local_app(tmp_path, webhook_backoff_s=0.05) as app:
        yield app


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=1)
    yield r
    r.close()


def test_every_transition_arrives_once_signed_after_a_retry(local: Local, receiver: Receiver) -> None:
    key = local.key("acme")
    job_id = local.submit(key, webhook_url=receiver.url)["id"]
    local.advance(job_id)
    assert get_dispatcher().wait_idle(30)

    events = receiver.accepted()
    assert [e["data"]["status"] for e in events] == PIPELINE
    assert all(e["type"] == "job.status_changed" and e["data"]["job_id"] == job_id for e in events)
    assert len({e["id"] for e in events}) == len(PIPELINE)

    secret = local.http.get("/v1/webhooks/secret", headers=local.as_tenant(key)).json()["secret"]
    for r in receiver.requests:
        assert verify(secret, r["headers"]["Distill-Signature"], r["body"])
        assert not verify(secret, r["headers"]["Distill-Signature"], r["body"] + b" ")

    # The receiver's error on the first delivery was retried with the same event id.
    first, retry = receiver.requests[0], receiver.requests[1]
    assert not first["ok"] and retry["ok"]
    assert first["headers"]["Distill-Event-Id"] == retry["headers"]["Distill-Event-Id"]
    assert [r["headers"]["Distill-Delivery-Attempt"] for r in (first, retry)] == ["1", "2"]

    log = local.http.get(f"/v1/jobs/{job_id}/events", headers=local.as_tenant(key)).json()["data"]
    attempts = [e["data"] for e in log if e["kind"] == "webhook"]
    assert len(attempts) == len(PIPELINE) + 1
    assert attempts[0] | {"duration_ms": 0} == {
        "event_id": events[0]["id"], "event_seq": 1, "status": "queued", "attempt": 1, "ok": False,
        "status_code": 500, "error": "HTTP 500", "retry_in_s": 0.05, "duration_ms": 0}
    assert attempts[1]["ok"] and attempts[1]["attempt"] == 2 and attempts[1]["status_code"] == 204


def test_a_failed_job_reports_its_error_and_jobs_without_a_url_send_nothing(
        local: Local, receiver: Receiver) -> None:
    key = local.key("acme")
    quiet = local.submit(key)["id"]
    failing = local.submit(key, webhook_url=receiver.url)["id"]
    local.advance(quiet)
    local.advance(failing, to="failed")
    assert get_dispatcher().wait_idle(30)

    events = receiver.accepted()
    assert {e["data"]["job_id"] for e in events} == {failing}
    assert [e["data"]["status"] for e in events] == ["queued", "soft_labeling", "distilling", "failed"]
    assert events[-1]["data"]["error"]["code"] == "shape_mismatch"
    log = local.http.get(f"/v1/jobs/{quiet}/events", headers=local.as_tenant(key)).json()["data"]
    assert not [e for e in log if e["kind"] == "webhook"]


def test_each_tenant_signs_with_its_own_secret(local: Local) -> None:
    secrets = [local.http.get("/v1/webhooks/secret", headers=local.as_tenant(local.key(t))).json()["secret"]
               for t in ("a", "b")]
    again = local.http.get("/v1/webhooks/secret", headers=local.as_tenant(local.key("a"))).json()["secret"]
    assert secrets[0] != secrets[1] and secrets[0] == again and secrets[0].startswith("whsec_")
    assert local.http.get("/v1/webhooks/secret").status_code == 401
