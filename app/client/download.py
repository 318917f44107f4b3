"""Streamed artifact download that survives dropped connections: bytes go to `<path>.part`, a retry asks
for the rest with `Range` (guarded by `If-Range` so a changed file restarts), and the whole is sha256-checked
before it is renamed into place. Memory stays flat whatever the size."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import httpx

from app.client.errors import ChecksumMismatch, ConnectionFailed
from app.client.models import Artifact
from app.client.transport import Transport

log = logging.getLogger("distill.client")
CHUNK = 1024 * 1024


def download_artifact(t: Transport, url: str, path: Path, expected: Artifact) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    etag: str | None = None
    for attempt in range(t.max_retries + 1):
        offset = part.stat().st_size if part.exists() else 0
        if offset > expected.size:  # not ours, or a different file: start over
            part.unlink()
            offset = 0
        if offset and offset == expected.size:
            break
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        if offset and etag:
            headers["If-Range"] = etag
        try:
            response = t.request("GET", url, idempotent=True, stream=True, headers=headers,
                                 follow_redirects=True)
            try:
                etag = response.headers.get("ETag") or etag
                mode = "ab" if response.status_code == 206 and _starts_at(response, offset) else "wb"
                with part.open(mode) as out:
                    for chunk in response.iter_bytes():  # as it arrives: a drop keeps all but the last bytes
                        out.write(chunk)
            finally:
                response.close()
            break
        except httpx.TransportError as exc:  # dropped mid-body: keep what arrived, ask for the rest
            if attempt == t.max_retries:
                raise ConnectionFailed(f"download of {url} kept failing: {exc!r}") from exc
            log.info("download of %s interrupted at %d bytes; resuming", url, _size(part))
            t._sleep(t.delay(attempt))
    digest = _sha256(part)
    if expected.sha256 and digest != expected.sha256:
        part.unlink()
        raise ChecksumMismatch(f"{expected.name}: sha256 {digest} != expected {expected.sha256}; removed")
    part.replace(path)
    return path


def _starts_at(response: httpx.Response, offset: int) -> bool:
    # "bytes 100-199/200": only append when the server really resumed where we stopped.
    content_range: str = response.headers.get("Content-Range", "")
    return content_range.startswith(f"bytes {offset}-")


def _size(p: Path) -> int:
    return p.stat().st_size if p.exists() else 0


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()
