"""A job's scratch work folder on the worker and its mirror in object storage.

The core reads and writes only the local folder (layout in docs/architecture.md). The task fills `inputs/`
from the job's files, and mirrors the resumable parts (`soft_labels/`, `checkpoints/`) to the job's prefix
so the next stage, or the next attempt on another machine, starts from what is already done. An index object
(`sync-index.json`, relpath -> size and sha256) is written after the objects it names, so it never vouches
for an object that is not fully there; a download is checked against it before it replaces anything.

The shard tasks of a split soft-label stage run on several machines at once, so each mirrors only its own
files, under an index of its own (`shards/<number>-index.json`): they never write the same object. The
worker that finishes the stage adopts their indexes into the job's (the objects are already at the keys it
names), pulls, and pushes the manifest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from app.storage import Storage, keys
from app.storage.base import sha256_file
from app.storage.exceptions import ObjectNotFound

INDEX = "sync-index.json"
MIRRORED = ("soft_labels", "checkpoints")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, fallback: str) -> str:
    """A user's file name as one harmless path segment (the extension stays: formats are detected by it)."""
    base = _UNSAFE.sub("_", Path(name.replace("\\", "/")).name).lstrip(".")
    return base[:120] or fallback


def fetch(storage: Storage, key: str, dest: Path, *, sha256: str | None = None) -> None:
    """Download `key` to `dest` unless an identical copy is there; rename into place only when complete."""
    if dest.is_file() and sha256 is not None and sha256_file(dest)[1] == sha256:
        return
    tmp = dest.with_name(f".{dest.name}.part")
    storage.download_to(key, tmp)
    if sha256 is not None and sha256_file(tmp)[1] != sha256:
        tmp.unlink(missing_ok=True)
        raise OSError(f"download of {key} does not match its recorded sha256")
    os.replace(tmp, dest)


def shard_index(number: int) -> str:
    """The index of the files one shard task of a split soft-label stage mirrors."""
    return f"shards/{number:05d}-index.json"


class WorkMirror:
    """Pushes and pulls `soft_labels/` and `checkpoints/` between `work` and the job's storage prefix.

    `index` and `files`: a mirror of these files only (relpaths), under an index of their own (a shard's).
    """

    def __init__(
        self,
        storage: Storage,
        tenant_id: str,
        job_id: str,
        work: Path,
        *,
        index: str = INDEX,
        files: Collection[str] | None = None,
    ) -> None:
        self.storage, self.tenant_id, self.job_id, self.work = storage, tenant_id, job_id, work
        self.index, self.files = index, None if files is None else frozenset(files)
        self._known: dict[
            str, tuple[int, int, str]
        ] = {}  # relpath -> (mtime_ns, size, sha256): skip rehashing

    def _key(self, relpath: str) -> str:
        return keys.job_work_key(self.tenant_id, self.job_id, relpath)

    def read_index(self, name: str | None = None) -> dict[str, dict[str, Any]]:
        try:
            raw = b"".join(self.storage.open_read(self._key(name or self.index)))
        except ObjectNotFound:
            return {}
        files: dict[str, dict[str, Any]] = json.loads(raw).get("files", {})
        return files

    def _write_index(self, files: dict[str, dict[str, Any]]) -> None:
        self.storage.put_stream(
            self._key(self.index), [json.dumps({"files": files}, sort_keys=True).encode()]
        )

    def local_files(self) -> Iterable[str]:
        for folder in MIRRORED:
            root = self.work / folder
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*")):
                # Dot files and *.tmp are the core's half-written files; they are renamed when complete.
                if (
                    path.is_file()
                    and not path.name.startswith(".")
                    and not path.name.endswith((".tmp", ".part"))
                ):
                    relpath = path.relative_to(self.work).as_posix()
                    if self.files is None or relpath in self.files:
                        yield relpath

    def adopt(self, indexes: Iterable[str]) -> int:
        """Take what other mirrors of this job pushed under `indexes` into this one's index, then drop those
        indexes: their objects are already at the keys this index names, so nothing is copied. The number
        of files adopted."""
        names = list(indexes)
        merged, adopted = self.read_index(), 0
        for name in names:
            files = self.read_index(name)
            merged.update(files)
            adopted += len(files)
        self._write_index(merged)
        for name in names:
            self.storage.delete(self._key(name))
        return adopted

    def _digest(self, relpath: str) -> tuple[int, str]:
        stat = (self.work / relpath).stat()
        cached = self._known.get(relpath)
        if cached and cached[:2] == (stat.st_mtime_ns, stat.st_size):
            return cached[1], cached[2]
        size, sha = sha256_file(self.work / relpath)
        self._known[relpath] = (stat.st_mtime_ns, size, sha)
        return size, sha

    def push(self) -> int:
        """Upload what changed since the index was written; return how many objects were uploaded."""
        index = self.read_index()
        current: dict[str, dict[str, Any]] = {}
        # Pointer files (latest.json, manifest.json) go last: they must never name an object not yet stored.
        ordered = sorted(self.local_files(), key=lambda rel: (rel.endswith(".json"), rel))
        uploaded = 0
        for relpath in ordered:
            try:
                size, sha = self._digest(relpath)
            except FileNotFoundError:  # pruned by the core while we were looking
                continue
            if index.get(relpath, {}).get("sha256") != sha:
                try:
                    self.storage.upload_from(self.work / relpath, self._key(relpath))
                except FileNotFoundError:
                    continue
                uploaded += 1
            current[relpath] = {"size": size, "sha256": sha}
        if uploaded or set(current) != set(index):
            self._write_index(current)
            for gone in set(index) - set(current):
                self.storage.delete(self._key(gone))
        return uploaded

    def pull(self, folders: tuple[str, ...] = MIRRORED) -> int:
        """Download what the index names (in `folders`) and the work folder lacks; the number fetched."""
        fetched = 0
        for relpath, meta in sorted(
            self.read_index().items(), key=lambda kv: (kv[0].endswith(".json"), kv[0])
        ):
            dest = self.work / relpath
            if (
                not dest.resolve().is_relative_to(self.work.resolve())
                or relpath.split("/")[0] not in MIRRORED
                or relpath.split("/")[0] not in folders
                or (self.files is not None and relpath not in self.files)
            ):
                continue  # the index is ours, but a path outside the mirrored folders is never written
            if dest.is_file() and self._digest(relpath)[1] == meta["sha256"]:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                fetch(self.storage, self._key(relpath), dest, sha256=meta["sha256"])
            except (ObjectNotFound, OSError):
                continue  # the core verifies what it resumes from and redoes what is missing
            fetched += 1
        return fetched


def clear(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
