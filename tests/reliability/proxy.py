"""A TCP forwarder for outage tests: put it in front of a shared service (PostgreSQL, an S3 server), then
`down()` (the port refuses, open connections are cut: what a restart looks like to clients) and `up()` on the
same port. The shared service itself is never touched."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from tests.support.processes import free_port


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._refusing = False
        self.refused = 0  # connections cut while `down(listen=True)`: how often a client tried again

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self, coro) -> None:  # type: ignore[no-untyped-def]
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def up(self) -> None:
        self._refusing = False
        if self._server is not None:
            return

        async def listen() -> None:
            self._server = await asyncio.start_server(
                self._accept, "127.0.0.1", self.port, reuse_address=True
            )

        self._run(listen())

    def down(self, *, listen: bool = False) -> None:
        """Cut every connection; new ones are refused, or with `listen` accepted, counted and cut at once."""

        async def close() -> None:
            self._refusing = listen
            if self._server is not None and not listen:
                self._server.close()
                self._server = None
            for writer in list(self._writers):
                writer.transport.abort()  # RST, as a dying server's kernel would send
            self._writers.clear()

        self._run(close())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()
        self._writers.discard(writer)
