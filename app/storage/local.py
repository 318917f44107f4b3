"""Local-folder backend: the embedded default. Writes go to a temporary file renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from app.storage.base import READ_CHUNK, SizeLimitedHasher, Storage, sha256_file
from app.storage.exceptions import ObjectNotFound, StorageUnavailable


class LocalStorage(Storage):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        # Writes in progress live here, outside every key's folder: a writer killed mid-object leaves its
        # temporary file where no listing or reader of objects looks. Same filesystem: the rename is atomic.
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not key or key.startswith("/") or not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return path

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path

    def put_stream(
        self, key: str, chunks: Iterable[bytes], *, max_bytes: int | None = None
    ) -> tuple[int, str]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        hasher = SizeLimitedHasher(max_bytes)
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix=f"{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    hasher.update(chunk)
                    fh.write(chunk)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return hasher.size, hasher.hexdigest()

    def open_read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        path = self._existing(key)
        fh = path.open("rb")  # opened eagerly so a missing object fails before the response starts

        def chunks() -> Iterator[bytes]:
            with fh:
                fh.seek(start)
                remaining = None if end is None else end - start
                while remaining is None or remaining > 0:
                    chunk = fh.read(READ_CHUNK if remaining is None else min(READ_CHUNK, remaining))
                    if not chunk:
                        return
                    if remaining is not None:
                        remaining -= len(chunk)
                    yield chunk

        return chunks()

    def size(self, key: str) -> int:
        return self._existing(key).stat().st_size

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def download_to(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._existing(key), path)

    def upload_from(self, path: Path, key: str) -> tuple[int, str]:
        with path.open("rb") as fh:
            return self.put_stream(key, iter(lambda: fh.read(READ_CHUNK), b""))

    def ping(self) -> None:
        if not (self.root.is_dir() and os.access(self.root, os.W_OK)):
            raise StorageUnavailable(f"storage folder {self.root} is not a writable directory")


__all__ = ["LocalStorage", "sha256_file"]
