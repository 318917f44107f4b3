"""The steps a task runs in its child process: the core's pipeline stages, called with a plain config dict.

Module-level functions, because the spawned child imports them by name. Imports of the core happen inside,
so the worker's parent process never loads torch. Results go back as JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

OnProgress = Callable[[dict[str, Any]], None]


def _config(config: dict[str, Any]) -> Any:
    from worker.distill.config import DistillConfig

    return DistillConfig.from_dict(config)


def preflight_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    from worker.distill import pipeline

    return pipeline.preflight(work, _config(config))


def soft_label_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    from worker.distill import pipeline

    return pipeline.soft_label(work, _config(config), on_progress)


def distill_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    from worker.distill import pipeline

    return pipeline.distill(work, _config(config), on_progress)


def evaluate_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    from worker.distill import pipeline

    return pipeline.evaluate(work, _config(config))


def export_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> list[str]:
    from worker.distill import pipeline

    return [Path(p).name for p in pipeline.export(work, _config(config))]


SOFT_LABEL_STEPS = [("preflight", preflight_step), ("soft_label", soft_label_step)]
DISTILL_STEPS = [("distill", distill_step), ("evaluate", evaluate_step), ("export", export_step)]
