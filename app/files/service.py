"""Files: streamed uploads, registration of existing S3 objects, listing and deletion, scoped by tenant."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import PurePosixPath
from urllib.parse import urlsplit

import anyio
import anyio.from_thread
import anyio.to_thread
from sqlalchemy.orm import Session

from app.db.base import new_id, utcnow
from app.db.session import on_commit, on_rollback
from app.errors import InvalidRequest
from app.files import repository
from app.files.exceptions import FileInUse, FileNotFound, S3NotConfigured
from app.files.models import PURPOSES, File
from app.files.multipart import MultipartFileReader
from app.jobs import repository as jobs_repository
from app.jobs.models import Job
from app.jobs.state import NON_TERMINAL
from app.paging import split_page
from app.storage import Storage, keys
from app.storage.exceptions import ObjectNotFound, ObjectTooLarge
from app.storage.s3 import S3Storage

MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries allowed on top of the file itself
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")


def clean_filename(name: str | None, fallback: str = "upload") -> str:
    """A display name only (keys never use it): last path segment, no control characters, <= 255 chars."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_NAME.sub("_", name).strip()[:255]
    return name if name not in ("", ".", "..") else fallback


def check_purpose(purpose: str | None) -> str:
    if purpose not in PURPOSES:
        raise InvalidRequest("purpose", f"must be one of {', '.join(PURPOSES)}")
    return purpose


async def upload(
    session: Session,
    storage: Storage,
    tenant_id: str,
    body: AsyncIterator[bytes],
    *,
    content_type: str,
    content_length: int | None,
    purpose: str | None,
    filename: str | None,
    max_bytes: int,
) -> File:
    """Stream a multipart (`file` + `purpose`) or raw body into storage, then record it.

    Runs the parser and the store in a worker thread that pulls body chunks from the event loop, so
    neither the loop nor memory ever holds more than a chunk. Past `max_bytes`: 413, nothing stored.
    """
    multipart = content_type.startswith("multipart/")
    allowance = MULTIPART_OVERHEAD if multipart else 0
    if content_length is not None and content_length > max_bytes + allowance:
        raise ObjectTooLarge(max_bytes)
    if purpose is not None or not multipart:
        check_purpose(purpose)
    file_id = new_id("file")
    key = keys.file_key(tenant_id, file_id)

    async def next_chunk() -> bytes | None:
        async for chunk in body:
            if chunk:
                return chunk
        return None

    def receive() -> bytes | None:
        return anyio.from_thread.run(next_chunk)

    def store() -> tuple[int, str, dict[str, str], str | None]:
        if not multipart:
            return (*storage.put_stream(key, iter(receive, None), max_bytes=max_bytes), {}, None)
        reader = MultipartFileReader(content_type, receive, on_file_start=_check_early_purpose)
        size, sha = storage.put_stream(key, reader.file_chunks(), max_bytes=max_bytes)
        return size, sha, reader.fields, reader.filename

    size, sha, fields, part_name = await anyio.to_thread.run_sync(store)
    try:
        chosen = check_purpose(fields.get("purpose", purpose))
        name = clean_filename(fields.get("filename") or filename or part_name)
        file = File(
            id=file_id, tenant_id=tenant_id, purpose=chosen, filename=name, size=size, sha256=sha, key=key
        )
        await anyio.to_thread.run_sync(_insert, session, file)
    except BaseException:
        await anyio.to_thread.run_sync(storage.delete, key)
        raise
    on_rollback(session, partial(storage.delete, key))  # the row never lands: do not keep its object
    return file


def _check_early_purpose(fields: dict[str, str]) -> None:
    if "purpose" in fields:
        check_purpose(fields["purpose"])


def _insert(session: Session, file: File) -> None:
    session.add(file)
    session.flush()


def register(
    session: Session,
    storage: Storage,
    tenant_id: str,
    *,
    uri: str,
    purpose: str,
    filename: str | None,
    max_bytes: int,
    limits: ShardLimits | None = None,
) -> File:
    """Record an existing `s3://bucket/key` object without copying it (HEAD only); or, for a URI ending in
    `/`, the WebDataset shards (`*.tar`) under that prefix, listed now with their sizes and ETags."""
    if not isinstance(storage, S3Storage):
        raise S3NotConfigured()
    parts = urlsplit(uri)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if parts.scheme != "s3" or not bucket or not key or parts.query or parts.fragment:
        raise InvalidRequest("uri", "expected s3://bucket/key, or s3://bucket/prefix/ for a set of shards")
    if bucket == storage.bucket:
        # The service's own bucket holds every tenant's uploads: registering from it would cross tenants.
        raise InvalidRequest("uri", "objects in the service's own bucket cannot be registered")
    if key.endswith("/"):
        store = storage.with_bucket(bucket)
        return _register_shards(session, store, tenant_id, key, purpose, filename, limits)
    try:
        info = storage.with_bucket(bucket).head(key)
    except ObjectNotFound:
        raise InvalidRequest("uri", "no object exists at this URI", code="object_not_found") from None
    if info.size > max_bytes:
        raise ObjectTooLarge(max_bytes)
    file = File(
        tenant_id=tenant_id,
        purpose=check_purpose(purpose),
        size=info.size,
        sha256=info.sha256,
        bucket=bucket,
        key=key,
        filename=clean_filename(filename or PurePosixPath(key).name),
    )
    _insert(session, file)
    return file


@dataclass(frozen=True)
class ShardLimits:
    """What a dataset registered from a prefix may hold (settings max_registered_shards / _bytes)."""

    shards: int = 100_000
    total_bytes: int = 2 * 1024**4


SHARD_SUFFIX = ".tar"


def _register_shards(
    session: Session,
    store: S3Storage,
    tenant_id: str,
    prefix: str,
    purpose: str,
    filename: str | None,
    limits: ShardLimits | None,
) -> File:
    limits = limits or ShardLimits()
    if purpose != "dataset":
        raise InvalidRequest("purpose", "only a dataset can be registered from a prefix (a set of shards)")
    listed = store.list_objects(prefix, limit=limits.shards)
    shards = [o for o in listed if o.key.endswith(SHARD_SUFFIX) and o.size > 0]
    if len(listed) > limits.shards:
        raise InvalidRequest(
            "uri", f"more than {limits.shards} objects under this prefix", code="too_many_shards"
        )
    if not shards:
        raise InvalidRequest(
            "uri", "no WebDataset shards (*.tar) under this prefix", code="object_not_found"
        )
    total = sum(o.size for o in shards)
    if total > limits.total_bytes:
        raise ObjectTooLarge(limits.total_bytes)
    members = [{"key": o.key, "size": o.size, "etag": o.etag} for o in shards]
    # One digest names the set as listed: the same objects in the same versions give the same digest.
    listing = "".join(f"{m['key']}\t{m['size']}\t{m['etag']}\n" for m in members)
    file = File(
        tenant_id=tenant_id,
        purpose="dataset",
        size=total,
        sha256=hashlib.sha256(listing.encode()).hexdigest(),
        bucket=store.bucket,
        key=prefix,
        filename=clean_filename(filename or PurePosixPath(prefix.rstrip("/")).name or "shards"),
        members=members,
    )
    _insert(session, file)
    return file


def get(session: Session, tenant_id: str, file_id: str) -> File:
    file = repository.get_for_tenant(session, tenant_id, file_id)
    if file is None:
        raise FileNotFound()
    return file


def list_files(
    session: Session, tenant_id: str, *, purpose: str | None, cursor: str | None, limit: int
) -> tuple[list[File], str | None]:
    rows = repository.list_for_tenant(session, tenant_id, purpose=purpose, cursor=cursor, limit=limit)
    return split_page(rows, limit, lambda f: (f.created_at, f.id))


def delete(session: Session, storage: Storage, tenant_id: str, file_id: str) -> None:
    """Soft-delete the row (jobs keep citing it) and remove an uploaded object once the delete commits."""
    file = get(session, tenant_id, file_id)
    users = _unfinished_jobs_using(session, tenant_id, file_id)
    if users:
        raise FileInUse(users)
    file.deleted_at = utcnow()
    session.flush()
    if file.bucket is None:  # a registered object lives in a bucket the service does not own: keep it
        on_commit(session, partial(storage.delete, file.key))


def _unfinished_jobs_using(session: Session, tenant_id: str, file_id: str) -> list[str]:
    unfinished = jobs_repository.list_in_states_for_tenant(session, tenant_id, NON_TERMINAL)
    return [job.id for job in unfinished if file_id in _input_ids(job)]


def _input_ids(job: Job) -> Iterator[str]:
    yield from job.teacher_file_ids
    yield job.dataset_file_id
    for optional in (job.validation_file_id, job.student_init_file_id):
        if optional is not None:
            yield optional


def storage_for(storage: Storage, file: File) -> Storage:
    """The store holding `file`: registered files live in their own bucket."""
    if file.bucket is not None:
        if not isinstance(storage, S3Storage):
            raise S3NotConfigured()
        return storage.with_bucket(file.bucket)
    return storage
