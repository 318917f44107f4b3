"""Datasets that cannot work fail the job in preflight, within seconds, with a code and a sentence a user
can act on (the core's own tests cover every code on its own; these prove the service path)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.hostile.conftest import assert_failed_fast, run_until_verdict
from tests.support.data import npz_bytes

RNG = np.random.default_rng(3)


def rows(n: int, features: int = 8) -> np.ndarray:
    return RNG.normal(size=(n, features)).astype(np.float32)


def labels(n: int, classes: int = 3) -> np.ndarray:
    return RNG.integers(0, classes, n).astype(np.int64)


def with_nan() -> bytes:
    x = rows(60)
    x[17, 3] = np.nan
    return npz_bytes(x=x, y=labels(60))


def label_too_high() -> bytes:
    y = labels(60)
    y[5] = 7  # the teacher has 3 classes
    return npz_bytes(x=rows(60), y=y)


CASES = {
    "empty": (lambda: npz_bytes(x=np.zeros((0, 8), np.float32), y=np.zeros(0, np.int64)), "empty_dataset"),
    "flat_x": (lambda: npz_bytes(x=rows(60).ravel(), y=labels(60)), "bad_shape"),
    "wrong_feature_count": (lambda: npz_bytes(x=rows(60, features=5), y=labels(60)), "shape_mismatch"),
    "nan": (with_nan, "non_finite"),
    "label_out_of_range": (label_too_high, "label_out_of_range"),
    "class_count_mismatch": (
        lambda: npz_bytes(x=rows(60), y=labels(60), class_names=np.array(["a", "b", "c", "d", "e"])),
        "class_count_mismatch",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_dataset_that_cannot_work_fails_in_preflight(service, teacher_bytes, case):
    make, code = CASES[case]
    job, elapsed = run_until_verdict(service, teacher_bytes, ("data.npz", make()))
    assert_failed_fast(job, elapsed, code)
    assert job["timestamps"].get("distilling") is None  # refused before any training
