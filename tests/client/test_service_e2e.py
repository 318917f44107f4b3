"""The client and the CLI against a running embedded service (`distill serve`: API + Celery worker): submit
with --wait to success and use the downloaded student; a failing job's exit status and code; --json output;
cancel; a signed webhook per transition; /metrics counting the jobs this module ran."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.client import Client, JobCancelled
from app.webhooks.signing import verify
from tests.client.receiver import Receiver
from tests.support.api import FAST_CONFIG
from tests.support.data import Problem, gaussian_problem
from tests.support.services import Served, served

pytestmark = pytest.mark.e2e
PIPELINE = ["queued", "soft_labeling", "distilling", "evaluating", "exporting", "succeeded"]
SETTINGS = [arg for k, v in FAST_CONFIG.items() if k != "epochs" for arg in ("--set", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with served(tmp_path_factory.mktemp("serve")) as s:
        yield s


@pytest.fixture(scope="module")
def problem(tmp_path_factory: pytest.TempPathFactory) -> Problem:
    return gaussian_problem(tmp_path_factory.mktemp("problem"))


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=1)
    yield r
    r.close()


@pytest.fixture(scope="module")
def submitted(service: Served, problem: Problem, receiver: Receiver,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("out")
    run = service.cli("submit", "--teacher", str(problem.teacher), "--dataset", str(problem.dataset),
                      "--student", "mlp:hidden=16", "--epochs", str(FAST_CONFIG["epochs"]), *SETTINGS,
                      "--webhook-url", receiver.url, "--wait", "--out", f"{out}/", "--json")
    return run, out


def test_submit_wait_succeeds_and_the_downloaded_student_predicts(
        submitted: tuple[subprocess.CompletedProcess[str], Path], problem: Problem, service: Served) -> None:
    run, out = submitted
    assert run.returncode == 0, f"{run.stderr[-3000:]}\n{service.log.read_text()[-3000:]}"
    job = json.loads(run.stdout)
    assert job["status"] == "succeeded" and job["downloaded"] == str(out / "student.pt")
    assert problem.accuracy_of(out / "student.pt") > 0.8  # three classes: chance is 0.33


def test_every_command_speaks_json_and_exits_zero(
        submitted: tuple[subprocess.CompletedProcess[str], Path], service: Served, tmp_path: Path) -> None:
    job_id = json.loads(submitted[0].stdout)["id"]
    status = json.loads(service.cli("status", job_id, "--json").stdout)
    assert status["status"] == "succeeded" and set(status["timestamps"]) >= set(PIPELINE)
    listing = json.loads(service.cli("list", "--json").stdout)
    assert job_id in [j["id"] for j in listing["data"]]
    logs = json.loads(service.cli("logs", job_id, "--json").stdout)["data"]
    assert [e["data"]["to"] for e in logs if e["kind"] == "status"] == PIPELINE
    assert any(e["kind"] == "epoch" for e in logs)
    follow = service.cli("logs", job_id, "--follow", "--json")  # a finished job: prints all, then ends
    seqs = [json.loads(line)["seq"] for line in follow.stdout.splitlines()]  # one JSON object per line
    assert follow.returncode == 0 and seqs[: len(logs)] == [e["seq"] for e in logs] and seqs == sorted(seqs)
    got = service.cli("download", job_id, "--name", "all", "--out", str(tmp_path), "--json")
    got = json.loads(got.stdout)
    assert {Path(p).name for p in got["files"]} >= {"student.pt", "report.json"}
    human = service.cli("status", job_id)
    assert human.returncode == 0 and "succeeded" in human.stdout


def test_the_webhook_receiver_got_every_transition_once_signed(
        submitted: tuple[subprocess.CompletedProcess[str], Path], service: Served,
        receiver: Receiver) -> None:
    job_id = json.loads(submitted[0].stdout)["id"]
    deadline = time.monotonic() + 30
    while "succeeded" not in [e["data"]["status"] for e in receiver.accepted()]:
        assert time.monotonic() < deadline, receiver.requests
        time.sleep(0.2)
    # One process sends `queued`, the worker the rest: receivers order by `seq`, as the docs say.
    accepted = sorted(receiver.accepted(), key=lambda e: e["data"]["seq"])
    assert [e["data"]["status"] for e in accepted] == PIPELINE
    assert not receiver.requests[0]["ok"] and receiver.requests[1]["ok"]  # the error was retried
    with Client(service.url, service.api_key) as client:
        secret = client._http.get("/v1/webhooks/secret").json()["secret"]
        attempts = [e.data for e in client.events(job_id) if e.kind == "webhook"]
    assert all(verify(secret, r["headers"]["Distill-Signature"], r["body"]) for r in receiver.requests)
    assert [a["ok"] for a in attempts][:2] == [False, True] and len(attempts) == len(PIPELINE) + 1


def test_a_failing_job_exits_non_zero_with_its_error_code(service: Served, problem: Problem,
                                                          tmp_path: Path) -> None:
    broken = tmp_path / "teacher.pt"
    broken.write_bytes(b"this is not a model" * 10)
    run = service.cli("submit", "--teacher", str(broken), "--dataset", str(problem.dataset), *SETTINGS,
                      "--wait", "--json")
    assert run.returncode == 3, run.stderr
    body = json.loads(run.stdout)
    code = body["error"]["code"]
    assert code not in ("job_failed", "internal_error") and body["job"]["status"] == "failed"
    assert f"error: {code}:" in run.stderr
    assert body["job"]["error"]["code"] == code


def test_cancel_from_the_client(service: Served, problem: Problem) -> None:
    with Client(service.url, service.api_key) as client:
        teacher, data = client.upload(problem.teacher, "teacher"), client.upload(problem.dataset, "dataset")
        job = client.create_job(teacher=teacher.id, dataset=data.id, student="mlp:hidden=16",
                                config={**FAST_CONFIG, "epochs": 500})
        run = service.cli("cancel", job.id, "--json")
        assert run.returncode == 0 and json.loads(run.stdout)["status"] == "cancelled"
        with pytest.raises(JobCancelled):
            client.wait(job.id, progress=False, timeout_s=60)
        again = service.cli("cancel", job.id)  # already finished: a conflict, with its code
        assert again.returncode == 1 and "error: " in again.stderr


def test_metrics_count_the_jobs_this_module_ran(service: Served) -> None:
    with Client(service.url, service.api_key) as client:
        by_status = Counter(j.status for j in client.iter_jobs())
    assert by_status["succeeded"] >= 1 and by_status["failed"] >= 1 and by_status["cancelled"] >= 1
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    jobs = {s.labels["state"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "distill_jobs" for s in f.samples}
    assert {k: v for k, v in jobs.items() if v} == dict(by_status)
    assert "distill_stage_duration_seconds_bucket" in text and "distill_http_request_duration_seconds" in text
