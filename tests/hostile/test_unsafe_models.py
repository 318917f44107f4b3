"""Model files built to run code or to make a reader go out of bounds are refused before anything runs.

Each file goes in the way a user would send it (upload, submit), and the job fails in preflight with a
stable code; the pickle payloads would create a marker file if anything ever unpickled them.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from tests.hostile.conftest import assert_failed_fast, run_until_verdict
from tests.support.data import npz_bytes, onnx_external_weight
from worker.distill.config import DistillConfig
from worker.distill.errors import TeacherError
from worker.distill.teachers import load_teacher


class Payload:
    """Unpickling this calls open(marker, "w"): any unpickler that honours __reduce__ creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


def legacy_pickle(marker: Path) -> bytes:
    return pickle.dumps({"fc.weight": Payload(marker)}, protocol=2)


def torch_zip_pickle(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"0.weight": torch.zeros(16, 8), "payload": Payload(marker)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("make", [legacy_pickle, torch_zip_pickle], ids=["legacy", "torch_zip"])
def test_a_pickle_teacher_with_a_payload_is_refused_and_never_runs(service, dataset_bytes, tmp_path, make):
    marker = tmp_path / "pwned"
    job, elapsed = run_until_verdict(
        service, ("model.pt", make(marker)), dataset_bytes, teacher_arch="mlp:hidden=16"
    )
    assert_failed_fast(job, elapsed, "unsafe_pickle")
    assert "pickle" in job["error"]["message"]
    assert not marker.exists()


def test_a_pickle_student_init_with_a_payload_never_runs(service, teacher_bytes, dataset_bytes, tmp_path):
    marker = tmp_path / "pwned"
    job, elapsed = run_until_verdict(
        service, teacher_bytes, dataset_bytes, student_init=("init.pt", torch_zip_pickle(marker))
    )
    assert job["status"] == "failed" and elapsed < 30, job
    assert not marker.exists()


def test_an_npz_dataset_holding_pickled_objects_never_runs(service, teacher_bytes, tmp_path):
    marker = tmp_path / "pwned"
    x = np.empty(2, dtype=object)
    x[0], x[1] = Payload(marker), Payload(marker)
    job, _ = run_until_verdict(service, teacher_bytes, ("data.npz", npz_bytes(x=x, y=np.zeros(2, np.int64))))
    assert job["status"] == "failed" and job["error"]["code"] == "bad_dtype", job
    assert not marker.exists()


def safetensors_file(header: dict, data: bytes, declared_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared_len is None else declared_len) + raw + data


def test_safetensors_with_offsets_past_the_end_fails_the_job(service, dataset_bytes):
    header = {"0.weight": {"dtype": "F32", "shape": [16, 8], "data_offsets": [0, 10**12]}}
    job, elapsed = run_until_verdict(
        service,
        ("t.safetensors", safetensors_file(header, b"\0" * 64)),
        dataset_bytes,
        teacher_arch="mlp:hidden=16",
    )
    assert_failed_fast(job, elapsed, "invalid_teacher")


@pytest.mark.parametrize(
    "blob",
    [
        safetensors_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 2**62),
        safetensors_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 2**20),
        safetensors_file({"a": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 4]}}, b"\0" * 4),
        safetensors_file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 4]}}, b"\0" * 16),
    ],
    ids=["header_len_2e62", "header_len_past_end", "shape_overflow", "reversed_offsets"],
)
def test_malformed_safetensors_are_a_teacher_error_not_a_crash(tmp_path, blob):
    path = tmp_path / "t.safetensors"
    path.write_bytes(blob)
    with pytest.raises(TeacherError) as err:
        load_teacher([path], DistillConfig(student="mlp:hidden=8", teacher_arch="mlp:hidden=16"))
    assert err.value.code in ("invalid_teacher", "unknown_teacher_format")


def onnx_with_external_data(location: str) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])],
        initializer=[onnx_external_weight(location)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_onnx_reading_external_data_from_an_absolute_path_fails_the_job(service, dataset_bytes):
    teacher = ("t.onnx", onnx_with_external_data("/etc/passwd"))
    job, elapsed = run_until_verdict(service, teacher, dataset_bytes)
    assert_failed_fast(job, elapsed, "invalid_teacher")
    assert "root:" not in json.dumps(job)  # nothing of the file it pointed at leaks back


@pytest.mark.parametrize("location", ["../../../../etc/passwd", "../dataset/train.npz", "/etc/hostname"])
def test_onnx_external_data_outside_the_model_folder_is_refused(tmp_path, location):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "train.npz").write_bytes(b"\0" * 4096)
    path = tmp_path / "teacher" / "t.onnx"
    path.write_bytes(onnx_with_external_data(location))
    with pytest.raises(TeacherError, match="External data path") as err:
        load_teacher([path], DistillConfig(student="mlp:hidden=8"))
    assert err.value.code == "invalid_teacher"


def test_the_external_data_model_itself_is_valid(tmp_path):
    """The control for the two tests above: the same graph loads when its data sits beside it, so what they
    refuse is the path and nothing else."""
    (tmp_path / "w.bin").write_bytes(np.ones((8, 3), np.float32).tobytes())
    path = tmp_path / "t.onnx"
    path.write_bytes(onnx_with_external_data("w.bin"))
    teacher = load_teacher([path], DistillConfig(student="mlp:hidden=8"))
    torch.testing.assert_close(teacher.logits(torch.ones(2, 8)), torch.full((2, 3), 8.0))
