"""A job's input files: described from their rows inside the claim, downloaded into `work/inputs/<slot>/`.

The download happens in the task (which holds the storage credentials); the child only reads the folder.
A copy already there with the recorded sha256 is kept, so a retry or the next stage on the same machine
does not fetch it again. Shard tasks of one job may run side by side on one machine (threads of a worker, or
workers sharing a data folder) in the job's one work folder: its downloads take turns.
"""

from __future__ import annotations

import fcntl
from dataclasses import dataclass
from pathlib import Path

from app.files.models import File
from app.files.service import storage_for
from app.jobs.lifecycle import JobInputs
from app.storage import Storage
from worker.tasks.workspace import fetch, safe_filename


@dataclass(frozen=True)
class InputFile:
    slot: str  # teacher | dataset | validation | student_init: the folder under work/inputs
    name: str  # file name in that folder (ensemble members keep their order through a numeric prefix)
    store: Storage  # the service's own store, or the bucket a registered file lives in
    key: str
    sha256: str | None


def describe(storage: Storage, job_inputs: JobInputs) -> list[InputFile]:
    files: list[InputFile] = []
    many = len(job_inputs.teachers) > 1
    for i, teacher in enumerate(job_inputs.teachers):
        name = safe_filename(teacher.filename, "teacher")
        name = f"{i:02d}-{name}" if many else name
        files.append(InputFile("teacher", name, storage_for(storage, teacher), teacher.key, teacher.sha256))
    slots: tuple[tuple[str, File | None], ...] = (
        ("dataset", job_inputs.dataset),
        ("validation", job_inputs.validation),
        ("student_init", job_inputs.student_init),
    )
    for slot, file in slots:
        if file is not None:
            name = safe_filename(file.filename, slot)
            files.append(InputFile(slot, name, storage_for(storage, file), file.key, file.sha256))
    return files


def download(files: list[InputFile], work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".inputs.lock", "w") as lock:  # released when closed, also by a killed process
        fcntl.flock(lock, fcntl.LOCK_EX)
        _download(files, work)


def _download(files: list[InputFile], work: Path) -> None:
    for item in files:
        folder = work / "inputs" / item.slot
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():  # one input per slot (teachers: exactly the job's list)
            if stale.is_file() and stale.name not in {f.name for f in files if f.slot == item.slot}:
                stale.unlink()
        fetch(item.store, item.key, folder / item.name, sha256=item.sha256)
