"""S3 backend (AWS, MinIO) over boto3. Uploads stream as multipart parts, so memory holds one part at most."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.storage.base import READ_CHUNK, SizeLimitedHasher, Storage, sha256_file
from app.storage.exceptions import ObjectChanged, ObjectNotAccessible, ObjectNotFound, StorageUnavailable

PART_BYTES = 8 * 1024 * 1024  # S3 needs >= 5 MiB for every part but the last
MAX_BACKOFF_S = 15.0


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    sha256: str | None  # only when the store kept a full-object SHA-256 checksum


@dataclass(frozen=True)
class ListedObject:
    key: str
    size: int
    etag: str


def make_client(endpoint_url: str | None, region: str, access_key: str | None, secret_key: str | None) -> Any:
    config = Config(
        signature_version="s3v4",
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=config,
    )


def _missing(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


def _unavailable(exc: Exception) -> bool:
    """The store is away (refused, timeout, 5xx, throttling), as opposed to the request being bad."""
    if isinstance(exc, BotoCoreError):
        return True
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code"))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout", "ServiceUnavailable")
    return False


class S3Storage(Storage):
    def __init__(
        self, client: Any, bucket: str, *, part_bytes: int = PART_BYTES, retry_budget_s: float = 0.0
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.part_bytes = part_bytes
        # Beyond botocore's own quick retries: keep trying an unavailable store this long (0: give up).
        self.retry_budget_s = retry_budget_s

    def with_bucket(self, bucket: str) -> S3Storage:
        """The same client on another bucket: files registered from `s3://other-bucket/key`."""
        return S3Storage(self.client, bucket, part_bytes=self.part_bytes, retry_budget_s=self.retry_budget_s)

    def _patient(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` again with exponential backoff while the store is unavailable and the budget lasts."""
        deadline = time.monotonic() + self.retry_budget_s
        delay = 0.5
        while True:
            try:
                return fn()
            except (ClientError, BotoCoreError) as exc:
                left = deadline - time.monotonic()
                if not _unavailable(exc) or left <= 0:
                    raise
                time.sleep(min(delay, left))
                delay = min(delay * 2, MAX_BACKOFF_S)

    def _call(self, key: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return self._patient(lambda: fn(Bucket=self.bucket, **kwargs))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if _missing(exc):
                raise ObjectNotFound(key) from exc
            if code in ("403", "AccessDenied", "Forbidden"):
                raise ObjectNotAccessible(f"access to s3://{self.bucket}/{key} is denied") from exc
            raise StorageUnavailable(f"object storage refused the request ({code})") from exc
        except BotoCoreError as exc:  # connection refused, timeouts: the store is down, not the request bad
            raise StorageUnavailable(f"object storage unreachable: {exc}") from exc

    def put_stream(
        self, key: str, chunks: Iterable[bytes], *, max_bytes: int | None = None
    ) -> tuple[int, str]:
        hasher = SizeLimitedHasher(max_bytes)
        buffer = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            for chunk in chunks:
                hasher.update(chunk)
                buffer += chunk
                while len(buffer) >= self.part_bytes:
                    if upload_id is None:
                        upload_id = self._call(key, self.client.create_multipart_upload, Key=key)["UploadId"]
                    part, buffer = bytes(buffer[: self.part_bytes]), bytearray(buffer[self.part_bytes :])
                    etag = self._call(
                        key,
                        self.client.upload_part,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=len(parts) + 1,
                        Body=part,
                    )["ETag"]
                    parts.append({"ETag": etag, "PartNumber": len(parts) + 1})
            if upload_id is None:
                self._call(key, self.client.put_object, Key=key, Body=bytes(buffer))
            else:
                if buffer or not parts:
                    etag = self._call(
                        key,
                        self.client.upload_part,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=len(parts) + 1,
                        Body=bytes(buffer),
                    )["ETag"]
                    parts.append({"ETag": etag, "PartNumber": len(parts) + 1})
                self._call(
                    key,
                    self.client.complete_multipart_upload,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            if upload_id is not None:  # an aborted upload leaves no parts billed or visible
                try:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                except (ClientError, BotoCoreError):
                    pass
            raise
        return hasher.size, hasher.hexdigest()

    def open_read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if end is not None and end <= start:
            return iter(())
        byte_range = f"bytes={start}-" + ("" if end is None else str(end - 1))
        body = self._call(key, self.client.get_object, Key=key, Range=byte_range)["Body"]

        def chunks() -> Iterator[bytes]:
            with body:
                yield from body.iter_chunks(READ_CHUNK)

        return chunks()

    def head(self, key: str) -> ObjectInfo:
        meta = self._call(key, self.client.head_object, Key=key, ChecksumMode="ENABLED")
        checksum = meta.get("ChecksumSHA256")
        sha = None
        if checksum and "-" not in checksum and meta.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
            sha = base64.b64decode(checksum).hex()
        return ObjectInfo(size=int(meta["ContentLength"]), sha256=sha)

    def size(self, key: str) -> int:
        return self.head(key).size

    def list_objects(self, prefix: str, *, limit: int) -> list[ListedObject]:
        """The objects under `prefix`, in key order; at most `limit` + 1 (so a caller can tell "too many")."""
        found: list[ListedObject] = []
        kwargs: dict[str, Any] = {"Prefix": prefix}
        while len(found) <= limit:
            page = self._call(prefix, self.client.list_objects_v2, **kwargs)
            for item in page.get("Contents", []):
                found.append(ListedObject(item["Key"], int(item["Size"]), str(item["ETag"]).strip('"')))
            if not page.get("IsTruncated"):
                break
            kwargs["ContinuationToken"] = page["NextContinuationToken"]
        return found[: limit + 1]

    def delete(self, key: str) -> None:
        self._call(key, self.client.delete_object, Key=key)

    def exists(self, key: str) -> bool:
        try:
            self._call(key, self.client.head_object, Key=key)
        except ObjectNotFound:
            return False
        return True

    def download_to(self, key: str, path: Path, *, etag: str | None = None) -> None:
        """`etag`: the object must still be that version (a changed one raises ObjectChanged)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if etag is not None:
            self._download_version(key, path, etag)
            return
        try:
            self._patient(lambda: self.client.download_file(self.bucket, key, str(path)))
        except ClientError as exc:
            if _missing(exc):
                raise ObjectNotFound(key) from exc
            raise
        except BotoCoreError as exc:
            raise StorageUnavailable(f"object storage unreachable: {exc}") from exc

    def _download_version(self, key: str, path: Path, etag: str) -> None:
        """A GET conditional on the ETag (s3transfer's download_file takes no IfMatch), streamed to `path`."""
        try:
            response = self._patient(
                lambda: self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=f'"{etag}"')
            )
            body = response["Body"]
            with body, open(path, "wb") as out:
                for chunk in body.iter_chunks(READ_CHUNK):
                    out.write(chunk)
        except ClientError as exc:
            if _missing(exc):
                raise ObjectNotFound(key) from exc
            if exc.response.get("Error", {}).get("Code") in ("412", "PreconditionFailed"):
                raise ObjectChanged(f"s3://{self.bucket}/{key} changed since it was registered") from exc
            raise
        except BotoCoreError as exc:
            raise StorageUnavailable(f"object storage unreachable: {exc}") from exc

    def upload_from(self, path: Path, key: str) -> tuple[int, str]:
        size, sha = sha256_file(path)
        try:
            self._patient(lambda: self.client.upload_file(str(path), self.bucket, key))
        except BotoCoreError as exc:
            raise StorageUnavailable(f"object storage unreachable: {exc}") from exc
        return size, sha

    def presigned_get(self, key: str, expires: int) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires
        )
        return url

    def ping(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise StorageUnavailable(f"bucket {self.bucket!r} is not reachable: {exc}") from exc
