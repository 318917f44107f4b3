"""A job's input files: described from their rows inside the claim, downloaded into `work/inputs/<slot>/`.

The download happens in the task (which holds the storage credentials); the child only reads the folder.
A copy already there with the recorded sha256 is kept, so a retry or the next stage on the same machine
does not fetch it again. Shard tasks of one job may run side by side on one machine (threads of a worker, or
workers sharing a data folder) in the job's one work folder: its downloads take turns.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.files.models import File
from app.files.service import storage_for
from app.jobs.lifecycle import JobInputs
from app.storage import Storage
from app.storage.s3 import S3Storage
from worker.tasks.workspace import fetch, safe_filename


@dataclass(frozen=True)
class InputFile:
    slot: str  # teacher | dataset | validation | student_init: the folder under work/inputs
    name: str  # file name in that folder (ensemble members keep their order through a numeric prefix)
    store: Storage  # the service's own store, or the bucket a registered file lives in
    key: str
    sha256: str | None
    # A dataset registered from a prefix: its shard objects ({"key", "size", "etag"}), fetched into a
    # folder named `name` (one file per shard), which the stage child streams from.
    members: tuple[dict[str, Any], ...] = ()


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
            members = tuple(file.members or ())
            files.append(InputFile(slot, name, storage_for(storage, file), file.key, file.sha256, members))
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
            if stale.name not in {f.name for f in files if f.slot == item.slot}:
                if stale.is_dir():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
        if item.members:
            _fetch_shards(item, folder / item.name)
        else:
            fetch(item.store, item.key, folder / item.name, sha256=item.sha256)


def _fetch_shards(item: InputFile, folder: Path) -> None:
    """Each shard object of a dataset registered from a prefix, one at a time, into `folder`: the version
    listed at registration (its ETag) and size; a shard already there at that size is kept."""
    if not isinstance(item.store, S3Storage):  # registration only takes prefixes of an S3 bucket
        raise TypeError("a set of shards lives in an S3 bucket")
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}-{safe_filename(m['key'], 'shard.tar')}" for i, m in enumerate(item.members)]
    for stale in folder.iterdir():
        if stale.name not in names:
            stale.unlink()
    for name, member in zip(names, item.members, strict=True):
        dest = folder / name
        if dest.is_file() and dest.stat().st_size == member["size"]:
            continue
        tmp = folder / f".{name}.part"
        item.store.download_to(member["key"], tmp, etag=member["etag"])
        if tmp.stat().st_size != member["size"]:
            tmp.unlink(missing_ok=True)
            raise OSError(f"shard {member['key']} is not the size it was registered with")
        os.replace(tmp, dest)
