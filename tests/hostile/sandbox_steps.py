"""Stage steps for tests/hostile/test_sandbox.py: the real preflight and soft-label steps with the TorchScript
operator check switched off inside the child, so a hostile teacher's file operators really run and only the
sandbox stands between them and the worker's files. Module-level: the sandboxed child imports them by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.tasks import steps


def _without_operator_check() -> None:
    from worker.distill import torchscript_guard

    torchscript_guard.check_archive_source = lambda path: None  # type: ignore[assignment]
    torchscript_guard.check_module = lambda module: None  # type: ignore[assignment]


def unguarded_preflight(work: Path, config: dict[str, Any], on_progress: Any) -> Any:
    _without_operator_check()
    return steps.preflight_step(work, config, on_progress)


def unguarded_soft_label(work: Path, config: dict[str, Any], on_progress: Any) -> Any:
    _without_operator_check()
    return steps.soft_label_step(work, config, on_progress)


UNGUARDED_SOFT_LABEL_STEPS = [("preflight", unguarded_preflight), ("soft_label", unguarded_soft_label)]
