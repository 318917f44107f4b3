"""Jobs API: validation without a model, enqueue after commit, idempotency, paging, cancel, tenant scoping."""

from __future__ import annotations

import json

import redis
from fastapi.testclient import TestClient

from tests.app.conftest import Tenant
from tests.support.api import assert_problem, inputs, job_body, upload


def queued_job_ids(broker: redis.Redis) -> list[str]:
    """Job ids in the Celery messages waiting on the `soft_label` queue (kombu's Redis list)."""
    ids = []
    for raw in broker.lrange("soft_label", 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == "distill.soft_label"
        ids.append(json.loads(__import__("base64").b64decode(message["body"]))[0][0])
    return ids


def test_create_job_fills_defaults_writes_an_event_and_enqueues(
    client: TestClient, alice: Tenant, broker: redis.Redis
) -> None:
    teacher, dataset = inputs(client, alice.headers)
    response = client.post(
        "/v1/jobs", headers=alice.headers, json=job_body(teacher, dataset, metadata={"team": "vision"})
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["id"].startswith("job_") and job["status"] == "queued" and job["stage"] is None
    assert job["progress"] == 0.0 and job["error"] is None and job["metadata"] == {"team": "vision"}
    assert job["config"]["epochs"] == 2 and job["config"]["student"] == "mlp:hidden=32"
    assert job["config"]["method"] == "auto" and job["config"]["export_formats"] == [
        "torchscript",
        "onnx",
        "safetensors",
    ]
    assert set(job["timestamps"]) == {"queued"}
    assert job["id"] in queued_job_ids(broker)
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=alice.headers).json()["data"]
    assert [(e["seq"], e["kind"], e["data"]["to"]) for e in events] == [(1, "status", "queued")]
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice.headers).json() == job


def test_validation_errors_name_the_field(client: TestClient, alice: Tenant) -> None:
    teacher, dataset = inputs(client, alice.headers)
    cases = {
        "config.epochs": {"config": {"epochs": 0}},
        "config.alpha": {"config": {"alpha": 1.5}},
        "config.temperature": {"config": {"temperature": "hot"}},
        "config.learning_rate": {"config": {"learning_rate": 0.1}},
        "config.method": {"config": {"method": "telepathy"}},
        "config.method_params": {"config": {"method_params": {"beta": 2.0}}},  # method "auto": whose beta?
        "config.export_formats.0": {"config": {"export_formats": ["pickle"]}},
        "config.preprocess.std.0": {"config": {"preprocess": {"std": [0.0]}}},
        "config.teacher_arch": {"config": {"teacher_arch": "mlp:hidden"}},
        "student": {"student": "transformer:layers=2"},
        "webhook_url": {"webhook_url": "ftp://example.com"},
        "surprise": {"surprise": True},
    }
    for field, change in cases.items():
        body = job_body(teacher, dataset)
        body = {**body, **change, "config": {**body["config"], **change.get("config", {})}}
        problem = assert_problem(
            client.post("/v1/jobs", headers=alice.headers, json=body), 422, "validation_error"
        )
        assert [e["field"] for e in problem["errors"]] == [field], (field, problem)
    missing = assert_problem(
        client.post("/v1/jobs", headers=alice.headers, json={"dataset_file_id": dataset}),
        422,
        "validation_error",
    )
    assert missing["errors"][0]["field"] == "teacher_file_ids"
    not_json = client.post(
        "/v1/jobs", headers={**alice.headers, "Content-Type": "application/json"}, content=b"{not json"
    )
    assert_problem(not_json, 422, "validation_error")


NON_FINITE_CASES = {
    "config.preprocess.scale": {"preprocess": {"scale": float("nan")}},
    "config.preprocess.mean.0": {"preprocess": {"mean": float("inf")}},  # a scalar, listed by the schema
    "config.preprocess.mean.1": {"preprocess": {"mean": [0.5, "-Infinity"]}},
    "config.method_params.beta": {"method": "dkd", "method_params": {"beta": "nan"}},
    "config.grad_clip": {"grad_clip": "inf"},
    "config.temperature": {"temperature": float("nan")},
    "config.val_fraction": {"val_fraction": "NaN"},
}


def test_nan_and_infinity_are_refused_naming_the_field(client: TestClient, alice: Tenant) -> None:
    """Python's json reads NaN/Infinity literals and pydantic reads "inf"/"nan" strings as floats; stored,
    they became null and the job failed later with a misleading code."""
    teacher, dataset = inputs(client, alice.headers)
    for field, config in NON_FINITE_CASES.items():
        body = job_body(teacher, dataset, config={"epochs": 2, **config})
        raw = json.dumps(body).encode()  # NaN / Infinity literals, as Python's json writes them
        response = client.post(
            "/v1/jobs", headers={**alice.headers, "Content-Type": "application/json"}, content=raw
        )
        problem = assert_problem(response, 422, "validation_error")
        assert [e["field"] for e in problem["errors"]] == [field], (field, problem)
        assert "finite" in problem["errors"][0]["message"]
    for field, body_change in {
        "student": {"student": "mlp:hidden=32;dropout=nan"},
        "config.teacher_arch": {"config": {"teacher_arch": "mlp:hidden=1e999"}},
        "metadata": {"metadata": {"score": float("inf")}},
    }.items():
        body = {**job_body(teacher, dataset), **body_change}
        response = client.post(
            "/v1/jobs",
            headers={**alice.headers, "Content-Type": "application/json"},
            content=json.dumps(body).encode(),
        )
        problem = assert_problem(response, 422, "validation_error")
        assert [e["field"] for e in problem["errors"]] == [field], (field, problem)
    assert client.get("/v1/jobs", headers=alice.headers).json()["data"] == []


def test_input_files_must_exist_for_the_tenant_and_fit_their_slot(
    client: TestClient, alice: Tenant, bob: Tenant
) -> None:
    teacher, dataset = inputs(client, alice.headers)
    bobs_teacher = upload(client, "teacher", headers=bob.headers)["id"]
    body = job_body(dataset, teacher, validation_file_id="file_nope")
    body["teacher_file_ids"].append(bobs_teacher)
    problem = assert_problem(
        client.post("/v1/jobs", headers=alice.headers, json=body), 422, "invalid_input_file"
    )
    fields = {e["field"]: e["message"] for e in problem["errors"]}
    assert set(fields) == {
        "teacher_file_ids.0",
        "teacher_file_ids.1",
        "dataset_file_id",
        "validation_file_id",
    }
    assert "purpose 'dataset', expected 'teacher'" in fields["teacher_file_ids.0"]
    assert "no such file" in fields["teacher_file_ids.1"]  # bob's file does not exist for alice


def test_idempotency_key_replays_the_same_job_and_refuses_another_body(
    client: TestClient, alice: Tenant, bob: Tenant, broker: redis.Redis
) -> None:
    teacher, dataset = inputs(client, alice.headers)
    headers = {**alice.headers, "Idempotency-Key": "retry-1"}
    first = client.post("/v1/jobs", headers=headers, json=job_body(teacher, dataset))
    again = client.post("/v1/jobs", headers=headers, json=job_body(teacher, dataset))
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert queued_job_ids(broker).count(first.json()["id"]) == 1
    other = client.post("/v1/jobs", headers=headers, json=job_body(teacher, dataset, metadata={"x": 1}))
    assert_problem(other, 409, "idempotency_key_reused")
    # keys are per tenant: bob may use the same key for his own job
    bob_teacher, bob_dataset = inputs(client, bob.headers)
    bobs = client.post(
        "/v1/jobs",
        headers={**bob.headers, "Idempotency-Key": "retry-1"},
        json=job_body(bob_teacher, bob_dataset),
    )
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"]
    bad_key = client.post(
        "/v1/jobs", headers={**alice.headers, "Idempotency-Key": "x" * 300}, json=job_body(teacher, dataset)
    )
    assert assert_problem(bad_key, 422, "validation_error")["errors"][0]["field"] == "Idempotency-Key"


def test_cursor_paging_and_status_filter(client: TestClient, alice: Tenant) -> None:
    teacher, dataset = inputs(client, alice.headers)
    ids = [
        client.post("/v1/jobs", headers=alice.headers, json=job_body(teacher, dataset)).json()["id"]
        for _ in range(5)
    ]
    seen, cursor = [], None
    while True:
        url = "/v1/jobs?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=alice.headers).json()
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    client.post(f"/v1/jobs/{ids[1]}/cancel", headers=alice.headers)
    cancelled = client.get("/v1/jobs?status=cancelled", headers=alice.headers).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[1]]
    assert len(client.get("/v1/jobs?status=queued", headers=alice.headers).json()["data"]) == 4
    assert_problem(client.get("/v1/jobs?status=sleeping", headers=alice.headers), 422, "validation_error")
    bad = assert_problem(client.get("/v1/jobs?cursor=bm9wZQ", headers=alice.headers), 422, "invalid_cursor")
    assert bad["errors"][0]["field"] == "cursor"


def test_cancel_then_cancel_again_is_409(client: TestClient, alice: Tenant) -> None:
    teacher, dataset = inputs(client, alice.headers)
    job_id = client.post("/v1/jobs", headers=alice.headers, json=job_body(teacher, dataset)).json()["id"]
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=alice.headers)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert set(response.json()["timestamps"]) == {"queued", "cancelled"}
    assert_problem(client.post(f"/v1/jobs/{job_id}/cancel", headers=alice.headers), 409, "job_finished")
    kinds = [
        (e["kind"], e["data"].get("to"))
        for e in client.get(f"/v1/jobs/{job_id}/events", headers=alice.headers).json()["data"]
    ]
    assert kinds == [("status", "queued"), ("status", "cancelled")]
    after = client.get(f"/v1/jobs/{job_id}/events?after=1", headers=alice.headers).json()["data"]
    assert [e["seq"] for e in after] == [2]


def test_files_used_by_unfinished_jobs_cannot_be_deleted(client: TestClient, alice: Tenant) -> None:
    teacher, dataset = inputs(client, alice.headers)
    job_id = client.post("/v1/jobs", headers=alice.headers, json=job_body(teacher, dataset)).json()["id"]
    assert_problem(client.delete(f"/v1/files/{dataset}", headers=alice.headers), 409, "file_in_use")
    client.post(f"/v1/jobs/{job_id}/cancel", headers=alice.headers)
    assert client.delete(f"/v1/files/{dataset}", headers=alice.headers).status_code == 204
    assert client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json()["dataset_file_id"] == dataset


def test_other_tenants_jobs_look_exactly_like_missing_ones(
    client: TestClient, alice: Tenant, bob: Tenant
) -> None:
    teacher, dataset = inputs(client, alice.headers)
    job_id = client.post("/v1/jobs", headers=alice.headers, json=job_body(teacher, dataset)).json()["id"]
    for suffix, method in (
        ("", "GET"),
        ("/events", "GET"),
        ("/cancel", "POST"),
        ("/artifacts", "GET"),
        ("/artifacts/report.json", "GET"),
    ):
        theirs = client.request(method, f"/v1/jobs/{job_id}{suffix}", headers=bob.headers)
        nobody = client.request(method, f"/v1/jobs/job_000000000000000000000000{suffix}", headers=bob.headers)
        assert theirs.status_code == nobody.status_code == 404
        assert theirs.json() == nobody.json()
    assert client.get("/v1/jobs", headers=bob.headers).json()["data"] == []
    assert client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json()["status"] == "queued"
