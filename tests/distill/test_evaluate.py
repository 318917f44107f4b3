"""The report's numbers: accuracy over labelled rows, agreement, KD gain, sizes and CPU latency."""

import pytest
import torch
from torch import nn

from worker.distill.evaluate import accuracy, agreement, build_report, count_parameters, cpu_latency_ms

torch.set_num_threads(1)


def one_hot_logits(classes: list[int], c: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(classes), c).float()


def test_accuracy_ignores_unlabelled_rows_and_is_none_without_labels():
    logits = one_hot_logits([0, 1, 2, 2])
    assert accuracy(logits, torch.tensor([0, 1, -1, 0])) == pytest.approx(2 / 3)
    assert accuracy(logits, torch.tensor([-1, -1, -1, -1])) is None


def test_agreement_is_top1_fidelity():
    assert agreement(one_hot_logits([0, 1, 2, 2]), one_hot_logits([0, 1, 1, 1])) == 0.5


def test_report_gives_kd_gain_speedup_and_compression():
    y = torch.tensor([0, 1, 2, 0])
    report = build_report(
        y_val=y,
        teacher_logits=one_hot_logits([0, 1, 2, 0]),
        student_logits=one_hot_logits([0, 1, 2, 1]),
        baseline_logits=one_hot_logits([0, 2, 2, 1]),
        teacher={"parameters": 1000, "bytes": 4000, "latency_ms": 8.0},
        student={"parameters": 100, "bytes": 400, "latency_ms": 2.0},
        hyperparameters={"temperature": 2.0, "alpha": 0.5, "why": "given"},
    )
    assert report["teacher"]["accuracy"] == 1.0 and report["student"]["accuracy"] == 0.75
    assert report["baseline"]["accuracy"] == 0.5 and report["kd_gain_points"] == 25.0
    assert report["student"]["agreement"] == 0.75
    assert report["speedup"] == 4.0 and report["compression"] == 10.0
    assert report["labelled_validation_rows"] == 4 and report["hyperparameters"]["alpha"] == 0.5


def test_latency_runs_one_thread_on_a_256_batch_and_restores_threads():
    seen = []

    def fn(x):
        seen.append((x.shape[0], torch.get_num_threads()))
        return x.sum(1, keepdim=True)

    torch.set_num_threads(2)
    try:
        ms = cpu_latency_ms(fn, torch.randn(10, 4), runs=3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert ms > 0 and seen == [(256, 1)] * (2 + 3)  # warm-up runs, then the timed ones


def test_count_parameters():
    assert count_parameters(nn.Linear(4, 3)) == 15
