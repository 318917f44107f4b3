"""A text classifier through the classification pipeline: a tiny BERT teacher folder (tar.gz) and a CSV of
texts with labelled and unlabelled rows; every stage as the worker runs it, each student kind, the exports
(HF folder, ONNX with tokenizer.json, safetensors) checked against the in-job student."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distill.tiny_text import LABELS, pack, save_teacher, texts, write_csv
from worker.distill import pipeline
from worker.distill.config import DistillConfig
from worker.distill.errors import ConfigError, DatasetError
from worker.distill.inputs import forget_loaded_inputs, load_inputs, load_weights
from worker.distill.workfolder import Work, prepare_inputs


@pytest.fixture(scope="module")
def teacher_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("text_teacher")
    return pack(save_teacher(folder / "model"), folder / "teacher.tar.gz")


def config(**overrides: object) -> DistillConfig:
    base = {
        "student": "bow:embed=16",
        "epochs": 2,
        "batch_size": 16,
        "method": "hinton",
        "temperature": 2.0,
        "alpha": 0.5,
        "max_length": 24,
        "export_formats": ["onnx", "safetensors"],
    }
    return DistillConfig.from_dict(base | overrides)


def work_with(tmp_path: Path, teacher: Path, rows: int = 96, **csv: object) -> Path:
    data = write_csv(tmp_path / "texts.csv", texts(rows, seed=2), **csv)  # type: ignore[arg-type]
    work = tmp_path / "work"
    prepare_inputs(work, teachers=[teacher], dataset=data)
    return work


def test_a_text_job_runs_every_stage_and_its_onnx_student_reads_tokenizer_ids(
    tmp_path: Path, teacher_archive: Path
) -> None:
    work = work_with(tmp_path, teacher_archive, unlabelled_every=3)
    cfg = config()
    summary = pipeline.preflight(work, cfg)
    assert summary["teacher"]["format"] == "hf_text"
    assert summary["class_names"] == LABELS
    assert summary["dataset"]["labelled_rows"] < summary["dataset"]["train_rows"]  # unlabelled rows kept
    assert summary["text"]["truncated"] == 0 and summary["text"]["length"] <= 24

    report = pipeline.run_all(work, cfg)
    assert report["teacher"]["parameters"] > 0
    for who in ("teacher", "student"):
        assert report[who]["latency_ms"] > 0
    assert report["text"]["latency"].startswith("ms per text")
    out = Work(work).out
    assert {"student.onnx", "tokenizer.json", "student.safetensors"} <= {p.name for p in out.iterdir()}

    # The ONNX student, fed what the tokenizer gives a user, matches the in-job student.
    import onnxruntime as ort
    from tokenizers import Tokenizer

    loaded, _ = load_inputs(Work(work), cfg)
    student = load_weights(loaded, cfg, Work(work).checkpoints / "student.pt")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("the food was great and lovely")
    ids = np.array([enc.ids], dtype=np.int64)
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    want = student(torch.from_numpy(ids)).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    forget_loaded_inputs()


@pytest.mark.parametrize(
    "student", ["text_transformer:layers=1;hidden=16;heads=2", "teacher_layers:keep=1", "textcnn:embed=16"]
)
def test_each_text_student_distils(tmp_path: Path, teacher_archive: Path, student: str) -> None:
    work = work_with(tmp_path, teacher_archive, rows=48, names=False)  # labels as class ids
    hf = not student.startswith("textcnn")
    cfg = config(student=student, epochs=1, export_formats=["hf", "onnx"] if hf else ["onnx"], baseline=False)
    report = pipeline.run_all(work, cfg)
    assert report["student"]["parameters"] > 0
    if not hf:
        return
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

    with tarfile.open(Work(work).out / "student_hf.tar.gz") as tar:
        tar.extractall(tmp_path / "hf", filter="data")
    root = next(p.parent for p in (tmp_path / "hf").rglob("config.json"))
    model = AutoModelForSequenceClassification.from_pretrained(root, local_files_only=True).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root, local_files_only=True)
    assert model.config.id2label == dict(enumerate(LABELS))
    batch = tokenizer(["the movie was awful", "a lovely day"], padding=True, return_tensors="pt")
    loaded, _ = load_inputs(Work(work), cfg)
    student_model = load_weights(loaded, cfg, Work(work).checkpoints / "student.pt")
    padded = torch.full((2, 24), tokenizer.pad_token_id, dtype=torch.int64)
    padded[:, : batch["input_ids"].shape[1]] = batch["input_ids"]
    with torch.no_grad():
        np.testing.assert_allclose(model(**batch).logits.numpy(), student_model(padded).numpy(), atol=1e-4)
    card = json.loads((Work(work).out / "model_card.json").read_text())
    assert card["formats"] == ["hf", "onnx"]
    forget_loaded_inputs()


def test_text_jobs_refuse_what_cannot_work(tmp_path: Path, teacher_archive: Path) -> None:
    work = work_with(tmp_path, teacher_archive, rows=24)
    with pytest.raises(ConfigError, match="text student"):
        pipeline.preflight(work, config(student="mlp:hidden=8"))
    with pytest.raises(DatasetError) as err:
        pipeline.preflight(work, config(text_column="body"))
    assert err.value.code == "missing_column"
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nthe food was good,delicious\n")
    prepare_inputs(tmp_path / "bad", teachers=[teacher_archive], dataset=bad)
    with pytest.raises(DatasetError) as err:
        pipeline.preflight(tmp_path / "bad", config())
    assert err.value.code == "unknown_label"
    assert "negative" in err.value.message
    forget_loaded_inputs()


def test_an_onnx_text_teacher_with_method_auto(tmp_path: Path) -> None:
    """The ONNX route: the classifier exported to ONNX beside its tokenizer.json, in one zip; `auto` picks
    the method on validation as for any classification job, and the report carries the teacher's labels."""
    import zipfile

    from tests.distill.test_text_teachers import export_onnx
    from tests.distill.tiny_text import fast_tokenizer, teacher_model

    folder = tmp_path / "onnx"
    folder.mkdir()
    export_onnx(teacher_model(), folder / "model.onnx")
    fast_tokenizer().save_pretrained(folder)
    archive = tmp_path / "teacher.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, p.name)
    work = work_with(tmp_path, archive, rows=64, names=False)
    cfg = config(method="auto", temperature="auto", alpha="auto", epochs=2)
    report = pipeline.run_all(work, cfg)
    assert report["hyperparameters"]["method"] in ("hinton", "dist")
    assert report["teacher"]["accuracy"] > 0.5  # the teacher's ONNX logits, scored on held-out rows
    assert (Work(work).out / "student.onnx").is_file()
    forget_loaded_inputs()


def test_soft_labels_are_not_reused_across_text_settings(tmp_path: Path, teacher_archive: Path) -> None:
    """The same files tokenized at another max_length are other inputs to the teacher: new soft labels."""
    from worker.distill.inputs import stored_soft_labels

    work = work_with(tmp_path, teacher_archive, rows=24)
    for length in (24, 4):
        cfg = config(max_length=length)
        pipeline.soft_label(work, cfg)
        loaded, _ = load_inputs(Work(work), cfg)
        stored = stored_soft_labels(Work(work), loaded, cfg, "train")
        np.testing.assert_allclose(stored.numpy(), loaded.teacher.logits(loaded.x).numpy(), atol=1e-2)
    forget_loaded_inputs()
