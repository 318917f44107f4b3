"""The object-store interface every backend implements, plus the hashing helpers they share."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path

from app.storage.exceptions import NotSupportedByStorage, ObjectTooLarge

READ_CHUNK = 1024 * 1024


class Storage(ABC):
    """Keys are `/`-separated strings from `app.storage.keys`. Ranges are half-open: `[start, end)`."""

    @abstractmethod
    def put_stream(
        self, key: str, chunks: Iterable[bytes], *, max_bytes: int | None = None
    ) -> tuple[int, str]:
        """Store the chunks under `key`; return `(size, sha256 hex)`.

        Past `max_bytes` raise `ObjectTooLarge`; on any failure nothing is left under `key` or beside it.
        """

    @abstractmethod
    def open_read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; deleting what is not there is not an error."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def download_to(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def upload_from(self, path: Path, key: str) -> tuple[int, str]: ...

    @abstractmethod
    def ping(self) -> None:
        """Raise `StorageUnavailable` unless the store answers."""

    def presigned_get(self, key: str, expires: int) -> str:
        raise NotSupportedByStorage("presigned URLs need the S3 backend")


class SizeLimitedHasher:
    """Counts and hashes bytes as they stream past; raises once the running total passes the cap."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._sha = hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise ObjectTooLarge(self.max_bytes)
        self._sha.update(chunk)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def sha256_file(path: Path) -> tuple[int, str]:
    hasher = SizeLimitedHasher(None)
    with path.open("rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            hasher.update(chunk)
    return hasher.size, hasher.hexdigest()
