"""The API validates job settings without importing the worker; these checks keep its copies of the core's
names (config fields, methods, students, formats) equal to the core's own, so the two cannot drift."""

from __future__ import annotations

import dataclasses

import pytest

from app.jobs import config_schema
from app.jobs.schemas import JobCreate

core_config = pytest.importorskip("worker.distill.config")


def test_every_core_setting_is_accepted_and_nothing_else() -> None:
    core_fields = {f.name for f in dataclasses.fields(core_config.DistillConfig)} - {"student"}
    # `task` picks the schema (copied from the request, excluded from what is stored)
    api_fields = set(config_schema.DistillConfigSchema.model_fields) - {"task"}
    assert api_fields == core_fields
    core_pre = {f.name for f in dataclasses.fields(core_config.Preprocess)}
    assert set(config_schema.PreprocessSchema.model_fields) == core_pre


def test_defaults_are_the_cores_defaults_and_the_core_accepts_what_the_api_stores() -> None:
    request = JobCreate(teacher_file_ids=["file_a"], dataset_file_id="file_b")
    stored = request.distill_config()
    assert stored == core_config.DistillConfig().to_dict()
    core_config.DistillConfig.from_dict(stored)  # the worker's first step must not fail on our output
    custom = JobCreate(
        teacher_file_ids=["file_a"],
        dataset_file_id="file_b",
        student="cnn:channels=8,16",
        config={
            "method": "dkd",
            "temperature": 3,
            "alpha": 0.5,
            "preprocess": {"scale": 0.5, "mean": 0.1, "std": 0.3},
            "soft_label_format": "topk",
            "export_formats": ["onnx"],
            "teacher_arch": "mlp:hidden=64",
            "augment": {"random_resized_crop": {"scale": [0.5, 1]}, "hflip": True},
            "views": 2,
        },
    ).distill_config()
    assert core_config.DistillConfig.from_dict(custom).augment == {
        "random_resized_crop": {"scale": [0.5, 1.0], "ratio": [0.75, 4 / 3]}, "hflip": True, "seed": 0
    }  # fmt: skip
    augment = pytest.importorskip("worker.distill.augment")
    assert config_schema.MAX_VIEWS == augment.MAX_VIEWS
    assert tuple(config_schema.CropSchema().scale) == augment.DEFAULT_SCALE
    assert tuple(config_schema.CropSchema().ratio) == augment.DEFAULT_RATIO


def test_names_match_the_core_registries() -> None:
    losses = pytest.importorskip("worker.distill.losses")
    students = pytest.importorskip("worker.distill.students")
    teachers = pytest.importorskip("worker.distill.teachers")
    assert set(config_schema.METHODS) == set(losses.METHODS.names())
    text_students = pytest.importorskip("worker.distill.text_students")
    text_names = set(text_students.TEXT_STUDENTS.names())
    assert set(config_schema.STUDENTS) == set(students.STUDENTS.names()) | text_names
    assert set(config_schema.TEXT_STUDENTS) == set(text_students.TEXT_STUDENTS.names())
    assert set(config_schema.TEACHER_FORMATS) == {"auto", *teachers.FORMATS}
    assert config_schema.EXPORT_FORMATS == core_config.EXPORT_FORMATS
    assert config_schema.OPTIMIZERS == core_config.OPTIMIZERS
    assert config_schema.SCHEDULES == core_config.SCHEDULES
    assert config_schema.SOFT_LABEL_FORMATS == core_config.SOFT_LABEL_FORMATS


@pytest.mark.parametrize("spec", ["mlp", "mlp:hidden=128,64;dropout=0.1", "resnet:depth=8", "logreg:"])
def test_student_specs_the_core_parses_are_accepted(spec: str) -> None:
    name, _ = core_config.parse_model_spec(spec)
    assert config_schema.parse_model_spec(spec, "student")[0] == name


@pytest.mark.parametrize(
    "spec",
    ["mlp:hidden=", "mlp:hidden", "mlp:=3", "mlp:dropout=nan", "mlp:hidden=1e999", "mlp:hidden=8,inf"]
    + [":x=1"],
)
def test_both_parsers_refuse_the_same_malformed_specs(spec: str) -> None:
    """One grammar: what the API refuses at submission the core refuses too, and the other way round."""
    errors = pytest.importorskip("worker.distill.errors")
    with pytest.raises(errors.ConfigError):
        core_config.parse_model_spec(spec)
    with pytest.raises(ValueError):
        config_schema.parse_model_spec(spec, "student")


def test_the_clients_job_has_every_field_the_api_shows() -> None:
    """The job's public shape: `JobOut` is the source; the SQL view asserts it follows it (jobs/repository.py)
    and the client's dataclass (which may not import the server's models) is held equal here."""
    from app.client.models import TERMINAL_STATES
    from app.client.models import Job as ClientJob
    from app.jobs.schemas import JobOut
    from app.jobs.state import TERMINAL

    client_fields = [f.name for f in dataclasses.fields(ClientJob) if f.name != "raw"]
    assert client_fields == list(JobOut.model_fields)
    assert TERMINAL_STATES == frozenset(TERMINAL)


def test_every_lm_setting_is_accepted_and_the_core_reads_what_the_api_stores() -> None:
    lm_config = pytest.importorskip("worker.distill.lm_config")
    core_fields = {f.name for f in dataclasses.fields(lm_config.LMConfig)} - {"student"}
    assert set(config_schema.LMConfigSchema.model_fields) == core_fields
    request = JobCreate(task="causal_lm", teacher_file_ids=["file_a"], dataset_file_id="file_b")
    stored = request.distill_config()
    assert (stored["student"], stored["method"], stored["topk"]) == ("causal_lm", "fkl", 64)
    lm_config.LMConfig.from_dict(stored)  # the worker's first step must not fail on our output
    gkd = JobCreate(
        task="causal_lm",
        teacher_file_ids=["file_a"],
        dataset_file_id="file_b",
        student="teacher_layers:keep=0,2",
        config={"method": "gkd", "method_params": {"beta": 0.3}, "temperature": 2},
    ).distill_config()
    assert lm_config.LMConfig.from_dict(gkd).beta == 0.3
