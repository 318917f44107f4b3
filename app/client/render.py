"""Plain-text and JSON renderings of jobs and events, shared by the CLI commands."""

from __future__ import annotations

import json
from typing import Any

from app.client.models import Event, Job
from app.client.progress import val_accuracy


def job_dict(job: Job) -> dict[str, Any]:
    return dict(job.raw)


def job_line(job: Job) -> str:
    stage = job.stage or "-"
    return f"{job.id}  {job.status:<13} {stage:<13} {100 * job.progress:5.1f}%  {job.created_at}"


def job_summary(job: Job) -> str:
    lines = [f"job       {job.id}", f"status    {job.status}"]
    if job.stage and not job.done:
        lines.append(f"stage     {job.stage} ({100 * job.progress:.0f}%)")
    if job.epoch is not None:
        lines.append(f"epoch     {job.epoch}")
    acc = val_accuracy(job.metrics)
    if acc is not None:
        lines.append(f"val acc   {acc:.4f}")
    for state, when in job.timestamps.items():
        if when:
            lines.append(f"  {state:<14}{when}")
    if job.error:
        lines.append(f"error     {job.error.get('code')}: {job.error.get('message')}")
    return "\n".join(lines)


def event_line(event: Event) -> str:
    data = json.dumps(event.data, separators=(",", ":"), default=str)
    return f"{event.seq:>5} {event.created_at} {event.kind:<16} {data}"
