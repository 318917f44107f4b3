"""The causal-LM stages over one work folder, end to end on a tiny teacher: preflight, soft_label, distill,
evaluate, export; a second call of a finished stage does no work; a stopped distill stage resumes exactly."""

from __future__ import annotations

import itertools
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from lm_student_fixtures import TEXTS
from tiny_lm import CORPUS, pack, save_folder

from worker.distill import lm_inputs, lm_outputs, lm_pipeline
from worker.distill.checkpoints import load_latest_checkpoint
from worker.distill.errors import ConfigError, DistillError
from worker.distill.lm_config import LMConfig
from worker.distill.lm_eval import evaluate_lm
from worker.distill.lm_pipeline import (
    Stopped,
    forget_lm_teacher,
    lm_distill,
    lm_evaluate,
    lm_export,
    lm_headline,
    lm_preflight,
    lm_soft_label,
)
from worker.distill.text_data import TokenData
from worker.distill.workfolder import prepare_inputs

torch.set_num_threads(1)
SETTINGS: dict[str, Any] = dict(
    student="causal_lm:layers=1;hidden=32;heads=2", topk=8, shard_rows=4, max_length=24, epochs=2,
    batch_size=4, lr=1e-2, val_fraction=0.25, max_new_tokens=4,
)  # fmt: skip


def _write_files(root: Path) -> tuple[Path, Path]:
    """A tiny HF teacher as a tar.gz and a JSONL of 24 short documents."""
    save_folder(root / "model")
    teacher = pack(root / "model", root / "teacher.tar.gz")
    sentences = sorted(set(CORPUS)) + sorted(set(TEXTS))
    docs = [f"{a} {b}" for a, b in itertools.permutations(sentences[:6], 2)][:24]
    dataset = root / "corpus.jsonl"
    dataset.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return teacher, dataset


def _snapshot(folder: Path) -> dict[Path, int]:
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every stage once, in order, on one work folder; shared read-only by the tests below."""
    root = tmp_path_factory.mktemp("lm_job")
    teacher, dataset = _write_files(root / "files")
    work = root / "work"
    prepare_inputs(work, teachers=[teacher], dataset=dataset)
    config = LMConfig.from_dict(SETTINGS)
    events: list[dict[str, Any]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm_outputs, "SPEED_SECONDS", 0.01)
        summary = lm_preflight(work, config)
        manifest = lm_soft_label(work, config, events.append)
        result = lm_distill(work, config, events.append)
        report = lm_evaluate(work, config)
        files = lm_export(work, config)
    return {
        "root": root, "work": work, "config": config, "events": events, "summary": summary,
        "manifest": manifest, "result": result, "report": report, "files": files,
    }  # fmt: skip


def test_the_stages_report_teacher_student_and_baseline(job: dict[str, Any]) -> None:
    summary, manifest, report = job["summary"], job["manifest"], job["report"]
    assert summary["teacher"]["architecture"] == "LlamaForCausalLM"
    assert summary["student"]["layers"] == 1 and summary["student"]["hidden"] == 32
    assert summary["dataset"]["documents"] + summary["dataset"]["val_documents"] == 24
    assert summary["soft_labels"]["bytes_per_token"] == 8 * (2 + 2) + 2  # uint16 ids, fp16 values and tail

    assert manifest["format"] == "topk" and manifest["k"] == 8 and manifest["temperature"] == 1.0
    assert all(manifest["splits"][s]["complete"] for s in ("train", "val"))
    assert (job["work"] / "soft_labels" / "tokens.npz").is_file()

    head = lm_headline(report)
    assert set(head) == {
        "teacher_perplexity", "student_perplexity", "baseline_perplexity", "agreement", "kl",
        "bytes_per_token", "method", "temperature", "alpha",
    }  # fmt: skip
    assert (head["method"], head["temperature"], head["alpha"]) == ("fkl", 1.0, 1.0)
    assert head["bytes_per_token"] == 34 and 0.0 < report["soft_labels"]["covered_mass"] < 1.0
    # The teacher is random: its held-out perplexity is near the vocabulary size, from the manifest.
    assert head["teacher_perplexity"] == manifest["splits"]["val"]["teacher_perplexity"] > 50
    assert 0.0 <= head["agreement"] <= 1.0 and head["kl"] > 0
    # KD imitates the random teacher; CE-only learns the repetitive text: both far below uniform (~300).
    assert head["baseline_perplexity"] < head["student_perplexity"]
    assert report["baseline"]["agreement"] is not None and report["baseline"]["kl"] > head["kl"]
    assert report["evaluated_on"] == "val" and report["student"]["steps"] == report["baseline"]["steps"]
    assert set(report["teacher"]["tokens_per_s"]) == {"batch_1", "batch_8"}
    assert report["compression"] > 1 and report["speedup"] > 0
    assert len(report["generations"]) == 3 and all(g["prompt"] for g in report["generations"])
    stored = json.loads((job["work"] / "out" / "report.json").read_text())
    assert set(stored["student"].pop("files")) == {"student_hf.tar.gz"}  # export adds its files' sizes
    assert stored == report


def test_progress_names_the_stage_and_the_phase_of_each_epoch(job: dict[str, Any]) -> None:
    soft = [e for e in job["events"] if e["stage"] == "soft_label"]
    assert soft and soft[-1]["progress"] == 1.0 and {e["metrics"]["split"] for e in soft} == {"train", "val"}
    epochs = [(e["phase"], e["epoch"]) for e in job["events"] if e["stage"] == "distill"]
    assert epochs == [("distill", 1), ("distill", 2), ("baseline", 1), ("baseline", 2)]
    progress = [e["progress"] for e in job["events"] if e["stage"] == "distill"]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert all(e["metrics"]["val_perplexity"] > 0 for e in job["events"] if e["stage"] == "distill")


def test_the_exported_student_loads_with_from_pretrained_and_generates(
    job: dict[str, Any], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = job["work"] / "out"
    assert [p.name for p in job["files"]] == ["student_hf.tar.gz", "model_card.json", "report.json"]
    with tarfile.open(out / "student_hf.tar.gz") as tar:
        tar.extractall(tmp_path / "student", filter="data")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "student", local_files_only=True)
    # The exported student is the evaluated one: the same held-out perplexity.
    data = TokenData.load_npz(job["work"] / "soft_labels" / "tokens.npz")
    ppl = evaluate_lm(model, data.split("val"))["perplexity"]
    assert ppl == pytest.approx(job["report"]["student"]["perplexity"], rel=1e-5)
    ids = torch.tensor([tok("the quick brown fox")["input_ids"]])
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 3

    card = json.loads((out / "model_card.json").read_text())
    assert LMConfig.from_dict(card["config"]) == job["config"]  # enough to run the job again
    assert card["metrics"]["student_perplexity"] == job["report"]["student"]["perplexity"]
    assert card["resolved_config"]["layers"] == 1 and card["task"] == "causal_lm"
    # Export again: nothing is rewritten.
    before = _snapshot(out)
    assert lm_export(job["work"], job["config"]) == job["files"]
    assert _snapshot(out) == before


def test_a_finished_soft_label_or_distill_stage_does_no_work(
    job: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_teacher(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished stage loaded the teacher")

    forget_lm_teacher()
    monkeypatch.setattr(lm_inputs, "load_lm_teacher", no_teacher)
    work = job["work"]
    before = _snapshot(work / "soft_labels") | _snapshot(work / "checkpoints")
    events: list[dict[str, Any]] = []
    assert lm_soft_label(work, job["config"], events.append) == job["manifest"]
    assert lm_distill(work, job["config"], events.append) == job["result"]
    assert _snapshot(work / "soft_labels") | _snapshot(work / "checkpoints") == before
    assert [e["stage"] for e in events] == ["soft_label"]  # "done", and no epoch ran


def test_a_stopped_distill_stage_resumes_to_the_same_student(job: dict[str, Any], tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(job["work"] / "inputs", work / "inputs")
    shutil.copytree(job["work"] / "soft_labels", work / "soft_labels")
    events: list[dict[str, Any]] = []
    with pytest.raises(Stopped):  # asked after the first epoch, as a SIGTERM would be
        lm_distill(work, job["config"], events.append, stop=lambda: bool(events))
    assert [e["epoch"] for e in events] == [1]
    state = json.loads((work / "checkpoints" / "lm" / "state.json").read_text())
    assert state["phases"] == {}
    # What a cancel with keep_partial leaves: the checkpoint's weights as a folder from_pretrained loads.
    from transformers import AutoModelForCausalLM

    from worker.distill.lm_pipeline import lm_partial_student

    archive = lm_partial_student(work, job["config"])
    assert archive is not None and archive.name == "partial_student_hf.tar.gz"
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "partial", filter="data")
    partial = AutoModelForCausalLM.from_pretrained(tmp_path / "partial", local_files_only=True)
    checkpoint = load_latest_checkpoint(work / "checkpoints" / "lm" / "kd")
    assert checkpoint is not None
    assert all(torch.equal(partial.state_dict()[k], v) for k, v in checkpoint["model"].items())

    result = lm_distill(work, job["config"], events.append, stop=lambda: False)
    assert result["phases"]["distill"]["resumed_from"] == result["phases"]["distill"]["steps"] // 2
    assert [(e["phase"], e["epoch"]) for e in events[1:]] == [
        ("distill", 2),
        ("baseline", 1),
        ("baseline", 2),
    ]
    for name in ("student.pt", "baseline.pt"):
        got = torch.load(work / "checkpoints" / "lm" / name, weights_only=True)
        want = torch.load(job["work"] / "checkpoints" / "lm" / name, weights_only=True)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_distill_and_evaluate_refuse_to_run_before_the_stage_they_need(
    tmp_path: Path, job: dict[str, Any]
) -> None:
    work = tmp_path / "work"
    shutil.copytree(job["work"] / "inputs", work / "inputs")
    with pytest.raises(DistillError) as missing:
        lm_distill(work, job["config"])
    assert missing.value.code == "soft_labels_missing"
    shutil.copytree(job["work"] / "soft_labels", work / "soft_labels")
    with pytest.raises(DistillError) as untrained:
        lm_evaluate(work, job["config"])
    assert untrained.value.code == "stage_not_done"


def test_config_resolves_task_dependent_defaults_and_names_bad_fields() -> None:
    config = LMConfig.from_dict({"method": "auto", "temperature": "auto", "alpha": "auto"})
    assert (config.method, config.temperature, config.alpha, config.topk) == ("fkl", 1.0, 1.0, 64)
    assert LMConfig.from_dict({"soft_label_format": "sampled"}).topk == 12
    assert LMConfig.from_dict({"method": "gkd"}).method_params == {"beta": 0.5}
    assert LMConfig.from_dict(config.to_dict()) == config
    cases: list[tuple[dict[str, Any], str]] = [
        ({"epoch": 3}, "epoch"),
        ({"soft_label_format": "sampled", "method": "rkl"}, "method"),
        ({"method": "fkl", "method_params": {"beta": 0.3}}, "method_params"),
        ({"task": "classification"}, "task"),
        ({"topk": 0}, "topk"),
        ({"export_formats": ["onnx"]}, "export_formats"),
        ({"student": "causal_lm:layers"}, "student"),
    ]
    for bad, field in cases:
        with pytest.raises(ConfigError) as info:
            LMConfig.from_dict(bad)
        assert info.value.field == field, bad
    with pytest.raises(ConfigError, match="known: task, student, method"):
        LMConfig.from_dict({"epoch": 3})


def test_the_baseline_trains_at_its_own_learning_rate(
    job: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`baseline_lr`: the CE-only run at its own rate (KD and CE want different ones), shown in the record."""
    work = tmp_path / "work"
    shutil.copytree(job["work"], work)
    config = LMConfig.from_dict({**SETTINGS, "baseline_lr": 3e-3})
    seen: list[tuple[str, float]] = []
    real = lm_pipeline.train_lm

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append((kwargs["method"], kwargs["lr"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_pipeline, "train_lm", spy)
    record = lm_distill(work, config)
    assert seen == [("fkl", 1e-2), ("ce", 3e-3)]
    assert (record["hyperparameters"]["lr"], record["hyperparameters"]["baseline_lr"]) == (1e-2, 3e-3)
    with pytest.raises(ConfigError) as info:
        LMConfig.from_dict({"baseline_lr": 0})
    assert info.value.field == "baseline_lr"
