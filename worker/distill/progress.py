"""Progress events: what a stage reports while it runs (the service keeps them on the job row)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Progress = Callable[[dict[str, Any]], None]


def emit(
    on_progress: Progress | None,
    stage: str,
    progress: float,
    epoch: int | None = None,
    *,
    phase: str | None = None,
    **metrics: Any,
) -> None:
    """One progress event. The distill stage trains up to three models in turn ("distill", "finetune",
    "baseline"; "autotune" before them) and each counts its epochs from 1, so `phase` says whose epoch it
    is: on the event and in its metrics (what the job row keeps), on every event, resumed runs included."""
    if on_progress is None:
        return
    if phase is not None:
        metrics = {"phase": phase, **metrics}
    event = {"stage": stage, "phase": phase, "progress": min(1.0, progress), "epoch": epoch}
    on_progress({**event, "metrics": metrics})
