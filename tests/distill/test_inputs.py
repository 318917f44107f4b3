"""load_inputs keeps its last load for the next stage of a job and loads again when anything changes."""

import numpy as np
import pytest
import torch
from tiny_job import PREPROCESS, clusters, write_job

from worker.distill import inputs, pipeline
from worker.distill.config import DistillConfig
from worker.distill.workfolder import Work

torch.set_num_threads(1)


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A prepared work folder, and a list that grows by one for every real load of its dataset."""
    teacher, data = write_job(tmp_path / "files", rows=120, unlabelled=0)
    work = tmp_path / "work"
    pipeline.prepare_inputs(work, teachers=[teacher], dataset=data)
    loads = []
    real = inputs.load_dataset

    def counting(*args, **kwargs):
        loads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(inputs, "load_dataset", counting)
    inputs.forget_loaded_inputs()
    yield Work(work), loads
    inputs.forget_loaded_inputs()


def config(**overrides) -> DistillConfig:
    return DistillConfig.from_dict({"student": "mlp:hidden=8", "preprocess": PREPROCESS} | overrides)


def test_a_second_stage_reuses_the_load_and_gets_a_fresh_student(job):
    work, loads = job
    first, student = inputs.load_inputs(work, config())
    with torch.no_grad():  # as a stage trains its student in place
        for p in student.parameters():
            p.add_(1.0)
    again, fresh = inputs.load_inputs(work, config())
    assert len(loads) == 1 and again is first
    assert fresh is not student
    untouched = inputs.new_student(first, config())
    for a, b in zip(fresh.state_dict().values(), untouched.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_other_settings_or_a_replaced_input_file_load_again(job, tmp_path):
    work, loads = job
    before, _ = inputs.load_inputs(work, config())
    inputs.load_inputs(work, config(val_fraction=0.3))
    assert len(loads) == 2
    raw, y, _ = clusters(120, seed=5)
    other = tmp_path / "files" / "other.npz"
    np.savez(other, x=raw, y=y)
    teacher = work.input_files("teacher")[0]
    pipeline.prepare_inputs(work.root, teachers=[teacher], dataset=other)
    loaded, _ = inputs.load_inputs(work, config(val_fraction=0.3))
    assert len(loads) == 3 and loaded.dataset_sha256 != before.dataset_sha256
    rewritten = work.input_files("dataset")[0]
    np.savez(rewritten, x=raw[:60], y=y[:60])  # the same name, new bytes
    loaded, _ = inputs.load_inputs(work, config(val_fraction=0.3))
    assert len(loads) == 4 and len(loaded.y) + len(loaded.y_val) == 60
