"""Incremental multipart/form-data reading for uploads of any size.

Starlette's `request.form()` spools a whole file before the handler runs; this reader instead feeds body
chunks to `python_multipart`'s streaming parser and hands the `file` part's bytes on as they arrive, so the
object store receives them while the client is still sending and memory holds one chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.files.exceptions import MalformedUpload

MAX_FIELD_BYTES = 1024
TEXT_FIELDS = ("purpose", "filename")


class MultipartFileReader:
    """`receive()` returns the next body chunk, or None at the end. Iterate `file_chunks()` exactly once.

    Afterwards `fields` holds the text fields (`purpose`, `filename`, wherever they were in the body) and
    `filename` the file part's own name. `on_file_start(fields)` runs when the file part begins, so a bad
    field sent before the file is refused before any byte is stored.
    """

    def __init__(
        self,
        content_type: str,
        receive: Callable[[], bytes | None],
        on_file_start: Callable[[dict[str, str]], None] = lambda fields: None,
        file_field: str = "file",
    ) -> None:
        ctype, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if ctype != b"multipart/form-data" or not boundary:
            raise MalformedUpload("expected multipart/form-data with a boundary")
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self._receive = receive
        self._on_file_start = on_file_start
        self._file_field = file_field
        self._pending: list[bytes] = []
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._part: str | None = None
        self._value = bytearray()
        self._in_file = self._file_seen = self._ended = False
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field_data,
                "on_header_value": self._header_value_data,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def file_chunks(self) -> Iterator[bytes]:
        while (chunk := self._receive()) is not None:
            try:
                self._parser.write(chunk)
            except MultipartParseError as exc:
                raise MalformedUpload(f"malformed multipart body: {exc}") from None
            if self._pending:
                pending, self._pending = self._pending, []
                yield from pending
        if not self._ended:
            raise MalformedUpload("the multipart body ended before its closing boundary")
        if not self._file_seen:
            raise MalformedUpload(f"the multipart body has no {self._file_field!r} part")

    def _part_begin(self) -> None:
        self._headers, self._part, self._value = {}, None, bytearray()

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name")
        if disposition != b"form-data" or name is None:
            raise MalformedUpload("each part needs Content-Disposition: form-data; name=...")
        self._part = name.decode("utf-8", "replace")
        if self._part == self._file_field:
            if self._file_seen:
                raise MalformedUpload(f"more than one {self._file_field!r} part")
            self._file_seen = self._in_file = True
            raw_name = params.get(b"filename")
            self.filename = raw_name.decode("utf-8", "replace") if raw_name else None
            self._on_file_start(dict(self.fields))
        elif self._part not in TEXT_FIELDS:
            raise MalformedUpload(f"unexpected form field {self._part!r}; expected file, purpose, filename")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._pending.append(bytes(data[start:end]))
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD_BYTES:
            raise MalformedUpload(f"form field {self._part!r} is longer than {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if self._in_file:
            self._in_file = False
        elif self._part is not None:
            self.fields[self._part] = self._value.decode("utf-8", "replace")

    def _end(self) -> None:
        self._ended = True
