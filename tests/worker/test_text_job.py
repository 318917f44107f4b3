"""A text classifier end to end over HTTP on the embedded service: a tiny BERT sequence classifier (tar.gz of
its Hugging Face folder) and a CSV of texts uploaded, a `text_transformer` student submitted as a plain
classification job, both stages run by the worker's own task code in the sandboxed child; the student comes
back as `student_hf.tar.gz` that `AutoModelForSequenceClassification.from_pretrained` loads, and as ONNX with
its tokenizer.json."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tests.distill.tiny_text import LABELS, pack, save_teacher, texts, write_csv
from tests.support.api import artifact_names, upload
from tests.support.services import Embedded
from worker.tasks.jobs import run_distill, run_soft_label


@pytest.fixture(scope="module")
def text_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("text")
    teacher = pack(save_teacher(folder / "teacher"), folder / "teacher.tar.gz")
    dataset = write_csv(folder / "reviews.csv", texts(80, seed=3), unlabelled_every=4)
    return teacher, dataset


def test_a_text_classifier_job_over_http_gives_hf_and_onnx_students(
    service: Embedded, text_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    teacher, dataset = text_inputs
    body = {
        "teacher_file_ids": [upload(service.http, "teacher", teacher)["id"]],
        "dataset_file_id": upload(service.http, "dataset", dataset)["id"],
        "student": "text_transformer:layers=1;hidden=16;heads=2",
        "config": {"epochs": 1, "batch_size": 16, "max_length": 32, "method": "hinton", "temperature": 2,
                   "alpha": 0.5},  # fmt: skip
    }
    r = service.http.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["task"] == "classification"
    assert job["config"]["export_formats"] == ["hf", "onnx"]  # a text student's default, resolved

    run_soft_label(service.ctx, job["id"])
    run_distill(service.ctx, job["id"])
    job = service.http.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    assert job["metrics"]["student_accuracy"] is not None
    names = artifact_names(service.http, job["id"])
    assert {"student_hf.tar.gz", "student.onnx", "tokenizer.json", "model_card.json", "report.json"} <= names

    archive = service.http.get(f"/v1/jobs/{job['id']}/artifacts/student_hf.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(tmp_path / "student", filter="data")
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

    root = next(p.parent for p in (tmp_path / "student").rglob("config.json"))
    model = AutoModelForSequenceClassification.from_pretrained(root, local_files_only=True).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root, local_files_only=True)
    logits = model(**tokenizer(["a great and lovely day"], return_tensors="pt")).logits
    assert logits.shape == (1, len(LABELS))
    assert model.config.id2label[0] == LABELS[0]


@pytest.mark.parametrize(
    ("student", "formats"),
    [("bow", ["hf"]), ("mlp:hidden=8", ["hf"]), ("textcnn", ["torchscript"])],
)
def test_export_formats_a_student_cannot_take_are_a_422(
    service: Embedded, text_inputs: tuple[Path, Path], student: str, formats: list[str]
) -> None:
    teacher, dataset = text_inputs
    body = {
        "teacher_file_ids": [upload(service.http, "teacher", teacher)["id"]],
        "dataset_file_id": upload(service.http, "dataset", dataset)["id"],
        "student": student,
        "config": {"export_formats": formats},
    }
    r = service.http.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert formats[0] in r.text
