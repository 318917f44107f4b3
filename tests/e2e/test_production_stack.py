"""The production stack for real: PostgreSQL, a Redis broker, an S3 server and two Celery worker processes
(one per queue), driven over HTTP the way a user would."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import Settings
from tests.support.processes import child_env
from tests.support.services import api_client

pytestmark = pytest.mark.e2e


def test_upload_submit_poll_download_on_postgres_redis_s3(
    tmp_path: Path,
    stack_env: dict[str, str],
    start_worker,
    problem,
    job_runner,
    evaluate_students,
):
    env = stack_env
    # Inference and training on separate worker pools, as in production.
    soft_label_worker = start_worker(child_env(**env), queues="soft_label")
    distill_worker = start_worker(child_env(**env), queues="distill")

    settings = Settings(**{k.removeprefix("DISTILL_").lower(): v for k, v in env.items()})
    with api_client(settings, tenant="e2e") as http:
        result = job_runner(http, problem, tmp_path)

    assert soft_label_worker.poll() is None and distill_worker.poll() is None
    assert result["statuses"][-1] == "succeeded"
    kinds = [e["kind"] for e in result["events"]]
    assert kinds.count("epoch") >= 3 and "attempt_failed" not in kinds
    logs = [(tmp_path / f"worker-{i}.log").read_text() for i in (0, 1)]
    assert "Task distill.soft_label[" in logs[0] and "Task distill.distill[" not in logs[0]
    assert "Task distill.distill[" in logs[1] and "Task distill.soft_label[" not in logs[1]
    accuracies = evaluate_students(tmp_path, problem)
    assert accuracies["torchscript"] > 0.8 and accuracies["onnx"] > 0.8, accuracies  # chance is 0.25
    assert abs(accuracies["torchscript"] - accuracies["onnx"]) < 0.02
