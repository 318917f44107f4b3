"""A causal-LM job end to end over HTTP on the embedded service: a tiny Llama teacher folder (tar.gz) and a
JSONL corpus uploaded, `{"task": "causal_lm"}` submitted, both stages run by the worker's own task code in
the sandboxed child, and the student downloaded as `student_hf.tar.gz` loads with `from_pretrained` and
generates."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.distill.tiny_lm import CORPUS, pack, save_folder
from tests.support.api import artifact_names, upload
from tests.support.services import Embedded
from worker.tasks.jobs import run_distill, run_soft_label

LM_CONFIG = {"epochs": 1, "batch_size": 4, "max_length": 32, "topk": 8, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def lm_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("lm")
    save_folder(folder / "teacher")
    teacher = pack(folder / "teacher", folder / "teacher.tar.gz")
    dataset = folder / "corpus.jsonl"
    lines = [json.dumps({"text": text}) for text in CORPUS]
    dataset.write_text("\n".join(lines) + "\n")
    return teacher, dataset


def test_a_causal_lm_job_over_http_gives_a_student_that_loads_and_generates(
    service: Embedded, lm_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    teacher, dataset = lm_inputs
    body = {
        "task": "causal_lm",
        "teacher_file_ids": [upload(service.http, "teacher", teacher)["id"]],
        "dataset_file_id": upload(service.http, "dataset", dataset)["id"],
        "student": "causal_lm:layers=1;hidden=32;heads=2",
        "config": LM_CONFIG,
    }
    r = service.http.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job = r.json()
    # Settings whose defaults depend on the task are resolved at submission: the config shown is run.
    assert job["task"] == "causal_lm"
    assert (job["config"]["method"], job["config"]["temperature"], job["config"]["alpha"]) == (
        "fkl",
        1.0,
        1.0,
    )
    assert (job["config"]["soft_label_format"], job["config"]["export_formats"]) == ("topk", ["hf"])

    run_soft_label(service.ctx, job["id"])
    run_distill(service.ctx, job["id"])
    job = service.http.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    for key in ("teacher_perplexity", "student_perplexity", "baseline_perplexity", "agreement", "kl"):
        assert job["metrics"][key] is not None, (key, job["metrics"])
    assert 0 < job["metrics"]["bytes_per_token"] <= 300
    assert {"student_hf.tar.gz", "model_card.json", "report.json"} <= artifact_names(service.http, job["id"])

    archive = service.http.get(f"/v1/jobs/{job['id']}/artifacts/student_hf.tar.gz")
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(tmp_path / "student", filter="data")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = next(p.parent for p in (tmp_path / "student").rglob("config.json"))
    model = AutoModelForCausalLM.from_pretrained(root, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    prompt = tokenizer("the cat", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 3


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"student": "mlp:hidden=8"}, "student"),
        ({"config": {"method": "dist"}}, "config.method"),
        ({"config": {"soft_label_format": "sampled", "method": "rkl"}}, "config"),
        ({"config": {"preprocess": {"scale": 2}}}, "config.preprocess"),
        ({"task": "translation"}, "task"),
    ],
)
def test_a_causal_lm_job_refuses_settings_of_the_other_task(
    service: Embedded, lm_inputs: tuple[Path, Path], change: dict, field: str
) -> None:
    teacher, dataset = lm_inputs
    body = {
        "task": "causal_lm",
        "teacher_file_ids": [upload(service.http, "teacher", teacher)["id"]],
        "dataset_file_id": upload(service.http, "dataset", dataset)["id"],
        **change,
    }
    r = service.http.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == [field]
