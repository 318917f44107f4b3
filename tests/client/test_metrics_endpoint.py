"""/metrics in Prometheus text format, parsed with prometheus_client's own parser: jobs by state, stage
durations, throughput of running stages, broker queue depth, and HTTP latency by route template."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.jobs import lifecycle
from tests.support.services import Local, local_app


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    with local_app(tmp_path) as app:
        yield app


def scrape(local: Local) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    r = local.http.get("/metrics")  # no key on the embedded default: Prometheus sees no tenant data
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_count_jobs_by_state_and_time_their_stages(local: Local) -> None:
    key_a, key_b = local.key("a"), local.key("b")
    done = [local.submit(key_a)["id"] for _ in range(2)]
    failed = local.submit(key_b)["id"]
    running = local.submit(key_b)["id"]
    local.submit(key_a)  # stays queued
    for job_id in done:
        local.advance(job_id)
    local.advance(failed, to="failed")
    local.step(lifecycle.claim_stage, running, "queued", "soft_labeling", "w")
    local.step(lifecycle.record_progress, running, 0.5, None, {"samples_per_s": 1500.0})

    m = scrape(local)
    jobs = {dict(k)["state"]: v for k, v in m["distill_jobs"].items()}
    assert jobs == {
        "queued": 1,
        "soft_labeling": 1,
        "distilling": 0,
        "evaluating": 0,
        "exporting": 0,
        "succeeded": 2,
        "failed": 1,
        "cancelled": 0,
    }
    counts = {dict(k)["stage"]: v for k, v in m["distill_stage_duration_seconds_count"].items()}
    # Both succeeded jobs left every stage; the failed one left queued and soft_labeling, then distilling.
    assert counts == {"queued": 3, "soft_labeling": 3, "distilling": 3, "evaluating": 2, "exporting": 2}
    assert m["distill_samples_per_second"][(("stage", "soft_labeling"),)] == 1500.0
    assert set(dict(k)["queue"] for k in m["distill_queue_depth"]) == {"soft_label", "distill"}


def test_http_latency_is_labelled_by_route_template_not_by_id(local: Local) -> None:
    key = local.key("a")
    ids = []
    for _ in range(3):
        job_id = local.submit(key)["id"]
        ids.append(job_id)
        assert local.http.get(f"/v1/jobs/{job_id}", headers=local.as_tenant(key)).status_code == 200
    local.http.get("/no/such/route")
    m = scrape(local)
    counts = {
        dict(k)["route"]: v
        for k, v in m["distill_http_request_duration_seconds_count"].items()
        if dict(k)["method"] == "GET"
    }
    assert counts["/v1/jobs/{job_id}"] == 3
    assert counts["unmatched"] == 1
    assert not any(job_id in route for route in counts for job_id in ids)


def test_a_metrics_token_is_required_once_set(tmp_path: Path) -> None:
    with local_app(tmp_path, metrics_token="scrape-9f2c") as local:
        for headers in ({}, {"Authorization": "Bearer scrape-9f2"}, {"Authorization": "Basic scrape-9f2c"}):
            r = local.http.get("/metrics", headers=headers)
            assert r.status_code == 401 and r.json()["code"] == "unauthorized", headers
            assert r.headers["www-authenticate"] == "Bearer" and "distill_jobs" not in r.text
        ok = local.http.get("/metrics", headers={"Authorization": "Bearer scrape-9f2c"})
        assert ok.status_code == 200 and "distill_jobs" in ok.text


@pytest.mark.parametrize(
    ("settings", "status"),
    [
        ({}, 404),  # production needs a token or an explicit public switch
        ({"metrics_public": True}, 200),  # the operator says the port is private
        ({"metrics_token": "scrape-9f2c"}, 401),
    ],
)
def test_production_serves_metrics_only_with_a_token_or_when_declared_public(
    tmp_path: Path, settings: dict[str, object], status: int
) -> None:
    with local_app(tmp_path, environment="production", webhook_secret="whroot-5d1e", **settings) as local:
        r = local.http.get("/metrics")
        assert r.status_code == status, r.text
        assert ("distill_jobs" in r.text) == (status == 200)


def test_placeholder_metrics_tokens_are_refused_outside_development() -> None:
    with pytest.raises(ValueError, match="DISTILL_METRICS_TOKEN"):
        Settings(environment="production", metrics_token="changeme")
