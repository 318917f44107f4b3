"""Serving a stored object over HTTP: Content-Length, a strong ETag from the sha256, single byte ranges
(206 / 416), If-None-Match (304), or a redirect to a presigned URL."""

from __future__ import annotations

import re
from urllib.parse import quote

from fastapi import Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from app.errors import AppError
from app.storage.base import Storage

_RANGE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$")
# No object has 20 digits of bytes, so a longer position only says "past the end"; it is never handed to
# int(), which refuses over 4300 digits (a 500) and is quadratic in the length below that.
_MAX_DIGITS = 19
_BEYOND_ANY_OBJECT = 10**_MAX_DIGITS


class RangeNotSatisfiable(AppError):
    status, code, title = 416, "range_not_satisfiable", "Range not satisfiable"

    def __init__(self, size: int) -> None:
        super().__init__(
            f"the requested range is outside the object's {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )


def byte_position(digits: str) -> int:
    """A decimal byte count or offset from a header (ASCII digits), without int()'s limit on long numbers."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else _BEYOND_ANY_OBJECT


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`Range` -> half-open `(start, end)`, or None to send everything (absent, multi-range or unparsable
    headers are ignored, as RFC 9110 allows). Raises `RangeNotSatisfiable`."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None or match.group(0) == "bytes=-":
        return None
    first, last = match.groups()
    if first == "":  # suffix: the last N bytes
        length = byte_position(last)
        if length == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - length), size
    start = byte_position(first)
    last_byte = None if last == "" else byte_position(last)
    if start >= size or (last_byte is not None and last_byte < start):
        raise RangeNotSatisfiable(size)
    return start, size if last_byte is None else min(last_byte + 1, size)


def object_response(
    request: Request,
    storage: Storage,
    key: str,
    *,
    size: int,
    sha256: str,
    content_type: str,
    filename: str,
    presign_expires: int | None = None,
) -> Response:
    if presign_expires is not None:
        return RedirectResponse(storage.presigned_get(key, presign_expires), status_code=307)
    etag = f'"{sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(filename)}",
    }
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    byte_range = parse_range(request.headers.get("range"), size)
    if_range = request.headers.get("if-range")
    if byte_range is not None and if_range is not None and if_range.strip() != etag:
        byte_range = None  # the client's copy is stale: send the whole current object
    if byte_range is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(storage.open_read(key), media_type=content_type, headers=headers)
    start, end = byte_range
    headers.update({"Content-Length": str(end - start), "Content-Range": f"bytes {start}-{end - 1}/{size}"})
    return StreamingResponse(
        storage.open_read(key, start, end), status_code=206, media_type=content_type, headers=headers
    )
