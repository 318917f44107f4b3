"""`distill worker --procs 2` on CPU: the option is the worker's setting, which reaches the distill step in
its sandboxed child; that trains on two processes meeting on the sandbox's loopback, rank 0 alone reports."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.config import Settings, get_settings
from tests.distill.tiny_job import PREPROCESS, write_job
from worker.distill.checkpoints import load_latest_checkpoint
from worker.distill.workfolder import prepare_inputs
from worker.supervisor import StageStopped, run_steps
from worker.tasks.context import sandbox_from
from worker.tasks.steps import SOFT_LABEL_STEPS, distill_step


def test_the_procs_option_is_the_setting_every_stage_child_gets(monkeypatch):
    from worker.cli import app

    monkeypatch.setenv("DISTILL_SANDBOX", "off")  # --check-sandbox then answers without starting a child
    monkeypatch.setenv("DISTILL_WORKER_PROCS", "1")  # restored afterwards, whatever the option writes
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["worker", "--procs", "3", "--check-sandbox"])
        assert result.exit_code == 0, result.output
        assert get_settings().worker_procs == 3
        assert sandbox_from(get_settings()).procs == 3
    finally:
        get_settings.cache_clear()


def _job(folder: Path, **config) -> tuple[Path, dict]:
    """A work folder holding a tiny job's inputs, and its config (fixed method, T and alpha: no autotune)."""
    teacher, dataset = write_job(folder / "job", rows=400, unlabelled=50)
    prepare_inputs(folder / "work", teachers=[teacher], dataset=dataset)
    fixed = {"method": "hinton", "temperature": 2.0, "alpha": 0.5, "batch_size": 32}
    return folder / "work", {"preprocess": PREPROCESS, "student": "mlp:hidden=16", **fixed, **config}


def _distill_epochs(messages: list[dict]) -> list[tuple[str, int]]:
    return [
        (m["event"]["metrics"]["phase"], m["event"]["epoch"])
        for m in messages
        if m["type"] == "progress" and m["event"]["stage"] == "distill" and m["event"]["epoch"] is not None
    ]


STEPS = [*SOFT_LABEL_STEPS, ("distill", distill_step)]
TWO_PROCESSES = sandbox_from(Settings(sandbox="bwrap", worker_procs=2))


def test_a_distill_stage_on_two_processes_runs_in_the_sandbox_and_reports_once(tmp_path: Path):
    work, config = _job(tmp_path, epochs=2)
    messages: list[dict] = []
    results = run_steps(
        STEPS, work, config, sandbox=TWO_PROCESSES, on_message=messages.append, should_stop=lambda: None
    )

    phases = results["distill"]["phases"]
    assert set(phases) == {"distill", "baseline"}
    for phase in phases.values():
        assert {"epochs", "best_epoch", "best_metric", "metric", "history"} <= set(phase)
        assert [r["epoch"] for r in phase["history"]] == [1, 2]
    # From rank 0 only: one event per epoch.
    assert _distill_epochs(messages) == [("distill", 1), ("distill", 2), ("baseline", 1), ("baseline", 2)]
    for folder in (work / "checkpoints", work / "checkpoints" / "baseline"):
        checkpoint = load_latest_checkpoint(folder)
        assert checkpoint is not None and checkpoint["run"]["processes"] == 2
        assert len(checkpoint["replica_rng"]) == 1  # rank 1's random state, written by rank 0


def test_a_stop_from_the_parent_ends_every_process_through_the_train_loop(tmp_path: Path):
    work, config = _job(tmp_path, epochs=100, baseline=False)
    messages: list[dict] = []

    def cancel_after_the_first_epoch() -> str | None:
        return "cancelled" if _distill_epochs(messages) else None

    with pytest.raises(StageStopped) as stopped:
        run_steps(
            STEPS, work, config, sandbox=TWO_PROCESSES, on_message=messages.append,
            should_stop=cancel_after_the_first_epoch, stop_check_interval=0.05,
        )  # fmt: skip
    # Exit status 0: rank 0 ended through its stop hook, so rank 1 stopped with it at the same step (a rank
    # left waiting in a collective would have held rank 0 until the parent's SIGKILL).
    assert stopped.value.exitcode == 0
    checkpoint = load_latest_checkpoint(work / "checkpoints")
    assert checkpoint is not None and 1 <= checkpoint["epoch"] < 100
    reported = _distill_epochs(messages)  # the parent drops what comes after it asked to stop
    assert (
        reported == [("distill", e) for e in range(1, len(reported) + 1)]
        and len(reported) <= checkpoint["epoch"]
    )
