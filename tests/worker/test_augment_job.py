"""An augmented image job over HTTP on the embedded service: `augment` and `views` submitted, the stored
views shown in the report, the student trained on them; bad settings a 422 naming the field, and augment on
rows that are not images a failed job that says so."""

from __future__ import annotations

from pathlib import Path

from tests.distill.test_augment import CROP_FLIP, write_images
from tests.support.api import assert_problem, upload
from tests.support.services import Embedded
from worker.tasks.jobs import run_distill, run_soft_label


def test_an_augmented_multi_view_job_over_http(service: Embedded, tmp_path: Path) -> None:
    teacher, dataset = write_images(tmp_path)
    body = {
        "teacher_file_ids": [upload(service.http, "teacher", teacher)["id"]],
        "dataset_file_id": upload(service.http, "dataset", dataset)["id"],
        "student": "cnn:channels=4,8",
        "config": {
            "epochs": 2, "batch_size": 32, "method": "hinton", "temperature": 2, "alpha": 0.5,
            "preprocess": {"scale": 1 / 255}, "augment": CROP_FLIP, "views": 2, "export_formats": ["onnx"],
        },
    }  # fmt: skip
    for bad, field in (
        ({"views": 2}, "config"),
        ({"augment": {"hflip": False}}, "config.augment"),
        ({"augment": {"random_resized_crop": {"scale": [0.9, 0.2]}}}, "config.augment.random_resized_crop"),
        ({"augment": CROP_FLIP, "views": 33}, "config.views"),
    ):
        response = service.http.post("/v1/jobs", json={**body, "config": {"epochs": 1, **bad}})
        problem = assert_problem(response, 422, "validation_error")
        assert any(e["field"].startswith(field) for e in problem["errors"]), (bad, problem)

    r = service.http.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["config"]["augment"] == {
        "random_resized_crop": {"scale": [0.35, 1.0], "ratio": [0.75, 4 / 3]}, "hflip": True, "seed": 0
    } and job["config"]["views"] == 2  # fmt: skip
    run_soft_label(service.ctx, job["id"])
    run_distill(service.ctx, job["id"])
    job = service.http.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    report = service.http.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    views = report["soft_labels"]["views"]
    assert views["count"] == 2 and views["bytes_per_image"] > 0
    assert set(report["soft_labels"]["teacher_accuracy"]) == {"train", "val", "train.v0", "train.v1"}


def test_augment_on_rows_that_are_not_images_fails_the_job_naming_it(
    service: Embedded, tiny_inputs: tuple[Path, Path]
) -> None:
    teacher, dataset = tiny_inputs
    body = {
        "teacher_file_ids": [upload(service.http, "teacher", teacher)["id"]],
        "dataset_file_id": upload(service.http, "dataset", dataset)["id"],
        "student": "mlp:hidden=8",
        "config": {"epochs": 1, "augment": {"hflip": True}},
    }
    job_id = service.http.post("/v1/jobs", json=body).json()["id"]
    run_soft_label(service.ctx, job_id)
    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_config", job
    assert "images" in job["error"]["message"]
