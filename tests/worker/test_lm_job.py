"""A causal-LM job end to end over HTTP on the embedded service: a tiny Llama teacher folder (tar.gz) and a
JSONL of prompts alone uploaded, `{"task": "causal_lm", "config": {"generate": ...}}` submitted, both stages
run by the worker's own task code in the sandboxed child: the teacher writes the completions (the artifact
`generated.jsonl`), and the student downloaded as `student_hf.tar.gz` loads with `from_pretrained` and
generates. (A corpus of documents runs the same stages without the generate step: tests/distill.)"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from app.jobs.config_schema import GenerateSchema
from tests.distill.tiny_lm import CORPUS, pack, save_folder
from tests.support.api import artifact_names, events, upload
from tests.support.services import Embedded
from worker.tasks.jobs import GENERATED, run_distill, run_soft_label

LM_CONFIG = {"epochs": 1, "batch_size": 4, "max_length": 32, "topk": 8, "max_new_tokens": 4}
# The first one to three words of each sentence: the teacher continues each for up to 8 tokens.
PROMPTS = sorted({" ".join(text.split()[:n]) for text in CORPUS for n in (1, 2, 3)})
GENERATE = {"max_new_tokens": 8, "do_sample": True, "temperature": 0.8}


@pytest.fixture(scope="module")
def lm_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("lm")
    save_folder(folder / "teacher")
    teacher = pack(folder / "teacher", folder / "teacher.tar.gz")
    dataset = folder / "corpus.jsonl"
    lines = [json.dumps({"text": text}) for text in CORPUS]
    dataset.write_text("\n".join(lines) + "\n")
    return teacher, dataset


def test_a_causal_lm_job_from_prompts_over_http_gives_the_teachers_text_and_a_student_that_loads(
    service: Embedded, lm_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    teacher = lm_inputs[0]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    body = {
        "task": "causal_lm",
        "teacher_file_ids": [upload(service.http, "teacher", teacher)["id"]],
        "dataset_file_id": upload(service.http, "dataset", prompts)["id"],
        "student": "causal_lm:layers=1;hidden=32;heads=2",
        "config": {**LM_CONFIG, "generate": GENERATE},
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
    assert job["config"]["generate"] == {**GENERATE, "top_p": 1.0, "seed": 0}

    run_soft_label(service.ctx, job["id"])
    run_distill(service.ctx, job["id"])
    job = service.http.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    for key in ("teacher_perplexity", "student_perplexity", "baseline_perplexity", "agreement", "kl"):
        assert job["metrics"][key] is not None, (key, job["metrics"])
    assert 0 < job["metrics"]["bytes_per_token"] <= 300
    names = {"student_hf.tar.gz", "model_card.json", "report.json", "generated.jsonl"}
    assert names <= artifact_names(service.http, job["id"])
    steps = [e["data"]["step"] for e in events(service.http, job["id"]) if e["kind"] == "step_started"]
    assert steps[:3] == ["preflight", "generate", "soft_label"]

    # What the teacher wrote, downloadable: every prompt, in order, with its completion.
    generated = service.http.get(f"/v1/jobs/{job['id']}/artifacts/generated.jsonl")
    assert generated.status_code == 200
    rows = [json.loads(line) for line in generated.text.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and all(r["completion"].strip() for r in rows)
    report = service.http.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    assert report["generated_dataset"]["rows"] == len(PROMPTS)
    assert 0 < report["generated_dataset"]["tokens"] <= 8 * len(PROMPTS)
    assert report["generated_dataset"]["seconds"] > 0

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
        ({"config": {"generate": {"max_new_tokens": 0}}}, "config.generate.max_new_tokens"),
        ({"config": {"generate": {"do_sample": True, "top_p": 1.5}}}, "config.generate.top_p"),
        ({"config": {"generate": {"temperature": 0.7}}}, "config.generate"),  # greedy: no temperature
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


def test_the_apis_generate_settings_are_the_cores() -> None:
    lm_config = pytest.importorskip("worker.distill.lm_config")
    assert set(GenerateSchema.model_fields) == {*lm_config.GENERATE_DEFAULTS, "seed"}
    assert GenerateSchema().model_dump(exclude={"seed"}) == lm_config.GENERATE_DEFAULTS
    assert GenerateSchema.model_fields["max_new_tokens"].metadata[-1].le == lm_config.MAX_NEW_TOKENS
    lm_generate = pytest.importorskip("worker.distill.lm_generate")
    assert GENERATED == lm_generate.GENERATED  # the task uploads what the core writes
