"""The stages over one work folder, end to end on a tiny job, as the service and `distill local` run them."""

import json
import shutil

import numpy as np
import pytest
import torch
from tiny_job import CLASSES, PREPROCESS, clusters, write_job

from worker.distill import pipeline
from worker.distill.config import DistillConfig
from worker.distill.errors import DatasetError, DistillError, TeacherError
from worker.distill.softlabels import sha256_file
from worker.distill.train import Stopped

torch.set_num_threads(1)


def make_config(**overrides):
    settings = dict(
        student="mlp:hidden=16", epochs=4, batch_size=32, lr=3e-3,
        method="hinton", temperature=2.0, alpha=0.7, soft_label_format="topk", topk=2, shard_size=128,
        val_fraction=0.2, finetune_epochs=1, preprocess=PREPROCESS,
    )  # fmt: skip
    return DistillConfig.from_dict(settings | overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One complete run_all, shared (read-only) by the tests below; they copy it before changing anything."""
    root = tmp_path_factory.mktemp("job")
    teacher, data = write_job(root / "files")
    work = root / "work"
    pipeline.prepare_inputs(work, teachers=[teacher], dataset=data)
    events = []
    report = pipeline.run_all(work, make_config(), events.append)
    return work, teacher, data, report, events


def snapshot(work):
    return {p.relative_to(work): p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}


def test_run_all_distils_a_student_well_above_chance(finished):
    work, _, _, report, _ = finished
    assert report["teacher"]["accuracy"] > 0.9
    assert report["student"]["accuracy"] > 0.8  # chance is 1/3
    assert report["student"]["agreement"] > 0.8
    assert report["baseline"]["accuracy"] is not None and report["kd_gain_points"] is not None
    # the holdout is 20% of the 500 labelled rows
    assert report["evaluated_on"] == "val" and report["validation_rows"] == 100
    chosen = {
        "method": "hinton",
        "temperature": 2.0,
        "alpha": 0.7,
        "source": "given",
        "why": "set in the config",
    }
    assert report["hyperparameters"] == chosen
    assert report["student"]["latency_ms"] > 0 and report["teacher"]["parameters"] == 8 * CLASSES + CLASSES
    assert set(report["phases"]) == {"distill", "finetune", "baseline"}
    assert report["phases"]["baseline"]["epochs"] == 5  # same budget: 4 distill + 1 fine-tune epochs
    sizes = {
        p: (work / "out" / p).stat().st_size for p in ("student.pt", "student.onnx", "student.safetensors")
    }
    assert report["student"]["bytes"] == sum(sizes.values())
    assert json.loads((work / "out" / "report.json").read_text()) == report


def test_exported_student_takes_raw_input(finished):
    work, _, _, report, _ = finished
    raw, y, _ = clusters(300, seed=7)
    student = torch.jit.load(str(work / "out" / "student.pt"))
    accuracy = (student(torch.from_numpy(raw)).argmax(1).numpy() == y).mean()
    assert accuracy > 0.8


def test_model_card_names_inputs_resolved_config_and_metrics(finished):
    work, teacher, data, report, _ = finished
    card = json.loads((work / "out" / "model_card.json").read_text())
    assert card["teacher_sha256"] == sha256_file(teacher) and card["dataset_sha256"] == sha256_file(data)
    assert card["config"]["temperature"] == 2.0 and card["config"]["alpha"] == 0.7 and card["seed"] == 0
    assert card["config"]["method"] == "hinton" and card["metrics"]["method"] == "hinton"
    assert card["config"]["student"] == "mlp:hidden=16"
    assert DistillConfig.from_dict(card["config"]).epochs == 4  # the card's config runs as is
    assert set(card["libraries"]) == {"python", "torch", "numpy", "onnx", "onnxruntime"}
    assert card["metrics"]["student_accuracy"] == report["student"]["accuracy"]
    assert card["student"]["input_shape"] == [8] and card["student"]["preprocess"]["scale"] == 0.02
    assert card["files"]["student.onnx"]["sha256"] == sha256_file(work / "out" / "student.onnx")


def test_progress_events_follow_the_documented_shape(finished):
    *_, events = finished
    assert all(set(e) == {"stage", "phase", "progress", "epoch", "metrics"} for e in events)
    assert all(0.0 <= e["progress"] <= 1.0 for e in events)
    stages = list(dict.fromkeys(e["stage"] for e in events))
    assert stages == ["preflight", "soft_label", "distill", "evaluate", "export"]
    epochs = [e for e in events if e["stage"] == "distill" and e["epoch"] is not None]
    assert [e["phase"] for e in epochs] == ["distill"] * 4 + ["finetune"] + ["baseline"] * 5
    assert all(e["metrics"]["phase"] == e["phase"] for e in epochs)
    assert epochs[-1]["progress"] == 1.0 and "val_acc" in epochs[0]["metrics"]
    assert all(e["phase"] is None for e in events if e["stage"] != "distill")


def test_epochs_after_a_stop_and_resume_still_name_their_phase(finished, tmp_path):
    """A job stopped during its baseline run (a restart, a cancel) resumes it; its epochs, which count
    from 1 again after the distilled student's, must still say they belong to the baseline."""
    work = tmp_path / "work"
    shutil.copytree(finished[0], work)
    shutil.rmtree(work / "checkpoints")
    before: list[dict] = []

    def stop() -> bool:  # asked after each epoch: stop once the baseline has done two
        return sum(e["phase"] == "baseline" for e in before) >= 2

    with pytest.raises(Stopped):
        pipeline.distill(work, make_config(), before.append, stop=stop)
    after: list[dict] = []
    pipeline.distill(work, make_config(), after.append)
    runs = [(e["phase"], e["metrics"]["phase"], e["epoch"]) for e in before + after if e["epoch"] is not None]
    distilled = [("distill", "distill", i) for i in range(1, 5)] + [("finetune", "finetune", 1)]
    assert runs == distilled + [("baseline", "baseline", i) for i in range(1, 6)]
    assert {e["phase"] for e in after} == {"baseline"}  # nothing before the baseline ran again


def test_running_a_finished_job_again_changes_nothing(finished, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(finished[0], work)
    before = snapshot(work)
    events = []
    report = pipeline.run_all(work, make_config(), events.append)
    assert snapshot(work) == before
    assert not [e for e in events if e["stage"] == "distill"]  # no epoch ran
    assert report == finished[3]


def test_lost_outputs_are_rebuilt_from_the_checkpoints(finished, tmp_path):
    # out/ is not mirrored between machines: the export stage must work from checkpoints/ alone
    work = tmp_path / "work"
    shutil.copytree(finished[0], work)
    shutil.rmtree(work / "out")
    checkpoints = {p: m for p, m in snapshot(work).items() if p.parts[0] == "checkpoints"}
    paths = pipeline.export(work, make_config(export_formats=["torchscript", "safetensors"]))
    assert {p.name for p in paths} == {"student.pt", "student.safetensors", "model_card.json", "report.json"}
    assert {p: m for p, m in snapshot(work).items() if p.parts[0] == "checkpoints"} == checkpoints


def test_changed_settings_retrain_instead_of_resuming(finished, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(finished[0], work)
    config = make_config(epochs=2, finetune_epochs=0, baseline=False, export_formats=["torchscript"])
    result = pipeline.distill(work, config)
    assert result["phases"]["distill"]["epochs"] == 2 and set(result["phases"]) == {"distill"}
    assert not (work / "out").exists()  # the old student's outputs went with its checkpoints
    report = pipeline.evaluate(work, config)
    assert report["baseline"] is None and report["phases"]["distill"]["epochs"] == 2


def test_user_errors_carry_stable_codes(tmp_path):
    teacher, data = write_job(tmp_path / "files", rows=60, unlabelled=0)
    with pytest.raises(TeacherError) as info:
        pipeline.preflight(tmp_path / "empty", make_config())
    assert info.value.code == "teacher_not_found"

    bad = tmp_path / "files" / "bad.npz"
    x, y, _ = clusters(60, seed=2)
    np.savez(bad, x=x, y=np.where(np.arange(60) == 5, CLASSES, y))  # a label the teacher does not have
    pipeline.prepare_inputs(tmp_path / "w1", teachers=[teacher], dataset=bad)
    with pytest.raises(DatasetError) as info:
        pipeline.preflight(tmp_path / "w1", make_config())
    assert info.value.code == "label_out_of_range"

    pipeline.prepare_inputs(tmp_path / "w2", teachers=[teacher], dataset=data)
    assert pipeline.preflight(tmp_path / "w2", make_config())["num_classes"] == CLASSES
    with pytest.raises(DistillError) as info:
        pipeline.evaluate(tmp_path / "w2", make_config())
    assert info.value.code == "stage_not_done"
    with pytest.raises(DistillError) as info:
        pipeline.distill(tmp_path / "w2", make_config())
    assert info.value.code == "soft_labels_missing"


def test_an_interrupted_distill_stage_redoes_only_the_unfinished_part(finished, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(finished[0], work)
    # As if the process died during the baseline run: its last epoch and the final record never landed.
    state_path = work / "checkpoints" / "state.json"
    state = json.loads(state_path.read_text())
    state.pop("done")
    state["phases"].pop("baseline")
    state_path.write_text(json.dumps(state))
    (work / "checkpoints" / "baseline.pt").unlink()
    latest = json.loads((work / "checkpoints" / "baseline" / "latest.json").read_text())
    assert latest["epoch"] == 5
    (work / "checkpoints" / "baseline" / latest["file"]).unlink()  # falls back to epoch 4
    student_before = sha256_file(work / "checkpoints" / "student.pt")
    events = []
    result = pipeline.distill(work, make_config(), events.append)
    assert [(e["metrics"]["phase"], e["epoch"]) for e in events] == [("baseline", 5)]
    assert result["phases"]["baseline"]["epochs"] == 5
    assert sha256_file(work / "checkpoints" / "student.pt") == student_before
    # the resumed baseline ends with the weights of the uninterrupted run
    assert sha256_file(work / "checkpoints" / "baseline.pt") == sha256_file(
        finished[0] / "checkpoints" / "baseline.pt"
    )


def test_unlabelled_transfer_set_is_judged_by_agreement(tmp_path):
    teacher, _ = write_job(tmp_path / "files")
    raw, _, _ = clusters(400, seed=3)
    data = tmp_path / "files" / "unlabelled.npz"
    np.savez(data, x=raw)  # no y at all: every row is learnt from the teacher alone
    work = tmp_path / "work"
    pipeline.prepare_inputs(work, teachers=[teacher], dataset=data)
    config = make_config(
        soft_label_format="full", epochs=8, finetune_epochs=2, export_formats=["torchscript"]
    )
    report = pipeline.run_all(work, config)
    assert report["student"]["accuracy"] is None and report["teacher"]["accuracy"] is None
    assert report["student"]["agreement"] > 0.8
    assert report["baseline"] is None and set(report["phases"]) == {"distill"}  # nothing to fine-tune on


def test_ensemble_and_separate_validation_file_in_preflight(tmp_path):
    teacher, data = write_job(tmp_path / "files", rows=120, unlabelled=0)
    raw, y, _ = clusters(30, seed=4)
    val = tmp_path / "files" / "val.npz"
    np.savez(val, x=raw, y=y)
    work = tmp_path / "work"
    pipeline.prepare_inputs(work, teachers=[teacher, teacher], dataset=data, validation=val)
    assert sorted(p.name for p in (work / "inputs" / "teacher").iterdir()) == [
        "00-teacher.pt",
        "01-teacher.pt",
    ]
    summary = pipeline.preflight(work, make_config())
    assert summary["teacher"]["format"] == "ensemble" and summary["teacher"]["files"] == 2
    assert summary["dataset"]["train_rows"] == 120 and summary["dataset"]["val_rows"] == 30
    pipeline.prepare_inputs(work, teachers=[teacher], dataset=data)  # a second call replaces the inputs
    assert [p.name for p in (work / "inputs" / "teacher").iterdir()] == ["teacher.pt"]
    assert not (work / "inputs" / "validation").exists() or not list(
        (work / "inputs" / "validation").iterdir()
    )


def test_a_torchscript_student_init_is_trained_and_exported(tmp_path):
    teacher, data = write_job(tmp_path / "files")
    init = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, CLASSES))
    init_path = tmp_path / "files" / "init.pt"
    torch.jit.save(torch.jit.script(init), str(init_path))
    work = tmp_path / "work"
    pipeline.prepare_inputs(work, teachers=[teacher], dataset=data, student_init=init_path)
    report = pipeline.run_all(work, make_config(finetune_epochs=0, baseline=False))
    assert (
        report["student"]["spec"] == "init:init.pt"
        and report["student"]["parameters"] == 8 * 12 + 12 + 12 * 3 + 3
    )
    assert report["student"]["accuracy"] > 0.8
    raw, y, _ = clusters(200, seed=9)
    for name in ("student.pt", "student.onnx", "student.safetensors"):
        assert name in report["student"]["files"]
    exported = torch.jit.load(str(work / "out" / "student.pt"))
    assert (exported(torch.from_numpy(raw)).argmax(1).numpy() == y).mean() > 0.8


def test_method_auto_trains_with_the_method_it_chose_and_says_so(finished, tmp_path):
    from worker.distill.checkpoints import load_latest_checkpoint

    work = tmp_path / "work"
    shutil.copytree(finished[0], work)
    config = make_config(
        method="auto", epochs=2, finetune_epochs=0, baseline=False, export_formats=["torchscript"]
    )
    report = pipeline.run_all(work, config)
    hp = report["hyperparameters"]
    assert hp["source"] == "auto" and {t["method"] for t in hp["trials"]} == {"hinton", "dist"}
    best = max(hp["trials"], key=lambda t: t["score"])
    assert hp["method"] == best["method"] and f"method {best['method']}," in hp["why"]
    assert load_latest_checkpoint(work / "checkpoints")["run"]["method"] == hp["method"]  # what ran
    card = json.loads((work / "out" / "model_card.json").read_text())
    assert card["config"]["method"] == card["metrics"]["method"] == hp["method"]
    assert DistillConfig.from_dict(card["config"]).method == hp["method"]  # the card's config reruns the pick
